"""ExaBGP config and environment rendering: golden files, determinism, refusals.

Pure tests, plus one that hands the rendered file to ExaBGP's own validator (no root).
Regenerate the golden files with ``L3FABRIC_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest

from bgp_speaker.bgp.routes import PeerType, SessionSpec
from bgp_speaker.exabgp.config import (
    NODE_SPEED,
    api_block_name,
    render_config,
    render_env,
)

GOLDEN = Path(__file__).parent / "golden"
ROUTER_ID = IPv4Address("10.0.0.1")
RELAY = ["/usr/bin/python3", "-I", "-S", "/opt/l3fabric/exabgp_relay.py", "/run/l3fabric/api.sock"]


def session(peer: str, **changes: object) -> SessionSpec:
    v6 = ":" in peer
    base = SessionSpec(
        peer_ip=ip_address(peer),
        peer_as=64512,
        local_as=64512,
        local_address=ip_address("fd00::1" if v6 else "10.0.0.1"),
        router_id=ROUTER_ID,
        peer_type=PeerType.MESH,
        name="mesh",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


SESSIONS = [
    session("10.0.0.3", passive=True, hold_time=30),
    session("10.0.0.2"),
    session(
        "192.0.2.1",
        peer_as=65001,
        peer_type=PeerType.NODE,
        name="tor-a",
        peer_port=1179,
        md5_password='s3cret "quoted" \\ pass',
        graceful_restart_time=None,
        hold_time=9,
    ),
    session("10.0.0.9", peer_type=PeerType.RR_CLIENT, rr_client=True, name="it's a client"),
    session("fd00::2", name="mesh-v6"),
]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("L3FABRIC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; L3FABRIC_UPDATE_GOLDEN=1 rewrites it"


def test_config_matches_golden() -> None:
    check_golden("exabgp_mesh.conf", render_config(ROUTER_ID, 64512, SESSIONS, RELAY, True))


def test_config_without_sessions_matches_golden() -> None:
    check_golden("exabgp_empty.conf", render_config(ROUTER_ID, 64512, [], RELAY, False))


def test_env_matches_golden() -> None:
    env = render_env([ip_address("10.0.0.1"), ip_address("fd00::1"), ip_address("10.0.0.1")])
    check_golden("exabgp_env.json", json.dumps(env, indent=1) + "\n")


def test_rendering_is_deterministic() -> None:
    expected = render_config(ROUTER_ID, 64512, SESSIONS, RELAY, True)
    shuffled = list(SESSIONS)
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert render_config(ROUTER_ID, 64512, shuffled, RELAY, True) == expected
    assert list(render_env([ip_address("10.0.0.1")])) == sorted(render_env([]))


def test_every_node_runs_the_measured_reactor_speed() -> None:
    assert render_env([])["exabgp.reactor.speed"] == NODE_SPEED == "20"


def test_env_outbound_only_and_custom_port() -> None:
    assert render_env([])["exabgp.tcp.bind"] == ""
    # A non-default listen port is set per neighbour: exabgp.tcp.port would also change
    # the port ExaBGP connects to.
    assert render_env([ip_address("10.0.0.1")], listen_port=1790)["exabgp.tcp.bind"] == ""
    text = render_config(ROUTER_ID, 64512, [session("10.0.0.2")], RELAY, True, listen_port=1790)
    assert "    listen 1790;\n" in text
    assert "exabgp.tcp.port" not in render_env([])
    with pytest.raises(ValueError, match="exabgp"):
        render_env([], extra={"daemon.user": "nobody"})


def test_api_block_names_are_unique_and_legal() -> None:
    names = {api_block_name(s.peer_ip) for s in SESSIONS}
    assert len(names) == len(SESSIONS)
    assert api_block_name(ip_address("fd00::2")) == "api-fd00--2"


def test_graceful_restart_is_omitted_when_off() -> None:
    text = render_config(ROUTER_ID, 64512, SESSIONS, RELAY, True)
    block = text.split("neighbor 192.0.2.1 {")[1].split("\n}\n")[0]
    assert "graceful-restart" not in block
    assert "route-refresh;" in block
    assert "        graceful-restart 120;" in text


@pytest.mark.parametrize(
    ("sessions", "listen", "message"),
    [
        ([session("10.0.0.2"), session("10.0.0.2", hold_time=9)], True, "two sessions"),
        ([session("10.0.0.2", passive=True)], False, "does not listen"),
        ([session("10.0.0.2", router_id=IPv4Address("10.0.0.5"))], True, "router_id"),
        ([session("10.0.0.2", local_address=ip_address("fd00::1"))], True, "another family"),
        ([session("10.0.0.2", md5_password="x" * 81)], True, "longer than 80"),
        ([session("10.0.0.2", hold_time=2)], True, "hold_time"),
        ([session("10.0.0.2", peer_as=0)], True, "AS number"),
        ([session("10.0.0.2", peer_port=0)], True, "TCP port"),
        ([session("10.0.0.2", graceful_restart_time=5000)], True, "12 bits"),
    ],
)
def test_unexpressible_sessions_are_refused(
    sessions: list[SessionSpec], listen: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_config(ROUTER_ID, 64512, sessions, RELAY, listen)


def test_relay_command_that_exabgp_cannot_tokenise_is_refused() -> None:
    with pytest.raises(ValueError, match="relay_cmd"):
        render_config(ROUTER_ID, 64512, [], ["/usr/bin/python3", "it's.py"], True)
    text = render_config(ROUTER_ID, 64512, [], ["/usr/bin/python3", "/a b/relay.py"], True)
    assert 'run /usr/bin/python3 "/a b/relay.py";' in text


@pytest.mark.skipif(shutil.which("exabgp") is None, reason="needs exabgp")
def test_exabgp_itself_accepts_the_rendering(tmp_path: Path) -> None:
    # The golden sessions include a quote, a backslash and an apostrophe in user input.
    relay = [sys.executable, "-I", "-S", "/nonexistent/relay.py", str(tmp_path / "api.sock")]
    path = tmp_path / "exabgp.conf"
    path.write_text(render_config(ROUTER_ID, 64512, SESSIONS, relay, True))
    done = subprocess.run(
        ["exabgp", "validate", "-n", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for peer in ("10.0.0.2", "10.0.0.3", "10.0.0.9", "192.0.2.1", "fd00::2"):
        assert f"neighbor  {peer}" in done.stdout + done.stderr
