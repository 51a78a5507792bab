"""ExaBGP's API, both ways: its JSON lines into speaker events, our commands into text.

Pure: no I/O. Formats as ExaBGP 5.0.15 writes and reads them (captured samples live in
``tests/bgp_speaker/golden/``):

- one JSON object per line for messages; ``type`` is ``state`` (``connected``/``up``/``down``
  with ``reason``), ``update`` (``message.update`` with ``attribute``, ``announce``
  ``{family: {next hop: [{nlri}]}}``, ``withdraw`` ``{family: [{nlri}]}``; or
  ``message.eor {afi, safi}`` for an End-of-RIB), and others we do not act on
  (``notification``, ``refresh``, ...); a received ``open`` gives the peer's BGP
  identifier, graceful-restart and hold time, a ``keepalive`` that the peer is alive.
  ``as-path`` is ``{"0": {"element": "as-sequence", "value": [...]}, ...}``; communities
  are ``[[high, low], ...]``.
- plain ``done``/``error`` lines acknowledge commands (``exabgp.api.ack=true``), without
  saying which: they are matched to commands in order. Some commands print more text
  before their ack (``reload in progress``, ``exabgp 5.0.15``).
- lines the relay adds (``{"l3fabric-relay": ...}``, see exabgp_relay.py).

Commands: ExaBGP answers a command it cannot parse with a bare ``error`` and logs why
only to its own log, so every command is rendered from typed values and checked against
the grammar here before it is sent: a malformed command is a bug in the caller and raises
``InvalidCommand`` instead.

ExaBGP reads commands as ASCII, one per line, at most 1 MiB; it answers *most* commands
from a queue, in order, but some (``announce eor``, ``announce route-refresh``, ``clear
adj-rib`` when no neighbour matches; ``reload``, ``version``, unknown commands) answer at
once, ahead of queued ones. ``acked_in_order`` tells the speaker which is which.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any

from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPAddr,
    IPNet,
    PathAttributes,
    PeerAlive,
    PeerOpened,
    PeerStateChanged,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionState,
    SpeakerEvent,
)

__all__ = [
    "MAX_PREFIXES_PER_COMMAND",
    "Ack",
    "InvalidCommand",
    "MalformedMessage",
    "OutgoingAttributes",
    "Output",
    "Parsed",
    "Received",
    "RelayDropped",
    "RelayHello",
    "acked_in_order",
    "group_by_attributes",
    "parse_line",
    "render_announce",
    "render_clear_adj_rib_out",
    "render_eor",
    "render_route_refresh",
    "render_withdraw",
    "validate_command",
]

MAX_PREFIXES_PER_COMMAND = 1000  # 20k prefixes: ~2.3 s in 1,000-prefix lines, ~15 s one each
MAX_COMMAND_BYTES = 1024 * 1024  # ExaBGP drops the process that sends a longer line
ORIGINS = ("igp", "egp", "incomplete")
_FAMILIES = {"ipv4 unicast": 4, "ipv6 unicast": 6}
_AFI = {4: "ipv4", 6: "ipv6"}


class InvalidCommand(ValueError):
    """A command that does not follow ExaBGP's grammar: a bug in whoever built it."""


class MalformedMessage(ValueError):
    """A line from ExaBGP that looks like a message but cannot be decoded."""


# --- lines in --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """``done`` (ok) or ``error``: the answer to the oldest unanswered command."""

    ok: bool


@dataclass(frozen=True)
class Received:
    """A JSON message from ExaBGP; ``events`` is empty for kinds the speaker ignores."""

    events: tuple[SpeakerEvent, ...]
    kind: str = ""


@dataclass(frozen=True)
class Output:
    """Any other text: a command's printed answer, e.g. ``reload in progress``."""

    text: str


@dataclass(frozen=True)
class RelayHello:
    pid: int


@dataclass(frozen=True)
class RelayDropped:
    """The relay lost this many lines of ExaBGP output: the stream is no longer complete."""

    lines: int


Parsed = Ack | Received | Output | RelayHello | RelayDropped

_DONE = Ack(True)
_ERROR = Ack(False)


