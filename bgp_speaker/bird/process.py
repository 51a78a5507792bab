"""BIRD 2 as the node's route reflector: configured from `ReflectorDesired`, supervised.

- `apply(desired)` only records what is wanted and wakes one worker, so a burst of store
  changes becomes one reload: the worker waits RELOAD_DEBOUNCE, renders the latest, and
  does nothing when the text is what BIRD runs already. A new text is checked with
  `bird -p` first (a refused one is logged and BIRD keeps the last good one), then
  written (0600) and loaded with `configure` on the control socket; BIRD restarts only
  the sessions whose protocol changed. `apply(None)` (no longer a reflector) stops BIRD.
- BIRD runs in the foreground through `kernel/tether.py` (it dies with the agent, enters
  the node's namespace); when it exits on its own it is restarted with backoff. The agent
  stops it with SIGKILL, as it stops ExaBGP: no NOTIFICATION goes out, so clients with
  graceful restart keep the routes while the agent restarts.
- Its files live under the agent's state dir in a 0700 directory: bird.conf (0600), the
  control socket (0600) and the pid file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bgp_speaker.bgp.reflection import ReflectorDesired, ReflectorSessionState
from bgp_speaker.bird.config import render_bird_config
from bgp_speaker.bird.control import BirdCommandFailed, BirdUnavailable, bird_command
from bgp_speaker.bird.protocols import parse_protocols
from bgp_speaker.kernel.netns import netns_path
from bgp_speaker.kernel.tether import tethered

__all__ = ["BirdReflector"]

log = logging.getLogger("l3fabric.agent.bird")

RELOAD_DEBOUNCE = 0.2
READY_TIMEOUT = 10.0
BACKOFF = (1.0, 30.0, 60.0)  # first delay, cap, a run this long resets the backoff
NO_LISTENING_SOCKET = "No listening socket"
REBIND_WINDOW = 10.0
REBIND_PAUSE = 0.5


class BirdReflector:
    """One supervised BIRD for a reflector node."""

    def __init__(
        self, workdir: str | os.PathLike[str], netns: str | None = None, bird: str = "bird"
    ) -> None:
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "bird.conf"
        self.socket_path = self.workdir / "bird.ctl"
        self.pid_path = self.workdir / "bird.pid"
        self.netns_path = None if netns is None else netns_path(netns)
        self._bird = shutil.which(bird) or bird
        # A configuration left by an earlier agent: its BIRD ran, and clients may hold its
        # routes by graceful restart.
        self._ran_before = self.config_path.exists()
        self._wanted: ReflectorDesired | None = None
        self._running_text: str | None = None
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._rebinder: asyncio.Task[None] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0
        self.reloads = 0
        self.last_error = ""

    # --- what the controller calls ----------------------------------------------------------

    def apply(self, desired: ReflectorDesired | None) -> None:
        """Make BIRD reflect as ``desired`` (None: stop it), soon and in the background."""
        if desired is not None and desired == self._wanted and self._alive():
            return  # every reconcile calls this: no render of 1000 sessions for nothing
        self._wanted = desired
        if desired is None and self._worker is None:
            return
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="bird-config")
        self._wake.set()

    @property
    def active(self) -> bool:
        return self._wanted is not None

    def describe(self) -> dict[str, Any]:
        return {
            "running": self._alive(),
            "pid": self._proc.pid if self._alive() and self._proc else None,
            "restarts": self.restarts,
            "reloads": self.reloads,
            "last_error": self.last_error,
        }

    async def stop(self) -> None:
        for task in (self._worker, self._supervisor, self._rebinder):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._worker = self._supervisor = self._rebinder = None
        self._kill()

    async def sessions(self) -> tuple[ReflectorSessionState, ...]:
        """BIRD's BGP sessions now (empty while BIRD is not up)."""
        if not self._alive():
            return ()
        try:
            reply = await bird_command(self.socket_path, "show protocols all")
        except (BirdUnavailable, BirdCommandFailed) as err:
            log.warning("cannot read BIRD's sessions", extra={"op": "bird", "reason": str(err)})
            return ()
        return parse_protocols(reply.text())

    # --- configuration ----------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(RELOAD_DEBOUNCE)  # merge a burst of changes into one reload
            self._wake.clear()
            wanted = self._wanted
            if wanted is None:
                self._stop_bird()
                continue
            try:
                await self._configure(wanted)
                self.last_error = ""
            except Exception as err:  # level state: the next change or restart tries again
                self.last_error = str(err)
                log.error("BIRD not configured", extra={"op": "bird", "reason": str(err)})

    async def _configure(self, wanted: ReflectorDesired) -> None:
        try:
            text = render_bird_config(wanted)
        except ValueError as err:
            raise ValueError(f"cannot render BIRD's configuration: {err}") from err
        if text == self._running_text and self._alive():
            return
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        candidate = self.config_path.with_suffix(".new")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        check = await asyncio.create_subprocess_exec(
            self._bird, "-p", "-c", str(candidate),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await check.communicate()
        if check.returncode != 0:
            raise ValueError(f"bird -p refused the configuration: {output.decode().strip()}")
        candidate.replace(self.config_path)
        if not self._alive():
            self._running_text = text
            self._ensure_supervised()
            await self._wait_ready()
        else:
            reply = await bird_command(self.socket_path, "configure")
            self._running_text = text
            self.reloads += 1
            log.info("BIRD reconfigured", extra={"op": "bird", "reason": reply.text().strip()})
        if self._rebinder is not None:
            self._rebinder.cancel()
        self._rebinder = asyncio.create_task(self._rebind(), name="bird-rebind")

    async def _rebind(self) -> None:
        """Enable again sessions that found no listening socket, for REBIND_WINDOW seconds
        after a configuration was loaded. BIRD binds a session's local address when the
        session starts and disables it when that fails: at the moment a node becomes a
        reflector, ExaBGP may still hold the port for a moment."""
        for _ in range(int(REBIND_WINDOW / REBIND_PAUSE)):
            await asyncio.sleep(REBIND_PAUSE)
            try:
                reply = await bird_command(self.socket_path, "show protocols")
            except (BirdUnavailable, BirdCommandFailed):
                continue  # restarting: the supervisor's business
            for _, line in reply.lines:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "down" and NO_LISTENING_SOCKET in line:
                    log.info("enabling a session that could not listen", extra={
                        "op": "bird", "protocol": fields[0],
                    })  # fmt: skip
                    with contextlib.suppress(BirdUnavailable, BirdCommandFailed):
                        await bird_command(self.socket_path, f"enable {fields[0]}")

    # --- the process ------------------------------------------------------------------------

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure_supervised(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name="bird")

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._alive() and self.socket_path.exists():
                with contextlib.suppress(BirdUnavailable, BirdCommandFailed):
                    await bird_command(self.socket_path, "show status", timeout=1.0)
                    # BIRD makes its socket 0660 whatever the umask: the agent's alone.
                    os.chmod(self.socket_path, 0o600)
                    return
            await asyncio.sleep(0.05)
        raise BirdUnavailable(f"BIRD did not answer on {self.socket_path} in {READY_TIMEOUT} s")

    async def _quietly_wait_ready(self) -> None:
        with contextlib.suppress(BirdUnavailable):  # it died meanwhile: the supervisor knows
            await self._wait_ready()

    async def _supervise(self) -> None:
        initial, cap, stable_after = BACKOFF
        failures = 0
        while self._wanted is not None:
            started = time.monotonic()
            try:
                code = await self._run_once(recover=self._ran_before)
                self._ran_before = True
            except OSError as err:
                code = None
                log.error("cannot start BIRD", extra={"op": "bird", "reason": str(err)})
            if self._wanted is None:
                return
            lived = time.monotonic() - started
            failures = 0 if lived >= stable_after else failures
            delay = min(initial * 2**failures, cap)
            failures += 1
            self.restarts += 1
            self.last_error = f"BIRD exited with {code}"
            log.error("BIRD died", extra={"op": "bird", "code": code, "restart_in": delay})
            await asyncio.sleep(delay)  # then the loop starts it again, from the last good file

    async def _run_once(self, *, recover: bool) -> int:
        """Run BIRD until it exits. ``recover``: a BIRD ran for this node before (it died, or
        the agent restarted): graceful restart recovery (-R), so BIRD sends nothing until its
        peers have sent their End-of-RIBs (or `graceful restart wait` passed). Its peers kept
        our routes by graceful restart while it was away; without -R it would answer their
        return with a partial table and its End-of-RIB, and they would drop the rest. A
        first start has nothing to recover and would only wait (20 s at 1000 clients)."""
        argv = tethered(
            os.getpid(), self.netns_path,
            [self._bird, "-f", *(["-R"] if recover else []), "-c", str(self.config_path),
             "-s", str(self.socket_path), "-P", str(self.pid_path)],
        )  # fmt: skip
        # Forked from the event loop's thread: the parent-death signal follows that thread.
        proc = subprocess.Popen(
            argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._proc = proc
        log.info("BIRD started", extra={"op": "bird", "pid": proc.pid})
        assert proc.stdout is not None
        reader = asyncio.create_task(self._forward_log(proc.stdout.fileno()))
        ready = asyncio.create_task(self._quietly_wait_ready())  # its socket made private
        try:
            return await asyncio.to_thread(proc.wait)
        finally:
            reader.cancel()
            ready.cancel()

    async def _forward_log(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", closefd=False)
        )
        try:
            while line := await reader.readline():
                log.info("bird: %s", line.decode(errors="replace").rstrip())
        finally:
            transport.close()

    def _stop_bird(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        self._kill()
        self._running_text = None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
