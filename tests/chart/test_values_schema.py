"""Bad values are refused before anything is rendered, with a message naming the value:
values.schema.json through Helm's own validator, and the chart's cross-field checks."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import helm_python as helm
import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.chart.conftest import CHART_DIR, MESH, TOR_PEERS, merged, render_files

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
POOL = {"name": "p", "cidr": "10.244.0.0/16"}
PEER = {"name": "tor", "peerIP": "10.0.0.1", "asNumber": 65001}


def _pool(**fields: Any) -> dict[str, Any]:
    return {"ipPools": [{**POOL, **fields}]}


def _bgp(**fields: Any) -> dict[str, Any]:
    return {"bgp": {**fields}}


BAD_VALUES = {
    # wrong types
    "mtu as text": ({"mtu": "1500"}, "at '/mtu': got string, want null or integer"),
    "natOutgoing as text": (_pool(natOutgoing="yes"), "at '/ipPools/0/natOutgoing': got string"),
    "peers not a list": (_bgp(peers={"a": 1}), "at '/bgp/peers': got object, want array"),
    "mtu too small": ({"mtu": 60}, "at '/mtu': minimum: got 60, want 68"),
    # unknown keys and modes
    "misspelt key": (_pool(blocksize=26), "additional properties 'blocksize' not allowed"),
    "unknown top-level key": ({"ippools": []}, "additional properties 'ippools' not allowed"),
    "unknown ipip mode": (
        _pool(ipipMode="Sometimes"),
        "at '/ipPools/0/ipipMode': value must be one of 'Never', 'Always', 'CrossSubnet'",
    ),
    "unknown vxlan mode": (_pool(vxlanMode="always"), "at '/ipPools/0/vxlanMode': value must"),
    "unknown selector operator": (
        _pool(nodeSelector={"matchExpressions": [{"key": "rack", "operator": "in"}]}),
        "at '/ipPools/0/nodeSelector/matchExpressions/0/operator': value must be one of",
    ),
    "unknown log level": ({"agent": {"logLevel": "verbose"}}, "at '/agent/logLevel'"),
    # bad CIDRs and addresses
    "prefix too long": (_pool(cidr="10.244.0.0/33"), "at '/ipPools/0/cidr': 'anyOf' failed"),
    "octet too large": (_pool(cidr="10.256.0.0/16"), "'10.256.0.0/16' does not match pattern"),
    "no prefix length": (_pool(cidr="10.244.0.0"), "'10.244.0.0' does not match pattern"),
    "short address": (_pool(cidr="10.244.0/16"), "'10.244.0/16' does not match pattern"),
    "ipv6 prefix too long": (_pool(cidr="fd00::/129"), "'fd00::/129' does not match pattern"),
    "two double colons": (_pool(cidr="fd00::1::/64"), "does not match pattern"),
    "bad peer address": (
        _bgp(peers=[{**PEER, "peerIP": "10.0.0.300"}]),
        "at '/bgp/peers/0/peerIP': 'anyOf' failed",
    ),
    "bad cluster id": (
        _bgp(routeReflectors={"enabled": True, "clusterID": "cluster-1"}),
        "at '/bgp/routeReflectors/clusterID': 'cluster-1' is not valid ipv4",
    ),
    # ranges the agent enforces too
    "ipv4 block too large": (_pool(blockSize=16), "at '/ipPools/0/blockSize': minimum: got 16"),
    "ipv6 block size on ipv6 pool": (
        _pool(cidr="fd00:244::/56", blockSize=26),
        "at '/ipPools/0/blockSize': minimum: got 26, want 116",
    ),
    "ipip on ipv6": (
        _pool(cidr="fd00:244::/56", ipipMode="Always"),
        "at '/ipPools/0/ipipMode': value must be 'Never'",
    ),
    "as number zero": (_bgp(asNumber=0), "at '/bgp/asNumber': minimum: got 0, want 1"),
    "as number too large": (_bgp(asNumber=4294967296), "at '/bgp/asNumber': maximum"),
    "peer without AS": (
        _bgp(peers=[{"name": "tor", "peerIP": "10.0.0.1"}]),
        "at '/bgp/peers/0': missing property 'asNumber'",
    ),
    "password without key": (
        _bgp(peers=[{**PEER, "passwordSecret": {"name": "s"}}]),
        "at '/bgp/peers/0/passwordSecret': missing property 'key'",
    ),
    "pool name with capitals": (_pool(name="Default"), "at '/ipPools/0/name'"),
    "metrics address not an address": (
        {"agent": {"metricsAddress": "0.0.0.0.0"}},
        "at '/agent/metricsAddress'",
    ),
    "relative host path": (
        {"agent": {"hostPaths": {"cniBinDir": "opt/cni/bin"}}},
        "at '/agent/hostPaths/cniBinDir'",
    ),
    # what the schema cannot say, the templates do
    "ipip and vxlan together": (
        _pool(ipipMode="Always", vxlanMode="CrossSubnet"),
        "ipPools[0] (p): ipipMode and vxlanMode cannot both be enabled on one pool",
    ),
    "two pools, one name": (
        {"ipPools": [POOL, {**POOL, "cidr": "10.245.0.0/16"}]},
        'ipPools[1].name: "p" is used by two pools',
    ),
    "two peers, one name": (
        _bgp(peers=[PEER, {**PEER, "peerIP": "10.0.0.2"}]),
        'bgp.peers[1].name: "tor" is used by two peers',
    ),
    "keepalive above a third of hold": (
        _bgp(holdTime=9, keepaliveTime=4),
        "bgp.keepaliveTime: must be at most a third of bgp.holdTime (9)",
    ),
}


@pytest.mark.parametrize(("values", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_refused_with_a_message_naming_them(chart, values, message):
    with pytest.raises(helm.HelmError) as caught:
        render_files(chart, values)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "values",
    [MESH, TOR_PEERS, _pool(cidr="fd00:244::/56", blockSize=122), _pool(cidr="0.0.0.0/0")],
)
def test_good_values_pass_the_schema(chart, values):
    chart.validate_schema(merged(values))


# The CIDR patterns against Python's own parser: every network's text form is accepted, and
# the same with a prefix length past the family's maximum is not.
_POOL_SCHEMA = {**SCHEMA["definitions"]["ipPool"], "definitions": SCHEMA["definitions"]}
_VALIDATOR = jsonschema.Draft7Validator(_POOL_SCHEMA)


def _valid_cidr(text: str) -> bool:
    return _VALIDATOR.is_valid({"name": "p", "cidr": text})


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_every_ipv4_network_is_accepted(address, prefix):
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    assert _valid_cidr(str(network))
    assert not _valid_cidr(f"{network.network_address}/{prefix + 33}")


@given(st.ip_addresses(v=6), st.integers(0, 128))
def test_every_ipv6_network_is_accepted(address, prefix):
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    assert _valid_cidr(str(network))
    assert _valid_cidr(network.exploded)
    assert not _valid_cidr(f"{network.network_address}/{prefix + 129}")


@given(st.text(alphabet="0123456789abcdef:./", max_size=45))
def test_accepted_cidr_text_is_a_network(text):
    if _valid_cidr(text):
        ipaddress.ip_network(text, strict=False)  # raises if the pattern let garbage through


def test_patterns_are_re2_compatible():
    """Helm's validator uses Go's RE2: no lookaround, no backreferences."""
    patterns = re.findall(r'"pattern": "((?:[^"\\]|\\.)*)"', json.dumps(SCHEMA))
    assert patterns
    for pattern in patterns:
        assert not re.search(r"\(\?[=!<]|\\[1-9]", pattern), pattern
