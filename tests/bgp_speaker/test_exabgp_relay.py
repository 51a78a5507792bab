"""exabgp_relay.py as ExaBGP runs it: a real child process on pipes and a real unix socket.

The test plays both ExaBGP (the relay's stdin/stdout) and the agent (the socket server).
No root needed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgp_speaker.exabgp import relay as exabgp_relay

RELAY = Path(exabgp_relay.__file__)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


def listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(5)
    return server


@pytest.fixture
def relays() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:  # by PID, each one this test started
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def start(relays: list[subprocess.Popen[bytes]], path: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(RELAY), str(path), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    relays.append(proc)
    return proc


class Lines:
    """Line reader on the agent's side of the socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""
        conn.settimeout(10)

    def next(self) -> str:
        while b"\n" not in self.buffer:
            data = self.conn.recv(1 << 20)
            if not data:
                raise EOFError
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def hello(lines: Lines) -> int:
    first = json.loads(lines.next())
    assert first["l3fabric-relay"] == "hello"
    return int(first["pid"])


def test_joins_exabgp_pipes_to_the_agent_socket(relays: list, sock_path: Path) -> None:
    server = listen(sock_path)
    started = time.monotonic()
    relay = start(relays, sock_path)
    conn, _ = server.accept()
    lines = Lines(conn)
    assert hello(lines) == relay.pid
    print(f"\nrelay connected {1000 * (time.monotonic() - started):.0f} ms after exec")
    relay.stdin.write(b'{"type": "state"}\ndone\n')
    relay.stdin.flush()
    assert lines.next() == '{"type": "state"}'
    assert lines.next() == "done"
    conn.sendall(b"announce eor ipv4 unicast\n")
    assert relay.stdout.readline() == b"announce eor ipv4 unicast\n"
    relay.stdin.close()  # ExaBGP went away: the relay has nothing left to do
    assert relay.wait(5) == 0


def test_never_blocks_exabgp_drops_with_a_marker_and_keeps_acks(
    relays: list, sock_path: Path
) -> None:
    server = listen(sock_path)
    relay = start(relays, sock_path, str(64 * 1024))
    conn, _ = server.accept()  # ... and then the agent stalls: nobody reads the socket
    total, every = 100_000, 50
    line = b'{"type": "update", "padding": "' + b"x" * 80 + b'"}\n'
    chunk = b"".join(line if n % every else b"done\n" for n in range(1, 1001))
    finished = threading.Event()

    def exabgp() -> None:
        for _ in range(total // 1000):
            relay.stdin.write(chunk)
        relay.stdin.flush()
        finished.set()

    writer = threading.Thread(target=exabgp, daemon=True)
    started = time.monotonic()
    writer.start()
    # ~9 MB written while the agent reads nothing: the relay must take it all, promptly.
    assert finished.wait(20), "the relay blocked its writer"
    print(f"\n{total} lines into a stalled relay in {time.monotonic() - started:.2f} s")
    lines = Lines(conn)
    hello(lines)
    acks = data = dropped = 0
    while acks < total // every or data + dropped < total - total // every:
        text = lines.next()
        if text == "done":
            acks += 1
        elif text.startswith('{"l3fabric-relay"'):
            marker = json.loads(text)
            assert marker["l3fabric-relay"] == "dropped"
            dropped += marker["lines"]
        else:
            data += 1
    assert acks == total // every  # every ack got through
    assert dropped > 0 and data > 0
    assert data + dropped == total - total // every


def test_keeps_draining_while_the_agent_is_away_and_reconnects(
    relays: list, sock_path: Path
) -> None:
    relay = start(relays, sock_path)  # the agent's socket does not exist yet
    relay.stdin.write(b"early\n")
    relay.stdin.flush()
    time.sleep(0.3)
    server = listen(sock_path)
    conn, _ = server.accept()
    lines = Lines(conn)
    hello(lines)
    assert lines.next() == "early"
    # The agent goes away and comes back on the same path.
    conn.close()
    server.close()
    sock_path.unlink()
    time.sleep(0.1)
    relay.stdin.write(b"while away\n")
    relay.stdin.flush()
    server = listen(sock_path)
    conn, _ = server.accept()
    lines = Lines(conn)
    hello(lines)
    assert lines.next() == "while away"
    conn.sendall(b"announce route-refresh ipv4 unicast\n")
    assert relay.stdout.readline() == b"announce route-refresh ipv4 unicast\n"


def test_usage_error() -> None:
    done = subprocess.run([sys.executable, str(RELAY)], capture_output=True, check=False)
    assert done.returncode == 2
    assert b"usage" in done.stderr
