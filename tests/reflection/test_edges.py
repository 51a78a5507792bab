"""Edges of the peering code: ExaBGP's OPEN message, BGP passwords (pure or local files)."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address
from pathlib import Path
from types import SimpleNamespace

import pytest

from bgp_speaker.bgp.config import PasswordRef
from bgp_speaker.bgp.passwords import PasswordUnavailable, resolve_password
from bgp_speaker.bgp.routes import PeerOpened
from bgp_speaker.exabgp.codec import Received, parse_line

# Captured from ExaBGP 5.0.15 (`receive { open; }`) with a BIRD 2 peer whose router id is not
# its address.
OPEN_LINE = (
    '{ "exabgp": "5.0.0", "time": 1795293167.1500669, "host" : "vm", "pid" : 28493, '
    '"ppid" : 28425, "counter": 2, "type": "open", "neighbor": { "address": { "local": '
    '"10.9.0.2", "peer": "10.9.0.1" }, "asn": { "local": 64512, "peer": 64512 }, "router-id": '
    '"10.9.0.2" , "direction": "receive", "open": { "version": 4, "asn": 64512, "hold_time": '
    '240, "router_id": "192.0.2.77", "capabilities": { "1": { "name": "multiprotocol", '
    '"families": [ "ipv4/unicast" ] }, "2": { "name": "route-refresh", "variant": "RFC" }, '
    '"64": { "name": "graceful restart", "time": 120, "address-family-flags": { }, '
    '"restart-flags": [ ]  }, "65": { "name": "asn4", "asn4": 64512 }, "70": { "name": '
    '"enhanced-route-refresh" }, "71": { "name": "unknown", "iana": "unassigned", "value": 71, '
    '"raw": "" } } } } }'
)


def test_received_open_gives_the_peer_router_id():
    parsed = parse_line(OPEN_LINE)
    assert parsed == Received(
        (PeerOpened(ip_address("10.9.0.1"), IPv4Address("192.0.2.77"), 120, 240),), "open"
    )
    sent = OPEN_LINE.replace('"direction": "receive"', '"direction": "send"')
    assert parse_line(sent) == Received((), "open")


def test_password_from_a_file_without_its_trailing_newline(tmp_path: Path):
    (tmp_path / "pw").write_text("s3cret\n")
    assert resolve_password(PasswordRef(file=str(tmp_path / "pw")), None, "BGPPeer/x") == "s3cret"


@pytest.mark.parametrize(
    "ref, store, message",
    [
        (PasswordRef(file="/nonexistent/pw"), None, "BGPPeer/x.password.file: cannot read"),
        (
            PasswordRef("s", "k"),
            SimpleNamespace(secrets=lambda: None),
            "embedded store has no Secrets",
        ),
        (PasswordRef(), None, "set secretKeyRef or file"),
    ],
)
def test_unreadable_passwords_name_the_field(ref, store, message):
    with pytest.raises(PasswordUnavailable, match=message):
        resolve_password(ref, store, "BGPPeer/x")


def test_password_from_a_kubernetes_secret_in_the_agent_namespace(monkeypatch):
    asked = []

    class Secrets:
        def read_secret(self, namespace, name):
            asked.append((name, namespace))
            return {"rack1": b"t0r-pw"}

    monkeypatch.setenv("POD_NAMESPACE", "l3fabric-system")
    store = SimpleNamespace(secrets=Secrets)
    assert resolve_password(PasswordRef("bgp-passwords", "rack1"), store, "BGPPeer/x") == "t0r-pw"
    assert asked == [("bgp-passwords", "l3fabric-system")]
    with pytest.raises(PasswordUnavailable, match="has no key 'rack2'"):
        resolve_password(PasswordRef("bgp-passwords", "rack2"), store, "BGPPeer/x")
