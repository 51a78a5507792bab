"""natOutgoing rules as nftables text (pure: bgp_speaker.overlay.nat rendering)."""

from __future__ import annotations

from ipaddress import ip_network

from bgp_speaker.overlay.encap import PoolEncap
from bgp_speaker.overlay.nat import render_nat_table, render_nat_transaction

A = PoolEncap(ip_network("10.244.0.0/16"), "a", nat_outgoing=True)
B = PoolEncap(ip_network("10.96.0.0/16"), "b")
V6 = PoolEncap(ip_network("fd00:10::/64"), "v6", nat_outgoing=True)


def test_no_natoutgoing_pool_means_no_table() -> None:
    assert render_nat_table([B]) is None
    assert render_nat_table([]) is None
    # The transaction then only removes ours (declared first, so deleting cannot fail).
    assert render_nat_transaction(None) == "table inet l3fabric\ndelete table inet l3fabric\n"


def test_nat_pools_masquerade_to_everything_outside_all_pools() -> None:
    text = render_nat_table([A, B])
    assert text == (
        "table inet l3fabric {\n"
        "    set nat-pools4 {\n"
        "        type ipv4_addr; flags interval;\n"
        "        elements = { 10.244.0.0/16 }\n"
        "    }\n"
        "    set all-pools4 {\n"
        "        type ipv4_addr; flags interval;\n"
        "        elements = { 10.96.0.0/16, 10.244.0.0/16 }\n"
        "    }\n"
        "    chain nat-outgoing {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        "        ip saddr @nat-pools4 ip daddr != @all-pools4 masquerade\n"
        "    }\n"
        "}\n"
    )
    assert render_nat_transaction(text).endswith(text)


def test_ipv6_pools_get_their_own_sets_and_rule() -> None:
    text = render_nat_table([B, V6])
    assert text is not None
    assert "ip6 saddr @nat-pools6 ip6 daddr != @all-pools6 masquerade" in text
    assert "nat-pools4" not in text  # no IPv4 pool NATs
    assert "elements = { fd00:10::/64 }" in text
