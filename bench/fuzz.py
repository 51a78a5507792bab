"""Fuzzing the CNI boundary for longer than the suite does: the generated cases of
tests/cni/boundary_fuzz.py, run one after the other against a real agent on real namespaces.

    sudo python bench/fuzz.py [--cases 5000] [--seed N] [--no-write]

Each case is the installed shim executed as a runtime executes it (ADD, maybe CHECK, DEL)
with a generated environment (bytes included), configuration and prevResult, or raw stdin.
Unlike the test, a finding does not stop the run: every case is run, and the findings are
counted by kind, with the first case of each kind. The case count and the findings replace
the `fuzz` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from results import replace_section  # noqa: E402

from tests.agent.harness import node_harness  # noqa: E402
from tests.cni.boundary_fuzz import BoundaryFuzzer, Case, cases  # noqa: E402

START, END = "<!-- fuzz:start -->", "<!-- fuzz:end -->"
PREFIX = f"h15cb{os.getpid() % 10000}"


def fuzz(fuzzer: BoundaryFuzzer, n: int, seed_value: int) -> dict[str, tuple[int, str]]:
    """Run `n` cases; findings by kind: (how many, the first case's description)."""
    findings: Counter[str] = Counter()
    first: dict[str, str] = {}

    @seed(seed_value)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=["generate"],  # no shrinking: a finding is recorded, not raised
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases())
    def run(case: Case) -> None:
        for problem in fuzzer.run_case(case):
            kind = problem.split(":")[0] + ": " + problem.split(":")[1][:60].strip()
            findings[kind] += 1
            first.setdefault(kind, f"{problem[:300]} — {case.describe()}")

    run()
    return {kind: (count, first[kind]) for kind, count in findings.most_common()}


def report(cases_run: int, seconds: float, seed_value: int, findings: dict) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        START,
        "## CNI boundary fuzzing (`bench/fuzz.py`)",
        "",
        f"`sudo python bench/fuzz.py --cases {cases_run} --seed {seed_value}` — {when}, "
        f"{seconds:.0f} s ({cases_run / seconds:.1f} cases/s).",
        "",
        "Each case: the installed shim run as a runtime runs it (ADD, sometimes CHECK, then DEL "
        "with the same input) against a real agent, with generated CNI_* values (bytes "
        "included), configuration fields, prevResults and raw stdin. Checked: one CNI JSON "
        "object on stdout with the matching exit status, no traceback on stderr or in the "
        "agent log, one log line per record, DEL after a successful ADD succeeds, and nothing "
        "left (host veths, routes, allocations, records, `ipam check`).",
        "",
        "| cases | findings |",
        "| --- | --- |",
        f"| {cases_run} | {sum(count for count, _ in findings.values())} |",
    ]
    if findings:
        lines += ["", "| finding | count | first case |", "| --- | --- | --- |"]
        for kind, (count, example) in findings.items():
            lines.append(f"| {kind} | {count} | `{example.replace('|', '/')}` |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    with (
        tempfile.TemporaryDirectory(prefix="l3fabric-fuzz-") as tmpdir,
        node_harness(Path(tmpdir), prefix=PREFIX) as node,
    ):
        node.start_agent()
        fuzzer = BoundaryFuzzer(node)
        start = time.monotonic()
        findings = fuzz(fuzzer, args.cases, args.seed)
        seconds = time.monotonic() - start
        cases_run = fuzzer.cases
    text = report(cases_run, seconds, args.seed, findings)
    print(text)
    if not args.no_write:
        replace_section(START, END, text)
        print(f"written to {REPO / 'bench' / 'RESULTS.md'}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
