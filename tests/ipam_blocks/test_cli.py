"""The `l3fabric` console script, run as a real process against a temporary sqlite store.

Setup goes through `l3fabric.cli.main` in-process (fast); every behaviour under test runs
`python -m l3fabric.cli` in a subprocess, so exit codes and stderr are the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from ipam_blocks.store import ALL_KINDS
from ipam_blocks.store.sqlite import SqliteStore
from l3fabric import cli as l3fabric_cli
from l3fabric.cli import main
from l3fabric.console import verb_group

POOL = IPNetwork("10.244.0.0/16")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def l3fabric(*argv: str, store: str | None = None, env: dict[str, str] | None = None) -> Run:
    """Run the console script; `store` is passed as --store after the verb."""
    full_env = {k: v for k, v in os.environ.items() if k != "L3FABRIC_STORE"}
    full_env.update(env or {})
    args = [*argv, "--store", store] if store is not None else list(argv)
    proc = subprocess.run(
        [sys.executable, "-m", "l3fabric.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def setup(store: str, *argv: str) -> None:
    assert main([*argv, "--store", store]) == 0, argv


def dump(db: Path) -> dict[str, Any]:
    """Everything in the store, revisions included: equal dumps mean nothing was written."""
    store = SqliteStore(db)
    try:
        state: dict[str, Any] = {
            kind: [(r.name, r.revision, r.spec, r.labels) for r in store.list(kind).items]
            for kind in ALL_KINDS
        }
        state["revision"] = store.list("IPPool").revision
        return state
    finally:
        store.close()


def assert_one_line_error(run: Run, code: int, starts: str) -> None:
    assert run.code == code, run
    assert "Traceback" not in run.err
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith(starts), run.err


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(db: Path) -> str:
    return f"sqlite:{db}"


@pytest.fixture
def cluster(store: str) -> str:
    """A pool, two nodes and one live pod holding an address (handle h0)."""
    setup(store, "pool", "add", "default", "--cidr", str(POOL), "--block-size", "26")
    setup(store, "node", "add", "node-a", "--label", "rack=r1", "--ipv4", "192.168.0.1/24")
    setup(store, "node", "add", "node-b", "--label", "rack=r2")
    setup(store, "ipam", "assign", "--node", "node-a", "--handle", "h0", "--pod", "p0")
    return store


def assign(store: str, *argv: str) -> IPAddress:
    run = l3fabric("ipam", "assign", *argv, store=store)
    assert run.code == 0, run
    return IPAddress(run.out.strip())


# --- pools and nodes -------------------------------------------------------------------------


def test_pool_add_list_delete(store: str) -> None:
    run = l3fabric(
        "pool", "add", "blue", "--cidr", "10.9.0.0/20", "--block-size", "28",
        "--vxlan-mode", "CrossSubnet", "--nat-outgoing", "--node-selector", "rack in (r1,r2)",
        store=store,
    )  # fmt: skip
    assert run.code == 0, run
    listing = l3fabric("pool", "list", store=store).out
    row = next(line for line in listing.splitlines() if "blue" in line)
    for cell in ("10.9.0.0/20", "/28", "CrossSubnet", "yes", "rack in (r1,r2)"):
        assert cell in row
    assert l3fabric("pool", "delete", "blue", store=store).code == 0
    assert "blue" not in l3fabric("pool", "list", store=store).out


def test_pool_delete_refused_while_in_use_then_allowed_after_release(cluster: str) -> None:
    refused = l3fabric("pool", "delete", "default", store=cluster)
    assert_one_line_error(refused, 1, "error: pool 'default' still has addresses in use (1)")
    assert "default" in l3fabric("pool", "list", store=cluster).out

    assert l3fabric("ipam", "release", "--handle", "h0", store=cluster).code == 0
    assert l3fabric("pool", "delete", "default", store=cluster).code == 0
    assert "default" not in l3fabric("pool", "list", store=cluster).out
    assert "no blocks claimed yet" in l3fabric("ipam", "show", "--show-blocks", store=cluster).out


def test_node_add_and_list(store: str) -> None:
    run = l3fabric(
        "node", "add", "node-x", "--label", "rack=r7", "--label", "zone=z1",
        "--ipv4", "192.168.7.1/24", "--asn", "64601", store=store,
    )  # fmt: skip
    assert run.code == 0, run
    row = next(line for line in l3fabric("node", "list", store=store).out.splitlines()
               if "node-x" in line)  # fmt: skip
    for cell in ("rack=r7,zone=z1", "192.168.7.1/24", "64601"):
        assert cell in row


# --- assign / release ------------------------------------------------------------------------


def test_assign_prints_an_address_of_the_pool_and_records_the_workload(
    cluster: str, db: Path
) -> None:
    ip = assign(cluster, "--node", "node-b", "--handle", "h1", "--pod", "p1", "--namespace", "ns")
    assert ip in POOL
    workloads = {r.name: r.spec for r in SqliteStore(db).list("Workload").items}
    assert workloads["h1"]["pod"] == "p1"
    assert workloads["h1"]["namespace"] == "ns"
    assert workloads["h1"]["node"] == "node-b"


def test_assign_without_pod_records_no_workload(cluster: str, db: Path) -> None:
    assign(cluster, "--node", "node-b", "--handle", "manual-1")
    assert "manual-1" not in {r.name for r in SqliteStore(db).list("Workload").items}


def test_assign_exact_ip_and_show_who_holds_it(cluster: str) -> None:
    ip = assign(cluster, "--node", "node-b", "--handle", "h2", "--ip", "10.244.200.7")
    assert ip == IPAddress("10.244.200.7")
    shown = l3fabric("ipam", "show", "--ip", "10.244.200.7", store=cluster)
    assert shown.code == 0
    assert "is allocated" in shown.out
    assert "handle:    h2" in shown.out
    assert "node:      node-b" in shown.out
    assert "10.244.200.0/26 (affinity node-b)" in shown.out
    taken = l3fabric("ipam", "assign", "--node", "node-a", "--handle", "h3", "--ip",
                     "10.244.200.7", store=cluster)  # fmt: skip
    assert_one_line_error(taken, 1, "error: 10.244.200.7 is already allocated")


def test_assign_ipv6(store: str) -> None:
    setup(store, "pool", "add", "v6", "--cidr", "fd00:10::/112")
    setup(store, "node", "add", "node-a")
    ip = assign(store, "--node", "node-a", "--handle", "h6", "--ipv6")
    assert ip.version == 6 and ip in IPNetwork("fd00:10::/112")


def test_release_by_handle_frees_addresses_and_forgets_the_workload(cluster: str, db: Path) -> None:
    ip = assign(cluster, "--node", "node-b", "--handle", "h1", "--pod", "p1")
    run = l3fabric("ipam", "release", "--handle", "h1", store=cluster)
    assert run.code == 0 and f"released {ip}" in run.out
    assert "is free" in l3fabric("ipam", "show", "--ip", str(ip), store=cluster).out
    assert "h1" not in {r.name for r in SqliteStore(db).list("Workload").items}
    again = l3fabric("ipam", "release", "--handle", "h1", store=cluster)
    assert_one_line_error(again, 2, "error: handle: unknown handle 'h1'")


def test_release_by_ip(cluster: str) -> None:
    ip = assign(cluster, "--node", "node-b", "--handle", "h1")
    run = l3fabric("ipam", "release", "--ip", str(ip), store=cluster)
    assert run.code == 0 and f"released {ip}" in run.out
    assert l3fabric("ipam", "check", store=cluster).code == 0


def test_exhausted_pool_is_exit_1(store: str) -> None:
    setup(store, "pool", "add", "tiny", "--cidr", "10.7.0.0/30", "--block-size", "30")
    setup(store, "node", "add", "node-a")
    for i in range(4):
        assign(store, "--node", "node-a", "--handle", f"h{i}")
    run = l3fabric("ipam", "assign", "--node", "node-a", "--handle", "h4", store=store)
    assert_one_line_error(run, 1, "error: no free IPv4 address")


def test_no_pool_selecting_the_node_is_exit_1(store: str) -> None:
    setup(store, "pool", "add", "r9", "--cidr", "10.7.0.0/24", "--node-selector", "rack=r9")
    setup(store, "node", "add", "node-a", "--label", "rack=r1")
    run = l3fabric("ipam", "assign", "--node", "node-a", "--handle", "h", store=store)
    assert_one_line_error(run, 1, "error: no enabled IPv4 pool selects node 'node-a'")


# --- show ------------------------------------------------------------------------------------


def test_show_pool_and_block_usage(cluster: str) -> None:
    for i in range(3):
        assign(cluster, "--node", "node-b", "--handle", f"b{i}")
    out = l3fabric("ipam", "show", "--show-blocks", store=cluster).out
    pool_row = next(line for line in out.splitlines() if "10.244.0.0/16" in line)
    assert pool_row.split("│")[3:8] == [" 2/1024 ", " 65536 ", "      4 ", " 65532 ", " 0.0% "]
    block_rows = [line for line in out.splitlines() if "/26 " in line]
    by_node = {row.split("│")[3].strip(): row.split("│")[4].strip() for row in block_rows}
    assert by_node == {"node-a": "1", "node-b": "3"}


def test_show_borrowed(store: str) -> None:
    # One block in the pool: node-a claims it, node-b can only borrow from it.
    setup(store, "pool", "add", "one", "--cidr", "10.8.0.0/26", "--block-size", "26")
    setup(store, "node", "add", "node-a")
    setup(store, "node", "add", "node-b")
    assign(store, "--node", "node-a", "--handle", "mine")
    lent = assign(store, "--node", "node-b", "--handle", "borrower")
    out = l3fabric("ipam", "show", "--show-borrowed", store=store).out
    rows = [line for line in out.splitlines() if str(lent) in line]
    assert len(rows) == 1
    assert [c.strip() for c in rows[0].split("│")[1:6]] == [
        str(lent),
        "borrower",
        "node-b",
        "10.8.0.0/26",
        "node-a",
    ]
    assert "mine" not in out


def test_strict_affinity_forbids_borrowing(store: str) -> None:
    setup(store, "pool", "add", "one", "--cidr", "10.8.0.0/26", "--block-size", "26")
    setup(store, "node", "add", "node-a")
    setup(store, "node", "add", "node-b")
    assign(store, "--node", "node-a", "--handle", "mine")
    cfg = l3fabric("ipam", "config", "--strict-affinity", "true", store=store)
    assert cfg.code == 0 and "strictAffinity: true" in cfg.out
    assert "strictAffinity: true" in l3fabric("ipam", "config", store=store).out
    run = l3fabric("ipam", "assign", "--node", "node-b", "--handle", "b", store=store)
    assert_one_line_error(run, 1, "error: no free IPv4 address")
    assert "strictAffinity forbids borrowing" in run.err


def test_show_ip_free_and_outside_pools(cluster: str) -> None:
    assert (
        "10.244.9.9 is free (pool default"
        in l3fabric("ipam", "show", "--ip", "10.244.9.9", store=cluster).out
    )
    assert (
        "10.1.2.3 is not in any pool"
        in l3fabric("ipam", "show", "--ip", "10.1.2.3", store=cluster).out
    )


# --- check / gc ------------------------------------------------------------------------------


def test_check_clean_text_and_json(cluster: str) -> None:
    text = l3fabric("ipam", "check", store=cluster)
    assert text.code == 0 and "ipam check: clean" in text.out
    as_json = l3fabric("ipam", "check", "-o", "json", store=cluster)
    assert as_json.code == 0
    report = json.loads(as_json.out)
    assert report["clean"] is True and report["leaks"] == []


def test_check_finds_a_leak_and_gc_releases_it_after_the_grace(cluster: str, db: Path) -> None:
    ip = assign(cluster, "--node", "node-b", "--handle", "gone", "--pod", "gone-pod")
    store = SqliteStore(db)
    store.delete("Workload", "gone")  # the pod vanished without a CNI DEL
    store.close()

    found = l3fabric("ipam", "check", "-o", "json", store=cluster)
    assert found.code == 1
    leaks = json.loads(found.out)["leaks"]
    assert [(leak["ip"], leak["handle"], leak["reason"]) for leak in leaks] == [
        (str(ip), "gone", "pod no longer exists")
    ]
    assert "leaks: 1" in l3fabric("ipam", "check", store=cluster).out

    young = l3fabric("ipam", "gc", store=cluster)  # default grace: 900 s
    assert young.code == 0 and f"kept (alive, reallocated or younger than --grace): {ip}" in (
        young.out
    )
    assert l3fabric("ipam", "check", store=cluster).code == 1

    collected = l3fabric("ipam", "gc", "--grace", "0", store=cluster)
    assert collected.code == 0 and f"released: {ip}" in collected.out
    assert l3fabric("ipam", "check", store=cluster).code == 0
    # The live pod's address was left alone.
    handles = {r.name: r.spec["block"] for r in SqliteStore(db).list("IPAMHandle").items}
    assert list(handles) == ["h0"] and sum(handles["h0"].values()) == 1


def test_gc_on_a_clean_store_does_nothing(cluster: str, db: Path) -> None:
    before = dump(db)
    run = l3fabric("ipam", "gc", "--grace", "0", store=cluster)
    assert run.code == 0 and run.out.strip() == "nothing to collect"
    assert dump(db) == before


def test_config_max_blocks_per_host(store: str) -> None:
    setup(store, "pool", "add", "small", "--cidr", "10.7.0.0/24", "--block-size", "30")
    setup(store, "node", "add", "node-a")
    run = l3fabric("ipam", "config", "--max-blocks-per-host", "1", store=store)
    assert run.code == 0 and "maxBlocksPerHost: 1" in run.out
    for i in range(4):  # one /30 block: four addresses, then the limit bites
        assign(store, "--node", "node-a", "--handle", f"h{i}")
    full = l3fabric("ipam", "assign", "--node", "node-a", "--handle", "h4", store=store)
    assert_one_line_error(full, 1, "error: no free IPv4 address")
    assert "maxBlocksPerHost=1" in full.err


# --- bad input: exit 2, one line naming the field, nothing written ---------------------------

BAD_INPUT = [
    (("pool", "add", "x", "--cidr", "banana"), "cidr"),
    (("pool", "add", "x", "--cidr", "10.9.0.0/33"), "cidr"),
    (("pool", "add", "x", "--cidr", "10.9.0.1/16"), "cidr"),
    (("pool", "add", "x", "--cidr", "10.9.0.0/16", "--block-size", "33"), "blockSize"),
    (("pool", "add", "x", "--cidr", "10.9.0.0/16", "--block-size", "19"), "blockSize"),
    (("pool", "add", "x", "--cidr", "10.9.0.0/16", "--block-size", "big"), "blockSize"),
    (("pool", "add", "x", "--cidr", "10.244.128.0/17"), "cidr"),  # overlaps `default`
    (("pool", "add", "x", "--cidr", "10.0.0.0/8"), "cidr"),  # contains `default`
    (("pool", "add", "x", "--cidr", "10.9.0.0/28"), "cidr"),  # smaller than a /26 block
    (("pool", "add", "default", "--cidr", "10.9.0.0/16"), "name"),
    (("pool", "add", "Bad_Name", "--cidr", "10.9.0.0/16"), "name"),
    (
        ("pool", "add", "x", "--cidr", "10.9.0.0/16", "--node-selector", "rack in (r1"),
        "nodeSelector",
    ),
    (("pool", "add", "x", "--cidr", "10.9.0.0/16", "--node-selector", "bad key=1"), "nodeSelector"),
    (("pool", "add", "x", "--cidr", "10.9.0.0/16", "--ipip-mode", "Sometimes"), "ipipMode"),
    (("pool", "add", "x", "--cidr", "fd00::/64", "--ipip-mode", "Always"), "ipipMode"),
    (("pool", "delete", "nope"), "name"),
    (("node", "add", "node-a"), "name"),
    (("node", "add", "Bad_Node"), "name"),
    (("node", "add", "n", "--label", "noequals"), "label"),
    (("node", "add", "n", "--ipv4", "192.168.0.9"), "ipv4Address"),
    (("node", "add", "n", "--asn", "lots"), "asNumber"),
    (("ipam", "assign", "--node", "ghost", "--handle", "h9", "--pod", "p9"), "node"),
    (("ipam", "assign", "--node", "node-a", "--handle", "Bad Handle!"), "handle"),
    (("ipam", "assign", "--node", "node-a", "--handle", "h9", "--pool", "nope"), "pool"),
    (("ipam", "assign", "--node", "node-a", "--handle", "h9", "--ip", "10.99.0.1"), "ip"),
    (("ipam", "assign", "--node", "node-a", "--handle", "h9", "--ip", "banana"), "ip"),
    (("ipam", "assign", "--node", "node-a", "--handle", "h9", "--namespace", "ns"), "namespace"),
    (("ipam", "release", "--handle", "nope"), "handle"),
    (("ipam", "release", "--ip", "10.244.99.99"), "ip"),
    (("ipam", "release", "--ip", "banana"), "ip"),
    (("ipam", "show", "--ip", "banana"), "ip"),
    (("ipam", "gc", "--grace", "-1"), "grace"),
    (("ipam", "gc", "--grace", "soon"), "grace"),
    (("ipam", "config", "--strict-affinity", "maybe"), "strictAffinity"),
    (("ipam", "config", "--max-blocks-per-host", "-3"), "maxBlocksPerHost"),
]


@pytest.mark.parametrize(("argv", "field"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_names_the_field_and_writes_nothing(
    cluster: str, db: Path, argv: tuple[str, ...], field: str
) -> None:
    before = dump(db)
    run = l3fabric(*argv, store=cluster)
    assert_one_line_error(run, 2, f"error: {field}: ")
    assert dump(db) == before


def test_bad_input_leaves_the_listings_unchanged(cluster: str) -> None:
    listings = [("pool", "list"), ("node", "list"), ("ipam", "show", "--show-blocks")]
    before = [l3fabric(*argv, store=cluster).out for argv in listings]
    assert l3fabric("pool", "add", "x", "--cidr", "10.9.0.0/28", store=cluster).code == 2
    assert l3fabric("ipam", "assign", "--node", "ghost", "--handle", "h", "--pod", "p",
                    store=cluster).code == 2  # fmt: skip
    assert [l3fabric(*argv, store=cluster).out for argv in listings] == before


def test_usage_errors_are_one_line_exit_2(store: str) -> None:
    assert_one_line_error(l3fabric("pool", "add", "x", store=store), 2, "error: l3fabric pool add")
    assert_one_line_error(l3fabric("ipam", "release", store=store), 2, "error: l3fabric ipam")
    assert_one_line_error(l3fabric("node", store=store), 2, "error: l3fabric node")


def test_unknown_store_scheme_is_bad_input(tmp_path: Path) -> None:
    run = l3fabric("pool", "list", store="ftp:somewhere")
    assert_one_line_error(run, 2, "error: store: ")


# --- store selection and failure -------------------------------------------------------------


@pytest.mark.parametrize("url", ["sqlite:/proc/nonexistent/x.db", "sqlite:/proc/x.db"])
def test_unreachable_store_is_exit_3_without_traceback(url: str) -> None:
    for argv in (("pool", "list"), ("ipam", "show"), ("ipam", "check", "-o", "json")):
        assert_one_line_error(l3fabric(*argv, store=url), 3, "error: store unavailable: ")


def test_corrupt_store_file_is_exit_3(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, just bytes " * 200)
    run = l3fabric("pool", "list", store=f"sqlite:{garbage}")
    assert_one_line_error(run, 3, "error: store unavailable: ")


def test_store_from_environment_and_before_the_verb(cluster: str) -> None:
    from_env = l3fabric("pool", "list", env={"L3FABRIC_STORE": cluster})
    assert from_env.code == 0 and "10.244.0.0/16" in from_env.out
    global_flag = l3fabric("--store", cluster, "pool", "list")
    assert global_flag.code == 0 and "10.244.0.0/16" in global_flag.out


# --- entry points ----------------------------------------------------------------------------


def test_help_lists_the_verb_groups() -> None:
    run = l3fabric("--help")
    assert run.code == 0
    for verb in ("pool", "node", "ipam", "demo"):
        assert verb in run.out


def test_another_package_can_add_a_verb_to_the_node_group(
    monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """How a package plugs a verb (here `node drain`) in next to `node add` and `node list`."""
    seen: list[argparse.Namespace] = []

    def register(subparsers: argparse._SubParsersAction) -> None:
        drain = verb_group(subparsers, "node").add_parser("drain")
        drain.set_defaults(handler=lambda args: seen.append(args) or 7)

    agent_cli = types.ModuleType("fake_agent_cli")
    agent_cli.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_agent_cli", agent_cli)
    monkeypatch.setattr(
        l3fabric_cli, "VERB_MODULES", (*l3fabric_cli.VERB_MODULES, "fake_agent_cli")
    )

    assert main(["node", "drain", "--store", store]) == 7
    assert seen[0].store == store  # the common options reach verbs added later too
    assert main(["node", "add", "node-z", "--store", store]) == 0  # the group kept its verbs
    assert main(["node", "list", "--store", store]) == 0
