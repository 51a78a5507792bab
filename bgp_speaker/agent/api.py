"""The agent's local API: a unix socket speaking `cni.protocol`, dispatching to ops.

Each op is a plain blocking function `args -> result` (IPAM and netlink block), run in a
thread of its own, at most `workers` at a time, so the event loop stays free for the agent's
other work. An op that has not finished after `op_timeout` is given up on: its caller hears
"try again later" and its slot goes to the next request, so one call stuck in the kernel or
the store can never stall other pods (its thread finishes, or not, on its own; the runtime's
retry meets the per-attachment lock and waits its turn). A client may send several requests
on one connection; they are answered in order.

Shutdown stops accepting, lets requests already running finish (a pod half set up is worse
than a refused one: the runtime retries a refused ADD), then closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cni.errors import INTERNAL_ERROR, INVALID_CONFIG, TRY_AGAIN_LATER, CniError
from cni.protocol import MAX_LINE, decode_request, encode_error, encode_result
from ipam_blocks.errors import L3FabricError

log = logging.getLogger("l3fabric.agent.api")
Op = Callable[[dict[str, Any]], Any]

# Below the shim's 60 s: the runtime hears "try again later" from us, not its own timeout.
DEFAULT_OP_TIMEOUT = 50.0


class SocketInUse(L3FabricError):
    """Another process answers on the socket path (an agent already runs)."""


class ApiServer:
    def __init__(
        self,
        path: Path,
        ops: Mapping[str, Op],
        *,
        workers: int,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
    ) -> None:
        self.path = path
        self.ops = dict(ops)
        self._slots = asyncio.Semaphore(workers)
        self._op_timeout = op_timeout
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    @property
    def in_flight(self) -> int:
        return self._running

    async def start(self) -> None:
        sock = _bind_private(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, wait up to `grace` s for running requests, close connections."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        self._unlink()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.error(
                "requests still running at shutdown",
                extra={"op": "shutdown", "reason": f"{self._running} after {grace:g} s"},
            )
        for writer in list(self._connections):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
        # Threads still busy (only after the grace period) are daemons: not waited for.

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while not self._closing:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break  # client closed (possibly mid-line: nothing to answer)
                except asyncio.LimitOverrunError:
                    err = CniError(INVALID_CONFIG, "request too large", f"over {MAX_LINE} bytes")
                    _log_refused(err)
                    writer.write(encode_error(err))
                    await writer.drain()
                    break  # the client reads this answer even though its write is cut short
                writer.write(await self._answer(line))
                await writer.drain()
        except ConnectionError:
            pass  # the client went away; its request (if any) was carried out regardless
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _answer(self, line: bytes) -> bytes:
        if self._closing:
            return encode_error(CniError(TRY_AGAIN_LATER, "l3fabric agent is shutting down"))
        self._running += 1
        self._idle.clear()
        try:
            try:
                op, args = decode_request(line)
            except CniError as err:
                _log_refused(err)
                raise
            fn = self.ops.get(op)
            if fn is None:
                raise CniError(INVALID_CONFIG, f"unknown op {op!r}", f"ops: {sorted(self.ops)}")
            return encode_result(await self._run(op, fn, args))
        except CniError as err:
            return encode_error(err)
        except Exception as err:  # an op's bug must not take the agent down
            log.exception("op failed", extra={"op": "api", "reason": repr(err)})
            return encode_error(CniError(INTERNAL_ERROR, "internal error", repr(err)))
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def _run(self, op: str, fn: Op, args: dict[str, Any]) -> Any:
        await self._slots.acquire()
        try:
            done = _in_thread(op, fn, args)
            try:
                return await asyncio.wait_for(asyncio.shield(done), self._op_timeout)
            except TimeoutError:
                log.error(
                    "op given up on",
                    extra={"op": op, "reason": f"still running after {self._op_timeout:g} s"},
                )
                raise CniError(
                    TRY_AGAIN_LATER,
                    f"{op} did not finish within {self._op_timeout:g} s",
                    "the agent stopped waiting for it; try again later",
                ) from None
        finally:
            self._slots.release()

    def _unlink(self) -> None:
        # Only our own socket: a new agent may already have bound the path.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def _log_refused(err: CniError) -> None:
    """One line for a request that could not be read (never its content or a traceback)."""
    log.warning("refused a request", extra={"op": "api", "code": err.code, "reason": str(err)})


def _bind_private(path: Path) -> socket.socket:
    """A listening socket at `path` with mode 0600 from the start (no window where others
    could connect), replacing a stale socket file but never a live agent's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # bind creates the file: 0777 & ~0177 = 0600
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listening: left by an agent that died
        return
    finally:
        probe.close()
    raise SocketInUse(f"another agent is listening on {path}")


def _in_thread(op: str, fn: Op, args: dict[str, Any]) -> asyncio.Future[Any]:
    """`fn(args)` in a daemon thread of its own; the future settles when it returns."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def work() -> None:
        try:
            result, error = fn(args), None
        except BaseException as err:  # handed to the event loop, raised to the caller there
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop closed while we ran: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=f"api-{op}", daemon=True).start()
    return done
