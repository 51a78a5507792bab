"""The agent's setting for spreading routing's first lists (no thundering herd at boot)."""

from __future__ import annotations

import pytest

from bgp_speaker.agent.main import LIST_JITTER, AgentSettings
from ipam_blocks.errors import InvalidInput
from l3fabric.cli import build_parser


def test_spread_by_default_with_the_kubernetes_store_only() -> None:
    assert AgentSettings("n1", "kube").first_list_jitter == LIST_JITTER > 0
    assert AgentSettings("n1", "sqlite:/tmp/l3e-store.db").first_list_jitter == 0.0
    assert AgentSettings("n1", "kube", list_jitter=0.0).first_list_jitter == 0.0


def test_a_negative_jitter_is_refused_by_name() -> None:
    with pytest.raises(InvalidInput, match="list_jitter"):
        AgentSettings("n1", "kube", list_jitter=-1.0)


def test_the_cli_flag_sets_it() -> None:
    args = build_parser().parse_args(["agent", "--node", "n1", "--list-jitter", "2.5"])
    assert args.list_jitter == 2.5
