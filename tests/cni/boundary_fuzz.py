"""Property-based fuzzing of the CNI boundary, shared by tests/cni/test_fuzz.py (a bounded run
in the suite) and bench/fuzz.py (a long run that reports its findings).

A case is what a runtime can hand the plugin: a command sequence (ADD, then CHECK, then DEL
with the same input, as a runtime does), the CNI_* environment (bytes included, as the
kernel allows any byte but NUL) and stdin (a configuration with generated fields and
prevResult, or raw bytes). `run_case` executes the installed shim as a runtime does against
the node's real agent and returns what went wrong, as short strings (empty: nothing):

- stdout is exactly one CNI JSON object: an error {cniVersion, code, msg, details} with exit
  status 1, or on success an ADD result (exit 0) or nothing (DEL, CHECK);
- no traceback on stderr or in the agent's log, and every log line is a record of its own;
- a DEL with the input of a successful ADD succeeds, and afterwards nothing remains: no host
  veth, no host route, no allocation, no Workload record, `ipam check` clean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.agent.harness import NodeHarness
from tests.cni.runtime import Container, PluginRun, exec_plugin, plugin_env

ERROR_KEYS = {"cniVersion", "code", "msg", "details"}
LOG_LEVELS = ("DEBUG ", "INFO ", "WARNING ", "ERROR ", "CRITICAL ")
POD_NETNS = 4  # namespaces the cases share (each case leaves nothing behind)

env_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
env_text = st.text(max_size=40).map(lambda t: t.replace("\0", ""))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
deep_json = st.integers(100, 3000).map(lambda n: "[" * n + "]" * n)
# A configuration field nested too deep for `json.dumps` itself: this placeholder string,
# replaced by the nesting in the serialised configuration.
DEEP = "h15c-deep-placeholder"


@dataclass(frozen=True)
class Case:
    env: dict[str, bytes | None]  # CNI_* overrides of a valid call; None removes a variable
    config: dict[str, Any]  # overrides of a valid configuration
    stdin: bytes | None  # raw stdin instead of the configuration
    deep: bytes  # what DEEP in the configuration stands for
    check: bool  # CHECK with the ADD result before DEL

    def describe(self) -> str:
        return repr(self.__class__(self.env, self.config, self.stdin, b"...", self.check))[:400]


@st.composite
def cni_args(draw: st.DrawFn) -> bytes:
    keys = st.sampled_from([b"K8S_POD_NAME", b"K8S_POD_NAMESPACE", b"K8S_POD_UID",
                            b"IgnoreUnknown"]) | env_bytes  # fmt: skip
    pairs = draw(st.lists(st.tuples(keys, env_bytes | env_text.map(str.encode)), max_size=4))
    sep = draw(st.sampled_from([b"=", b"", b"=="]))
    return b";".join(k + sep + v for k, v in pairs)


def env_value(var: str) -> st.SearchStrategy[bytes | None]:
    special = {
        "CNI_IFNAME": st.sampled_from([b"eth1", b"lo", b"x" * 16, b"a/b", b".", b"\xc3\xa9th"]),
        "CNI_NETNS": st.sampled_from([b"/var/run/netns/h15c-none", b"relative", b"/"]),
        "CNI_ARGS": cni_args(),
    }.get(var, st.nothing())
    return st.none() | env_bytes | env_text.map(str.encode) | special


@st.composite
def cases(draw: st.DrawFn) -> Case:
    variables = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]
    chosen = draw(st.lists(st.sampled_from(variables), unique=True, max_size=3))
    env = {var: draw(env_value(var)) for var in chosen}
    fields = {
        "cniVersion": st.sampled_from(["0.4.0", "1.0.0", "1.1.0", "0.3.1", "", "1.0"])
        | json_values,
        "name": st.sampled_from(["l3fabric", "other-net", "Bad Name", ""]) | json_values,
        "mtu": st.integers(0, 70000) | json_values,
        "ipam": st.fixed_dictionaries({}, optional={"pools": st.lists(
            st.sampled_from(["main", "tiny", "nope"]) | st.text(max_size=8), max_size=3
        ) | json_values, "type": st.sampled_from(["l3fabric", "host-local"])}) | json_values,
        "log_level": st.sampled_from(["debug", "info", "loud"]) | json_values,
        "prevResult": json_values | st.just(DEEP),
        "runtimeConfig": json_values,
        "args": json_values,
    }  # fmt: skip
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=3))
    config = {name: draw(fields[name]) for name in names}
    stdin = draw(
        st.none()
        | st.binary(max_size=200)
        | deep_json.map(lambda d: f'{{"cniVersion":"1.0.0","name":"n","x":{d}}}'.encode())
        | st.sampled_from([b"", b"{", b"[]", b"null", b'{"cniVersion": "1.0.0", "name": '])
    )  # fmt: skip
    raw = stdin if draw(st.integers(0, 4)) == 0 else None
    return Case(env, config, raw, draw(deep_json).encode(), draw(st.booleans()))


class BoundaryFuzzer:
    """Runs cases on one node with a running agent, sharing a few pod namespaces."""

    def __init__(self, node: NodeHarness) -> None:
        self.node = node
        self.netns = [node.new_pod(f"fz{i}").netns for i in range(POD_NETNS)]
        self.cases = 0
        self._log_seen = 0

    def run_case(self, case: Case) -> list[str]:
        self.cases += 1
        c = Container(
            f"ctr-fz{self.cases}", self.netns[self.cases % POD_NETNS], pod=f"fz{self.cases}"
        )
        stdin = case.stdin
        if stdin is None:
            conf = json.dumps({**self.node.conf(), **case.config}).encode()
            stdin = conf.replace(json.dumps(DEEP).encode(), case.deep)
        problems: list[str] = []
        add = self._call("ADD", c, case, stdin, problems)
        if case.check and add.returncode == 0:
            check_stdin = _with_prev_result(stdin, add.stdout)
            self._call("CHECK", c, case, check_stdin, problems)
        dele = self._call("DEL", c, case, stdin, problems)
        if add.returncode == 0 and dele.returncode != 0:
            problems.append(f"DEL after a successful ADD failed: {_out(dele)}")
        problems += self._nothing_left(c)
        problems += self._log_problems()
        return problems

    def _call(
        self, command: str, c: Container, case: Case, stdin: bytes, problems: list[str]
    ) -> PluginRun:
        env: dict[str, Any] = plugin_env(command, c, ["/usr/lib/cni", self.node.plugin.parent])
        for var, value in case.env.items():
            if value is None:
                env.pop(var, None)
            else:
                env[var] = value
        run = exec_plugin(self.node.plugin, env, stdin)
        problems += [f"{command}: {p}" for p in output_problems(command, run)]
        return run

    def _nothing_left(self, c: Container) -> list[str]:
        node = self.node
        left = {
            "host veths": node.host_veths(),
            "host routes": [str(r) for r in node.host_routes()],
            "allocations": node.allocated(),
            "records": [r.handle_id for r in node.records()],
        }
        problems = [f"left behind: {what} {items}" for what, items in left.items() if items]
        report = node.ipam_check()
        if not report.clean:
            problems.append(f"ipam check: {report.to_dict()}")
        if problems:  # what a runtime would do next, so the next case starts from nothing
            node.cni("DEL", c)
        return problems

    def _log_problems(self) -> list[str]:
        agent = self.node.agents[-1]
        if agent.proc.poll() is not None:
            return [f"agent exited {agent.proc.returncode}"]
        text = agent.log_text()
        new, self._log_seen = text[self._log_seen :], len(text)
        problems = []
        if "Traceback" in new or "Logging error" in new:
            problems.append(f"traceback in the agent log: {new[-600:]!r}")
        stray = [ln for ln in new.splitlines() if not ln.startswith((*LOG_LEVELS, "  "))]
        if stray:
            problems.append(f"agent log line that is no record: {stray[0][:200]!r}")
        return problems


def output_problems(command: str, run: PluginRun) -> list[str]:
    """What is wrong with one execution's stdout, stderr and exit status."""
    problems = []
    if b"Traceback" in run.stderr:
        problems.append(f"traceback on stderr: {run.stderr[-400:]!r}")
    try:
        out = json.loads(run.stdout) if run.stdout.strip() else None
    except ValueError:
        return [*problems, f"stdout is not one JSON object: {run.stdout[:200]!r}"]
    if run.returncode == 0:
        if command == "ADD" and not (isinstance(out, dict) and {"cniVersion", "ips"} <= set(out)):
            problems.append(f"ADD succeeded without a result: {_out(run)}")
        if command != "ADD" and out is not None:
            problems.append(f"{command} succeeded but printed {run.stdout[:200]!r}")
    elif run.returncode != 1:
        problems.append(f"exit status {run.returncode}: {_out(run)}")
    elif not (isinstance(out, dict) and set(out) == ERROR_KEYS and isinstance(out["code"], int)):
        problems.append(f"error is not a CNI error object: {_out(run)}")
    return problems


def _with_prev_result(stdin: bytes, result: bytes) -> bytes:
    conf = json.loads(stdin)
    return json.dumps({**conf, "prevResult": json.loads(result)}).encode()


def _out(run: PluginRun) -> str:
    return f"exit {run.returncode} stdout {run.stdout[:300]!r} stderr {run.stderr[-300:]!r}"
