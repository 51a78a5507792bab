"""Hostile CNI input through the real entry point: the installed shim executed as a runtime
executes it, against a real agent on real namespaces. Each call gets exactly one CNI JSON
object on stdout and the right exit status, no traceback anywhere, nothing left behind, and
the agent's log stays one line per record whatever the input holds."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni import errors, protocol
from cni.errors import CniError
from cni.protocol import MAX_LINE, call
from tests.agent.harness import AgentProcess, NodeHarness, node_harness
from tests.cni.runtime import PluginRun, assert_cni_error

pytestmark = pytest.mark.root
_counter = iter(range(1_000_000))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeHarness]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    with node_harness(tmp_path, prefix=f"h15c{os.getpid() % 10000}x{next(_counter)}") as harness:
        yield harness


def assert_del_succeeds(run: PluginRun) -> None:
    assert run.returncode == 0 and run.stdout == b"", run
    assert b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")


def assert_log_clean(agent: AgentProcess) -> None:
    log = agent.log_text()
    assert "Traceback" not in log and "Logging error" not in log, log


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- item 6: deep JSON -----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_config_is_a_decode_error(node: NodeHarness, agent, depth: int) -> None:
    c = node.new_pod("deep")
    conf = json.dumps(node.conf(extra="X")).encode().replace(b'"X"', nested(depth))
    assert_cni_error(node.cni("ADD", c, conf), errors.UNDECODABLE_CONFIG, "nested")
    prev = json.dumps(node.conf(prevResult="X")).encode().replace(b'"X"', nested(depth))
    assert_cni_error(node.cni("CHECK", c, prev), errors.UNDECODABLE_CONFIG, "nested")
    assert_log_clean(agent)
    node.assert_nothing_left()


@pytest.mark.parametrize("depth", [400, 990, 5000])
def test_deeply_nested_socket_frame_is_a_decode_error_logged_once(
    node: NodeHarness, agent, depth: int
) -> None:
    """What the shim refuses, another client on the socket may still send."""
    frame = b'{"op": "cni.add", "args": {"env": {}, "config": {"prevResult": %s}}}\n' % nested(
        depth
    )
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(node.socket))
        sock.sendall(frame)
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["ok"] is False and answer["error"]["code"] == errors.UNDECODABLE_CONFIG, answer
    assert "nested" in answer["error"]["details"], answer
    assert_log_clean(agent)
    [line] = [ln for ln in agent.log_text().splitlines() if "not valid JSON" in ln]
    assert "code=6" in line


# --- item 7: bytes that are not UTF-8 ------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("CNI_IFNAME", b"eth\xff", "CNI_IFNAME"),
        ("CNI_ARGS", b"K8S_POD_NAMESPACE=default;K8S_POD_NAME=p\xc3\x28", "K8S_POD_NAME"),
        ("CNI_ARGS", b"IgnoreUnknown=1;K8S_POD_UID=\xfe\xff", "K8S_POD_UID"),
        ("CNI_NETNS", b"/var/run/netns/\xff", "CNI_NETNS"),
        ("CNI_CONTAINERID", b"ctr-\xff", "CNI_CONTAINERID"),
    ],
)
def test_undecodable_environment_fails_add_and_del_succeeds(
    node: NodeHarness, agent, var: str, value: bytes, named: str
) -> None:
    c = node.new_pod("bytes")
    env: dict = {var: value}
    assert_cni_error(node.cni("ADD", c, env=env), errors.INVALID_ENV, named, "UTF-8")
    node.assert_nothing_left()
    assert_del_succeeds(node.cni("DEL", c, env=env))
    assert_log_clean(agent)
    node.assert_nothing_left()


@pytest.mark.parametrize("ifname", [b"eth\xff", b"a/b", b"x" * 16])
def test_del_with_an_interface_add_refuses_is_success_and_touches_nothing(
    node: NodeHarness, agent, ifname: bytes
) -> None:
    """An invalid CNI_IFNAME names no attachment: its DEL succeeds and leaves eth0's alone."""
    c = node.new_pod("otherif")
    node.add(c)
    assert_del_succeeds(node.cni("DEL", c, env={"CNI_IFNAME": ifname}))
    assert len(node.allocated()) == 1 and len(node.host_veths()) == 1
    node.delete(c)
    assert_log_clean(agent)
    node.assert_nothing_left()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CNI_ARGS", b"K8S_POD_NAMESPACE=default;K8S_POD_NAME=\xff"),
        ("CNI_ARGS", b"garbage"),
        ("CNI_NETNS", b"/var/run/netns/\xff"),
    ],
)
def test_del_with_garbled_environment_releases_what_add_made(
    node: NodeHarness, agent, var: str, value: bytes
) -> None:
    """DEL must be able to succeed: the container ID still identifies the attachment."""
    c = node.new_pod("garbled")
    node.add(c)
    assert_del_succeeds(node.cni("DEL", c, env={var: value}))
    assert_log_clean(agent)
    node.assert_nothing_left()


