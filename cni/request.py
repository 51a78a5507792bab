"""Parse a CNI invocation (environment + network configuration) into a request, once.

The shim parses so it can report bad input itself, even with the agent down; the agent
parses the same env and config again with the same function, because the socket accepts
any client. Errors name the variable or field (`cni.errors` has the codes).

Standard library only and no `typing`, `enum`, `re` or `dataclasses`: this runs in every
CNI call and each of those costs milliseconds of interpreter start-up.
"""

from __future__ import annotations

from cni.errors import INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV, CniError
from cni.protocol import DEFAULT_SOCKET

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
# What each command needs from the environment (as the reference plugins' skel demands).
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_PATH",),
    "GC": ("CNI_PATH",),
    "VERSION": (),
}
SINCE_VERSION = {"STATUS": "1.1.0", "GC": "1.1.0", "CHECK": "0.4.0"}
LOG_LEVELS = ("debug", "info", "warning", "error")
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
IPAM_TYPE = "l3fabric"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_IFNAME_FORBIDDEN = frozenset("/: \t\n\r\v\f")
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one NUL


class NetConf:
    """The plugin's network configuration (stdin), validated."""

    __slots__ = (
        "cni_version",
        "log_level",
        "mtu",
        "name",
        "pools",
        "prev_result",
        "raw",
        "socket",
        "valid_attachments",
    )

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.cni_version: str = _version(raw)
        self.name: str = _network_name(raw.get("name"))
        self.mtu: int | None = _optional_int(raw, "mtu", 68, 65535)
        self.socket: str = _socket_path(raw.get("socket"))
        self.pools: tuple[str, ...] = _pools(raw.get("ipam"))
        self.log_level: str = _log_level(raw.get("log_level"))
        prev = raw.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise _invalid("prevResult", "expected an object")
        self.prev_result: dict[str, Any] | None = prev
        self.valid_attachments: tuple[tuple[str, str], ...] | None = _valid_attachments(raw)


class CniRequest:
    """One CNI call: the command, its environment and the configuration."""

    __slots__ = (
        "args",
        "command",
        "config",
        "container_id",
        "ifname",
        "ignored",
        "netns",
        "path",
    )

    def __init__(
        self,
        command: str,
        container_id: str,
        netns: str,
        ifname: str,
        args: dict[str, str],
        path: str,
        config: NetConf,
        ignored: tuple[str, ...] = (),
    ) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args
        self.path = path
        self.config = config
        self.ignored = ignored
        """DEL only: the invalid values left out (as blanks), each as "VARIABLE: why"."""

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def handle_id(self) -> str:
        """IPAM handle of this attachment: `<network name>.<container ID>` (DESIGN §6)."""
        return f"{self.config.name}.{self.container_id}"


def parse_command(env: Mapping[str, str]) -> str:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set", f"expected one of {COMMANDS}")
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENV, f"CNI_COMMAND: unknown command {command!r}", f"expected one of {COMMANDS}"
        )
    return command


def parse_request(env: Mapping[str, str], config: Any) -> CniRequest:
    """Validate env and config for one command. Raises CniError with the spec's code."""
    command = parse_command(env)
    for var in REQUIRED_ENV[command]:
        if not env.get(var):
            raise CniError(INVALID_ENV, f"{var} is not set", f"{command} needs {var}")
    if not isinstance(config, dict):
        raise _invalid("config", "the network configuration must be a JSON object")
    conf = NetConf(config)
    since = SINCE_VERSION.get(command)
    if since and _version_tuple(conf.cni_version) < _version_tuple(since):
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"{command} needs cniVersion {since} or later",
            f"config has cniVersion {conf.cni_version}",
        )
    if command == "CHECK" and conf.prev_result is None:
        raise _invalid("prevResult", "CHECK needs the result of ADD in prevResult")
    if command == "GC" and conf.valid_attachments is None:
        raise _invalid(VALID_ATTACHMENTS, "GC needs the list of valid attachments")
    # DEL must be able to succeed (the runtime retries a failed DEL forever), and what ADD
    # refuses it never attached: on DEL an invalid value is left out, and the attachment is
    # found by what remains (no container ID: nothing to delete).
    problems: list[CniError] = []
    report = problems.append if command == "DEL" else _raise
    container_id = _checked_env(env, "CNI_CONTAINERID", _container_id_problem, report)
    ifname = _checked_env(env, "CNI_IFNAME", _ifname_problem, report)
    netns = _checked_env(env, "CNI_NETNS", _netns_problem, report)
    args = parse_cni_args(env.get("CNI_ARGS", ""), report)
    return CniRequest(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=args,
        path=env.get("CNI_PATH", ""),
        config=conf,
        ignored=tuple(err.msg for err in problems),
    )