def parse_line(line: str) -> Parsed:
    """Decode one line of the relay stream (without or with its newline)."""
    text = line.strip()
    if text == "done":
        return _DONE
    if text == "error":
        return _ERROR
    if not text.startswith("{"):
        return Output(text)
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise MalformedMessage(f"not JSON: {text[:200]!r}") from err
    if not isinstance(obj, dict):
        raise MalformedMessage(f"not a JSON object: {text[:200]!r}")
    relay = obj.get("l3fabric-relay")
    if relay == "hello":
        return RelayHello(int(obj.get("pid", 0)))
    if relay == "dropped":
        return RelayDropped(int(obj.get("lines", 0)))
    kind = obj.get("type")
    if not isinstance(kind, str):
        return Output(text)
    try:
        return Received(tuple(_decode_message(kind, obj)), kind)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MalformedMessage(f"{kind} message: {err}: {text[:300]!r}") from err


def _decode_message(kind: str, obj: dict[str, Any]) -> Iterator[SpeakerEvent]:
    if kind == "state":
        neighbor = obj["neighbor"]
        peer = ip_address(neighbor["address"]["peer"])
        state = SessionState(neighbor["state"])
        yield PeerStateChanged(peer, state, str(neighbor.get("reason", "")))
    elif kind == "open":
        neighbor = obj["neighbor"]
        if neighbor.get("direction", "receive") == "receive":
            peer = ip_address(neighbor["address"]["peer"])
            opened = neighbor["open"]
            yield PeerOpened(
                peer, IPv4Address(opened["router_id"]), _restart_time(opened),
                int(opened["hold_time"]) if "hold_time" in opened else None,
            )  # fmt: skip
    elif kind == "keepalive":
        neighbor = obj["neighbor"]
        if neighbor.get("direction", "receive") == "receive":
            yield PeerAlive(ip_address(neighbor["address"]["peer"]))
    elif kind == "update":
        neighbor = obj["neighbor"]
        if neighbor.get("direction", "receive") != "receive":
            return
        peer = ip_address(neighbor["address"]["peer"])
        message = neighbor["message"]
        if "eor" in message:
            yield EndOfRib(peer)
        else:
            yield from _decode_update(peer, message["update"])


def _restart_time(opened: dict[str, Any]) -> int | None:
    """The restart time of the OPEN's graceful-restart capability (code 64), if it has one:
    ``"64": {"name": "graceful restart", "time": 120, ...}``."""
    for code, capability in (opened.get("capabilities") or {}).items():
        if str(code) == "64" and isinstance(capability, dict):
            return int(capability.get("time", 0))
    return None


def _decode_update(peer: IPAddr, update: dict[str, Any]) -> Iterator[SpeakerEvent]:
    # Withdrawals first: that is the order BGP itself processes an UPDATE in.
    for family, nlris in update.get("withdraw", {}).items():
        version = _FAMILIES.get(family)
        if version is not None and nlris:
            yield RoutesWithdrawn(peer, tuple(_prefix(item, version) for item in nlris))
    announce = update.get("announce")
    if not announce:
        return
    base = _decode_attributes(update.get("attribute", {}))
    for family, by_next_hop in announce.items():
        version = _FAMILIES.get(family)
        if version is None:
            continue
        for next_hop, nlris in by_next_hop.items():
            attributes = PathAttributes(next_hop=ip_address(next_hop), **base)
            prefixes = tuple(_prefix(item, version) for item in nlris)
            if prefixes:
                yield RoutesAnnounced(peer, prefixes, attributes)


def _prefix(item: Any, version: int) -> IPNet:
    # {"nlri": "10.0.0.0/26"} normally; a bare string with exabgp.api.compact=true.
    text = item["nlri"] if isinstance(item, dict) else item
    if version != 4:
        return IPv6Network(text)
    # Every received prefix passes here: from integers, IPv4Network skips its string parser
    # (about half the cost). ExaBGP writes canonical dotted quads; bytes() refuses an octet
    # outside 0-255.
    address, slash, length = text.partition("/")
    octets = address.split(".")
    if not slash or len(octets) != 4:
        raise ValueError(f"{text!r} is not an IPv4 prefix")
    try:
        return IPv4Network((int.from_bytes(bytes(map(int, octets)), "big"), int(length)))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 prefix") from None


