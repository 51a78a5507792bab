"""Graceful-restart decisions (pure: bgp_speaker.bgp.graceful), and the controller acting on what
a peer advertised in its OPEN (fake speaker and FIB; see tests/fabric for the real thing)."""

from __future__ import annotations

import asyncio
import dataclasses
from ipaddress import IPv4Address
from typing import Any

import pytest
from netaddr import IPNetwork

from bgp_speaker.bgp import graceful
from bgp_speaker.bgp.config import parse_bgp_config, parse_bgp_peer
from bgp_speaker.bgp.routes import (
    EndOfRib,
    PathAttributes,
    PeerAlive,
    PeerOpened,
    PeerStateChanged,
    PeerType,
    RoutesAnnounced,
    SessionSpec,
    SessionState,
)
from bgp_speaker.bgp.sessions import desired_sessions
from bgp_speaker.exabgp.codec import Received, parse_line
from bgp_speaker.exabgp.config import render_config
from ipam_blocks.errors import InvalidInput
from ipam_blocks.model import Node
from ipam_blocks.store.base import Resource
from tests.fabric.test_graceful_restart import (
    BLOCK_1,
    BLOCK_2,
    LEARNED,
    PEER,
    controller,
    feed,
    via_peer,
)
from tests.reflection.doubles import FakeSpeaker

ME = IPv4Address("10.0.0.11")
SPEC = SessionSpec(PEER, 64512, 64512, ME, ME, PeerType.MESH, graceful_restart_time=120)
LOST = "closing connection"

# An OPEN as ExaBGP 5.0.15 reports it with `receive { open; }` (capabilities shortened).
OPEN_LINE = (
    '{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 2, '
    '"type": "open", "neighbor": { "address": { "local": "10.0.0.11", "peer": "10.0.0.12" }, '
    '"asn": { "local": 64512, "peer": 64512 }, "router-id": "10.0.0.11" , '
    '"direction": "receive", "open": { "version": 4, "asn": 64512, "hold_time": 9, '
    '"router_id": "10.0.0.12", "capabilities": { "1": { "name": "multiprotocol", "families": '
    '[ "ipv4/unicast" ] }, "64": { "name": "graceful restart", "time": 45, '
    '"address-family-flags": { "ipv4/unicast": [ "restart" ] }, "restart-flags": '
    '[ "forwarding" ]  }, "2": { "name": "route-refresh", "variant": "RFC" } } } } }'
)


def test_the_peers_advertised_time_decides() -> None:
    assert graceful.retention(SPEC, 45, LOST) == 45
    assert graceful.retention(SPEC, None, LOST) is None  # it advertised no capability
    assert graceful.retention(SPEC, 0, LOST) is None
    # No OPEN seen: our own setting for the session.
    assert graceful.retention(SPEC, graceful.UNKNOWN, LOST) == 120
    no_gr = dataclasses.replace(SPEC, graceful_restart_time=None)
    assert graceful.retention(no_gr, graceful.UNKNOWN, LOST) is None
    # ...even when we advertise none ourselves, a restarting peer keeps forwarding.
    assert graceful.retention(no_gr, 45, LOST) == 45


def test_max_restart_time_caps_the_peer() -> None:
    capped = dataclasses.replace(SPEC, max_restart_time=30)
    assert graceful.retention(capped, 300, LOST) == 30
    assert graceful.retention(capped, 10, LOST) == 10
    assert graceful.retention(dataclasses.replace(SPEC, max_restart_time=0), 300, LOST) is None


def test_a_notification_from_the_peer_drops_at_once() -> None:
    assert graceful.retention(SPEC, 120, "notification received (6,2)") is None
    # Our hold timer expiring (we sent the NOTIFICATION) is a restart like any other.
    assert graceful.retention(SPEC, 120, "notification sent (4,0)") == 120


def test_our_own_speaker_restart_uses_our_time() -> None:
    assert graceful.retention(SPEC, None, graceful.SPEAKER_RESTART) == 120
    no_gr = dataclasses.replace(SPEC, graceful_restart_time=None)
    assert graceful.retention(no_gr, 45, graceful.SPEAKER_RESTART) is None


def test_initial_sync_waits_our_longest_restart_time() -> None:
    short = dataclasses.replace(SPEC, peer_ip=IPv4Address("10.0.0.13"), graceful_restart_time=30)
    assert graceful.initial_sync_wait([SPEC, short]) == 120
    assert graceful.initial_sync_wait([]) == graceful.NO_RESTART_SYNC_WAIT
    no_gr = dataclasses.replace(SPEC, graceful_restart_time=None)
    assert graceful.initial_sync_wait([no_gr]) == graceful.NO_RESTART_SYNC_WAIT


