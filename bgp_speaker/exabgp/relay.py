"""The API process ExaBGP runs: joins ExaBGP's pipes to the agent's unix socket.

    relay.py SOCKET [MAX_BUFFER_BYTES]

ExaBGP writes to its API processes with *blocking* writes: a reader that stalls freezes
ExaBGP's whole reactor, keepalives stop and peers drop the sessions on hold-timer expiry.
So this relay never stops reading its stdin (ExaBGP's output): lines go into a bounded
buffer and on to the socket without blocking. When the buffer is full, lines are dropped
(never the ``done``/``error`` acks, which the agent counts) and a marker line tells the
agent how many were lost, so it can resynchronise. While the agent's socket is away the
relay keeps draining and retries the connection.

Commands travel the other way, socket → stdout (ExaBGP reads them), also without blocking.

Lines the relay itself sends to the agent (JSON, never confused with ExaBGP's output):

    {"l3fabric-relay": "hello", "pid": 123}     after every (re)connect
    {"l3fabric-relay": "dropped", "lines": 42}  before the first line after a loss

Standard library only and nothing imported from the project: ExaBGP starts it (and
restarts it) with a bare interpreter, and it must start fast.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import sys
import time
from collections import deque

DEFAULT_MAX_BUFFER = 32 * 1024 * 1024
READ_CHUNK = 1024 * 1024
RETRY_MIN, RETRY_MAX = 0.05, 1.0  # seconds between connection attempts
ACKS = (b"done", b"error")
_BLOCKING = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class Relay:
    def __init__(self, socket_path: str, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.socket_path = socket_path
        self.max_buffer = max_buffer
        self.selector = selectors.DefaultSelector()
        self.sock: socket.socket | None = None
        self.retry_at = 0.0
        self.retry_delay = RETRY_MIN
        # ExaBGP -> agent: complete lines, and bytes of an unfinished line
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.partial = b""
        self.sending = b""  # taken from `out`, not yet accepted by the socket
        self.dropped = 0  # lines lost since the last marker
        # agent -> ExaBGP
        self.cmds = bytearray()
        self.stdin_open = True
        for fd in (0, 1):
            os.set_blocking(fd, False)
        self.selector.register(0, selectors.EVENT_READ, "stdin")

    # --- ExaBGP -> agent ------------------------------------------------------------------

    def read_stdin(self) -> None:
        try:
            data = os.read(0, READ_CHUNK)
        except OSError as err:
            if err.errno in _BLOCKING:
                return
            data = b""
        if not data:
            self.stdin_open = False  # ExaBGP is gone: nothing left to relay
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            self.queue_line(line + b"\n")
        if len(self.partial) > self.max_buffer:  # no newline in sight: drop it, keep going
            self.partial = b""
            self.dropped += 1

    def queue_line(self, line: bytes) -> None:
        # Acks are never dropped: the agent matches them to its commands one by one.
        if self.out_bytes + len(line) > self.max_buffer and line.rstrip() not in ACKS:
            self.dropped += 1
            return
        if self.dropped:  # the marker goes where the lines were lost
            self.push_marker()
        self.out.append(line)
        self.out_bytes += len(line)

    def push_marker(self) -> None:
        marker = b'{"l3fabric-relay": "dropped", "lines": %d}\n' % self.dropped
        self.dropped = 0
        self.out.append(marker)
        self.out_bytes += len(marker)

    def send_out(self) -> None:
        assert self.sock is not None
        while self.sending or self.out:
            if not self.sending:
                # Join many small lines into one send: 20k prefixes arrive as many lines.
                parts: list[bytes] = []
                size = 0
                while self.out and size < 256 * 1024:
                    line = self.out.popleft()
                    parts.append(line)
                    size += len(line)
                self.sending = b"".join(parts)
            try:
                sent = self.sock.send(self.sending)
            except OSError as err:
                if err.errno in _BLOCKING:
                    return
                self.disconnect()
                return
            self.out_bytes -= sent
            self.sending = self.sending[sent:]

    # --- agent -> ExaBGP ------------------------------------------------------------------

    def read_socket(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(READ_CHUNK)
        except OSError as err:
            if err.errno in _BLOCKING:
                return
            data = b""
        if not data:
            self.disconnect()
            return
        self.cmds += data
        self.write_stdout()

    def write_stdout(self) -> None:
        while self.cmds:
            try:
                written = os.write(1, self.cmds)
            except OSError as err:
                if err.errno in _BLOCKING:
                    return
                raise SystemExit(0) from err  # ExaBGP closed our stdout: it is going away
            del self.cmds[:written]

    # --- the connection -------------------------------------------------------------------

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            self.retry_at = time.monotonic() + self.retry_delay
            self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)
            return
        sock.setblocking(False)
        self.sock = sock
        self.retry_delay = RETRY_MIN
        # Whatever was half-sent on a previous connection is lost with it.
        if self.sending:
            self.dropped += max(1, self.sending.count(b"\n"))
            self.out_bytes -= len(self.sending)
            self.sending = b""
        hello = b'{"l3fabric-relay": "hello", "pid": %d}\n' % os.getpid()
        self.out.appendleft(hello)
        self.out_bytes += len(hello)
        self.selector.register(sock, selectors.EVENT_READ, "socket")

    def disconnect(self) -> None:
        if self.sock is None:
            return
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None
        self.cmds.clear()  # commands of a connection that is gone must not run later
        self.retry_at = time.monotonic() + RETRY_MIN

    def run(self) -> None:
        while self.stdin_open:
            if self.dropped and self.out_bytes < self.max_buffer:
                self.push_marker()  # lines were lost and nothing followed them (yet)
            if self.sock is None and time.monotonic() >= self.retry_at:
                self.connect()
            if self.sock is not None:
                events = selectors.EVENT_READ
                if self.out or self.sending:
                    events |= selectors.EVENT_WRITE
                self.selector.modify(self.sock, events, "socket")
            if self.cmds:
                self._watch_stdout(True)
            timeout = None if self.sock is not None else max(0.0, self.retry_at - time.monotonic())
            for key, mask in self.selector.select(timeout):
                if key.data == "stdin":
                    self.read_stdin()
                elif key.data == "stdout":
                    self.write_stdout()
                elif key.data == "socket" and self.sock is not None:
                    if mask & selectors.EVENT_READ:
                        self.read_socket()
                    if self.sock is not None and mask & selectors.EVENT_WRITE:
                        self.send_out()
            if not self.cmds:
                self._watch_stdout(False)

    def _watch_stdout(self, on: bool) -> None:
        registered = 1 in self.selector.get_map()
        if on and not registered:
            self.selector.register(1, selectors.EVENT_WRITE, "stdout")
        elif not on and registered:
            self.selector.unregister(1)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        sys.stderr.write("usage: relay.py SOCKET [MAX_BUFFER_BYTES]\n")
        return 2
    max_buffer = int(argv[2]) if len(argv) == 3 else DEFAULT_MAX_BUFFER
    Relay(argv[1], max_buffer).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
