"""ExaBGPSpeaker: the agent's BGP speaker, an ExaBGP child process driven over its API.

Errors, by what the caller should do::

    SpeakerError
    ├── ConfigRejected      invalid desired state (render or `exabgp validate` refused it);
    │                       the running daemon was not touched. Fix the input.
    ├── CommandFailed       ExaBGP answered `error` (e.g. EOR to a peer that is not up).
    └── SpeakerUnavailable  transient: ExaBGP is (re)starting or did not answer in time;
                            look again after the next SpeakerRestarted.

How it works, and why:

- ``set_sessions`` renders the whole config (exabgp_config), skips an unchanged render,
  checks the file with ``exabgp validate`` (a reload of a bad file still answers ``done``),
  then starts ExaBGP or makes it reload (rewrite + SIGUSR1). ExaBGP silently *drops* a
  SIGUSR1 that arrives while it still has routes queued for a peer, so a reload only counts
  once ExaBGP logs "loaded new configuration successfully"; until then it is re-signalled.
  (A SIGUSR1 before ExaBGP installed its handlers would kill it: a new ExaBGP is signalled
  only after its relay connected, which ExaBGP starts after that.)
- ExaBGP runs in its own session (``start_new_session``) inside ``netns``, started through
  kernel/tether.py: it enters the namespace (so the agent never switches one) and ties
  ExaBGP's life to the agent's (PR_SET_PDEATHSIG, SIGKILL): an agent killed by anything
  takes its ExaBGP, and with it the relay, along. A pidfd tells the supervisor the moment
  it exits; it is restarted with capped exponential backoff, reset after a stable period,
  and ``SpeakerRestarted`` is yielded when the new one is ready. A new speaker on the same
  workdir first ends an ExaBGP a previous agent left (its pid file, checked against
  /proc/PID/cmdline naming our config).
- ExaBGP's API process is exabgp/relay.py, which connects to a unix socket the speaker
  owns. Every command gets exactly one ``done``/``error`` (``exabgp.api.ack=true``); they
  are matched in order. Commands ExaBGP may answer out of order (EOR, route refresh, clear
  adj-rib) are sent only when nothing else awaits an ack.
- ExaBGP gives routes announced over the API only to neighbours that exist at that moment,
  and forgets them all when it restarts. So the speaker keeps the export set (``announce``/
  ``withdraw``) as *level* state and replays them to
  neighbours that ``set_sessions`` adds and to every neighbour of a restarted ExaBGP:
  ``announce`` means "advertise to every session, now and later".
- If the relay ever loses output lines (it drops rather than block ExaBGP) or its
  connection, updates or withdrawals may be lost, which a route refresh cannot repair
  (it re-sends routes, never the withdrawals). The speaker then restarts ExaBGP with
  SIGKILL — no NOTIFICATION, so graceful-restart peers keep our routes — and the agent
  resynchronises on ``SpeakerRestarted`` exactly as after a crash.

What the agent does: ``start``; ``set_sessions`` whenever the desired sessions change;
``announce``/``withdraw`` its exports as they change; on every
``PeerStateChanged(UP)``, once its exports are announced, ``send_eor(peer)`` (sessions use
``manual-eor``: ExaBGP never sends an End-of-RIB by itself); on ``SpeakerRestarted`` treat
every session as new (the speaker has already replayed the exports); ``stop`` at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bgp_speaker.bgp.routes import (
    IPAddr,
    IPNet,
    SessionSpec,
    SpeakerEvent,
    SpeakerRestarted,
)
from bgp_speaker.exabgp.codec import (
    Ack,
    MalformedMessage,
    OutgoingAttributes,
    Output,
    Received,
    RelayDropped,
    RelayHello,
    acked_in_order,
    group_by_attributes,
    parse_line,
    render_announce,
    render_clear_adj_rib_out,
    render_eor,
    render_route_refresh,
    render_withdraw,
)
from bgp_speaker.exabgp.config import API_ROUTES_PER_LOOP, render_config, render_env
from bgp_speaker.exabgp.relay import DEFAULT_MAX_BUFFER
from bgp_speaker.kernel.netns import netns_path, open_netns
from bgp_speaker.kernel.tether import tethered

__all__ = [
    "CommandFailed",
    "ConfigRejected",
    "ExaBGPSpeaker",
    "SpeakerError",
    "SpeakerUnavailable",
]

log = logging.getLogger("l3fabric.bgp.exabgp")

RELAY_SCRIPT = Path(__file__).resolve().with_name("relay.py")
LINE_LIMIT = 64 * 1024 * 1024  # one JSON line per UPDATE; extended messages make them big
LOG_PIPE_SIZE = 1024 * 1024  # Linux's default pipe-max-size
MAX_UNIX_PATH = 107
RELOAD_OK = "loaded new configuration successfully"
RELOAD_FAILED = "could not load/reload configuration"
RESIGNAL_EVERY = 1.0  # seconds between SIGUSR1s until ExaBGP confirms a reload
_END = object()


class SpeakerError(Exception):
    """Base of the speaker's errors."""


