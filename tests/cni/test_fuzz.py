"""The CNI boundary under generated input (`tests/cni/boundary_fuzz.py` says what is
generated and what must hold), bounded to about a minute; bench/fuzz.py runs it longer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.agent.harness import NodeHarness, node_harness
from tests.cni.boundary_fuzz import BoundaryFuzzer, Case, cases

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeHarness]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    with node_harness(tmp_path, prefix=f"h15cf{os.getpid() % 10000}") as harness:
        yield harness


@pytest.fixture
def fuzzer(node: NodeHarness, agent) -> BoundaryFuzzer:
    return BoundaryFuzzer(node)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_every_cni_call_gets_one_clean_answer_and_del_leaves_nothing(
    fuzzer: BoundaryFuzzer, case: Case
) -> None:
    problems = fuzzer.run_case(case)
    assert not problems, "\n".join(problems)