def _decode_attributes(attribute: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"origin": str(attribute.get("origin", "igp"))}
    if "as-path" in attribute:
        out["as_path"] = _as_path(attribute["as-path"])
    if "local-preference" in attribute:
        out["local_pref"] = int(attribute["local-preference"])
    if "med" in attribute:
        out["med"] = int(attribute["med"])
    if "originator-id" in attribute:
        out["originator_id"] = IPv4Address(attribute["originator-id"])
    if "cluster-list" in attribute:
        out["cluster_list"] = tuple(IPv4Address(c) for c in attribute["cluster-list"])
    if "community" in attribute:
        # A set on the wire; sorted numerically, as ExaBGP itself sorts what it sends, so
        # equal sets compare equal.
        pairs = sorted((int(high), int(low)) for high, low in attribute["community"])
        out["communities"] = tuple(f"{high}:{low}" for high, low in pairs)
    return out


def _as_path(value: Any) -> tuple[int, ...]:
    # {"0": {"element": "as-sequence", "value": [...]}, "1": {"element": "as-set", ...}}.
    # Segments are flattened in order; an AS_SET's members are all kept, which is what
    # loop detection needs (path length then counts a set by its size, not as one).
    if isinstance(value, list):
        return tuple(int(asn) for asn in value)
    path: list[int] = []
    for _, segment in sorted(value.items(), key=lambda kv: int(kv[0])):
        path.extend(int(asn) for asn in segment["value"])
    return tuple(path)


# --- commands out ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingAttributes:
    """Path attributes for routes we send. None / empty means ExaBGP's default."""

    next_hop: IPAddr | None = None  # None: "self", the session's local address
    origin: str | None = None  # None: igp
    as_path: tuple[int, ...] | None = None  # None: empty on iBGP, our AS on eBGP
    local_pref: int | None = None  # None: 100 on iBGP, absent on eBGP
    med: int | None = None
    communities: tuple[str, ...] = ()
    originator_id: IPv4Address | None = None
    cluster_list: tuple[IPv4Address, ...] = ()

    def __post_init__(self) -> None:
        if self.origin is not None and self.origin not in ORIGINS:
            raise InvalidCommand(f"origin: {self.origin!r} is not one of {ORIGINS}")
        for name, value in (("local_pref", self.local_pref), ("med", self.med)):
            if value is not None and not 0 <= value <= 0xFFFFFFFF:
                raise InvalidCommand(f"{name}: {value} is not a 32-bit unsigned integer")
        for asn in self.as_path or ():
            if not 0 < asn <= 0xFFFFFFFF:
                raise InvalidCommand(f"as_path: {asn} is not an AS number")
        for community in self.communities:
            _check_community(community)

    def render(self) -> str:
        parts = ["next-hop", "self" if self.next_hop is None else str(self.next_hop)]
        if self.origin is not None:
            parts += ["origin", self.origin]
        if self.as_path is not None:
            parts += ["as-path", "[", *map(str, self.as_path), "]"]
        if self.local_pref is not None:
            parts += ["local-preference", str(self.local_pref)]
        if self.med is not None:
            parts += ["med", str(self.med)]
        if self.communities:
            parts += ["community", "[", *self.communities, "]"]
        if self.originator_id is not None:
            parts += ["originator-id", str(self.originator_id)]
        if self.cluster_list:
            parts += ["cluster-list", "[", *map(str, self.cluster_list), "]"]
        return " ".join(parts)


def _check_community(community: str) -> None:
    high, sep, low = community.partition(":")
    if not (sep and high.isdigit() and low.isdigit() and int(high) < 65536 and int(low) < 65536):
        raise InvalidCommand(f"community: {community!r} is not ASN:VALUE (16 bits each)")