class ConfigRejected(SpeakerError, ValueError):
    """The desired sessions cannot be configured; the running ExaBGP was left alone."""


class CommandFailed(SpeakerError):
    """ExaBGP answered ``error`` to a command."""

    def __init__(self, command: str) -> None:
        super().__init__(f"ExaBGP refused: {command[:160]}")
        self.command = command


class SpeakerUnavailable(SpeakerError):
    """ExaBGP is not running or not answering (transient)."""


_Sent = tuple[str, "asyncio.Future[bool]"]  # a command and the future of its ack


def _session_key(s: SessionSpec) -> tuple[object, ...]:
    # ExaBGP's own neighbour identity; a different key is a different adj-RIB-out.
    return (s.peer_ip, s.local_address, s.local_as, s.peer_as, s.router_id)


@dataclass(eq=False)
class _Connection:
    """One relay connection: the command stream of one relay process."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    generation: int
    pending: deque[tuple[str, asyncio.Future[bool]]] = field(default_factory=deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    relay_pid: int = 0

    def fail_pending(self, reason: str) -> None:
        while self.pending:
            _, future = self.pending.popleft()
            if not future.done():
                future.set_exception(SpeakerUnavailable(reason))
        self.changed.set()

    def close(self, reason: str) -> None:
        self.closed = True
        self.fail_pending(reason)
        self.writer.close()


@dataclass
class _Instance:
    """One ExaBGP process."""

    proc: subprocess.Popen[bytes]
    generation: int
    started: float
    exited: asyncio.Future[int]
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    reloads_ok: int = 0
    reloads_failed: int = 0
    log_changed: asyncio.Event = field(default_factory=asyncio.Event)
    hello: asyncio.Event = field(default_factory=asyncio.Event)  # its relay connected
    had_connection: bool = False
    killed: bool = False  # by us, on purpose


class ExaBGPSpeaker:
    """The BGP speaker adapter: one supervised ExaBGP, its config and its API."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        router_id: IPv4Address,
        local_as: int,
        listen: bool,
        netns: str | None = None,
        *,
        listen_port: int = 179,
        exabgp: Sequence[str] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        start_timeout: float = 20.0,
        reload_wait: float = 90.0,
        command_timeout: float = 60.0,
        window: int = 8,
        relay_buffer: int = DEFAULT_MAX_BUFFER,
        env_extra: dict[str, str] | None = None,
        api_tap: Callable[[str], None] | None = None,
    ) -> None:
        """``netns``: a name under /var/run/netns or a path; None runs ExaBGP right here.

        ``exabgp`` is the command that runs ExaBGP (default: ``exabgp`` on PATH, else
        ``python -m exabgp``). ``window`` bounds commands awaiting their ack. ``api_tap``
        sees every raw line from the relay (debugging, capturing samples for tests).
        ``reload_wait`` bounds how long set_sessions re-signals a reload ExaBGP defers.
        Restarts back off from ``backoff_initial`` doubling to ``backoff_max``, reset once
        an ExaBGP has run ``stable_after`` seconds.
        """
        self.workdir = Path(workdir).resolve()
        self.router_id = router_id
        self.local_as = local_as
        self.listen = listen
        self.listen_port = listen_port
        self.netns_path = None if netns is None else netns_path(netns)
        found = shutil.which("exabgp")
        self._exabgp = list(exabgp or ([found] if found else [sys.executable, "-m", "exabgp"]))
        self.config_path = self.workdir / "exabgp.conf"
        self.socket_path = self.workdir / "api.sock"
        self.pid_path = self.workdir / "exabgp.pid"
        if len(str(self.socket_path)) > MAX_UNIX_PATH:
            raise ValueError(f"workdir: {self.socket_path} is too long for a unix socket")
        self._relay_cmd = [
            sys.executable, "-I", "-S", str(RELAY_SCRIPT), str(self.socket_path),
            str(relay_buffer),
        ]  # fmt: skip
        self._backoff = (backoff_initial, backoff_max, stable_after)
        self._start_timeout = start_timeout
        self._reload_wait = reload_wait
        self._command_timeout = command_timeout
        self._window = max(1, window)
        self._env_extra = dict(env_extra or {})
        self._api_tap = api_tap

        self._sessions: tuple[SessionSpec, ...] = ()  # desired
        self._applied: tuple[SessionSpec, ...] = ()  # confirmed by ExaBGP
        self._rendered: str | None = None  # the text ExaBGP runs with, once confirmed
        self._env: dict[str, str] | None = None
        self._exports: dict[IPNet, OutgoingAttributes] = {}

        self._events: asyncio.Queue[object] = asyncio.Queue()
        self._cmd_lock = asyncio.Lock()  # record updates + command order are one step
        self._config_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._api: _Connection | None = None  # the ready connection, if any
        self._conn: _Connection | None = None  # the latest connection, ready or not
        self._instance: _Instance | None = None
        self._generation = 0
        self._ever_ready = False
        self._restart_reason = ""
        self._server: asyncio.AbstractServer | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._wake_supervisor = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._relay_pids: set[int] = set()
        self._started = False
        self._stopping = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Own the workdir and the API socket. ExaBGP starts with the first set_sessions."""
        if self._started:
            raise RuntimeError("speaker already started")
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.netns_path is not None:
            with open_netns(self.netns_path):
                pass  # fail now, with a clear error, rather than at the first spawn
        self._kill_stale()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(
            self._on_relay, path=str(self.socket_path), limit=LINE_LIMIT
        )
        os.chmod(self.socket_path, 0o600)
        self._started = True
        log.info("speaker started", extra={"op": "speaker_start", "workdir": str(self.workdir)})

    async def stop(self, *, keep_routes: bool = True) -> None:
        """Stop ExaBGP and the API socket.

        ``keep_routes``: SIGKILL, so ExaBGP sends no NOTIFICATION and graceful-restart peers
        keep our routes until we are back. False: SIGTERM, ExaBGP closes every session with a
        Cease and peers drop our routes at once.
        """
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._wake_supervisor.set()
        instance = self._instance
        if instance is not None and not instance.exited.done():
            instance.proc.send_signal(signal.SIGKILL if keep_routes else signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(instance.exited), 10)
            except TimeoutError:
                instance.proc.kill()
                await instance.exited
        if self._supervisor is not None:
            await self._supervisor
        await self._reap_relays()
        if self._conn is not None:
            self._conn.close("speaker stopped")
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for path in (self.socket_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._events.put_nowait(_END)
        log.info("speaker stopped", extra={"op": "speaker_stop"})

    @property
    def pid(self) -> int | None:
        """ExaBGP's pid while it runs."""
        instance = self._instance
        return instance.proc.pid if instance and not instance.exited.done() else None

    @property
    def sessions(self) -> tuple[SessionSpec, ...]:
        return self._sessions

    @property
    def ready(self) -> bool:
        """ExaBGP runs and its API answers."""
        return self._api is not None

    async def wait_ready(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise SpeakerUnavailable(f"ExaBGP not ready after {timeout} s") from None

    async def events(self) -> AsyncIterator[SpeakerEvent]:
        """Speaker events, in the order ExaBGP reported them, until ``stop``."""
        while True:
            item = await self._events.get()
            if item is _END:
                return
            yield item  # type: ignore[misc]

    # --- sessions -------------------------------------------------------------------------

    async def set_sessions(
        self,
        sessions: Sequence[SessionSpec],
        *,
        handed_over: Collection[IPAddr] = (),
        listen: bool = True,
    ) -> bool:
        """Make ExaBGP's neighbours exactly ``sessions``. False: nothing changed.

        A removed session whose peer is in ``handed_over`` (BIRD takes it) goes without a
        NOTIFICATION: ExaBGP is restarted rather than reloaded. ``listen`` False (on a
        reflector node, where BIRD listens) binds nothing, whatever the speaker's setting.

        Unchanged sessions stay up. Raises ConfigRejected (nothing touched) for a desired
        state ExaBGP would refuse, SpeakerUnavailable if ExaBGP does not come up or confirm
        the reload within ``reload_wait``. Usually returns in well under a second; while an
        active neighbour is down with routes queued for it, ExaBGP defers reloads until its
        next connection attempt (up to ~60 s). Announcements are not held up meanwhile.
        """
        if not self._started or self._stopping:
            raise RuntimeError("speaker not running")
        wanted = tuple(sessions)
        async with self._config_lock:
            try:
                text = render_config(
                    self.router_id, self.local_as, wanted, self._relay_cmd, self.listen,
                    listen_port=self.listen_port,
                )  # fmt: skip
                env = render_env(
                    [s.local_address for s in wanted] if self.listen and listen else [],
                    listen_port=self.listen_port,
                    extra=self._env_extra,
                )
            except ValueError as err:
                raise ConfigRejected(str(err)) from err
            instance = self._instance
            running = instance is not None and not instance.exited.done()
            handed = {s.peer_ip for s in self._applied} & set(handed_over) - {
                s.peer_ip for s in wanted
            }
            if text == self._rendered and env == self._env and running:
                return False
            await self._validate(text, env)
            self.config_path.with_suffix(".new").replace(self.config_path)
            # Until ExaBGP confirms, the file and ExaBGP may differ: never skip a retry.
            self._rendered = None
            # No lock needed: nothing awaits between reading these and acting on them, and
            # taking _cmd_lock would wait behind a whole flood of announcements.
            self._sessions = wanted
            log.info(
                "sessions configured",
                extra={"op": "set_sessions", "sessions": len(wanted), "running": running},
            )
            if self._supervisor is None:
                self._env = env
                self._supervisor = asyncio.create_task(self._supervise(), name="exabgp")
                await self.wait_ready(self._start_timeout)
            elif env != self._env or handed:
                self._env = env  # only a new process takes a new environment
                # A reload would close handed-over sessions with a NOTIFICATION, and the peer
                # would drop our routes; a killed ExaBGP sends none (graceful restart).
                self._request_restart(
                    "sessions handed over" if handed else "listen addresses changed"
                )
                await self.wait_ready(self._start_timeout)
            elif running:
                await self._reload(instance)  # type: ignore[arg-type]
                await self._replay_to_new(self._applied, wanted)
            # else: ExaBGP is between a crash and its restart, which reads the new file.
            self._applied = wanted
            self._rendered = text
            return True

    async def _validate(self, text: str, env: dict[str, str]) -> None:
        candidate = self.config_path.with_suffix(".new")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        proc = await asyncio.create_subprocess_exec(
            *self._exabgp, "validate", str(candidate),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=self._child_env(env), cwd=self.workdir,
        )  # fmt: skip
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            candidate.unlink(missing_ok=True)
            reason = output.decode(errors="replace").strip().splitlines()[-3:]
            log.error("config refused", extra={"op": "validate", "reason": " | ".join(reason)})
            raise ConfigRejected("exabgp validate: " + " | ".join(reason))

    async def _reload(self, instance: _Instance) -> None:
        # A SIGUSR1 that lands before ExaBGP installed its handlers kills it. Its relay
        # starts after that, so the relay's hello says signals are safe.
        if not instance.hello.is_set():
            hello = asyncio.ensure_future(instance.hello.wait())
            started_or_exited: set[asyncio.Future[Any]] = {hello, instance.exited}
            await asyncio.wait(
                started_or_exited,
                timeout=self._start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            hello.cancel()
            if instance.exited.done():
                return  # its successor reads the new file
            if not instance.hello.is_set():
                raise SpeakerUnavailable("ExaBGP did not start its API process")
        # ExaBGP drops a SIGUSR1 while any active neighbour has routes queued, and a down
        # neighbour's queue only empties at its next connection attempt (backoff up to
        # 60 s): keep signalling until ExaBGP logs the reload.
        deadline = time.monotonic() + self._reload_wait
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            if instance.exited.done():
                return  # its successor reads the new file
            ok, failed = instance.reloads_ok, instance.reloads_failed
            instance.log_changed.clear()
            instance.proc.send_signal(signal.SIGUSR1)
            until = min(deadline, time.monotonic() + RESIGNAL_EVERY)
            while instance.reloads_ok == ok and instance.reloads_failed == failed:
                remaining = until - time.monotonic()
                if remaining <= 0 or instance.exited.done():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(instance.log_changed.wait(), remaining)
                instance.log_changed.clear()
            if instance.reloads_failed != failed:
                tail = " | ".join(list(instance.log_tail)[-4:])
                raise ConfigRejected(f"ExaBGP refused the reload: {tail}")
            if instance.reloads_ok != ok:
                log.info("reloaded", extra={"op": "reload", "attempts": attempt})
                return
            if attempt == 3:
                log.warning("ExaBGP defers the reload (routes queued for a peer), re-signalling",
                            extra={"op": "reload", "attempts": attempt})  # fmt: skip
        raise SpeakerUnavailable(f"ExaBGP did not reload within {self._reload_wait} s")

    async def _replay_to_new(
        self, previous: Sequence[SessionSpec], wanted: Sequence[SessionSpec]
    ) -> None:
        known = {_session_key(s) for s in previous}
        new_peers = [s.peer_ip for s in wanted if _session_key(s) not in known]
        if not new_peers:
            return
        futures: list[_Sent] = []
        async with self._cmd_lock:
            conn = self._api
            if conn is None:
                return  # not ready: the replay on ready covers every neighbour
            # A neighbour removed earlier and now back gets its old adj-RIB-out back from
            # ExaBGP's cache: clear it before replaying the current state.
            lines = [
                line
                for peer in new_peers
                for line in (render_clear_adj_rib_out(peer), *self._replay_lines(peer))
            ]
            with contextlib.suppress(SpeakerUnavailable):  # gone: its successor replays all
                for line in lines:
                    futures.append(await self._enqueue(conn, line))
        await self._settle(futures, tolerate_restart=True)

    def _replay_lines(self, peer: IPAddr | None) -> list[str]:
        """Commands that give ``peer`` (None: every neighbour) the current routes."""
        lines: list[str] = []
        for attributes, prefixes in group_by_attributes(self._exports.items()).items():
            lines += render_announce(
                prefixes, attributes, peers=() if peer is None else (peer,),
                batch=API_ROUTES_PER_LOOP,
            )  # fmt: skip
        return lines

    # --- routes ---------------------------------------------------------------------------

    async def announce(
        self,
        prefixes: Iterable[IPNet],
        *,
        next_hop: IPAddr | None = None,
        origin: str | None = None,
        local_pref: int | None = None,
        med: int | None = None,
        communities: Sequence[str] = (),
    ) -> None:
        """Advertise ``prefixes`` to every session, now and later (next hop None: self).

        Announcing a prefix again replaces its attributes.
        """
        attributes = OutgoingAttributes(
            next_hop=next_hop, origin=origin, local_pref=local_pref, med=med,
            communities=tuple(communities),
        )  # fmt: skip
        items = list(prefixes)

        def record() -> None:
            for prefix in items:
                self._exports[prefix] = attributes

        await self._routes_command(
            record, render_announce(items, attributes, batch=API_ROUTES_PER_LOOP)
        )

    async def withdraw(self, prefixes: Iterable[IPNet]) -> None:
        """Stop advertising ``prefixes``."""
        items = list(prefixes)

        def record() -> None:
            for prefix in items:
                self._exports.pop(prefix, None)

        await self._routes_command(record, render_withdraw(items, batch=API_ROUTES_PER_LOOP))

    async def _routes_command(self, record: Callable[[], None], lines: list[str]) -> None:
        futures: list[_Sent] = []
        async with self._cmd_lock:
            record()
            conn = self._api
            if conn is None or not self._sessions:
                return  # recorded: replayed when ExaBGP (re)starts or a session is added
            with contextlib.suppress(SpeakerUnavailable):  # ExaBGP is gone: the same
                for line in lines:  # record is replayed to its successor
                    futures.append(await self._enqueue(conn, line))
        await self._settle(futures, tolerate_restart=True)

    async def send_eor(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        """End-of-RIB to ``peer`` (None: every established session).

        ExaBGP sends it after the routes still queued for the peer. CommandFailed when no
        matching session is established.
        """
        await self._control(render_eor(afi, peer=peer))

    async def route_refresh(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        """Ask ``peer`` (None: every established session) to send all its routes again."""
        await self._control(render_route_refresh(afi, peer=peer))

    async def _control(self, line: str) -> None:
        async with self._cmd_lock:
            conn = self._api
            if conn is None:
                raise SpeakerUnavailable("ExaBGP is not ready")
            sent = await self._enqueue(conn, line)
        await self._settle([sent], tolerate_restart=False)

    # --- the command stream ---------------------------------------------------------------

    async def _enqueue(self, conn: _Connection, line: str) -> _Sent:
        """Send one command (caller holds _cmd_lock); the future is its ack."""
        in_order = acked_in_order(line)  # validates: a malformed command raises here
        while not conn.closed and (
            len(conn.pending) >= self._window or (not in_order and conn.pending)
        ):
            conn.changed.clear()
            await conn.changed.wait()
        if conn.closed:
            raise SpeakerUnavailable("the API connection closed")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        conn.pending.append((line, future))
        conn.writer.write(line.encode("ascii") + b"\n")
        await conn.writer.drain()
        return line, future

    async def _settle(self, sent: list[_Sent], tolerate_restart: bool) -> None:
        """Wait for the acks. ``tolerate_restart``: a command lost to an ExaBGP restart is
        fine, because the replay after the restart carries the same state."""
        if not sent:
            return
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(future for _, future in sent), return_exceptions=True),
                self._command_timeout,
            )
        except TimeoutError:
            self._request_restart("commands not acknowledged in time")
            raise SpeakerUnavailable("ExaBGP did not acknowledge in time") from None
        refused = [line for (line, _), ok in zip(sent, outcomes, strict=True) if ok is False]
        for outcome in outcomes:
            if isinstance(outcome, SpeakerUnavailable) and tolerate_restart:
                continue
            if isinstance(outcome, BaseException):
                raise outcome
        if refused:
            raise CommandFailed(refused[0])

    # --- the relay connection -------------------------------------------------------------

    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(reader, writer, self._generation)
        if self._conn is not None:
            self._conn.close("replaced by a new relay connection")
        self._conn = conn
        try:
            while True:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    self._request_restart("over-long line from the relay")
                    break
                if not raw:
                    break
                line = raw.decode("utf-8", errors="replace")
                if self._api_tap is not None:
                    self._api_tap(line)
                self._handle_line(conn, line)
        except ConnectionError:
            pass
        finally:
            if self._api is conn:
                self._api = None
                self._ready.clear()
            conn.close("the API connection closed")
            if self._conn is conn:
                self._conn = None

    def _handle_line(self, conn: _Connection, line: str) -> None:
        try:
            parsed = parse_line(line)
        except MalformedMessage as err:
            log.error("undecodable ExaBGP message", extra={"op": "api_in", "reason": str(err)})
            return
        if isinstance(parsed, Ack):
            if not conn.pending:
                log.warning("ack without a command", extra={"op": "api_in"})
                return
            command, future = conn.pending.popleft()
            conn.changed.set()
            if not future.done():
                future.set_result(parsed.ok)
            if not parsed.ok:
                log.warning("command refused", extra={"op": "api_out", "command": command[:160]})
        elif isinstance(parsed, Received):
            for event in parsed.events:
                self._events.put_nowait(event)
        elif isinstance(parsed, RelayHello):
            conn.relay_pid = parsed.pid
            self._relay_pids.add(parsed.pid)
            self._on_hello(conn)
        elif isinstance(parsed, RelayDropped):
            instance = self._instance
            if instance is not None and not instance.killed:
                log.error("relay dropped output", extra={"op": "api_in", "lines": parsed.lines})
            self._request_restart(f"relay dropped {parsed.lines} lines of ExaBGP output")
        elif isinstance(parsed, Output) and parsed.text:
            log.debug("exabgp api output", extra={"op": "api_in", "text": parsed.text[:200]})

    def _on_hello(self, conn: _Connection) -> None:
        instance = self._instance
        if instance is None or instance.exited.done() or self._stopping:
            return
        if instance.had_connection:
            # The relay died and ExaBGP started another: what the old one held is lost.
            self._request_restart("relay reconnected, output may be lost")
            return
        instance.had_connection = True
        instance.hello.set()
        if self._ever_ready:
            # Queued before anything the new ExaBGP reports, so the agent sees it first.
            self._events.put_nowait(SpeakerRestarted(self._restart_reason or "restarted"))
        self._spawn_task(self._become_ready(conn, instance))

    async def _become_ready(self, conn: _Connection, instance: _Instance) -> None:
        sent: list[_Sent] = []
        ready = False
        async with self._cmd_lock:
            if conn.closed or instance.exited.done():
                return
            lines = self._replay_lines(None) if self._sessions else []
            with contextlib.suppress(SpeakerUnavailable):  # gone already: its successor replays
                for line in lines:
                    sent.append(await self._enqueue(conn, line))
                ready = True
            if ready:
                self._api = conn
                self._ever_ready = True
                self._ready.set()
        if ready:
            log.info("ExaBGP ready", extra={"op": "exabgp_ready", "pid": instance.proc.pid,
                                             "replayed": len(lines)})  # fmt: skip
        try:
            await self._settle(sent, tolerate_restart=True)
        except SpeakerError as err:
            log.error("replay failed", extra={"op": "replay", "reason": str(err)})

    # --- the ExaBGP process ---------------------------------------------------------------

    async def _supervise(self) -> None:
        initial, cap, stable_after = self._backoff
        failures = 0
        while not self._stopping:
            try:
                instance = await self._spawn()
            except Exception as err:  # e.g. the netns is gone: retry with backoff
                log.error("cannot start ExaBGP", extra={"op": "exabgp_spawn", "reason": str(err)})
                instance = None
            if instance is not None:
                code = await instance.exited
                await self._forget(instance)
                lived = time.monotonic() - instance.started
                if self._stopping:
                    break
                if instance.killed:
                    delay = 0.0  # a restart we asked for: no backoff
                else:
                    failures = 0 if lived >= stable_after else failures
                    delay = min(initial * 2**failures, cap)
                    failures += 1
                    self._restart_reason = f"ExaBGP exited with {code}"
                    log.error("ExaBGP died", extra={
                        "op": "exabgp_exit", "code": code, "lived": round(lived, 1),
                        "restart_in": delay, "reason": " | ".join(list(instance.log_tail)[-3:]),
                    })  # fmt: skip
            else:
                delay = min(initial * 2**failures, cap)
                failures += 1
            self._wake_supervisor.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_supervisor.wait(), delay)

    async def _spawn(self) -> _Instance:
        assert self._env is not None
        self._generation += 1
        env = self._child_env(self._env)
        argv = tethered(
            os.getpid(), self.netns_path, [*self._exabgp, "server", str(self.config_path)]
        )
        # Forked right here, from the event loop's thread: the kernel's parent-death signal
        # follows the thread that forked, and this one lives as long as the agent.
        proc = subprocess.Popen(
            argv, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        # ExaBGP's log writes block like its API writes: give a stalled agent more slack.
        with contextlib.suppress(OSError):
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, LOG_PIPE_SIZE)
        loop = asyncio.get_running_loop()
        instance = _Instance(proc, self._generation, time.monotonic(), loop.create_future())
        self._instance = instance
        self.pid_path.write_text(f"{proc.pid}\n")
        self._watch_exit(instance)
        self._spawn_task(self._read_log(instance))
        log.info("ExaBGP started", extra={"op": "exabgp_spawn", "pid": proc.pid,
                                          "generation": instance.generation})  # fmt: skip
        return instance

    def _watch_exit(self, instance: _Instance) -> None:
        # A pidfd is readable the moment the process exits: no polling, no SIGCHLD handler.
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(instance.proc.pid)

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            code = instance.proc.wait()
            if not instance.exited.done():
                instance.exited.set_result(code)

        loop.add_reader(pidfd, exited)

    async def _read_log(self, instance: _Instance) -> None:
        assert instance.proc.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=LINE_LIMIT, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), instance.proc.stdout
        )
        try:
            while raw := await reader.readline():
                text = raw.decode("utf-8", errors="replace").rstrip()
                instance.log_tail.append(text)
                if RELOAD_OK in text:
                    instance.reloads_ok += 1
                    instance.log_changed.set()
                elif RELOAD_FAILED in text:
                    instance.reloads_failed += 1
                    instance.log_changed.set()
                log.debug("exabgp: %s", text, extra={"op": "exabgp_log", "pid": instance.proc.pid})
        finally:
            transport.close()

    async def _forget(self, instance: _Instance) -> None:
        conn = self._api
        if conn is not None and conn.generation == instance.generation:
            self._api = None
            self._ready.clear()
            conn.fail_pending("ExaBGP exited")
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def _request_restart(self, reason: str) -> None:
        instance = self._instance
        if self._stopping or instance is None or instance.exited.done() or instance.killed:
            return
        instance.killed = True
        log.warning("restarting ExaBGP", extra={"op": "exabgp_restart", "reason": reason})
        self._restart_reason = reason
        if self._api is not None:
            self._api = None
            self._ready.clear()
        # SIGKILL: no NOTIFICATION goes out, so graceful-restart peers keep our routes.
        instance.proc.send_signal(signal.SIGKILL)

    async def _reap_relays(self) -> None:
        # A relay exits when ExaBGP's pipe closes; make sure, by pid, that every one did.
        # The cmdline check keeps a recycled pid safe.
        ours = str(self.socket_path).encode()
        deadline = time.monotonic() + 2
        for pid in sorted(self._relay_pids):
            while _alive(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if _alive(pid) and ours in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _kill_stale(self) -> None:
        """An ExaBGP left behind by a previous agent on this workdir would hold port 179."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        if str(self.config_path).encode() in _cmdline(pid).split(b"\0"):
            log.warning("killing a stale ExaBGP", extra={"op": "exabgp_stale", "pid": pid})
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)

    def _child_env(self, exabgp_env: dict[str, str]) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("exabgp.", "exabgp_", "PYTHON"))
        }  # fmt: skip
        env.update(exabgp_env)
        return env

    def _spawn_task(self, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
