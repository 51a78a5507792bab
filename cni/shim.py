"""`l3fabric-cni`: the executable the container runtime runs for every pod sandbox.

A thin client (DESIGN §1): it parses the CNI environment and configuration, forwards the
request to the node agent's unix socket and prints the agent's answer. VERSION is answered
here. Errors are printed as the spec's JSON on stdout with exit status 1.

Start-up time is the CNI latency that matters, so this module and everything it imports
use the standard library only, and only its cheap parts (see `cni.protocol` on JSON and
sockets); `l3fabric cni install` runs it as `python -I -S` (no site-packages scan).
"""

from __future__ import annotations

import posix  # not `os`: that imports _collections_abc and posixpath, ~1 ms per call
import sys

from cni.errors import (
    INTERNAL_ERROR,
    INVALID_CONFIG,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    UNDECODABLE_CONFIG,
    CniError,
)
from cni.protocol import MAX_LINE, AgentUnreachable, call, dumps, loads
from cni.request import (
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    cni_version_of,
    parse_command,
    parse_request,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

OPS = {
    "ADD": "cni.add",
    "DEL": "cni.del",
    "CHECK": "cni.check",
    "STATUS": "cni.status",
    "GC": "cni.gc",
}
# Environment forwarded to the agent: exactly what the spec defines, nothing else.
CNI_ENV = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
_CNI_ENV_BYTES = frozenset(k.encode() for k in CNI_ENV)
AGENT_TIMEOUT = 120.0
"""Seconds to wait for the agent; above its worst case (store retries with backoff)."""


def main() -> int:
    env = cni_environ()
    config: Any = None
    try:
        command = parse_command(env)
        if command == "VERSION":
            _print({"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)})
            return 0
        config = _decode_config(_read_config())
        result = run(env, config)
    except CniError as err:
        _print({"cniVersion": cni_version_of(config), **err.to_dict()})
        return 1
    except Exception as err:  # a bug here must still answer the runtime in the CNI format
        details = f"{type(err).__name__}: {err}"
        _print({"cniVersion": cni_version_of(config), "code": INTERNAL_ERROR,
                "msg": "l3fabric CNI plugin failed", "details": details})  # fmt: skip
        return 1
    if result is not None:
        _print(result)
    return 0


def run(env: Mapping[str, str], config: Any) -> Any:
    """Validate one call and have the agent carry it out; its result, or CniError."""
    request = parse_request(env, config)
    try:
        return call(
            request.config.socket,
            OPS[request.command],
            {"env": dict(env), "config": config},
            timeout=AGENT_TIMEOUT,
        )
    except AgentUnreachable as err:
        # STATUS asks "can you serve ADD?": the spec's answer for "no" is 50, not 11.
        code = NOT_AVAILABLE if request.command == "STATUS" else TRY_AGAIN_LATER
        raise CniError(code, "l3fabric agent unreachable", str(err)) from None


def cni_environ() -> dict[str, str]:
    """The CNI variables of the environment (the shim needs and forwards nothing else)."""
    return {
        key.decode(): value.decode("utf-8", "surrogateescape")
        for key, value in posix.environ.items()
        if key in _CNI_ENV_BYTES
    }


def _read_config() -> bytes:
    """stdin, refused unread past the agent's limit (the request that carries it is larger)."""
    data = sys.stdin.buffer.read(MAX_LINE + 1)
    if len(data) > MAX_LINE:
        raise CniError(
            INVALID_CONFIG,
            "network configuration too large",
            f"over {MAX_LINE} bytes on stdin; the agent accepts at most {MAX_LINE}",
        )
    return data


def _decode_config(data: bytes) -> Any:
    try:
        return loads(data)
    except ValueError as err:
        raise CniError(
            UNDECODABLE_CONFIG, "cannot decode the network configuration (stdin)", str(err)
        ) from None


def _print(obj: Any) -> None:
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
