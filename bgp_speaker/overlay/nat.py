"""natOutgoing: pods of such pools reach the world outside all pools from the node's address.

Rules live in one nftables table the agent owns, ``inet l3fabric``, with one NAT chain
hooked at postrouting::

    table inet l3fabric {
        set nat-pools4 { type ipv4_addr; flags interval; elements = { <natOutgoing pools> } }
        set all-pools4 { type ipv4_addr; flags interval; elements = { <every enabled pool> } }
        chain nat-outgoing {
            type nat hook postrouting priority srcnat; policy accept;
            ip saddr @nat-pools4 ip daddr != @all-pools4 masquerade
        }
    }

(and the same with ``ip6`` for IPv6 pools). ``masquerade`` rewrites the source to the address
of the interface the packet leaves by — the node's address on its uplink — and conntrack
undoes it on the replies. Pod-to-pod traffic is never NATed: every pool is in ``all-pools``,
whichever node or encapsulation the destination is behind.

Reconciled by level: the whole table is replaced in one ``nft -f`` transaction whenever the
desired rules change or what the kernel lists differs from what was listed right after the
last apply (someone edited or flushed it). With no natOutgoing pool the table is deleted.
Nothing else in the ruleset is touched.

Pure rendering first (``render_nat_table``), the adapter (``NatTable``, runs ``nft`` in the
node's namespace) after it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from bgp_speaker.bgp.routes import IPNet
from bgp_speaker.kernel.netns import netns_path, open_netns, run_in_netns
from bgp_speaker.overlay.encap import PoolEncap
from ipam_blocks.errors import L3FabricError

__all__ = ["NAT_TABLE", "NatError", "NatTable", "render_nat_table", "render_nat_transaction"]

log = logging.getLogger("l3fabric.agent.nat")

NAT_FAMILY = "inet"
NAT_TABLE = "l3fabric"
NAT_CHAIN = "nat-outgoing"
NFT_TIMEOUT = 10.0


class NatError(L3FabricError):
    """nft is missing or refused the rules (transient: retried at the next reconcile)."""


# --- pure -------------------------------------------------------------------------------------


def _elements(nets: Sequence[IPNet]) -> str:
    return ", ".join(str(n) for n in sorted(nets, key=lambda n: (int(n.network_address),
                                                                 n.prefixlen)))  # fmt: skip


def render_nat_table(pools: Sequence[PoolEncap]) -> str | None:
    """The ``nft`` text of the whole table; None when no pool has natOutgoing."""
    lines = [f"table {NAT_FAMILY} {NAT_TABLE} {{"]
    rules = []
    for version, family, kind in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
        nat = [p.cidr for p in pools if p.nat_outgoing and p.cidr.version == version]
        if not nat:
            continue
        every = [p.cidr for p in pools if p.cidr.version == version]
        for name, nets in ((f"nat-pools{version}", nat), (f"all-pools{version}", every)):
            lines += [
                f"    set {name} {{",
                f"        type {kind}; flags interval;",
                f"        elements = {{ {_elements(nets)} }}",
                "    }",
            ]
        rules.append(
            f"        {family} saddr @nat-pools{version} {family} daddr != @all-pools{version} "
            "masquerade"
        )
    if not rules:
        return None
    lines += [
        f"    chain {NAT_CHAIN} {{",
        "        type nat hook postrouting priority srcnat; policy accept;",
        *rules,
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_nat_transaction(table: str | None) -> str:
    """One atomic ``nft -f`` script that replaces (or, for None, removes) our table: declare it
    (a no-op when it exists), delete it, define it anew."""
    head = f"table {NAT_FAMILY} {NAT_TABLE}\ndelete table {NAT_FAMILY} {NAT_TABLE}\n"
    return head + (table or "")


# --- adapter ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatStatus:
    enabled: bool
    error: str = ""


class NatTable:
    """Our nftables table in one network namespace (None: the agent's own)."""

    def __init__(self, netns: str | None = None, nft: str | None = None) -> None:
        self.netns = None if netns is None else netns_path(netns)
        self._nft = nft or shutil.which("nft") or "nft"
        self._wanted: str | None = None
        self._listed: str | None = None  # what the kernel listed right after our last apply
        self._applied = False
        self.status = NatStatus(False)

    def reconcile(self, pools: Sequence[PoolEncap]) -> bool:
        """Make the kernel's table match ``pools``; True when something was written.
        Raises NatError (the caller logs it and tries again later)."""
        wanted = render_nat_table(pools)
        try:
            listed = self._list()
            if self._applied and wanted == self._wanted and listed == self._listed:
                return False
            if wanted is None and listed is None:
                self._wanted, self._listed, self._applied = None, None, True
                self.status = NatStatus(False)
                return False
            self._run(["-f", "-"], render_nat_transaction(wanted))
            self._wanted, self._listed, self._applied = wanted, self._list(), True
        except NatError as err:
            self.status = NatStatus(wanted is not None, str(err))
            raise
        self.status = NatStatus(wanted is not None)
        log.info("nat rules applied", extra={"op": "nat", "enabled": wanted is not None,
                                             "pools": [str(p.cidr) for p in pools
                                                       if p.nat_outgoing]})  # fmt: skip
        return True

    def _list(self) -> str | None:
        try:
            return self._run(["list", "table", NAT_FAMILY, NAT_TABLE])
        except NatError as err:
            if "No such file or directory" in str(err):
                return None
            raise

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        argv = [self._nft, *args]

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT,
                check=False,
            )  # fmt: skip

        try:
            if self.netns is None:
                done = run()
            else:
                with open_netns(self.netns) as fd:
                    done = run_in_netns(fd, run)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NatError(f"nft {' '.join(args)}: {err}") from err
        if done.returncode != 0:
            raise NatError(f"nft {' '.join(args)}: {done.stderr.strip()[:300]}")
        return done.stdout
