"""The pure part of reflection on a reflector node: which sessions BIRD takes
(`split_sessions`), what BIRD is configured from (`reflector_desired`), and the sessions BIRD
took over from the node's ExaBGP whose routes stay meanwhile (`TakenOver.update`)."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address, ip_network

from bgp_speaker.bgp.policy import AcceptRule
from bgp_speaker.bgp.reflection import (
    TAKEOVER_WAIT,
    TakenOver,
    node_speaker_session,
    reflector_desired,
    split_sessions,
)
from bgp_speaker.bgp.routes import IPAddr, PeerType, SessionSpec

ME = IPv4Address("10.0.0.1")
CLUSTER = IPv4Address("244.0.0.1")
AS = 64512
POOLS = ((ip_network("10.244.0.0/16"), 26),)


def ibgp(peer: str, **extra) -> SessionSpec:
    return SessionSpec(ip_address(peer), AS, AS, ME, ME, PeerType.RR_CLIENT, rr_client=True,
                       **extra)  # fmt: skip


def ebgp(peer: str, **extra) -> SessionSpec:
    return SessionSpec(ip_address(peer), 65009, AS, ME, ME, PeerType.GLOBAL, **extra)


# --- split_sessions --------------------------------------------------------------------------


def test_bird_takes_every_ibgp_session_exabgp_keeps_ebgp() -> None:
    client, other_rr, router = ibgp("10.0.0.11"), ibgp("10.0.0.2"), ibgp("10.0.0.21")
    tor, external = ebgp("10.0.0.254"), ebgp("192.0.2.1")
    bird, speaker = split_sessions([client, tor, other_rr, external, router])
    assert bird == [client, other_rr, router]  # order kept: the render sorts by itself
    assert speaker == [tor, external]


def test_split_of_nothing_and_of_one_kind_only() -> None:
    assert split_sessions([]) == ([], [])
    assert split_sessions([ibgp("10.0.0.11")]) == ([ibgp("10.0.0.11")], [])
    assert split_sessions([ebgp("192.0.2.1")]) == ([], [ebgp("192.0.2.1")])


# --- reflector_desired ------------------------------------------------------------------------


def test_reflector_desired_carries_next_hop_self_and_accept_lists_per_peer() -> None:
    speaker = node_speaker_session(ME, AS, 9, 3, 120)
    router, client = ibgp("10.0.0.21"), ibgp("10.0.0.11")
    default = AcceptRule(ip_network("0.0.0.0/0"))
    lab = AcceptRule(ip_network("192.0.2.0/24"), or_longer=True)
    other = AcceptRule(ip_network("198.51.100.0/24"))
    router2 = ibgp("10.0.0.22")
    desired = reflector_desired(
        ME, CLUSTER, AS, POOLS, [router, client, router2], speaker,
        frozenset({router.peer_ip}),
        {router.peer_ip: (default, lab), router2.peer_ip: (lab, other)},
    )  # fmt: skip
    assert (desired.router_id, desired.cluster_id, desired.local_as) == (ME, CLUSTER, AS)
    assert desired.pools == POOLS and desired.node_speaker == speaker
    by_peer = {s.spec.peer_ip: s for s in desired.sessions}
    assert [s.spec for s in desired.sessions] == [router, client, router2]
    assert by_peer[router.peer_ip].next_hop_self and by_peer[router.peer_ip].accept == (
        default,
        lab,
    )
    assert not by_peer[client.peer_ip].next_hop_self and by_peer[client.peer_ip].accept == ()
    assert not by_peer[router2.peer_ip].next_hop_self
    # The node's ExaBGP is offered every extra prefix a peer may teach, each once, in order.
    assert desired.node_speaker_accept == (default, lab, other)
    assert desired.peers == {router.peer_ip, client.peer_ip, router2.peer_ip}


def test_reflector_desired_without_sessions() -> None:
    speaker = node_speaker_session(ME, AS, 9, 3, None)
    desired = reflector_desired(ME, CLUSTER, AS, [], [], speaker, frozenset(), {})
    assert desired.sessions == () and desired.peers == frozenset()
    assert desired.node_speaker_accept == () and desired.pools == ()
    assert speaker.graceful_restart_time is None and speaker.peer_as == speaker.local_as == AS


# --- TakenOver.update -------------------------------------------------------------------------

A, B, C = ibgp("10.0.0.11", graceful_restart_time=60), ibgp("10.0.0.12"), ebgp("192.0.2.1")
A_IP, B_IP = A.peer_ip, B.peer_ip


def never(_: IPAddr) -> bool:
    return False


def always(_: IPAddr) -> bool:
    return True


def took_a_and_b(t0: float = 100.0) -> TakenOver:
    """ExaBGP had A, B (iBGP) and C (eBGP); the node became a reflector: BIRD has A and B."""
    taken = TakenOver()
    assert taken.update([A, B, C], {C.peer_ip}, {A_IP, B_IP}, never, t0) == [A_IP, B_IP]
    return taken


def test_sessions_exabgp_gave_to_bird_are_recorded_with_their_spec() -> None:
    taken = took_a_and_b()
    assert taken.sessions == {A_IP: (A, 100.0), B_IP: (B, 100.0)}
    assert taken.specs == [A, B]


def test_only_sessions_bird_now_holds_and_exabgp_dropped_are_taken_over() -> None:
    taken = TakenOver()
    # C left ExaBGP but BIRD does not have it (removed): no takeover. B stays with ExaBGP.
    assert taken.update([A, B, C], {B_IP}, {A_IP, B_IP}, never, 0.0) == [A_IP]
    assert set(taken.sessions) == {A_IP}


def test_a_new_session_is_kept_even_when_already_covered() -> None:
    """Its routes were just marked stale: BIRD's copies must still arrive (not this call)."""
    taken = TakenOver()
    assert taken.update([A], set(), {A_IP}, always, 0.0) == [A_IP]
    assert set(taken.sessions) == {A_IP}


