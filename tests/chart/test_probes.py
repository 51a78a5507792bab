"""The agent DaemonSet's probes: `l3fabric node status --check` (readiness: routing runs and every
desired BGP session is established) and `node status -o json` (liveness: the socket answers),
against the agent's real socket server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bgp_speaker.agent.api import ApiServer
from l3fabric.cli import main as cli_main
from l3fabric.commands.agent import sessions_ready


def _peer(address: str, state: str) -> dict[str, Any]:
    return {"address": address, "type": "mesh", "state": state, "since": 0.0}


UP = {"router_id": "192.0.2.1", "peers": [_peer("192.0.2.2", "established")] * 2}
ONE_DOWN = {
    "router_id": "192.0.2.1",
    "peers": [_peer("192.0.2.2", "established"), _peer("192.0.2.3", "connect")],
}
NOT_STARTED = {"router_id": None, "peers": []}
ALONE = {"router_id": "192.0.2.1", "peers": []}


@pytest.mark.parametrize(
    ("status", "ready", "line"),
    [
        (UP, True, "ready: 2/2 BGP sessions established"),
        (ONE_DOWN, False, "not ready: 1/2 BGP sessions established; down: 192.0.2.3 (connect)"),
        (NOT_STARTED, False, "not ready: routing not started"),
        (ALONE, True, "ready: 0/0 BGP sessions established"),
    ],
)
def test_sessions_ready(status, ready, line):
    got_ready, got_line = sessions_ready(status)
    assert got_ready is ready
    assert got_line.startswith(line)


@pytest.fixture
def agent_socket(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The agent's socket server answering `node.status` with whatever the test puts in."""
    path = tmp_path / "agent.sock"
    status: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    server = ApiServer(path, {"node.status": lambda args: status}, workers=1)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield path, status
    asyncio.run_coroutine_threadsafe(server.shutdown(1), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.mark.parametrize(("state", "code"), [(UP, 0), (ONE_DOWN, 1), (NOT_STARTED, 1)])
def test_readiness_probe_exit_code(agent_socket, capsys, state, code):
    path, status = agent_socket
    status.update(state)
    assert cli_main(["node", "status", "--socket", str(path), "--check"]) == code
    assert "ready" in capsys.readouterr().out


def test_liveness_probe_passes_while_the_socket_answers(agent_socket, capsys):
    path, status = agent_socket
    status.update(ONE_DOWN)  # not ready, but alive
    assert cli_main(["node", "status", "--socket", str(path), "--output=json"]) == 0
    capsys.readouterr()


def test_probes_fail_without_an_agent(tmp_path, capsys):
    missing = str(tmp_path / "none.sock")
    assert cli_main(["node", "status", "--socket", missing, "--check"]) == 1
    assert cli_main(["node", "status", "--socket", missing, "--output=json"]) == 1
    assert "no agent answers" in capsys.readouterr().err
