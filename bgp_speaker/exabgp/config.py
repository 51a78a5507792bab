"""Render ExaBGP's whole configuration file and environment from the desired sessions.

Pure: no I/O. The output is deterministic (neighbours sorted by address, fixed key order), so
an unchanged desired state renders byte-for-byte the same text and the speaker can skip the
reload. Golden files in ``tests/bgp_speaker/golden/`` pin the text.

Facts about ExaBGP 5.0.15 this relies on (read in its source, checked against the daemon):

- API block names are global to one file: each neighbour gets its own (``api-<peer>``).
- ExaBGP keys a neighbour by (peer, local address, local AS, peer AS, router id); a reload
  leaves a neighbour whose key and settings are unchanged alone, re-establishes one whose
  settings changed and keeps the routes the API announced to it (its adj-RIB-out is cached
  by that key), and starts a new one with an empty adj-RIB-out.
- ExaBGP derives the keepalive from the hold time (hold / 3); there is no keepalive knob.
- ``md5-password`` is tokenised after backslash unescaping, so a quote or backslash in a
  password cannot be escaped; the password is therefore always written base64-encoded with
  ``md5-base64 true`` (ExaBGP decodes it strictly and checks the 80-byte limit itself).
- ``route-refresh`` forces ``adj-rib-out`` on, which we want anyway: it is what makes ExaBGP
  re-send our routes after a session re-establishes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, ip_address

from bgp_speaker.bgp.routes import IPAddr, SessionSpec

__all__ = [
    "MAX_MD5_PASSWORD_BYTES",
    "RELAY_PROCESS",
    "api_block_name",
    "render_config",
    "render_env",
]

RELAY_PROCESS = "l3fabric-relay"
MAX_MD5_PASSWORD_BYTES = 80  # RFC 2385 / Linux TCP_MD5SIG_MAXKEYLEN; ExaBGP refuses longer
BGP_PORT = 179
MAX_HOLD_TIME = 65535

# A token ExaBGP's tokeniser reads back unchanged without quotes.
_BARE_TOKEN = re.compile(r"[A-Za-z0-9_./:=@+%-]+")  # no "," "[" "]" ";" "{" "}" "#"
# Inside double quotes ExaBGP's tokeniser keeps everything but a double quote, a single
# quote (it starts a new quoted string even inside "..."), a backslash (unescaped before
# tokenising) and line breaks.
_QUOTABLE = re.compile(r"[^\"'\\\r\n]+")
# Characters kept in a description; the rest become "_" (it is only shown in logs).
_DESCRIPTION_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:/()@+,=-]")


def api_block_name(peer: IPAddr) -> str:
    """The per-neighbour API block name: unique per peer, only [A-Za-z0-9._-]."""
    return "api-" + str(peer).replace(":", "-")


def render_config(
    router_id: IPv4Address,
    local_as: int,
    sessions: Sequence[SessionSpec],
    relay_cmd: Sequence[str],
    listen: bool,
    *,
    listen_port: int = BGP_PORT,
) -> str:
    """ExaBGP's configuration text: the relay process and one ``neighbor`` per session.

    ``listen`` says whether this node accepts connections at all (passive sessions need it);
    ``listen_port`` other than 179 is written per neighbour, because ExaBGP's global port
    setting also changes the port it connects *to*. Raises ValueError for a desired state
    ExaBGP cannot express (two sessions to one peer, a passive session without listening, a
    session whose router id is not this node's, a password over 80 bytes, ...).
    """
    if not relay_cmd:
        raise ValueError("relay_cmd: empty")
    _check_asn("local_as", local_as)
    _check_port("listen_port", listen_port)
    ordered = sorted(sessions, key=lambda s: (s.peer_ip.version, int(s.peer_ip)))
    seen: set[IPAddr] = set()
    for session in ordered:
        if session.peer_ip in seen:
            raise ValueError(f"sessions: two sessions to peer {session.peer_ip}")
        seen.add(session.peer_ip)
        _check_session(session, router_id, listen)

    lines = [
        "# Rendered by l3fabric (bgp_speaker/exabgp/config.py); rewritten on every change.",
        f"# node router-id {router_id} as {local_as}",
        "",
        f"process {RELAY_PROCESS} {{",
        f"    run {' '.join(_config_token(arg, 'relay_cmd') for arg in relay_cmd)};",
        "    encoder json;",
        "}",
    ]
    for session in ordered:
        lines.append("")
        lines.extend(_render_neighbor(session, listen, listen_port))
    return "\n".join(lines) + "\n"


def _render_neighbor(session: SessionSpec, listen: bool, listen_port: int) -> list[str]:
    family = "ipv4 unicast" if session.peer_ip.version == 4 else "ipv6 unicast"
    out = [
        f"neighbor {session.peer_ip} {{",
        f"    description {_quoted(_description(session), 'name')};",
        f"    router-id {session.router_id};",
        f"    local-address {session.local_address};",
        f"    local-as {session.local_as};",
        f"    peer-as {session.peer_as};",
        f"    hold-time {session.hold_time};",
        f"    passive {'true' if session.passive else 'false'};",
    ]
    if session.peer_port != BGP_PORT:
        out.append(f"    connect {session.peer_port};")
    if listen and listen_port != BGP_PORT:
        out.append(f"    listen {listen_port};")
    if session.md5_password:
        encoded = base64.b64encode(session.md5_password.encode()).decode("ascii")
        out.append(f'    md5-password "{encoded}";')
        out.append("    md5-base64 true;")
    out += [
        "    manual-eor true;",
        # The agent keeps its own Adj-RIB-In; ExaBGP's copy only costs CPU per prefix.
        "    adj-rib-in false;",
        "    family {",
        f"        {family};",
        "    }",
        "    capability {",
    ]
    if session.graceful_restart_time is not None:
        out.append(f"        graceful-restart {session.graceful_restart_time};")
    out += [
        "        route-refresh;",
        "    }",
        f"    api {api_block_name(session.peer_ip)} {{",
        f"        processes [ {RELAY_PROCESS} ];",
        "        neighbor-changes;",
        "        receive {",
        "            parsed;",
        "            open;",
        "            keepalive;",
        "            update;",
        "        }",
        "    }",
        "}",
    ]
    return out


def _description(session: SessionSpec) -> str:
    # Shown in ExaBGP's own logs and `show neighbor`; never part of ExaBGP's neighbour
    # equality, so renaming a BGPPeer does not flap its session.
    kind = str(session.peer_type)
    text = f"{session.name} ({kind})" if session.name else kind
    return _DESCRIPTION_UNSAFE.sub("_", text)


def _check_session(session: SessionSpec, router_id: IPv4Address, listen: bool) -> None:
    where = f"session {session.peer_ip}"
    if session.router_id != router_id:
        raise ValueError(f"{where}: router_id {session.router_id} is not the node's {router_id}")
    if session.peer_ip.version != session.local_address.version:
        raise ValueError(f"{where}: local_address {session.local_address} is another family")
    _check_asn(f"{where}: local_as", session.local_as)
    _check_asn(f"{where}: peer_as", session.peer_as)
    _check_port(f"{where}: peer_port", session.peer_port)
    if session.hold_time != 0 and not 3 <= session.hold_time <= MAX_HOLD_TIME:
        raise ValueError(f"{where}: hold_time {session.hold_time} is neither 0 nor 3..65535")
    if session.graceful_restart_time is not None and not 0 <= session.graceful_restart_time < 4096:
        raise ValueError(f"{where}: graceful_restart_time must fit 12 bits")
    if session.passive and not listen:
        raise ValueError(f"{where}: passive, but this node does not listen")
    password = session.md5_password
    if password is not None and len(password.encode()) > MAX_MD5_PASSWORD_BYTES:
        raise ValueError(f"{where}: md5_password longer than {MAX_MD5_PASSWORD_BYTES} bytes")


def _check_asn(field: str, value: int) -> None:
    if not 1 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{field}: {value} is not a 32-bit AS number")


def _check_port(field: str, value: int) -> None:
    if not 1 <= value <= 0xFFFF:
        raise ValueError(f"{field}: {value} is not a TCP port")


def _config_token(value: str, field: str) -> str:
    if _BARE_TOKEN.fullmatch(value):
        return value
    return _quoted(value, field)


def _quoted(value: str, field: str) -> str:
    if not _QUOTABLE.fullmatch(value):
        raise ValueError(f"{field}: {value!r} cannot be written in an ExaBGP config")
    return f'"{value}"'


# ExaBGP's reactor gives every peer a turn on every loop and then sleeps speed/100 s unless a
# socket (a peer, the API) wakes it: idle, it costs (a fixed part + peers) x loops per second;
# an API command wakes it at once, so a longer sleep does not delay commands. Keepalives due
# (ExaBGP counts whole seconds), signals (reload) and new connections wait one sleep at most.
# Measured on 2 cores (issue 13): idle CPU of ExaBGP + relay, % of a core, at speed
# 0.5 / 1 / 2 / 5 / 10 / 20, quiet sessions (hold 90 s) to BIRD peers in namespaces:
#   2 sessions    4.9-5.1 / 2.8-2.9 / 1.3-1.6 / 0.6-0.8 / 0.3   / 0.13
#   10 sessions   7.4-7.9 / 5.1     / 2.6     / 1.0     / 0.5   / 0.2
#   100 sessions  31      / 18      / 11.7    / 5.3     / 2.2-2.7 / 1.2
# (0.5-10: bench/RESULTS.md "ExaBGP reactor speed sweep"; 20, and 10 again at 100 sessions,
# measured the same way.) API announce -> route in a BIRD peer's kernel: 3-7 ms median at
# every speed with 2 sessions, 9 ms at 20 with 10 sessions: the sleep never delays it.
# A whole mesh3 lab node (agent, ExaBGP, relay; 2 sessions) idles at 0.4 % at 20, 7.6 % at
# 0.5 before. With hold 3 s, keepalives still leave 1.00 s apart (tests/agent/test_idle.py).
# 10 would leave a full mesh of 100 no room under its 3 % (2.2-2.7 % + the agent); 20 does.
# (With hold 3 s, 100 sessions cost ~35 % at 10 and 20 alike: every keepalive that arrives
# wakes the reactor, which then runs every peer; speed cannot help there.)
# No node pushes routes by the thousand through the API any more (BIRD reflects), so every
# node runs this speed.
NODE_SPEED = "20"
# ExaBGP takes at most 50 API route changes per loop, then sleeps (above) unless more input
# wakes it. A command of no more prefixes is done in one loop, and its ack brings the next
# command, which wakes the reactor: a 20k-prefix flood took 6-10 s at speed 20 in lines of
# 50, where lines of 1000 sleep 20 times each (80 s; tests/agent/test_idle.py has a burst).
API_ROUTES_PER_LOOP = 50


def render_env(
    listen_addresses: Sequence[IPAddr],
    *,
    listen_port: int = BGP_PORT,
    log_level: str = "INFO",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``exabgp.*`` environment for ``exabgp server``, sorted by key.

    ``listen_addresses`` empty means outbound only (``exabgp.tcp.bind`` empty). With a listen
    port other than 179 the neighbours carry ``listen`` themselves and nothing is bound here.
    ``extra`` overrides (tests); it must only hold ``exabgp.`` keys.
    """
    bind = (
        sorted({ip_address(a) for a in listen_addresses}, key=lambda a: (a.version, int(a)))
        if listen_port == BGP_PORT
        else []
    )
    env = {
        # root: the default `nobody` could not bind 179 after dropping privileges.
        "exabgp.daemon.user": "root",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        # exactly one `done`/`error` line per command: the speaker matches them in order.
        "exabgp.api.ack": "true",
        # several ExaBGPs on one machine would fight over the same CLI named pipes.
        "exabgp.api.cli": "false",
        "exabgp.api.encoder": "json",
        # the relay is respawned by ExaBGP if it dies; too many deaths end ExaBGP, which the
        # speaker then restarts.
        "exabgp.api.respawn": "true",
        "exabgp.api.terminate": "false",
        "exabgp.reactor.speed": NODE_SPEED,
        "exabgp.tcp.bind": " ".join(str(a) for a in bind),
        "exabgp.tcp.attempts": "0",
        "exabgp.bgp.passive": "false",
        # Logs go to stderr, which the speaker reads: it waits for "loaded new configuration
        # successfully" there to know a SIGUSR1 reload really happened.
        "exabgp.log.enable": "true",
        "exabgp.log.destination": "stderr",
        "exabgp.log.level": log_level,
        "exabgp.log.short": "true",
        "exabgp.log.reactor": "true",
        "exabgp.log.configuration": "true",
        "exabgp.log.network": "true",
        # "route added to neighbor ..." once per prefix: 20k lines per flood, and ~25% of
        # ExaBGP's API intake time. The speaker logs refused commands itself.
        "exabgp.log.processes": "false",
        "exabgp.log.daemon": "true",
        "exabgp.log.packets": "false",
        "exabgp.log.rib": "false",
        "exabgp.log.routes": "false",
        "exabgp.log.message": "false",
        "exabgp.log.timers": "false",
        "exabgp.log.parser": "false",
        "exabgp.log.statistics": "false",
    }
    for key, value in (extra or {}).items():
        if not key.startswith("exabgp."):
            raise ValueError(f"extra: {key!r} is not an exabgp.* setting")
        env[key] = value
    return dict(sorted(env.items()))
