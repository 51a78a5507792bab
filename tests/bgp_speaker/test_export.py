"""Exports: confirmed affine blocks and borrowed addresses (pure)."""

from ipaddress import ip_network

from netaddr import IPAddress, IPNetwork

from bgp_speaker.bgp.export import blackhole_routes, compute_exports
from bgp_speaker.bgp.routes import KernelRoute
from ipam_blocks import block as blockmath
from ipam_blocks.model import AffinityState, Attribute, BlockAffinity


def test_confirmed_blocks_and_borrowed_addresses():
    mine = blockmath.new_block(IPNetwork("10.244.0.0/26"), "a")
    pending = blockmath.new_block(IPNetwork("10.244.0.64/26"), "a")
    theirs = blockmath.new_block(IPNetwork("10.244.0.128/26"), "b")
    theirs = blockmath.assign_ip(theirs, IPAddress("10.244.0.130"), Attribute("h1", node="a"))
    theirs = blockmath.assign_ip(theirs, IPAddress("10.244.0.131"), Attribute("h2", node="b"))
    affinities = [
        BlockAffinity("a", mine.cidr, AffinityState.CONFIRMED),
        BlockAffinity("a", pending.cidr, AffinityState.PENDING),
        BlockAffinity("b", theirs.cidr, AffinityState.CONFIRMED),
    ]
    exports = compute_exports("a", [mine, pending, theirs], affinities)
    assert exports.blocks == {ip_network("10.244.0.0/26")}
    assert exports.borrowed == {ip_network("10.244.0.130/32")}
    assert blackhole_routes(exports) == {
        ip_network("10.244.0.0/26"): KernelRoute(ip_network("10.244.0.0/26"), blackhole=True)
    }
    b = compute_exports("b", [mine, pending, theirs], affinities)
    assert b.blocks == {ip_network("10.244.0.128/26")} and not b.borrowed


def test_affinity_without_matching_block_is_not_exported():
    moved = blockmath.new_block(IPNetwork("10.244.1.0/26"), "b")
    aff = [BlockAffinity("a", moved.cidr, AffinityState.CONFIRMED)]
    assert compute_exports("a", [moved], aff).prefixes == frozenset()
