"""BIRD's configuration for a reflector node: pinned by a golden file, accepted by `bird -p`,
and refusing what BIRD cannot carry with the field named."""

from __future__ import annotations

import shutil
import subprocess
from ipaddress import IPv4Address, ip_network
from pathlib import Path

import pytest

from bgp_speaker.bgp.policy import AcceptRule
from bgp_speaker.bgp.reflection import ReflectorDesired, node_speaker_session, reflector_desired
from bgp_speaker.bgp.routes import PeerType, SessionSpec
from bgp_speaker.bird.config import render_bird_config

GOLDEN = Path(__file__).parent / "golden"
ME = IPv4Address("10.0.0.1")
CLUSTER = IPv4Address("244.0.0.1")
POOLS = ((ip_network("10.244.0.0/16"), 26), (ip_network("10.250.0.0/16"), 28))
ROUTER = IPv4Address("10.0.0.21")

needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2")


def session(peer: str, *, client: bool = True, **extra) -> SessionSpec:
    address = IPv4Address(peer)
    return SessionSpec(
        address, 64512, 64512, ME, ME, PeerType.RR_CLIENT if client else PeerType.NODE,
        passive=address < ME, hold_time=9, keepalive_time=3, rr_client=client,
        name="peer-with-route-reflectors", **extra,
    )  # fmt: skip


def desired(*sessions: SessionSpec, pools=POOLS) -> ReflectorDesired:
    speaker = node_speaker_session(ME, 64512, 9, 3, 120)
    accept = (AcceptRule(ip_network("0.0.0.0/0")), AcceptRule(ip_network("192.0.2.0/24"), True))
    return reflector_desired(
        ME, CLUSTER, 64512, pools, sessions, speaker, frozenset({ROUTER}), {ROUTER: accept}
    )


FABRIC = desired(
    session("10.0.0.11"),
    session("10.0.0.2", client=False, graceful_restart_time=None),
    session("10.0.0.21", md5_password="s3cr et'", max_prefixes=100, peer_port=1179),
)


def test_render_matches_the_golden_file() -> None:
    assert render_bird_config(FABRIC) == (GOLDEN / "reflector.conf").read_text()


@needs_bird
@pytest.mark.parametrize("config", [FABRIC, desired(pools=())], ids=["fabric", "empty"])
def test_bird_accepts_what_is_rendered(config: ReflectorDesired, tmp_path: Path) -> None:
    path = tmp_path / "bird.conf"
    path.write_text(render_bird_config(config))
    check = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("password", ['say "hi"', "back\\slash", "two\nlines"])
def test_a_password_bird_cannot_carry_names_the_peer(password: str) -> None:
    bad = desired(session("10.0.0.11", md5_password=password))
    with pytest.raises(ValueError, match="BGPPeer peer-with-route-reflectors: password"):
        render_bird_config(bad)
