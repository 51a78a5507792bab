"""`parse_protocols` on what BIRD 2 really answers to `show protocols all` over its control
socket (the text of `bird_command`'s reply, codes stripped).

The capture: a reflector BIRD running the agent's rendered config (`timeformat protocol "%s"`:
"since" in epoch seconds) with three BGP protocols - one client BIRD established (2 routes in,
1 out), one client address where nothing speaks BGP (Active, a socket error), and the
loopback session with a BIRD standing in for the node's ExaBGP (1 in, 2 out) - plus the
`device` protocol every BIRD config has. Trailing blanks of the header lines trimmed.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from bgp_speaker.bgp.reflection import ReflectorSessionState
from bgp_speaker.bird.protocols import parse_protocols

CAPTURED = """\
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     1796695790

peer_10_99_0_2 BGP        ---        up     1796695792    Established
  Description:    clients
  BGP state:          Established
    Neighbor address: 10.99.0.2
    Neighbor AS:      64512
    Local AS:         64512
    Neighbor ID:      10.99.0.2
    Local capabilities
      Multiprotocol
        AF announced: ipv4
      Route refresh
      Graceful restart
        Restart time: 120
        AF supported: ipv4
        AF preserved:
      4-octet AS numbers
      Enhanced refresh
      Long-lived graceful restart
    Neighbor capabilities
      Multiprotocol
        AF announced: ipv4
      Route refresh
      Graceful restart
        Restart time: 120
        AF supported: ipv4
        AF preserved:
      4-octet AS numbers
      Enhanced refresh
      Long-lived graceful restart
    Session:          internal multihop route-reflector AS4
    Source address:   10.99.0.1
    Hold timer:       6.852/9
    Keepalive timer:  1.234/3
  Channel ipv4
    State:          UP
    Table:          master4
    Preference:     100
    Input filter:   (unnamed)
    Output filter:  (unnamed)
    Routes:         2 imported, 1 exported, 2 preferred
    Route change stats:     received   rejected   filtered    ignored   accepted
      Import updates:              2          0          0          0          2
      Import withdraws:            0          0        ---          0          0
      Export updates:              3          2          0        ---          1
      Export withdraws:            0        ---        ---        ---          0
    BGP Next hop:   10.99.0.1
    IGP IPv4 table: master4

peer_10_99_0_3 BGP        ---        start  1796695790    Active        Socket: Connection reset by peer
  Description:    clients
  BGP state:          Active
    Neighbor address: 10.99.0.3
    Neighbor AS:      64512
    Local AS:         64512
    Connect delay:    0.652/2
    Last error:       Socket: Connection reset by peer
  Channel ipv4
    State:          DOWN
    Table:          master4
    Preference:     100
    Input filter:   (unnamed)
    Output filter:  (unnamed)
    IGP IPv4 table: master4

node_speaker BGP        ---        up     1796695817    Established
  Description:    the node's own speaker (ExaBGP)
  Router ID:      127.0.0.1
  BGP state:          Established
    Neighbor address: 127.0.0.2
    Neighbor AS:      64512
    Local AS:         64512
    Neighbor ID:      10.99.0.1
    Local capabilities
      Multiprotocol
        AF announced: ipv4
      Route refresh
      Graceful restart
        Restart time: 120
        AF supported: ipv4
        AF preserved:
      4-octet AS numbers
      Enhanced refresh
      Long-lived graceful restart
    Neighbor capabilities
      Multiprotocol
        AF announced: ipv4
      Route refresh
      Graceful restart
      4-octet AS numbers
      Enhanced refresh
      Long-lived graceful restart
    Session:          internal multihop route-reflector AS4
    Source address:   127.0.0.1
    Hold timer:       6.546/9
    Keepalive timer:  0.151/3
  Channel ipv4
    State:          UP
    Table:          master4
    Preference:     100
    Input filter:   (unnamed)
    Output filter:  (unnamed)
    Routes:         1 imported, 2 exported, 1 preferred
    Route change stats:     received   rejected   filtered    ignored   accepted
      Import updates:              1          0          0          0          1
      Import withdraws:            0          0        ---          0          0
      Export updates:              3          1          0        ---          2
      Export withdraws:            0        ---        ---        ---          0
    BGP Next hop:   127.0.0.1
    IGP IPv4 table: master4

"""  # noqa: E501 (a header line of the capture)


def test_every_bgp_session_parsed_with_state_since_and_route_counts() -> None:
    assert parse_protocols(CAPTURED) == (
        ReflectorSessionState(
            name="peer_10_99_0_2", peer=IPv4Address("10.99.0.2"), bgp_state="Established",
            since=1796695792.0, info="Established", imported=2, exported=1,
        ),
        ReflectorSessionState(
            name="peer_10_99_0_3", peer=IPv4Address("10.99.0.3"), bgp_state="Active",
            since=1796695790.0, info="Active        Socket: Connection reset by peer",
            last_error="Socket: Connection reset by peer",
        ),
        ReflectorSessionState(
            name="node_speaker", peer=IPv4Address("127.0.0.2"), bgp_state="Established",
            since=1796695817.0, info="Established", imported=1, exported=2,
        ),
    )  # fmt: skip


def test_established_only_for_an_established_session() -> None:
    states = {s.name: s.established for s in parse_protocols(CAPTURED)}
    assert states == {"peer_10_99_0_2": True, "peer_10_99_0_3": False, "node_speaker": True}


def test_the_device_protocol_and_the_table_header_are_not_sessions() -> None:
    names = [s.name for s in parse_protocols(CAPTURED)]
    assert "device1" not in names and "Name" not in names
    # Its details stay its own: nothing of the device leaks into the session before it.
    only_device = CAPTURED.split("\n\npeer_10_99_0_2")[0]
    assert "device1" in only_device
    assert parse_protocols(only_device) == ()


def test_a_protocol_list_without_details_still_gives_states() -> None:
    """`show protocols` (no `all`): header lines only; no neighbour, counts zero."""
    headers = "\n".join(line for line in CAPTURED.splitlines() if line and not line[0].isspace())
    parsed = parse_protocols(headers)
    assert [(s.name, s.bgp_state, s.peer, s.imported) for s in parsed] == [
        ("peer_10_99_0_2", "Established", None, 0),
        ("peer_10_99_0_3", "Active", None, 0),
        ("node_speaker", "Established", None, 0),
    ]


def test_nothing_to_parse_gives_no_sessions() -> None:
    assert parse_protocols("") == ()
