"""The ExaBGP API codec: real captured JSON lines in, validated command lines out.

``golden/exabgp_api_lines.json`` holds lines real ExaBGP 5.0.15 wrote during the
integration tests (refreshed by running them with ``L3FABRIC_UPDATE_GOLDEN=1``).
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

import pytest

from bgp_speaker.bgp.routes import (
    EndOfRib,
    PathAttributes,
    PeerStateChanged,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionState,
)
from bgp_speaker.exabgp.codec import (
    Ack,
    InvalidCommand,
    MalformedMessage,
    OutgoingAttributes,
    Output,
    Received,
    RelayDropped,
    RelayHello,
    acked_in_order,
    parse_line,
    render_announce,
    render_clear_adj_rib_out,
    render_eor,
    render_route_refresh,
    render_withdraw,
    validate_command,
)

SAMPLES: dict[str, str] = json.loads(
    (Path(__file__).parent / "golden" / "exabgp_api_lines.json").read_text()
)
A = ip_address("10.0.0.1")


def events(kind: str) -> tuple[object, ...]:
    parsed = parse_line(SAMPLES[kind] + "\n")
    assert isinstance(parsed, Received)
    return parsed.events


# --- lines in --------------------------------------------------------------------------------


def test_acks_and_relay_lines() -> None:
    assert parse_line(SAMPLES["done"]) == Ack(True)
    assert parse_line("error\n") == Ack(False)
    assert parse_line(SAMPLES["hello"]) == RelayHello(int(json.loads(SAMPLES["hello"])["pid"]))
    assert parse_line('{"l3fabric-relay": "dropped", "lines": 42}') == RelayDropped(42)
    assert parse_line("reload in progress") == Output("reload in progress")
    assert parse_line('[{"peer": 1}]') == Output('[{"peer": 1}]')  # `show neighbor json`


@pytest.mark.parametrize(
    ("kind", "state", "reason"),
    [
        ("state-connected", SessionState.CONNECTED, ""),
        ("state-up", SessionState.UP, ""),
        ("state-down", SessionState.DOWN, "closing connection"),
        ("state-down-shutdown", SessionState.DOWN, "stop, message [shutting down]"),
    ],
)
def test_state_changes(kind: str, state: SessionState, reason: str) -> None:
    assert events(kind) == (PeerStateChanged(A, state, reason),)


def test_announcement_with_attributes() -> None:
    (event,) = events("update-announce")
    assert event == RoutesAnnounced(
        A,
        tuple(IPv4Network(f"10.60.0.{n}/26") for n in (0, 64, 128)),
        PathAttributes(
            next_hop=A, origin="igp", local_pref=200, med=5, communities=("64512:7", "64512:100")
        ),
    )


def test_reflected_announcement_keeps_originator_and_cluster_list() -> None:
    (event,) = events("update-reflected")
    assert isinstance(event, RoutesAnnounced)
    assert event.prefixes == (IPv4Network("10.70.0.0/26"),)
    assert event.attributes == PathAttributes(
        next_hop=ip_address("10.0.0.9"),
        local_pref=150,
        originator_id=IPv4Address("10.0.0.9"),
        cluster_list=(IPv4Address("10.0.0.1"),),
        communities=("64512:1",),
    )


def test_as_path_and_origin() -> None:
    (event,) = events("update-as-path")
    assert isinstance(event, RoutesAnnounced)
    assert event.attributes.as_path == (65001, 65002)
    assert event.attributes.origin == "incomplete"
    assert event.attributes.cluster_list == (IPv4Address("10.0.0.1"), IPv4Address("10.7.7.7"))


def test_withdrawal_and_end_of_rib() -> None:
    assert events("update-withdraw") == (
        RoutesWithdrawn(A, (IPv4Network("10.60.0.0/26"), IPv4Network("10.60.0.64/26"))),
    )
    assert events("eor") == (EndOfRib(A),)


@pytest.mark.parametrize("kind", ["refresh", "notification-shutdown"])
def test_messages_the_speaker_ignores(kind: str) -> None:
    assert events(kind) == ()


def _update(body: str, direction: str = "receive") -> str:
    return (
        '{ "exabgp": "5.0.0", "type": "update", "neighbor": { "address": { "local": '
        '"10.0.0.2", "peer": "10.0.0.1" }, "asn": { "local": 64512, "peer": 64512 }, '
        f'"direction": "{direction}", "message": {{ "update": {body} }} }} }}'
    )


def test_one_update_per_next_hop_withdrawals_first_other_families_skipped() -> None:
    line = _update(
        '{ "attribute": { "origin": "igp", "as-path": {"0": {"element": "as-sequence", '
        '"value": [65001]}, "1": {"element": "as-set", "value": [65003, 65002]}} }, '
        '"announce": { "ipv4 unicast": { "10.0.0.1": [ { "nlri": "10.1.0.0/26" } ], '
        '"10.0.0.5": [ "10.2.0.0/26" ] }, "ipv6 unicast": { "fd00::1": [ { "nlri": '
        '"fd10::/64" } ] }, "ipv4 flow": { "no-nexthop": [ { "destination": "1.0.0.0/8" } ] } }, '
        '"withdraw": { "ipv4 unicast": [ { "nlri": "10.9.0.0/26" } ] } }'
    )
    parsed = parse_line(line)
    assert isinstance(parsed, Received)
    withdrawn, *announced = parsed.events
    assert withdrawn == RoutesWithdrawn(A, (IPv4Network("10.9.0.0/26"),))
    path = (65001, 65003, 65002)
    assert announced == [
        RoutesAnnounced(A, (ip_network("10.1.0.0/26"),), PathAttributes(A, as_path=path)),
        RoutesAnnounced(
            A, (ip_network("10.2.0.0/26"),), PathAttributes(ip_address("10.0.0.5"), path)
        ),
        RoutesAnnounced(
            A, (IPv6Network("fd10::/64"),), PathAttributes(ip_address("fd00::1"), path)
        ),
    ]


def test_updates_we_sent_are_not_events() -> None:
    line = _update('{ "withdraw": { "ipv4 unicast": [ "10.9.0.0/26" ] } }', direction="send")
    assert parse_line(line) == Received((), "update")


@pytest.mark.parametrize(
    "line",
    [
        "{ not json",
        _update('{ "withdraw": { "ipv4 unicast": [ { "nlri": "10.9.0.1/26" } ] } }'),
        _update('{ "announce": { "ipv4 unicast": { "not-an-ip": [ "10.1.0.0/26" ] } } }'),
        '{ "type": "state", "neighbor": { "address": { "peer": "10.0.0.1" }, "state": "odd" } }',
    ],
)
def test_undecodable_messages_raise(line: str) -> None:
    with pytest.raises(MalformedMessage):
        parse_line(line)


# --- commands out ----------------------------------------------------------------------------


def prefixes(count: int) -> list[IPv4Network]:
    return [IPv4Network(f"10.{n // 256}.{n % 256}.0/24") for n in range(count)]


def test_announce_is_batched_by_1000() -> None:
    lines = render_announce(prefixes(2500))
    assert [len(line.split(" nlri ")[1].split()) for line in lines] == [1000, 1000, 500]
    assert lines[0].startswith("announce attributes next-hop self nlri 10.0.0.0/24 10.0.1.0/24 ")
    assert lines[2].endswith(" 10.9.195.0/24")
    assert render_announce([]) == []


def test_announce_splits_families_and_renders_every_attribute() -> None:
    attributes = OutgoingAttributes(
        next_hop=ip_address("10.0.0.9"),
        origin="igp",
        as_path=(65001, 65002),
        local_pref=150,
        med=10,
        communities=("64512:1", "64512:2"),
        originator_id=IPv4Address("10.0.0.9"),
        cluster_list=(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.3")),
    )
    lines = render_announce(
        [ip_network("fd10::/64"), ip_network("10.1.0.0/26")], attributes, peers=[A]
    )
    assert lines == [
        "neighbor 10.0.0.1 announce attributes next-hop 10.0.0.9 origin igp as-path "
        "[ 65001 65002 ] local-preference 150 med 10 community [ 64512:1 64512:2 ] "
        "originator-id 10.0.0.9 cluster-list [ 10.0.0.1 10.0.0.3 ] nlri 10.1.0.0/26",
        "neighbor 10.0.0.1 announce attributes next-hop 10.0.0.9 origin igp as-path "
        "[ 65001 65002 ] local-preference 150 med 10 community [ 64512:1 64512:2 ] "
        "originator-id 10.0.0.9 cluster-list [ 10.0.0.1 10.0.0.3 ] nlri fd10::/64",
    ]


def test_withdraw_eor_refresh_clear() -> None:
    assert render_withdraw(prefixes(1001), peers=[A])[1] == (
        "neighbor 10.0.0.1 withdraw attributes nlri 10.3.232.0/24"
    )
    assert render_eor() == "announce eor ipv4 unicast"
    assert render_eor(6, peer=A) == "neighbor 10.0.0.1 announce eor ipv6 unicast"
    assert render_route_refresh() == "announce route-refresh ipv4 unicast"
    assert render_clear_adj_rib_out(A) == "neighbor 10.0.0.1 clear adj-rib out"
    with pytest.raises(InvalidCommand):
        render_eor(5)


def test_one_command_for_several_neighbours() -> None:
    b = ip_address("10.0.0.2")
    (line,) = render_withdraw(prefixes(1), peers=[A, b])
    assert line == "neighbor 10.0.0.1 , neighbor 10.0.0.2 withdraw attributes nlri 10.0.0.0/24"
    (line,) = render_announce(prefixes(1), peers=[A, b])
    assert line.startswith("neighbor 10.0.0.1 , neighbor 10.0.0.2 announce attributes ")
    assert acked_in_order(line)


def test_which_commands_are_acked_in_order() -> None:
    assert acked_in_order(render_announce(prefixes(1))[0])
    assert acked_in_order(render_withdraw(prefixes(1), peers=[A])[0])
    for command in (render_eor(), render_route_refresh(peer=A), render_clear_adj_rib_out(A)):
        assert not acked_in_order(command)


@pytest.mark.parametrize(
    "command",
    [
        "shutdown",
        "announce route 10.0.0.0/24 next-hop self",
        "announce attributes next-hop self nlri 10.0.0.1/24",  # host bits
        "announce attributes next-hop self nlri 10.0.0.0/24 fd00::/64",  # two families
        "announce attributes next-hop 10.0.0.256 nlri 10.0.0.0/24",
        "announce attributes next-hop self community [ 65536:1 ] nlri 10.0.0.0/24",
        "announce attributes next-hop self local-preference 4294967296 nlri 10.0.0.0/24",
        "announce attributes next-hop self as-path [ 0 ] nlri 10.0.0.0/24",
        "announce attributes next-hop self nlri 10.0.0.0/24\nshutdown",
        "announce attributes next-hop self nlri 10.0.0.0/24 ",
        "neighbor 10.0.0.x announce eor ipv4 unicast",
        "neighbor 10.0.0.1 , neighbor 10.0.0.x withdraw attributes nlri 10.0.0.0/24",
        "neighbor 10.0.0.1 , withdraw attributes nlri 10.0.0.0/24",
        "announce eor ipv4 flow",
        "withdraw attributes nlri " + " ".join(map(str, prefixes(1001))),
        "announce attributes next-hop self description «x» nlri 10.0.0.0/24",
    ],
)
def test_malformed_commands_are_refused(command: str) -> None:
    with pytest.raises(InvalidCommand):
        validate_command(command)


@pytest.mark.parametrize(
    "changes",
    [
        {"origin": "bgp"},
        {"local_pref": -1},
        {"med": 2**32},
        {"as_path": (0,)},
        {"communities": ("65000",)},
        {"communities": ("65000:65536",)},
    ],
)
def test_bad_attributes_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidCommand):
        OutgoingAttributes(**changes)  # type: ignore[arg-type]


def test_batch_size_is_bounded() -> None:
    with pytest.raises(InvalidCommand):
        render_announce(prefixes(1), batch=1001)
    assert len(render_withdraw(prefixes(10), batch=3)) == 4
