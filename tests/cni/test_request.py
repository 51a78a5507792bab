"""Parsing a CNI invocation: every bad input gets the spec's code and names its field."""

from __future__ import annotations

from typing import Any

import pytest

from cni import errors
from cni.errors import CniError
from cni.protocol import DEFAULT_SOCKET
from cni.request import parse_cni_args, parse_request

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc123",
    "CNI_NETNS": "/var/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0",
}
CONF = {"cniVersion": "1.0.0", "name": "l3fabric", "type": "l3fabric"}


def error(env: dict[str, Any], conf: Any) -> CniError:
    with pytest.raises(CniError) as err:
        parse_request(env, conf)
    return err.value


def test_a_full_request() -> None:
    conf = {**CONF, "mtu": 1400, "socket": "/run/a.sock", "ipam": {"pools": ["p1"]},
            "log_level": "debug"}  # fmt: skip
    req = parse_request(ENV, conf)
    assert (req.command, req.container_id, req.netns, req.ifname) == (
        "ADD", "abc123", "/var/run/netns/x", "eth0"
    )  # fmt: skip
    assert (req.pod_namespace, req.pod_name, req.handle_id) == ("ns1", "web-0", "l3fabric.abc123")
    c = req.config
    assert (c.cni_version, c.name, c.mtu, c.socket, c.pools, c.log_level) == (
        "1.0.0", "l3fabric", 1400, "/run/a.sock", ("p1",), "debug"
    )  # fmt: skip


def test_defaults() -> None:
    c = parse_request(ENV, CONF).config
    assert (c.mtu, c.socket, c.pools, c.log_level, c.prev_result) == (
        None, DEFAULT_SOCKET, (), "info", None
    )  # fmt: skip


@pytest.mark.parametrize(
    ("command", "needed"),
    [
        ("ADD", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]),
        ("DEL", ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]),
        ("GC", ["CNI_PATH"]),
    ],
)
def test_missing_environment_names_the_variable(command: str, needed: list[str]) -> None:
    conf = {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": []}
    for var in needed:
        env = {k: v for k, v in ENV.items() if k != var} | {"CNI_COMMAND": command}
        err = error(env, conf)
        assert err.code == errors.INVALID_ENV and var in err.msg
    # DEL does not need the namespace: it may be gone already
    parse_request({k: v for k, v in ENV.items() if k != "CNI_NETNS"} | {"CNI_COMMAND": "DEL"}, CONF)


@pytest.mark.parametrize(
    ("env", "word"),
    [
        ({"CNI_COMMAND": ""}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
        ({"CNI_CONTAINERID": "-leading-dash"}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "has space"}, "CNI_CONTAINERID"),
        ({"CNI_IFNAME": "much-too-long-name0"}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "a/b"}, "CNI_IFNAME"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, "CNI_ARGS"),
    ],
)
def test_invalid_environment(env: dict[str, str], word: str) -> None:
    err = error(ENV | env, CONF)
    assert err.code == errors.INVALID_ENV and word in err.msg


@pytest.mark.parametrize(
    ("conf", "code", "field"),
    [
        ([], errors.INVALID_CONFIG, "config"),
        ({"name": "x"}, errors.INVALID_CONFIG, "cniVersion"),
        ({"cniVersion": "0.3.1", "name": "x"}, errors.INCOMPATIBLE_VERSION, "0.3.1"),
        ({"cniVersion": "1.0.0"}, errors.INVALID_CONFIG, "name"),
        ({**CONF, "name": "bad name"}, errors.INVALID_CONFIG, "name"),
        ({**CONF, "mtu": 10}, errors.INVALID_CONFIG, "mtu"),
        ({**CONF, "mtu": True}, errors.INVALID_CONFIG, "mtu"),
        ({**CONF, "socket": "relative.sock"}, errors.INVALID_CONFIG, "socket"),
        ({**CONF, "ipam": []}, errors.INVALID_CONFIG, "ipam"),
        ({**CONF, "ipam": {"type": "host-local"}}, errors.INVALID_CONFIG, "ipam.type"),
        ({**CONF, "ipam": {"pools": "p1"}}, errors.INVALID_CONFIG, "ipam.pools"),
        ({**CONF, "log_level": "loud"}, errors.INVALID_CONFIG, "log_level"),
        ({**CONF, "prevResult": []}, errors.INVALID_CONFIG, "prevResult"),
    ],
)
def test_invalid_configuration(conf: Any, code: int, field: str) -> None:
    err = error(ENV, conf)
    assert err.code == code
    assert field in f"{err.msg} {err.details}"


def test_command_specific_requirements() -> None:
    err = error(ENV | {"CNI_COMMAND": "CHECK"}, CONF)
    assert err.code == errors.INVALID_CONFIG and "prevResult" in err.msg
    err = error(ENV | {"CNI_COMMAND": "GC"}, CONF)
    assert err.code == errors.INCOMPATIBLE_VERSION and "1.1.0" in err.msg
    err = error(ENV | {"CNI_COMMAND": "GC"}, {**CONF, "cniVersion": "1.1.0"})
    assert err.code == errors.INVALID_CONFIG and "valid-attachments" in err.msg
    attachments = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b"}]
    conf = {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": attachments}
    err = error(ENV | {"CNI_COMMAND": "GC"}, conf)
    assert err.code == errors.INVALID_CONFIG and "[1]" in err.msg
    conf["cni.dev/valid-attachments"] = attachments[:1]
    req = parse_request(ENV | {"CNI_COMMAND": "GC"}, conf)
    assert req.config.valid_attachments == (("a", "eth0"),)


def test_cni_args() -> None:
    assert parse_cni_args("") == {}
    assert parse_cni_args("A=1;;B=x=y") == {"A": "1", "B": "x=y"}