def test_kept_while_not_covered_and_not_reported_new_again() -> None:
    taken = took_a_and_b()
    for now in (101.0, 110.0, 150.0):
        # `before` is ExaBGP's sessions since: C only.
        assert taken.update([C], {C.peer_ip}, {A_IP, B_IP}, never, now) == []
        assert set(taken.sessions) == {A_IP, B_IP}
    # The same `before` again (a level-triggered re-plan): recorded once, the time unchanged.
    assert taken.update([A, B, C], {C.peer_ip}, {A_IP, B_IP}, never, 151.0) == []
    assert taken.sessions[A_IP] == (A, 100.0)


def test_dropped_once_covered_by_the_loopback() -> None:
    taken = took_a_and_b()
    taken.update([C], {C.peer_ip}, {A_IP, B_IP}, lambda peer: peer == A_IP, 101.0)
    assert set(taken.sessions) == {B_IP}
    taken.update([C], {C.peer_ip}, {A_IP, B_IP}, always, 102.0)
    assert taken.sessions == {}


def test_dropped_when_no_longer_birds() -> None:
    taken = took_a_and_b()
    # A's BGPPeer is gone: BIRD no longer holds it.
    taken.update([C], {C.peer_ip}, {B_IP}, never, 101.0)
    assert set(taken.sessions) == {B_IP}
    # The node stops being a reflector: ExaBGP holds B again.
    taken.update([C], {C.peer_ip, B_IP}, set(), never, 102.0)
    assert taken.sessions == {}


def test_dropped_when_exabgp_configures_it_again_though_bird_still_lists_it() -> None:
    taken = took_a_and_b()
    taken.update([C], {C.peer_ip, A_IP}, {A_IP, B_IP}, never, 101.0)
    assert set(taken.sessions) == {B_IP}


def test_dropped_after_its_restart_time_or_the_default_wait() -> None:
    taken = took_a_and_b(t0=100.0)
    assert A.graceful_restart_time == 60 and B.graceful_restart_time == 120
    taken.update([C], {C.peer_ip}, {A_IP, B_IP}, never, 160.0)  # exactly A's restart time
    assert set(taken.sessions) == {A_IP, B_IP}
    taken.update([C], {C.peer_ip}, {A_IP, B_IP}, never, 160.5)
    assert set(taken.sessions) == {B_IP}
    taken.update([C], {C.peer_ip}, {A_IP, B_IP}, never, 220.0)
    assert set(taken.sessions) == {B_IP}
    taken.update([C], {C.peer_ip}, {A_IP, B_IP}, never, 220.5)
    assert taken.sessions == {}


def test_without_graceful_restart_the_takeover_wait_applies() -> None:
    plain = ibgp("10.0.0.13", graceful_restart_time=None)
    taken = TakenOver()
    assert taken.update([plain], set(), {plain.peer_ip}, never, 0.0) == [plain.peer_ip]
    taken.update([], set(), {plain.peer_ip}, never, TAKEOVER_WAIT)
    assert set(taken.sessions) == {plain.peer_ip}
    taken.update([], set(), {plain.peer_ip}, never, TAKEOVER_WAIT + 0.5)
    assert taken.sessions == {}
