"""The ADD result's exact shape, and reading prevResult back for CHECK."""

from __future__ import annotations

import pytest
from netaddr import IPAddress, IPNetwork

from cni import errors
from cni.errors import CniError
from cni.result import Attachment, parse_prev_result, render_result

ATT = Attachment(
    host_ifname="l3f0123456789ab",
    host_mac="ee:ee:ee:ee:ee:ee",
    container_ifname="eth0",
    container_mac="02:42:0a:00:00:05",
    sandbox="/var/run/netns/pod",
    addresses=(IPNetwork("10.1.0.5/32"),),
    gateway=IPAddress("169.254.1.1"),
)


def test_result_1_0_0() -> None:
    assert render_result("1.0.0", ATT) == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "l3f0123456789ab", "mac": "ee:ee:ee:ee:ee:ee"},
            {"name": "eth0", "mac": "02:42:0a:00:00:05", "sandbox": "/var/run/netns/pod"},
        ],
        "ips": [{"address": "10.1.0.5/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def test_result_0_4_0_carries_ip_versions() -> None:
    result = render_result("0.4.0", ATT)
    assert result["ips"] == [
        {"version": "4", "address": "10.1.0.5/32", "gateway": "169.254.1.1", "interface": 1}
    ]


def test_prev_result_after_chained_plugins() -> None:
    prev = render_result("1.0.0", ATT)
    prev["interfaces"].append({"name": "dummy0", "mac": "02:00:00:00:00:09"})  # added by a chain
    got = parse_prev_result(prev, "eth0", "/var/run/netns/pod")
    assert got.container_mac == "02:42:0a:00:00:05"
    assert got.addresses == (IPNetwork("10.1.0.5/32"),)
    assert got.host_ifname == "l3f0123456789ab"


@pytest.mark.parametrize(
    ("prev", "field"),
    [
        ({}, "interfaces"),
        ({"interfaces": [{"name": "eth0", "sandbox": "/other"}], "ips": []}, "interfaces"),
        ({"interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pod"}]}, "ips"),
        ({"interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pod"}],
          "ips": [{"address": "nonsense", "interface": 0}]}, "ips[0].address"),
    ],
)  # fmt: skip
def test_malformed_prev_result(prev: dict, field: str) -> None:
    with pytest.raises(CniError) as err:
        parse_prev_result(prev, "eth0", "/var/run/netns/pod")
    assert err.value.code == errors.INVALID_CONFIG and field in err.value.msg
