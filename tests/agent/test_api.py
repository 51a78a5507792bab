"""The agent's socket server (`bgp_speaker.agent.api`) with stand-in ops."""

from __future__ import annotations

import asyncio
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bgp_speaker.agent.api import ApiServer, SocketInUse
from cni import errors, protocol
from cni.errors import CniError
from cni.protocol import MAX_LINE, AgentUnreachable, call, encode_request


def make_ops(release: threading.Event) -> dict[str, Callable[[dict[str, Any]], Any]]:
    def slow(args: dict[str, Any]) -> Any:
        release.wait(10)
        return {"slept": True}

    def cni_error(args: dict[str, Any]) -> Any:
        raise CniError(errors.POOL_EXHAUSTED, "pool exhausted", "no room")

    def bug(args: dict[str, Any]) -> Any:
        raise KeyError("oops")

    return {"echo": lambda args: args, "slow": slow, "cni": cni_error, "bug": bug}


def serve(tmp: Path, scenario: Callable[[ApiServer, Path], Awaitable[None]]) -> None:
    path = tmp / "sub" / "agent.sock"
    release = threading.Event()

    async def main() -> None:
        server = ApiServer(path, make_ops(release), workers=2)
        await server.start()
        try:
            await scenario(server, path)
        finally:
            release.set()
            await server.shutdown(5)

    asyncio.run(main())


async def request(path: Path, op: str, args: dict[str, Any] | None = None) -> Any:
    return await asyncio.to_thread(call, str(path), op, args or {}, 5.0)


def test_round_trip_and_errors(tmp_path: Path) -> None:
    async def scenario(server: ApiServer, path: Path) -> None:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await request(path, "echo", {"a": [1, "é"]}) == {"a": [1, "é"]}
        for op, code in (("cni", errors.POOL_EXHAUSTED), ("bug", errors.INTERNAL_ERROR),
                         ("nope", errors.INVALID_CONFIG)):  # fmt: skip
            with pytest.raises(CniError) as err:
                await request(path, op)
            assert err.value.code == code

    serve(tmp_path, scenario)


def test_several_requests_on_one_connection_and_garbage(tmp_path: Path) -> None:
    async def scenario(server: ApiServer, path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(encode_request("echo", {"n": 1}) + b"not json\n" + encode_request("echo", {}))
        lines = [await reader.readline() for _ in range(3)]
        assert lines[0] == b'{"ok":true,"result":{"n":1}}\n'
        assert b'"code":6' in lines[1]
        assert lines[2] == b'{"ok":true,"result":{}}\n'
        writer.close()

    serve(tmp_path, scenario)


def test_shutdown_finishes_running_requests_and_removes_the_socket(tmp_path: Path) -> None:
    release = threading.Event()
    path = tmp_path / "agent.sock"

    async def main() -> None:
        server = ApiServer(path, make_ops(release), workers=2)
        await server.start()
        running = asyncio.create_task(request(path, "slow"))
        while server.in_flight == 0:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.shutdown(10))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # waits for the slow request
        assert not path.exists()  # but accepts nothing new
        with pytest.raises(AgentUnreachable):
            await request(path, "echo")
        release.set()
        assert await running == {"slept": True}
        await stopping

    asyncio.run(main())


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves

    async def scenario(server: ApiServer, p: Path) -> None:
        assert await request(p, "echo", {}) == {}
        with pytest.raises(SocketInUse):
            await ApiServer(p, {}, workers=1).start()

    async def main() -> None:
        server = ApiServer(path, {"echo": lambda a: a}, workers=1)
        await server.start()
        try:
            await scenario(server, path)
        finally:
            await server.shutdown(1)

    asyncio.run(main())
    path.write_text("not a socket")
    with pytest.raises(SocketInUse):
        asyncio.run(ApiServer(path, {}, workers=1).start())


def test_deep_or_oversized_frames_are_refused_in_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nesting past the interpreter's recursion limit is a decode error (6), not an op bug
    (199 with a traceback); a frame over the limit gets its answer (7) though the agent
    stops reading it."""

    async def scenario(server: ApiServer, path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "echo", "args": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}\n")
        answer = await reader.readline()
        assert b'"code":6' in answer and b"nested" in answer, answer
        writer.close()
        monkeypatch.setattr(protocol, "MAX_LINE", 16 * protocol.MAX_LINE)
        with pytest.raises(CniError) as err:
            await request(path, "echo", {"pad": "P" * (2 * MAX_LINE)})
        assert err.value.code == errors.INVALID_CONFIG and "too large" in err.value.msg

    with caplog.at_level("WARNING", logger="l3fabric.agent.api"):
        serve(tmp_path, scenario)
    refused = [r for r in caplog.records if r.getMessage() == "refused a request"]
    assert [r.code for r in refused] == [errors.UNDECODABLE_CONFIG, errors.INVALID_CONFIG]  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info]


def test_ops_that_never_finish_are_given_up_on_and_stall_nobody(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stuck = threading.Event()  # never set before the end: an op blocked in the kernel, say

    async def main() -> None:
        ops = {"hang": lambda args: stuck.wait(30), "echo": lambda args: args}
        server = ApiServer(path, ops, workers=2, op_timeout=0.5)
        await server.start()
        try:
            started = time.monotonic()
            hung = [asyncio.create_task(request(path, "hang")) for _ in range(3)]  # > workers
            for task in hung:
                with pytest.raises(CniError) as err:
                    await task
                assert err.value.code == errors.TRY_AGAIN_LATER
                assert "did not finish within 0.5 s" in err.value.msg
            # Every slot was given back: other pods are served at once, hung threads or not.
            assert await request(path, "echo", {"pod": "next"}) == {"pod": "next"}
            assert time.monotonic() - started < 5
        finally:
            stuck.set()
            await server.shutdown(5)

    asyncio.run(main())
