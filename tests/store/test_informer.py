"""The informer (ipam_blocks/store/informer.py) over SQLite and the Kubernetes API double: its
pure diff, resumes without loss, one relist after expiry, API restarts, backoff, stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ipam_blocks.errors import StoreUnavailable
from ipam_blocks.retry import RetryBudget
from ipam_blocks.selector import EVERYTHING, LabelSelector, parse_selector_text
from ipam_blocks.store import EventType, Listing, Resource, Store, WatchEvent
from ipam_blocks.store.informer import Change, Informer, apply_event, diff_listing
from tests.store.conftest import StoreBackend
from tests.store.test_list_watch_contract import compact_history, peer, pool, relabel, with_nat

FAST_BACKOFF = RetryBudget(attempts=0, base_delay=0.02, max_delay=0.1)


def res(name: str, revision: str) -> Resource:
    return Resource("IPPool", name, {"cidr": "10.0.0.0/16"}, revision=revision)


# ---------------------------------------------------------------------------------------------
# the pure parts


def test_diff_listing_names_what_changed_and_nothing_else() -> None:
    cache = {"gone": res("gone", "1"), "same": res("same", "2"), "moved": res("moved", "3")}
    listed = [res("same", "2"), res("moved", "9"), res("new", "8")]
    assert diff_listing(cache, listed) == [
        Change(EventType.DELETED, cache["gone"], None),
        Change(EventType.MODIFIED, cache["moved"], listed[1]),
        Change(EventType.ADDED, None, listed[2]),
    ]
    assert diff_listing({}, []) == []
    assert diff_listing({"same": res("same", "2")}, [res("same", "2")]) == []


def test_apply_event_skips_what_the_cache_already_has() -> None:
    cache = {"a": res("a", "5")}
    assert apply_event(cache, WatchEvent(EventType.ADDED, res("a", "5"))) is None  # repeated
    assert apply_event(cache, WatchEvent(EventType.DELETED, res("b", "6"))) is None  # unseen
    assert apply_event(cache, WatchEvent.bookmark("IPPool", "7")) is None
    new = res("a", "6")
    assert apply_event(cache, WatchEvent(EventType.ADDED, new)) == Change(
        EventType.MODIFIED, cache["a"], new
    )
    assert apply_event(cache, WatchEvent(EventType.MODIFIED, res("c", "7"))) == Change(
        EventType.ADDED, None, res("c", "7")
    )
    assert apply_event(cache, WatchEvent(EventType.DELETED, res("a", "8"))) == Change(
        EventType.DELETED, cache["a"], None
    )


# ---------------------------------------------------------------------------------------------
# helpers


class Recorder:
    """The handler: every change as (type, name, revision of new or old)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.changed = threading.Condition()

    def __call__(self, type_: EventType, old: Resource | None, new: Resource | None) -> None:
        obj = new if new is not None else old
        assert obj is not None
        with self.changed:
            self.seen.append((str(type_), obj.name, obj.revision))
            self.changed.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, str, str | None]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.seen) >= n, timeout), self.seen
            return list(self.seen)