def _selector(peers: Sequence[IPAddr]) -> str:
    # ExaBGP reads `neighbor A , neighbor B <command>` as one command for both: it parses
    # the routes once, where one command per neighbour would parse them once each.
    return "".join(f"neighbor {peer} , " for peer in peers[:-1]) + (
        f"neighbor {peers[-1]} " if peers else ""
    )


def _one(peer: IPAddr | None) -> tuple[IPAddr, ...]:
    return () if peer is None else (peer,)


def _batches(prefixes: Iterable[IPNet], size: int) -> Iterator[list[IPNet]]:
    # One family per command: ExaBGP takes the family from the last prefix of the line.
    by_version: dict[int, list[IPNet]] = {4: [], 6: []}
    for prefix in prefixes:
        by_version[prefix.version].append(prefix)
    for version in (4, 6):
        items = by_version[version]
        for start in range(0, len(items), size):
            yield items[start : start + size]


def render_announce(
    prefixes: Iterable[IPNet],
    attributes: OutgoingAttributes = OutgoingAttributes(),
    *,
    peers: Sequence[IPAddr] = (),
    batch: int = MAX_PREFIXES_PER_COMMAND,
) -> list[str]:
    """``[neighbor X , neighbor Y] announce attributes ... nlri P1 P2 ...`` lines, ≤ ``batch``
    prefixes each; no peers: every neighbour."""
    if not 1 <= batch <= MAX_PREFIXES_PER_COMMAND:
        raise InvalidCommand(f"batch: {batch} is outside 1..{MAX_PREFIXES_PER_COMMAND}")
    head = f"{_selector(peers)}announce attributes {attributes.render()} nlri "
    return [_checked(head + " ".join(map(str, chunk))) for chunk in _batches(prefixes, batch)]


def render_withdraw(
    prefixes: Iterable[IPNet],
    *,
    peers: Sequence[IPAddr] = (),
    batch: int = MAX_PREFIXES_PER_COMMAND,
) -> list[str]:
    """``[neighbor X , ...] withdraw attributes nlri P1 P2 ...`` lines (attributes are not
    needed); no peers: every neighbour."""
    if not 1 <= batch <= MAX_PREFIXES_PER_COMMAND:
        raise InvalidCommand(f"batch: {batch} is outside 1..{MAX_PREFIXES_PER_COMMAND}")
    head = f"{_selector(peers)}withdraw attributes nlri "
    return [_checked(head + " ".join(map(str, chunk))) for chunk in _batches(prefixes, batch)]


def render_eor(afi: int = 4, *, peer: IPAddr | None = None) -> str:
    return _checked(f"{_selector(_one(peer))}announce eor {_afi(afi)} unicast")


def render_route_refresh(afi: int = 4, *, peer: IPAddr | None = None) -> str:
    return _checked(f"{_selector(_one(peer))}announce route-refresh {_afi(afi)} unicast")


def render_clear_adj_rib_out(peer: IPAddr) -> str:
    """Withdraw everything ExaBGP holds for ``peer`` (its adj-RIB-out outlives a removal)."""
    return _checked(f"neighbor {peer} clear adj-rib out")


def _afi(afi: int) -> str:
    try:
        return _AFI[afi]
    except KeyError:
        raise InvalidCommand(f"afi: {afi} is neither 4 nor 6") from None


def _checked(command: str) -> str:
    validate_command(command)
    return command


# --- the grammar we speak --------------------------------------------------------------------

