"""The list+watch contract an informer relies on, run against SQLite and the Kubernetes API
double alike: paged lists consistent at one revision, watches that resume without loss,
bookmarks, selector-scoped watches and compaction (ipam_blocks/store/base.py).

What each backend does where the Kubernetes API leaves room:
- a selector-scoped watch: both show an object entering the selector as ADDED and one leaving
  it as DELETED in its last matching state (at the revision of the change that moved it out),
  then nothing more about it until it matches again; the API server's watch cache does the same.
- bookmarks: both send one when a watch ends quietly; the API server (and the double) also
  sends them when a server-side watch request ends, which the kube store passes on.
- a page's `limit` counts selected items on both (the real server may return short pages).
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator

import pytest

from ipam_blocks.errors import InvalidInput, WatchExpired
from ipam_blocks.selector import EVERYTHING, LabelSelector, parse_selector_text
from ipam_blocks.store import EventType, Listing, Resource, Store, WatchEvent
from tests.store.conftest import StoreBackend


def pool(name: str, octet: int = 0, labels: dict[str, str] | None = None) -> Resource:
    spec = {"cidr": f"10.{octet}.0.0/16", "blockSize": 26, "natOutgoing": False}
    return Resource("IPPool", name, spec, labels or {})


def peer(name: str) -> Resource:
    return Resource("BGPPeer", name, {"peerIP": "192.0.2.1", "asNumber": 64512})


def with_nat(obj: Resource, nat: bool = True) -> Resource:
    return obj.with_spec({**obj.spec, "natOutgoing": nat})


def relabel(obj: Resource, labels: dict[str, str]) -> Resource:
    return Resource(obj.kind, obj.name, obj.spec, labels, obj.annotations, obj.revision)


def events_of(events: Iterator[WatchEvent]) -> list[tuple[str, str]]:
    return [(str(e.type), e.resource.name) for e in events]


def all_pages(
    store: Store,
    kind: str,
    limit: int,
    selector: LabelSelector = EVERYTHING,
    continue_token: str | None = None,
) -> list[Listing]:
    pages = [store.list(kind, selector, limit=limit, continue_token=continue_token)]
    while (token := pages[-1].continue_token) is not None:
        pages.append(store.list(kind, selector, limit=limit, continue_token=token))
    return pages


def compact_history(backend: StoreBackend) -> None:
    """Forget the change history up to the current revision, as etcd compaction does."""
    if backend.double is not None:
        backend.double.compact()
    elif backend.name == "sqlite":
        # What SqliteStore._bump does on its schedule, done now.
        db = sqlite3.connect(backend.store.path)  # type: ignore[attr-defined]
        with db:
            db.execute("DELETE FROM changes")
            db.execute("UPDATE compacted SET revision = (SELECT revision FROM counter)")
        db.close()
    else:
        pytest.skip("cannot compact a real cluster's history")


# ---------------------------------------------------------------------------------------------
# paged lists


def test_pages_hold_every_item_once_in_name_order(any_store: Store) -> None:
    for i in range(7):
        any_store.create(pool(f"p{i}", i))
    full = any_store.list("IPPool")
    pages = all_pages(any_store, "IPPool", limit=3)
    assert [len(p.items) for p in pages] == [3, 3, 1]
    assert [o for p in pages for o in p.items] == full.items
    assert pages[-1].continue_token is None


def test_a_list_without_limit_or_within_it_has_no_continue_token(any_store: Store) -> None:
    any_store.create(pool("a"))
    assert any_store.list("IPPool").continue_token is None
    assert any_store.list("IPPool", limit=1).continue_token is None
    assert any_store.list("IPPool", limit=5).continue_token is None


def test_pages_are_consistent_at_the_first_pages_revision(store_backend: StoreBackend) -> None:
    """Writes between pages do not show: the later pages show the objects as they were."""
    store, writer = store_backend.store, store_backend.open()
    created = [store.create(pool(f"p{i}", i)) for i in range(6)]
    before = store.list("IPPool")
    first = store.list("IPPool", limit=2)
    assert first.items == before.items[:2]
    writer.update(with_nat(created[0]))  # already listed
    writer.update(with_nat(created[3]))  # on a later page
    writer.delete("IPPool", "p4")
    writer.create(pool("p3a", 30))  # would sort into a later page
    writer.update(with_nat(writer.update(with_nat(created[5])), nat=False))  # twice
    rest = all_pages(store, "IPPool", limit=2, continue_token=first.continue_token)
    assert [o for page in [first, *rest] for o in page.items] == before.items
    assert {page.revision for page in [first, *rest]} == {before.revision}


def test_pages_count_only_selected_items(any_store: Store) -> None:
    for i in range(6):
        any_store.create(pool(f"p{i}", i, labels={"zone": "a" if i % 2 else "b"}))
    selector = parse_selector_text("zone=a")
    pages = all_pages(any_store, "IPPool", limit=2, selector=selector)
    assert [[o.name for o in p.items] for p in pages] == [["p1", "p3"], ["p5"]]


def test_a_continue_token_older_than_the_history_is_expired(store_backend: StoreBackend) -> None:
    store = store_backend.store
    for i in range(3):
        store.create(pool(f"p{i}", i))
    first = store.list("IPPool", limit=1)
    store.create(peer("unrelated"))
    compact_history(store_backend)
    with pytest.raises(WatchExpired, match=r"list again|too old"):
        store.list("IPPool", limit=1, continue_token=first.continue_token)
    assert len(all_pages(store, "IPPool", limit=1)) == 3  # the documented recovery


@pytest.mark.parametrize("limit", [0, -1])
def test_a_page_size_below_one_names_the_field(any_store: Store, limit: int) -> None:
    with pytest.raises(InvalidInput) as info:
        any_store.list("IPPool", limit=limit)
    assert info.value.field == "limit"


# ---------------------------------------------------------------------------------------------
# watch: resume, bookmarks, compaction


def test_a_watch_resumed_from_the_last_revision_loses_and_repeats_nothing(
    store_backend: StoreBackend,
) -> None:
    store, writer = store_backend.store, store_backend.open()
    revision = store.list("IPPool").revision
    seen: list[tuple[str, str]] = []
    for round_ in range(3):
        a = writer.create(pool(f"r{round_}", round_))
        writer.update(with_nat(a))
        writer.create(peer(f"other-{round_}"))  # another kind moves the revision too
        for event in store.watch("IPPool", revision, timeout=0.2, bookmarks=True):
            revision = event.resource.revision or revision
            if event.type is not EventType.BOOKMARK:
                seen.append((str(event.type), event.resource.name))
    assert seen == [(t, f"r{i}") for i in range(3) for t in ("ADDED", "MODIFIED")]


def test_a_quiet_watch_ends_with_a_bookmark_past_other_kinds_writes(
    store_backend: StoreBackend,
) -> None:
    store = store_backend.store
    since = store.list("IPPool").revision
    last_other = store.create(peer("unrelated")).revision
    events = list(store.watch("IPPool", since, timeout=0.3, bookmarks=True))
    assert [e.type for e in events] == [EventType.BOOKMARK]
    mark = events[0].resource
    assert (mark.kind, mark.name) == ("IPPool", "")
    assert int(mark.revision or 0) >= int(last_other or 0)


def test_no_bookmarks_unless_asked(any_store: Store) -> None:
    since = any_store.list("IPPool").revision
    any_store.create(peer("unrelated"))
    assert list(any_store.watch("IPPool", since, timeout=0.2)) == []


def test_a_bookmark_is_resumable_where_the_old_revision_has_expired(
    store_backend: StoreBackend,
) -> None:
    """After a quiet period with other kinds changing, the history before it is compacted:
    a watch resumed from the bookmark goes on, one resumed from the list revision expires."""
    store, writer = store_backend.store, store_backend.open()
    since = store.list("IPPool").revision
    writer.create(peer("unrelated"))
    (mark,) = store.watch("IPPool", since, timeout=0.2, bookmarks=True)
    compact_history(store_backend)
    with pytest.raises(WatchExpired):
        list(store.watch("IPPool", since, timeout=0.2))
    created = writer.create(pool("after"))
    resumed = list(store.watch("IPPool", mark.resource.revision or "", timeout=0.2))
    assert [(e.type, e.resource) for e in resumed] == [(EventType.ADDED, created)]


def test_a_watch_from_a_compacted_revision_is_expired(store_backend: StoreBackend) -> None:
    store = store_backend.store
    since = store.list("IPPool").revision
    store.create(pool("a"))
    compact_history(store_backend)
    with pytest.raises(WatchExpired):
        list(store.watch("IPPool", since, timeout=0.2))
    listing = store.list("IPPool")
    assert list(store.watch("IPPool", listing.revision, timeout=0.2)) == []


# ---------------------------------------------------------------------------------------------
# selector-scoped watch


def test_a_scoped_watch_shows_objects_entering_and_leaving_the_selector(
    store_backend: StoreBackend,
) -> None:
    store = store_backend.store
    since = store.list("IPPool").revision
    mine, theirs = {"node": "n1"}, {"node": "n2"}
    a = store.create(pool("a", 1, mine))
    store.create(pool("b", 2, theirs))
    a = store.update(with_nat(a))
    left = store.update(relabel(a, theirs))
    left = store.update(with_nat(left, nat=False))  # not ours any more: not shown
    back = store.update(relabel(left, mine))
    store.delete("IPPool", "b")
    store.delete("IPPool", "a")
    selector = parse_selector_text("node=n1")
    events = list(store.watch("IPPool", since, timeout=0.3, selector=selector))
    assert events_of(iter(events)) == [
        ("ADDED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "a"),
        ("ADDED", "a"),
        ("DELETED", "a"),
    ]
    gone = events[2].resource
    assert gone.labels == mine and gone.spec == a.spec  # its last state the watcher could see
    assert int(gone.revision or 0) > int(a.revision or 0)  # at the revision it left
    assert events[3].resource == back


def test_a_scoped_watch_bookmark_covers_what_it_skipped(store_backend: StoreBackend) -> None:
    store = store_backend.store
    since = store.list("IPPool").revision
    skipped = [store.create(pool(f"t{i}", i, {"node": "n2"})) for i in range(3)]
    selector = parse_selector_text("node=n1")
    events = list(store.watch("IPPool", since, timeout=0.2, selector=selector, bookmarks=True))
    assert [e.type for e in events] == [EventType.BOOKMARK]
    assert int(events[0].resource.revision or 0) >= int(skipped[-1].revision or 0)


def test_a_scoped_watch_resumes_across_the_watch_ends(store_backend: StoreBackend) -> None:
    """Resuming each time from the last event or bookmark of a scoped watch misses nothing
    and repeats nothing, while other nodes' objects keep changing."""
    store, writer = store_backend.store, store_backend.open()
    revision = store.list("IPPool").revision
    selector = parse_selector_text("node=n1")
    names = itertools.count()
    wanted, seen = [], []
    for _ in range(3):
        mine = writer.create(pool(f"m{next(names)}", next(names) % 250, {"node": "n1"}))
        writer.create(pool(f"o{next(names)}", next(names) % 250, {"node": "n2"}))
        wanted.append(mine.name)
        for event in store.watch("IPPool", revision, 0.2, selector=selector, bookmarks=True):
            revision = event.resource.revision or revision
            if event.type is EventType.ADDED:
                seen.append(event.resource.name)
    assert seen == wanted