class HookedStore:
    """A store that runs test hooks around list pages and watches; the rest passes through."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lists: list[str | None] = []  # continue token of each list call
        self.watches: list[str] = []
        self.on_page: Callable[[int], None] = lambda page: None
        self.before_watch: Callable[[int], None] = lambda n: None
        self.fail_lists = 0

    def list(
        self,
        kind: str,
        selector: LabelSelector = EVERYTHING,
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> Listing:
        self.lists.append(continue_token)
        if self.fail_lists:
            self.fail_lists -= 1
            raise StoreUnavailable("injected")
        self.on_page(sum(1 for t in self.lists if t is not None))
        return self.store.list(kind, selector, limit=limit, continue_token=continue_token)

    def watch(self, kind: str, since: str, timeout: float, **kw: Any) -> Iterator[WatchEvent]:
        self.watches.append(since)
        self.before_watch(len(self.watches))
        return self.store.watch(kind, since, timeout, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
def informers() -> Iterator[list[Informer]]:
    started: list[Informer] = []
    yield started
    for informer in started:
        informer.stop()


def start(
    informers: list[Informer], store: Any, kind: str = "IPPool", **kw: Any
) -> tuple[Informer, Recorder]:
    recorder = Recorder()
    kw = {"start_jitter": 0, "watch_timeout": 0.3, "backoff": FAST_BACKOFF, **kw}
    informer = Informer(store, kind, recorder, **kw).start()
    informers.append(informer)
    assert informer.synced.wait(10)
    return informer, recorder


# ---------------------------------------------------------------------------------------------
# over both backends


def test_first_list_is_paged_and_handed_over_as_added(
    store_backend: StoreBackend, informers: list[Informer]
) -> None:
    store = store_backend.store
    created = [store.create(pool(f"p{i}", i)) for i in range(5)]
    hooked = HookedStore(store)
    informer, recorder = start(informers, hooked, page_size=2)
    assert len(hooked.lists) == 3  # pages of 2
    assert recorder.seen == [("ADDED", o.name, o.revision) for o in created]
    assert informer.items() == created and informer.size == 5
    assert informer.get("p3") == created[3] and informer.get("nope") is None
    assert informer.revision == store.list("IPPool").revision


def test_watches_that_end_quietly_resume_without_losing_an_event(
    store_backend: StoreBackend, informers: list[Informer]
) -> None:
    store, writer = store_backend.store, store_backend.open()
    if store_backend.double is not None:
        # timeoutSeconds is whole seconds: the server ends each watch request early instead.
        store_backend.double.max_watch_seconds = 0.15
    informer, recorder = start(informers, store, watch_timeout=0.2)
    expected = []
    for i in range(4):
        time.sleep(0.5)  # longer than a watch stays quiet: every change lands in a new watch
        a = writer.create(pool(f"p{i}", i))
        expected.append(("ADDED", a.name, a.revision))
        writer.create(peer(f"other-{i}"))
    assert recorder.wait_for(4) == expected
    time.sleep(0.3)
    assert recorder.seen == expected  # none twice
    assert informer.relists == 0 and informer.watch_restarts >= 3


def test_an_expired_watch_relists_once_and_hands_over_what_changed(
    store_backend: StoreBackend, informers: list[Informer]
) -> None:
    """The history after the list is compacted before the watch starts: one relist, diffed
    against the cache, delivers the changes made meanwhile exactly once."""
    store, writer = store_backend.store, store_backend.open()
    a, b = store.create(pool("a", 1)), store.create(pool("b", 2))
    hooked = HookedStore(store)
    gate = threading.Event()
    hooked.before_watch = lambda n: gate.wait(10) if n == 1 else None
    informer, recorder = start(informers, hooked)
    a2 = writer.update(with_nat(a))
    writer.delete("IPPool", "b")
    c = writer.create(pool("c", 3))
    compact_history(store_backend)
    gate.set()
    seen = recorder.wait_for(5)
    assert seen[2:] == [
        ("DELETED", "b", b.revision),
        ("MODIFIED", "a", a2.revision),
        ("ADDED", "c", c.revision),
    ]
    d = writer.create(pool("d", 4))  # and the watch goes on from the relist
    assert recorder.wait_for(6)[5:] == [("ADDED", "d", d.revision)]
    assert informer.relists == 1
    assert [o.name for o in informer.items()] == ["a", "c", "d"]


def test_a_change_made_during_the_list_is_not_lost(
    store_backend: StoreBackend, informers: list[Informer]
) -> None:
    store, writer = store_backend.store, store_backend.open()
    first = [store.create(pool(f"p{i}", i)) for i in range(4)]
    hooked = HookedStore(store)
    late: list[Resource] = []

    def write_between_pages(page: int) -> None:
        if page == 1:  # before the second page
            late.append(writer.update(with_nat(first[0])))
            late.append(writer.create(pool("p9", 9)))

    hooked.on_page = write_between_pages
    informer, recorder = start(informers, hooked, page_size=2)
    seen = recorder.wait_for(6)
    assert seen == [
        *(("ADDED", o.name, o.revision) for o in first),
        ("MODIFIED", "p0", late[0].revision),
        ("ADDED", "p9", late[1].revision),
    ]
    assert informer.relists == 0


def test_store_errors_back_off_then_sync(
    store_backend: StoreBackend, informers: list[Informer]
) -> None:
    hooked = HookedStore(store_backend.store)
    hooked.fail_lists = 10**6
    informer = Informer(
        hooked, "IPPool", start_jitter=0, backoff=RetryBudget(0, base_delay=0.05, max_delay=0.2)
    ).start()
    informers.append(informer)
    time.sleep(1.0)
    # Without backoff this would be thousands; with it ~10 (mean pause ~0.1 s once capped).
    assert 3 <= len(hooked.lists) <= 40
    assert not informer.synced.is_set()
    hooked.fail_lists = 0
    assert informer.synced.wait(2)


def test_a_scoped_informer_holds_only_selected_objects(
    store_backend: StoreBackend, informers: list[Informer]
) -> None:
    store = store_backend.store
    mine = store.create(pool("mine", 1, {"node": "n1"}))
    store.create(pool("theirs", 2, {"node": "n2"}))
    informer, recorder = start(informers, store, selector=parse_selector_text("node=n1"))
    assert [o.name for o in informer.items()] == ["mine"]
    moved = store.update(relabel(mine, {"node": "n2"}))
    assert recorder.wait_for(2)[1] == ("DELETED", "mine", mine.revision)
    store.update(with_nat(moved))
    back = store.create(pool("new", 3, {"node": "n1"}))
    assert recorder.wait_for(3)[2:] == [("ADDED", "new", back.revision)]
    assert [o.name for o in informer.items()] == ["new"]


def test_stop_is_prompt_and_final(store_backend: StoreBackend, informers: list[Informer]) -> None:
    store = store_backend.store
    informer, recorder = start(informers, store, watch_timeout=30)
    started = time.monotonic()
    informer.stop()
    assert time.monotonic() - started < 1.5
    store.create(pool("after"))
    time.sleep(0.5)
    assert recorder.seen == []


# ---------------------------------------------------------------------------------------------
# the Kubernetes API double: server restarts, requests


KINDS = ("Node", "BGPConfiguration", "BGPPeer", "IPPool", "IPAMBlock", "BlockAffinity")


@pytest.mark.kube
def test_an_api_server_restart_costs_at_most_one_relist_per_kind(
    kube_backend: StoreBackend, kube_api: Any, informers: list[Informer]
) -> None:
    store, writer = kube_backend.store, kube_backend.open()
    watched = [start(informers, store, kind, watch_timeout=30)[0] for kind in KINDS]
    pools = watched[KINDS.index("IPPool")]
    recorder = pools._handler
    assert isinstance(recorder, Recorder)

    def lists_of(plural: str) -> int:
        return sum(
            1
            for r in kube_api.requests
            if r.path.endswith(f"/{plural}") and r.method == "GET" and not r.query.get("watch")
        )

    time.sleep(0.3)  # every informer is in its watch
    # A restart whose watch cache still reaches back: every watch resumes, nothing is listed.
    kube_api.drop_watches()
    a = writer.create(pool("a", 1))
    assert recorder.wait_for(1) == [("ADDED", "a", a.revision)]
    assert [i.relists for i in watched] == [0] * len(KINDS)
    # A restart with a fresh watch cache: resuming from before it is 410, one relist each.
    writer.create(peer("moves-the-revision"))
    lists_before = lists_of("ippools")
    kube_api.drop_watches(expire=True)
    b = writer.create(pool("b", 2))
    assert recorder.wait_for(2)[1:] == [("ADDED", "b", b.revision)]
    time.sleep(1.0)
    # BGPPeer's informer saw the last write before the restart: it resumes from the new
    # cache's first revision without a list. Every other kind lists once.
    assert [i.relists for i in watched] == [0 if k == "BGPPeer" else 1 for k in KINDS]
    assert lists_of("ippools") == lists_before + 1
    assert recorder.seen == [("ADDED", "a", a.revision), ("ADDED", "b", b.revision)]


@pytest.mark.kube
def test_an_idle_informer_asks_nothing_but_its_watch(
    kube_backend: StoreBackend, kube_api: Any, informers: list[Informer]
) -> None:
    """With nothing changing, an informer's requests are its one list and its watches; each
    resumed watch starts from the last bookmark, never from the old list revision."""
    store = kube_backend.store
    store.create(peer("other"))
    informer, _ = start(informers, store, watch_timeout=0.2)
    first = informer.revision
    store.create(peer("moves-the-revision"))
    time.sleep(1.5)
    pool_requests = [r for r in kube_api.requests if r.path.endswith("/ippools")]
    assert sum(1 for r in pool_requests if not r.query.get("watch")) == 1
    resumed_from = [r.query["resourceVersion"] for r in pool_requests if r.query.get("watch")]
    assert len(resumed_from) >= 2
    assert resumed_from[0] == first and int(resumed_from[-1]) > int(first or 0)
