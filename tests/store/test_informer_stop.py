"""An informer stopped while its first list is under way ends quietly: it has no revision to
watch from, and must not try (it used to fail an assertion in its thread)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ipam_blocks.store import Listing
from ipam_blocks.store.informer import Informer


class ListBlocksUntilReleased:
    """A store whose list answers only when the test says so, and that has no watch."""

    def __init__(self) -> None:
        self.listing = threading.Event()
        self.release = threading.Event()
        self.watched = False

    def list(self, kind: str, selector: Any = None, **_: Any) -> Listing:
        self.listing.set()
        self.release.wait(5)
        return Listing([], "7")

    def watch(self, *args: Any, **kwargs: Any) -> Any:
        self.watched = True
        return iter(())


def test_stopped_during_the_first_list_it_never_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    failures: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    store = ListBlocksUntilReleased()
    informer = Informer(store, "IPPool", start_jitter=0.0).start()  # type: ignore[arg-type]
    assert store.listing.wait(5)
    informer.stop(timeout=0.0)
    store.release.set()
    informer.stop(timeout=5.0)  # joins the thread
    assert failures == [] and not store.watched
    assert not informer.synced.is_set()
