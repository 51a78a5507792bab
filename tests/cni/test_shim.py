"""The shim as the runtime runs it, against a stand-in agent: what it forwards, what it
prints, its exit status, and that its hot path imports only cheap standard library."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import errors
from cni.install import install

REPO = Path(__file__).resolve().parents[2]
# Heavy or slow-to-import modules the shim must never load on its way to the agent.
FORBIDDEN = {
    "netaddr", "pyroute2", "kubernetes", "ipam_blocks", "bgp_speaker", "bgp_speaker.pods.dataplane",
    "json", "re", "typing", "socket", "dataclasses", "enum", "asyncio", "logging", "os",
}  # fmt: skip


class StubAgent:
    """Answers every request with `reply` and keeps what it was asked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[Any] = []
        self.reply: dict[str, Any] = {"ok": True, "result": None}
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(str(path))
        self._sock.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                self.requests.append(json.loads(f.readline()))
                f.write(json.dumps(self.reply).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[StubAgent]:
    agent = StubAgent(tmp_path / "agent.sock")
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cni")
    return install(root / "bin", root / "conf").plugin


def env(command: str = "ADD", **extra: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "ctr1",
        "CNI_NETNS": "/var/run/netns/pod1",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web",
        **extra,
    }


def conf(socket_path: Path | str, **extra: Any) -> bytes:
    base = {"cniVersion": "1.0.0", "name": "l3fabric", "type": "l3fabric"}
    return json.dumps({**base, "socket": str(socket_path), **extra}).encode()


def run(plugin: Path, environ: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([str(plugin)], input=stdin, env=environ, capture_output=True)


def test_version_is_answered_without_the_agent(plugin: Path) -> None:
    out = run(plugin, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    assert out.returncode == 0
    assert json.loads(out.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
    }


def test_add_forwards_env_and_config_and_prints_the_result(plugin: Path, stub: StubAgent) -> None:
    result = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/32", "interface": 1}]}
    stub.reply = {"ok": True, "result": result}
    out = run(plugin, env() | {"HOME": "/root", "SECRET": "x"}, conf(stub.path, mtu=1400))
    assert out.returncode == 0, out
    assert json.loads(out.stdout) == result
    [request] = stub.requests
    assert request["op"] == "cni.add"
    assert request["args"]["env"] == env()  # CNI_* only
    assert request["args"]["config"]["mtu"] == 1400


def test_del_prints_nothing_and_agent_errors_pass_through(plugin: Path, stub: StubAgent) -> None:
    out = run(plugin, env("DEL"), conf(stub.path, cniVersion="0.4.0"))
    assert out.returncode == 0 and out.stdout == b""
    stub.reply = {"ok": False, "error": {"code": 100, "msg": "pool exhausted", "details": "d"}}
    out = run(plugin, env(), conf(stub.path, cniVersion="0.4.0"))
    assert out.returncode == 1
    assert json.loads(out.stdout) == {
        "cniVersion": "0.4.0", "code": 100, "msg": "pool exhausted", "details": "d"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("environ", "stdin", "code", "word"),
    [
        ({}, b"{}", errors.INVALID_ENV, "CNI_COMMAND"),
        (env(CNI_IFNAME=""), None, errors.INVALID_ENV, "CNI_IFNAME"),
        (env(), b"{not json", errors.UNDECODABLE_CONFIG, "decode"),
        (env(), b'{"cniVersion": "0.1.0", "name": "n"}', errors.INCOMPATIBLE_VERSION, "0.1.0"),
        (env(), b'{"cniVersion": "1.0.0", "name": "n", "mtu": -1}', errors.INVALID_CONFIG, "mtu"),
        (env(), None, errors.TRY_AGAIN_LATER, "unreachable"),
        (env("STATUS"), b'{"cniVersion": "1.1.0", "name": "n", "socket": "/nonexistent"}',
         errors.NOT_AVAILABLE, "unreachable"),
    ],
)  # fmt: skip
def test_errors_without_an_agent(
    plugin: Path, tmp_path: Path, environ: dict, stdin: bytes | None, code: int, word: str
) -> None:
    out = run(plugin, environ, stdin if stdin is not None else conf(tmp_path / "none.sock"))
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["code"] == code and word in f"{err['msg']} {err['details']}", err
    assert set(err) == {"cniVersion", "code", "msg", "details"}


def test_hot_path_imports_only_cheap_standard_library(stub: StubAgent) -> None:
    stub.reply = {"ok": True, "result": {"cniVersion": "1.0.0"}}
    probe = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from cni.shim import main; rc = main(); "
        "sys.stderr.write(' '.join(sys.modules)); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe],
        input=conf(stub.path),
        env=env(),
        capture_output=True,
    )
    assert out.returncode == 0, out
    assert len(stub.requests) == 1  # it really did a full ADD round trip
    loaded = set(out.stderr.decode().split())
    assert not {m for m in loaded if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN}