def parse_cni_args(text: str, report: Callable[[CniError], None] | None = None) -> dict[str, str]:
    """CNI_ARGS: `K1=V1;K2=V2` (empty pairs tolerated, as libcni produces none). An invalid
    pair raises, or with `report` is passed to it and left out."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            err = CniError(INVALID_ENV, f"CNI_ARGS: invalid pair {pair!r}", "expected KEY=VALUE")
        elif _undecodable(key) or _undecodable(value):
            err = CniError(
                INVALID_ENV,
                f"CNI_ARGS: {key!r} is not valid UTF-8" if _undecodable(key)
                else f"CNI_ARGS: the value of {key} is not valid UTF-8",
                repr(pair),
            )  # fmt: skip
        else:
            args[key] = value
            continue
        (report or _raise)(err)
    return args


def cni_version_of(config: Any) -> str:
    """The config's cniVersion if it is one we speak, else the latest (for error output)."""
    version = config.get("cniVersion") if isinstance(config, dict) else None
    return version if version in SUPPORTED_VERSIONS else LATEST_VERSION


# --- field validators ---------------------------------------------------------------------------


def _invalid(field: str, message: str) -> CniError:
    return CniError(
        INVALID_CONFIG, f"invalid network configuration: {field}", f"{field}: {message}"
    )


def _version(raw: dict[str, Any]) -> str:
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise _invalid("cniVersion", 'missing (e.g. "1.0.0")')
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version}",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _raise(err: CniError) -> None:
    raise err


def _checked_env(
    env: Mapping[str, str],
    var: str,
    problem: Callable[[str], str | None],
    report: Callable[[CniError], None],
) -> str:
    """The value of `var`, or "" after reporting why it is unusable."""
    value = env.get(var, "")
    if not value:
        return ""
    why = "not valid UTF-8" if _undecodable(value) else problem(value)
    if why is None:
        return value
    report(CniError(INVALID_ENV, f"{var}: {why}", repr(value)))
    return ""


def _undecodable(value: str) -> bool:
    """Whether `value` holds bytes that were not UTF-8 (decoded as lone surrogates)."""
    if value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def _container_id_problem(value: str) -> str | None:
    if _is_name(value):
        return None
    return (
        "invalid container ID: letters, digits, '_', '.' and '-', starting with a letter or digit"
    )


def _ifname_problem(value: str) -> str | None:
    if _is_ifname(value):
        return None
    return (
        "invalid interface name: 1-15 bytes, printable, no '/', ':' or whitespace, not '.' or '..'"
    )


def _netns_problem(value: str) -> str | None:
    return None if value.isprintable() else "invalid path: control characters"


def _is_name(value: str) -> bool:
    return value[:1].isalnum() and value.isascii() and set(value) <= _NAME_CHARS


def _is_ifname(value: str) -> bool:
    return (
        len(value.encode()) <= 15  # IFNAMSIZ - 1, in bytes
        and value.isprintable()
        and value not in (".", "..")
        and not set(value) & _IFNAME_FORBIDDEN
    )


def _network_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid("name", "missing network name")
    if not _is_name(value):
        raise _invalid(
            "name",
            f"{value!r}: letters, digits, '_', '.' and '-', starting with a letter or digit",
        )
    return value


def _optional_int(raw: dict[str, Any], field: str, lo: int, hi: int) -> int | None:
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _invalid(field, f"expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _socket_path(value: Any) -> str:
    if value is None:
        return DEFAULT_SOCKET
    if not isinstance(value, str) or not value.startswith("/"):
        raise _invalid("socket", f"expected an absolute path, got {value!r}")
    if _undecodable(value) or not value.isprintable():
        raise _invalid("socket", f"{value!r}: control characters or invalid Unicode")
    if len(value.encode()) > _MAX_SOCKET_PATH:
        raise _invalid("socket", f"{value!r}: longer than {_MAX_SOCKET_PATH} bytes")
    return value


def _pools(ipam: Any) -> tuple[str, ...]:
    if ipam is None:
        return ()
    if not isinstance(ipam, dict):
        raise _invalid("ipam", "expected an object")
    kind = ipam.get("type")
    if kind is not None and kind != IPAM_TYPE:
        raise _invalid(
            "ipam.type", f"{kind!r}: l3fabric does its own IPAM (leave type out or use l3fabric)"
        )
    pools = ipam.get("pools")
    if pools is None:
        return ()
    if not isinstance(pools, list) or not all(isinstance(p, str) and _is_name(p) for p in pools):
        raise _invalid(
            "ipam.pools", "expected a list of pool names (letters, digits, '_', '.' and '-')"
        )
    return tuple(pools)


def _log_level(value: Any) -> str:
    if value is None:
        return "info"
    if value not in LOG_LEVELS:
        raise _invalid("log_level", f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value


def _valid_attachments(raw: dict[str, Any]) -> tuple[tuple[str, str], ...] | None:
    value = raw.get(VALID_ATTACHMENTS)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _invalid(VALID_ATTACHMENTS, "expected a list of {containerID, ifname}")
    out = []
    for i, item in enumerate(value):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("containerID"), str)
            and isinstance(item.get("ifname"), str)
        ):
            raise _invalid(f"{VALID_ATTACHMENTS}[{i}]", "expected {containerID, ifname}")
        out.append((item["containerID"], item["ifname"]))
    return tuple(out)