def test_initial_sync_waits_only_for_sessions_that_negotiated_graceful_restart() -> None:
    other = IPv4Address("10.0.0.13")
    both = [SPEC, dataclasses.replace(SPEC, peer_ip=other)]
    up = {PEER, other}
    # Both sides advertise the capability: End-of-RIB is due from each.
    assert graceful.awaiting_end_of_rib(both, {PEER: 45, other: 45}, up, set()) == up
    assert graceful.awaiting_end_of_rib(both, {PEER: 45, other: 45}, up, {PEER}) == {other}
    # The peer's OPEN had no capability: it need not ever send End-of-RIB.
    assert graceful.awaiting_end_of_rib(both, {PEER: None, other: 45}, up, set()) == {other}
    # Nor when we advertise none (None), though the peer does; 0 s is still a capability.
    ours_off = [dataclasses.replace(s, graceful_restart_time=None) for s in both]
    assert graceful.awaiting_end_of_rib(ours_off, {PEER: 45, other: 45}, up, set()) == set()
    ours_zero = [dataclasses.replace(s, graceful_restart_time=0) for s in both]
    assert graceful.awaiting_end_of_rib(ours_zero, {PEER: 45, other: 45}, up, set()) == up
    # Not up yet, or no OPEN seen: it may still negotiate graceful restart, wait for it.
    assert graceful.awaiting_end_of_rib(both, {PEER: None}, {other}, set()) == up


def test_a_restarted_agent_does_not_wait_for_end_of_rib_from_a_peer_without_it() -> None:
    """Routes adopted from the kernel at start are swept once the only peer is up without
    graceful restart (it never sends End-of-RIB), not after our 120 s restart time."""

    async def scenario() -> None:
        routing, fib = controller(120)  # we advertise 120 s; the peer advertises none
        fib.routes = via_peer(BLOCK_1, BLOCK_2)  # left by the agent before this one
        await routing.kernel.adopt()
        sync = asyncio.ensure_future(routing.kernel.initial_sync())
        await feed(
            routing,
            PeerOpened(PEER, PEER, None),
            PeerStateChanged(PEER, SessionState.UP),
            RoutesAnnounced(PEER, (BLOCK_1,), PathAttributes(PEER)),
        )
        await asyncio.wait_for(sync, 2)
        assert fib.routes == via_peer(BLOCK_1)  # BLOCK_2 was not learned again

    run(scenario())


def test_a_restarted_agent_waits_for_end_of_rib_from_a_graceful_peer() -> None:
    async def scenario() -> None:
        routing, fib = controller(120)
        fib.routes = via_peer(BLOCK_1, BLOCK_2)
        await routing.kernel.adopt()
        sync = asyncio.ensure_future(routing.kernel.initial_sync())
        await feed(
            routing,
            PeerOpened(PEER, PEER, 45),
            PeerStateChanged(PEER, SessionState.UP),
            RoutesAnnounced(PEER, (BLOCK_1,), PathAttributes(PEER)),
        )
        await asyncio.sleep(0.5)
        assert not sync.done()  # its table may not be complete yet
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)
        await feed(routing, EndOfRib(PEER))
        await asyncio.wait_for(sync, 2)
        assert fib.routes == via_peer(BLOCK_1)

    run(scenario())


def test_the_codec_reads_the_restart_time_from_an_open() -> None:
    parsed = parse_line(OPEN_LINE)
    assert isinstance(parsed, Received)
    assert parsed.events == (PeerOpened(PEER, IPv4Address("10.0.0.12"), 45, 9),)
    without = OPEN_LINE.replace('"64": { "name": "graceful restart"', '"99": { "name": "x"')
    assert parse_line(without).events == (  # type: ignore[union-attr]
        PeerOpened(PEER, IPv4Address("10.0.0.12"), None, 9),
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_controller_drops_a_peer_that_advertised_no_graceful_restart() -> None:
    async def scenario() -> None:
        routing, fib = controller(120)  # we advertise 120 s
        await feed(routing, PeerOpened(PEER, PEER, None), *LEARNED)
        await feed(routing, PeerStateChanged(PEER, SessionState.DOWN, LOST))
        assert fib.routes == {}

    run(scenario())


def test_controller_keeps_routes_for_the_peers_time_capped_by_max_restart_time() -> None:
    async def scenario() -> None:
        routing, fib = controller(None)  # we advertise none; the peer does (300 s)
        desired = routing.state.desired
        assert desired is not None
        spec = dataclasses.replace(desired.sessions[0], max_restart_time=1)
        routing.state.desired = dataclasses.replace(desired, sessions=(spec,))
        await feed(routing, PeerOpened(PEER, PEER, 300), *LEARNED)
        await feed(routing, PeerStateChanged(PEER, SessionState.DOWN, LOST))
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)  # kept, stale
        await asyncio.sleep(1.5)  # maxRestartTime 1 s, not the advertised 300 s
        assert fib.routes == {}

    run(scenario())


