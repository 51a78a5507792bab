"""BIRD's control socket, spoken directly (what `birdc` does, without a process per call).

BIRD greets with `0001 BIRD <version> ready.`; every reply line starts with a four-digit
code and a `-` (more follows) or a space (the last line), or with a space alone (a
continuation of the previous code). Codes 8xxx and 9xxx are errors.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BirdCommandFailed", "BirdReply", "BirdUnavailable", "bird_command"]

COMMAND_TIMEOUT = 30.0


class BirdUnavailable(Exception):
    """The control socket cannot be reached or closed mid-reply."""


class BirdCommandFailed(Exception):
    """BIRD answered with an error code."""


@dataclass(frozen=True)
class BirdReply:
    lines: tuple[tuple[int, str], ...]
    """(code, text) per line; continuation lines carry the code they continue."""

    @property
    def code(self) -> int:
        return self.lines[-1][0] if self.lines else 0

    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)


async def bird_command(socket: Path, command: str, timeout: float = COMMAND_TIMEOUT) -> BirdReply:
    """Send one command, return BIRD's whole reply; BirdCommandFailed on an error code."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(socket))
            try:
                await _read_reply(reader)  # the greeting
                writer.write(command.encode() + b"\n")
                await writer.drain()
                reply = await _read_reply(reader)
            finally:
                writer.close()
    except (OSError, TimeoutError) as err:
        raise BirdUnavailable(f"{socket}: {err or type(err).__name__}") from err
    if reply.code >= 8000:
        raise BirdCommandFailed(f"{command!r}: {reply.text()}")
    return reply


async def _read_reply(reader: asyncio.StreamReader) -> BirdReply:
    lines: list[tuple[int, str]] = []
    code = 0
    while True:
        raw = await reader.readline()
        if not raw:
            raise BirdUnavailable("control socket closed mid-reply")
        line = raw.decode(errors="replace").rstrip("\n")
        if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
            code, text, last = int(line[:4]), line[5:], line[4] == " "
        else:
            text, last = line[1:], False
        lines.append((code, text))
        if last:
            return BirdReply(tuple(lines))