_UINT = r"(?:0|[1-9][0-9]{0,9})"
_IPV4 = r"(?:[0-9]{1,3}\.){3}[0-9]{1,3}"
_ADDR = r"[0-9A-Fa-f.:]+"
_ATTRS = (
    rf"next-hop (?P<nh>self|{_ADDR})"
    r"(?: origin (?:igp|egp|incomplete))?"
    rf"(?: as-path \[(?P<aspath>(?: {_UINT})*) \])?"
    rf"(?: local-preference (?P<lp>{_UINT}))?"
    rf"(?: med (?P<med>{_UINT}))?"
    r"(?: community \[(?P<comm>(?: [0-9]{1,5}:[0-9]{1,5})+) \])?"
    rf"(?: originator-id (?P<oid>{_IPV4}))?"
    rf"(?: cluster-list \[(?P<clist>(?: {_IPV4})+) \])?"
)
_SELECTOR = rf"(?:(?P<peers>neighbor {_ADDR}(?: , neighbor {_ADDR})*) )?"
_GRAMMAR = {
    "announce": re.compile(rf"{_SELECTOR}announce attributes {_ATTRS} nlri (?P<nlri>.+)"),
    "withdraw": re.compile(rf"{_SELECTOR}withdraw attributes nlri (?P<nlri>.+)"),
    "eor": re.compile(rf"{_SELECTOR}announce eor (?:ipv4|ipv6) unicast"),
    "refresh": re.compile(rf"{_SELECTOR}announce route-refresh (?:ipv4|ipv6) unicast"),
    "clear": re.compile(rf"neighbor (?P<peer>{_ADDR}) clear adj-rib out"),
}
_IN_ORDER = ("announce", "withdraw")


def validate_command(command: str) -> str:
    """The command's kind (a key of the grammar); InvalidCommand if it is not one we speak."""
    if len(command) >= MAX_COMMAND_BYTES or not command.isascii():
        raise InvalidCommand(f"command longer than {MAX_COMMAND_BYTES} bytes or not ASCII")
    if "\n" in command or "\r" in command:
        raise InvalidCommand("command spans several lines")
    for kind, pattern in _GRAMMAR.items():
        match = pattern.fullmatch(command)
        if match is not None:
            _check_values(match, command)
            return kind
    raise InvalidCommand(f"not a command l3fabric sends: {command[:200]!r}")


def acked_in_order(command: str) -> bool:
    """Whether ExaBGP answers this command from its queue, in order with the ones before it.

    The others may be answered at once, overtaking queued commands' acks: send them only
    when no other command is waiting for its ack.
    """
    return validate_command(command) in _IN_ORDER


def _check_values(match: re.Match[str], command: str) -> None:
    # The grammar pins the shape; these are the values a regular expression cannot check.
    groups = match.groupdict()
    try:
        for name in ("peer", "nh"):
            if groups.get(name) and groups[name] != "self":
                ip_address(groups[name])
        for selected in filter(None, (groups.get("peers") or "").split(" , ")):
            ip_address(selected.removeprefix("neighbor "))
        if groups.get("oid"):
            IPv4Address(groups["oid"])
        for value in (groups.get("clist") or "").split():
            IPv4Address(value)
    except ValueError as err:
        raise InvalidCommand(f"{err}: {command[:200]!r}") from None
    for name in ("lp", "med"):
        if groups.get(name) and int(groups[name]) > 0xFFFFFFFF:
            raise InvalidCommand(f"{name} out of range: {command[:200]!r}")
    for value in (groups.get("aspath") or "").split():
        if not 0 < int(value) <= 0xFFFFFFFF:
            raise InvalidCommand(f"AS {value} out of range: {command[:200]!r}")
    for value in (groups.get("comm") or "").split():
        _check_community(value)
    if "nlri" in groups:
        _check_nlri(groups["nlri"], command)


def _check_nlri(text: str, command: str) -> None:
    items = text.split(" ")
    if len(items) > MAX_PREFIXES_PER_COMMAND:
        raise InvalidCommand(f"{len(items)} prefixes in one command (max 1000)")
    versions = set()
    for item in items:
        try:
            versions.add(ip_network(item).version)  # strict: host bits set is an error
        except ValueError as err:
            raise InvalidCommand(f"nlri {item!r}: {err}") from None
    if len(versions) > 1:
        raise InvalidCommand(f"IPv4 and IPv6 prefixes in one command: {command[:200]!r}")


def group_by_attributes(
    routes: Iterable[tuple[IPNet, OutgoingAttributes]],
) -> dict[OutgoingAttributes, list[IPNet]]:
    """Prefixes grouped by identical attributes, so each group goes out in batched lines."""
    groups: dict[OutgoingAttributes, list[IPNet]] = {}
    for prefix, attributes in routes:
        groups.setdefault(attributes, []).append(prefix)
    return groups