@pytest.mark.parametrize(
    ("container_id", "code"),
    [(b"ctr-\xff", errors.INVALID_ENV), (b"bad/id", errors.INVALID_ENV),
     (b"x" * 300, errors.INVALID_CONFIG)],  # too long for the IPAM handle's name
)  # fmt: skip
def test_del_of_a_container_id_add_refuses_is_success(
    node: NodeHarness, agent, container_id: bytes, code: int
) -> None:
    c = node.new_pod("badid")
    run = node.cni("ADD", c, env={"CNI_CONTAINERID": container_id})
    assert_cni_error(run, code, "CNI_CONTAINERID")
    assert_del_succeeds(node.cni("DEL", c, env={"CNI_CONTAINERID": container_id}))
    assert_log_clean(agent)
    node.assert_nothing_left()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("socket", "/run/\ud800.sock"),
        ("socket", "/run/a\u0000b.sock"),
        ("socket", "/" + "s" * 200),
        ("ipam", {"pools": ["\ud800"]}),
        ("name", "l3\ud800"),
    ],
)
def test_config_strings_that_cannot_be_used_are_invalid(
    node: NodeHarness, agent, field: str, value: object
) -> None:
    """Valid JSON can still hold lone surrogates, NULs or over-long paths."""
    c = node.new_pod("strs")
    run = node.cni("ADD", c, json.dumps(node.conf(**{field: value})).encode())
    assert_cni_error(run, errors.INVALID_CONFIG, field)
    assert_log_clean(agent)
    node.assert_nothing_left()


def test_config_that_is_not_utf8_is_a_decode_error(node: NodeHarness, agent) -> None:
    c = node.new_pod("latin1")
    conf = json.dumps(node.conf(ipam={"pools": ["X"]})).encode().replace(b"X", b"\xe9")
    assert_cni_error(node.cni("ADD", c, conf), errors.UNDECODABLE_CONFIG, "UTF-8")
    node.assert_nothing_left()


# --- item 8: too large ---------------------------------------------------------------------


# Under the limit on stdin but not with the environment around it; over it on stdin.
@pytest.mark.parametrize("size", [MAX_LINE - 200, MAX_LINE + 1, 3 * MAX_LINE])
def test_oversized_config_is_invalid_not_try_again_later(
    node: NodeHarness, agent, size: int
) -> None:
    c = node.new_pod("big")
    conf = json.dumps(node.conf(padding="P" * size)).encode()
    assert_cni_error(node.cni("ADD", c, conf), errors.INVALID_CONFIG, "too large")
    assert_log_clean(agent)
    node.assert_nothing_left()


def test_agent_answer_is_read_when_the_request_is_cut_short(
    node: NodeHarness, agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose write the agent stops reading still gets the agent's answer (7), here
    one that believes the agent takes more than it does."""
    monkeypatch.setattr(protocol, "MAX_LINE", 16 * MAX_LINE)
    with pytest.raises(CniError) as err:
        call(str(node.socket), "cni.add", {"padding": "P" * (2 * MAX_LINE)}, timeout=30)
    assert err.value.code == errors.INVALID_CONFIG and "too large" in err.value.msg


# --- item 9: log injection ---------------------------------------------------------------------


FORGED = "evil\nINFO l3fabric.agent.pods: cni DEL op=del pod=default/victim\r\n x=y"


def test_pod_name_with_newlines_is_one_escaped_log_line(node: NodeHarness, agent) -> None:
    c = node.new_pod("inject")
    args = f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={FORGED}"
    run = node.cni("ADD", c, env={"CNI_ARGS": args})
    assert run.ok, run
    assert_del_succeeds(node.cni("DEL", c, env={"CNI_ARGS": args}))
    log = agent.log_text().splitlines()
    mentions = [ln for ln in log if "victim" in ln]
    assert [ln.split(" handle=")[0] for ln in mentions] == [
        "INFO l3fabric.agent.pods: cni ADD",
        "INFO l3fabric.agent.pods: cni DEL",
    ], mentions
    for line in mentions:
        assert line.endswith(
            r' pod="default/evil\nINFO l3fabric.agent.pods: cni DEL op=del pod=default/victim'
            r'\r\n x=y"'
        ), line
    assert_log_clean(agent)
    node.assert_nothing_left()
