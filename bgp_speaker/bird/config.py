"""BIRD 2's configuration for a reflector node, rendered from `reflection.ReflectorDesired`
(pure; golden files in tests/bird/golden/).

Per iBGP session one `protocol bgp` named after the peer's address, with Calico's timers
(connect retry 5 s, connect delay 2 s, error wait 5-30 s: BIRD's defaults wait minutes);
reflection is BIRD's own (`rr client`, `rr cluster id`, next hop kept). Import: what the
fabric rules allow (a prefix inside an enabled pool, no shorter than its block size) plus a
`peerIP` peer's accept list; export to the fabric: pool routes only, so a reflector is no
transit for anything else. The loopback session with the node's ExaBGP (see `reflection`)
imports the node's own exports with their next hop set to the node's address (ExaBGP sends
its loopback address) and exports everything BIRD accepted, for the node's kernel.

BIRD cannot express everything a SessionSpec can: `maxRestartTime` (a cap on the peer's
restart time) has no BIRD counterpart and is not rendered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bgp_speaker.bgp.policy import AcceptRule
from bgp_speaker.bgp.reflection import NODE_SPEAKER_BIRD_ID, ReflectorDesired, ReflectorSession
from bgp_speaker.bgp.routes import IPAddr, SessionSpec

__all__ = ["NODE_SPEAKER_PROTOCOL", "protocol_name", "render_bird_config"]

NODE_SPEAKER_PROTOCOL = "node_speaker"
CONNECT_RETRY = 5
CONNECT_DELAY = 2
ERROR_WAIT = (5, 30)
GRACEFUL_RESTART_WAIT = 20


def protocol_name(peer: IPAddr) -> str:
    """BIRD's protocol name for the session to ``peer`` (an identifier: no dots or colons)."""
    return "peer_" + str(peer).replace(".", "_").replace(":", "_")


def render_bird_config(desired: ReflectorDesired) -> str:
    """The whole bird.conf. Raises ValueError naming the field BIRD could not carry."""
    pools = [(net, size) for net, size in desired.pools if net.version == 4]
    lines = [
        "# Rendered by the l3fabric agent from the store; rewritten on every change.",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        f"router id {desired.router_id};",
        # Epoch seconds in `show protocols`: what `node status` reports.
        'timeformat protocol "%s";',
        # How long a restarted BIRD (-R) waits for its peers' End-of-RIBs before it sends
        # anything: a client that stays down must not hold the fabric back for BIRD's 240 s.
        f"graceful restart wait {GRACEFUL_RESTART_WAIT};",
        "",
        "protocol device {}",
        "",
        f"define FABRIC = {_prefix_set(f'{net}{{{size},32}}' for net, size in pools)};",
        "",
    ]
    for session in sorted(desired.sessions, key=lambda s: int(s.spec.peer_ip)):
        lines += _fabric_protocol(desired, session)
    lines += _node_speaker_protocol(desired)
    return "\n".join(lines) + "\n"


def _prefix_set(items: Iterable[str]) -> str:
    return "[ " + "".join(f"{item}, " for item in items).removesuffix(", ") + " ]"


def _accept_set(rules: Sequence[AcceptRule]) -> str:
    return _prefix_set(f"{r.prefix}{'+' if r.or_longer else ''}" for r in rules)


def _fabric_protocol(desired: ReflectorDesired, session: ReflectorSession) -> list[str]:
    spec = session.spec
    if session.accept:
        extra = _accept_set([r for r in session.accept if r.prefix.version == 4])
        import_rule = f"import where net ~ FABRIC || net ~ {extra};"
    else:
        import_rule = "import where net ~ FABRIC;"
    body = [
        f'  description "{_quoted(spec.name or "peer", "name")}";',
        f"  local {spec.local_address} as {spec.local_as};",
        f"  neighbor {spec.peer_ip}{_port(spec)} as {spec.peer_as};",
        "  strict bind;",
        *(["  passive on;"] if spec.passive else []),
        *(["  rr client;"] if spec.rr_client else []),
        f"  rr cluster id {desired.cluster_id};",
        *_session_options(spec),
        "  ipv4 {",
        f"    {import_rule}",
        "    export where net ~ FABRIC;",
        "    next hop self;" if session.next_hop_self else "    next hop keep;",
        *([f"    receive limit {spec.max_prefixes} action disable;"] if spec.max_prefixes else []),
        "  };",
    ]
    return [f"protocol bgp {protocol_name(spec.peer_ip)} {{", *body, "}", ""]


def _node_speaker_protocol(desired: ReflectorDesired) -> list[str]:
    spec = desired.node_speaker
    extras = [r for r in desired.node_speaker_accept if r.prefix.version == 4]
    export = (
        f"export where net ~ FABRIC || net ~ {_accept_set(extras)};"
        if extras
        else "export where net ~ FABRIC;"
    )
    return [
        f"protocol bgp {NODE_SPEAKER_PROTOCOL} {{",
        '  description "the node\'s own speaker (ExaBGP)";',
        f"  local {spec.peer_ip} as {spec.local_as};",
        f"  neighbor {spec.local_address} as {spec.local_as};",
        "  strict bind;",
        "  passive on;",
        "  rr client;",
        # A cluster of its own: see reflection.py for why not the shared cluster ID.
        f"  rr cluster id {desired.router_id};",
        f"  router id {NODE_SPEAKER_BIRD_ID};",
        *_session_options(spec),
        "  ipv4 {",
        f"    import filter {{ if net ~ FABRIC then {{ bgp_next_hop = {desired.router_id};"
        " accept; } reject; };",
        f"    {export}",
        "    next hop keep;",
        "  };",
        "}",
    ]


def _session_options(spec: SessionSpec) -> list[str]:
    keepalive = spec.keepalive_time or max(1, spec.hold_time // 3)
    out = [
        f"  hold time {spec.hold_time};",
        f"  keepalive time {keepalive};",
        f"  connect retry time {CONNECT_RETRY};",
        f"  connect delay time {CONNECT_DELAY};",
        f"  error wait time {ERROR_WAIT[0]},{ERROR_WAIT[1]};",
    ]
    if spec.graceful_restart_time:
        out += ["  graceful restart on;", f"  graceful restart time {spec.graceful_restart_time};"]
    else:
        out.append("  graceful restart off;")
    if spec.md5_password:
        where = f"BGPPeer {spec.name or spec.peer_ip}: password"
        out.append(f'  password "{_quoted(spec.md5_password, where)}";')
    return out


def _port(spec: SessionSpec) -> str:
    return "" if spec.peer_port == 179 else f" port {spec.peer_port}"


def _quoted(text: str, field: str) -> str:
    """``text`` inside BIRD's double quotes. BIRD's lexer ends a string at the next quote and
    knows no escapes, so a quote, a backslash or a line break cannot be carried."""
    bad = next((c for c in text if c in '"\\\n\r' or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{field}: BIRD cannot carry the character {bad!r}")
    return text
