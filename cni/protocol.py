"""The agent's socket protocol, shared by the CNI shim, the CLI and the agent's server.

One JSON object per line, each way:

    request   {"op": "cni.add", "args": {...}}
    response  {"ok": true, "result": {...}}
              {"ok": false, "error": {"code": 7, "msg": "...", "details": "..."}}

Error codes are the CNI ones (`cni.errors`), so the shim prints them as they come.

Standard library only, and cheap to import: the shim runs this on every pod start. That is
why JSON goes through the C accelerator `_json` directly: `import json` pulls in `re` and
compiles its patterns, ~7 ms per process, as much as the whole rest of the shim. The `json`
module remains the fallback, and produces the error messages for input the fast path
rejects, so behaviour (and every message) is exactly `json`'s.
"""

from __future__ import annotations

from cni.errors import INTERNAL_ERROR, INVALID_CONFIG, UNDECODABLE_CONFIG, CniError

TYPE_CHECKING = False  # `typing` costs ~9 ms of start-up: imported for type checkers only
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

DEFAULT_SOCKET = "/var/run/l3fabric/agent.sock"
MAX_LINE = 4 << 20
"""Longest request or response line accepted (a GC request lists every attachment)."""
MAX_DEPTH = 128
"""Deepest nesting of arrays and objects accepted. Real configurations nest a handful of
levels; the limit is far below the interpreter's recursion limit, so every reader (the
shim, the agent inside its event loop) refuses the same documents, with a decode error."""
_JSON_WHITESPACE = " \t\n\r"


# --- JSON --------------------------------------------------------------------------------------


class _ScanContext:
    """What `_json.make_scanner` reads from a JSONDecoder: `json.loads` defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(
        {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__
    )
    memo: dict[str, Any] = {}


def _not_serializable(obj: object) -> Any:
    """The fast encoder's `default`: give up, so `json.dumps` names the offending value."""
    raise TypeError(type(obj).__name__)


_scan: Callable[[str, int], tuple[Any, int]] | None
_encode: Callable[[object, int], Any] | None
try:
    import _json

    # typeshed types the context as a make_scanner; the scanner only reads the attributes
    # above from it (see the TODO in typeshed's _json.pyi).
    _scan = _json.make_scanner(_ScanContext)  # type: ignore[arg-type]
    _encode = _json.make_encoder(
        None, _not_serializable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )
except (ImportError, AttributeError, TypeError):  # another interpreter: plain json it is
    _scan = _encode = None


def dumps(obj: Any) -> str:
    """Compact, ASCII-only JSON (what `json.dumps(obj, separators=(",", ":"))` gives)."""
    if _encode is not None:
        try:
            return "".join(_encode(obj, 0))
        except (TypeError, ValueError):
            pass  # let json name the offending value
    import json

    return json.dumps(obj, separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """`json.loads` of UTF-8 text nested at most MAX_DEPTH levels; ValueError otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"not valid UTF-8: byte {e.object[e.start]:#04x} at position {e.start}"
            ) from None
    value = _parse(text)
    if not _depth_at_most(value, MAX_DEPTH):
        raise ValueError(_too_deep())
    return value


def _parse(text: str) -> Any:
    if _scan is not None:
        stripped = text.strip(_JSON_WHITESPACE)
        try:
            value, end = _scan(stripped, 0)
            if end == len(stripped):
                return value
        except RecursionError:
            raise ValueError(_too_deep()) from None
        except (StopIteration, ValueError, SystemError):
            pass  # json.loads below says what is wrong
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(_too_deep()) from None


def _too_deep() -> str:
    return f"JSON nested more than {MAX_DEPTH} levels deep"


def _depth_at_most(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest at most `limit` levels (iterative: no recursion)."""
    todo = [(value, 1)] if isinstance(value, (dict, list)) else []
    while todo:
        item, depth = todo.pop()
        if depth > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        todo.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


# --- framing -----------------------------------------------------------------------------------


def encode_request(op: str, args: dict[str, Any]) -> bytes:
    return (dumps({"op": op, "args": args}) + "\n").encode()


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """The op and args of a request line; CniError 6/7 when it is not one."""
    try:
        request = loads(line)
    except ValueError as e:
        raise CniError(UNDECODABLE_CONFIG, "request is not valid JSON", str(e)) from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise CniError(INVALID_CONFIG, "invalid request", 'expected {"op": "...", "args": {}}')
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise CniError(INVALID_CONFIG, "invalid request", "args: expected an object")
    return request["op"], args


def encode_result(result: Any) -> bytes:
    return (dumps({"ok": True, "result": result}) + "\n").encode()


def encode_error(err: CniError) -> bytes:
    return (dumps({"ok": False, "error": err.to_dict()}) + "\n").encode()


def decode_response(line: bytes) -> Any:
    """The result of a response line; raises the CniError it carries."""
    try:
        response = loads(line)
    except ValueError as e:
        raise CniError(INTERNAL_ERROR, "agent sent invalid JSON", str(e)) from None
    if not isinstance(response, dict):
        raise CniError(INTERNAL_ERROR, "agent sent a malformed response", repr(response)[:200])
    if response.get("ok") is True:
        return response.get("result")
    raise CniError.from_dict(response.get("error"))


# --- client ------------------------------------------------------------------------------------


class AgentUnreachable(Exception):
    """No agent answers on the socket (not running, not listening yet, or timed out)."""


def call(socket_path: str, op: str, args: dict[str, Any], timeout: float = 60.0) -> Any:
    """Send one request to the agent and return its result (or raise its CniError).

    Uses `_socket` rather than `socket`: the latter imports selectors and builds enums, an
    extra ~8 ms of start-up for every CNI call.
    """
    request = encode_request(op, args)
    if len(request) > MAX_LINE:
        # Permanent, so never "agent unreachable" (which the runtime retries).
        raise CniError(
            INVALID_CONFIG,
            "request too large",
            f"{len(request)} bytes; the agent accepts at most {MAX_LINE}",
        )
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as e:
            raise AgentUnreachable(f"cannot connect to {socket_path}: {e.strerror or e}") from None
        try:
            # (No contextlib.suppress: importing contextlib costs the shim start-up time.)
            try:  # noqa: SIM105
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent stops reading a request it refuses: its answer says why
            line = _read_line(sock)
        except TimeoutError:
            raise AgentUnreachable(f"no answer from {socket_path} in {timeout:g} s") from None
        except OSError as e:
            raise AgentUnreachable(f"connection to {socket_path} failed: {e}") from None
    finally:
        sock.close()
    if not line:
        raise AgentUnreachable(f"agent at {socket_path} closed the connection without answering")
    return decode_response(line)


def _read_line(sock: Any) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b""  # closed before a full line
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_LINE:
            raise CniError(INTERNAL_ERROR, "agent response too long", f"over {MAX_LINE} bytes")