def test_hold_timers_expire_once_and_notice_a_revival() -> None:
    timers = graceful.HoldTimers()
    timers.opened(PEER, 9)
    timers.up(PEER, 3, now=0.0)  # ours 3, theirs 9: 3
    assert timers.heard(PEER, 2.0) is False
    assert timers.expired(4.9) == []
    assert timers.expired(5.1) == [PEER]
    assert timers.expired(9.0) == []  # reported once
    assert timers.heard(PEER, 9.5) is True  # ExaBGP kept it: alive after all
    assert timers.heard(PEER, 9.6) is False
    timers.down(PEER)
    assert timers.expired(100.0) == [] and timers.heard(PEER, 101.0) is False
    timers.opened(PEER, 0)  # hold time 0: no keepalives, no timer
    timers.up(PEER, 90, now=0.0)
    assert timers.expired(1e6) == []


def test_controller_drops_a_silent_peer_at_its_hold_time_and_refreshes_a_revived_one() -> None:
    async def scenario() -> None:
        speaker = FakeSpeaker()
        # No graceful restart: a dead peer's routes go.
        routing, fib = controller(None, speaker=speaker)
        watch = asyncio.get_running_loop().create_task(routing.timers.watch())
        for event in (PeerOpened(PEER, PEER, None, 3), *LEARNED):
            routing.timers.heard(event)
        await feed(routing, PeerOpened(PEER, PEER, None, 3), *LEARNED)
        await asyncio.sleep(2.0)
        routing.timers.heard(PeerAlive(PEER))  # a keepalive: still there
        await asyncio.sleep(2.0)
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)
        await asyncio.sleep(1.3)  # silent for 3.3 s > hold time 3
        assert fib.routes == {}
        assert routing.state.peer_state[PEER][2] == graceful.HOLD_EXPIRED
        # It speaks again (ExaBGP's own timer had not fired): its routes are asked for.
        routing.timers.heard(PeerAlive(PEER))
        await asyncio.sleep(0.05)
        assert speaker.take("route_refresh") == [("route_refresh", str(PEER))]
        await feed(routing, RoutesAnnounced(PEER, (BLOCK_1,), LEARNED[1].attributes))
        assert fib.routes == via_peer(BLOCK_1)
        watch.cancel()
        routing.tasks.cancel()

    run(scenario())


def _sessions(cfg_spec: dict[str, Any], peer_spec: dict[str, Any] | None = None) -> Any:
    me = Node("n1", {}, IPNetwork("10.0.0.11/24"))
    other = Node("n2", {}, IPNetwork("10.0.0.12/24"))
    cfg = parse_bgp_config(Resource("BGPConfiguration", "default", cfg_spec))
    peers = [parse_bgp_peer(Resource("BGPPeer", "p", peer_spec))] if peer_spec else []
    return desired_sessions(me, [me, other], cfg, peers)


def test_graceful_restart_capability_follows_the_bgp_configuration() -> None:
    [mesh] = _sessions({"gracefulRestartTime": 45})
    assert mesh.graceful_restart_time == 45
    text = render_config(ME, 64512, [mesh], ["relay"], True)
    assert "graceful-restart 45;" in text and "keepalive;" in text and "open;" in text
    [default] = _sessions({})
    assert "graceful-restart 120;" in render_config(ME, 64512, [default], ["relay"], True)
    [off] = _sessions({"gracefulRestartTime": 0})
    assert "graceful-restart" not in render_config(ME, 64512, [off], ["relay"], True)


def test_per_peer_timers_and_max_restart_time() -> None:
    peer = {"peerSelector": {}, "holdTime": 3, "keepaliveTime": 1, "maxRestartTime": 30}
    [spec] = _sessions({}, peer)
    assert (spec.hold_time, spec.keepalive_time, spec.max_restart_time) == (3, 1, 30)
    assert "hold-time 3;" in render_config(ME, 64512, [spec], ["relay"], True)
    for bad in ({"holdTime": 2}, {"keepaliveTime": 0}, {"holdTime": 3, "keepaliveTime": 2}):
        with pytest.raises(InvalidInput):
            parse_bgp_peer(Resource("BGPPeer", "p", {"peerSelector": {}, **bad}))
