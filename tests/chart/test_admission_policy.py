"""The agent's ValidatingAdmissionPolicy (templates/admission-policy-agent.yaml), evaluated for
real: every CEL expression of the rendered policy runs in cel-python (celpy) against concrete
admission requests, the way the API server applies a policy (resource rules, match conditions,
variables, then every validation; an evaluation error refuses, as failurePolicy: Fail does).

celpy has standard CEL only, not Kubernetes' extension libraries (strings `replace`,
`lowerAscii`, optional types, ...): the policy keeps to standard CEL so that this is the whole
truth about it, and `test_every_expression_compiles_as_standard_cel` fails if an extension
creeps in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from netaddr import IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM, NODE_LABEL, AssignRequest
from ipam_blocks.model import (
    AffinityState,
    BlockAffinity,
    IPPool,
    Node,
    render_affinity,
    render_block,
)
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store.base import Resource
from ipam_blocks.store.sqlite import SqliteStore
from tests.chart.conftest import NAMESPACE, RELEASE, by_kind, merged

K8S_VERSION = "1.30.0"
NODE_CLAIM = "authentication.kubernetes.io/node-name"
AGENT = f"system:serviceaccount:{NAMESPACE}:l3fabric-agent"
GC = f"system:serviceaccount:{NAMESPACE}:l3fabric-ipam-gc"
OWN, OTHER = "node-a", "node-b"
OWN_BLOCK, OTHER_BLOCK = IPNetwork("10.244.0.0/26"), IPNetwork("10.244.0.64/26")
# Where the API server finds each kind the policy may see: (group, version, plural).
RESOURCES = {
    "Node": ("", "v1", "nodes"),
    "BlockAffinity": ("l3fabric.io", "v1", "blockaffinities"),
    "IPAMBlock": ("l3fabric.io", "v1", "ipamblocks"),
    "IPAMHandle": ("l3fabric.io", "v1", "ipamhandles"),
}

# --- the policy, as the API server applies it ---------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    matched: bool
    message: str = ""
    refused_by: int | None = None  # index of the validation that refused


class AdmissionPolicy:
    """One rendered ValidatingAdmissionPolicy; every expression compiled once by celpy."""

    def __init__(self, policy: dict[str, Any]) -> None:
        spec = policy["spec"]
        assert spec["failurePolicy"] == "Fail"
        self.rules = spec["matchConstraints"]["resourceRules"]
        env = celpy.Environment()
        compile_ = lambda text: env.program(env.compile(text))  # noqa: E731
        self.conditions = [compile_(c["expression"]) for c in spec.get("matchConditions", [])]
        self.variables = [(v["name"], compile_(v["expression"])) for v in spec["variables"]]
        self.validations = [
            (
                compile_(v["expression"]),
                v.get("message"),
                _maybe(compile_, v.get("messageExpression")),
            )
            for v in spec["validations"]
        ]

    def _rule_matches(self, request: dict[str, Any]) -> bool:
        res = request["resource"]
        return any(
            _listed(res["group"], r["apiGroups"])
            and _listed(res["version"], r["apiVersions"])
            and _listed(res["resource"], r["resources"])
            and _listed(request["operation"], r["operations"])
            for r in self.rules
        )

    def admit(self, request: dict[str, Any]) -> Decision:
        if not self._rule_matches(request):
            return Decision(True, matched=False)
        activation: dict[str, Any] = {
            "request": celpy.json_to_cel(request),
            "object": celpy.json_to_cel(request.get("object")),
            "oldObject": celpy.json_to_cel(request.get("oldObject")),
            "params": None,
        }
        for condition in self.conditions:
            if _evaluate(condition, activation) is not True:
                return Decision(True, matched=False)
        # Variables in order, each seeing the ones before it. (The API server evaluates them
        # lazily; eagerly here is stricter: an erring variable refuses even when unused.)
        values = celpy.celtypes.MapType()
        activation["variables"] = values
        try:
            for name, program in self.variables:
                values[celpy.celtypes.StringType(name)] = program.evaluate(activation)
        except celpy.CELEvalError as err:
            return Decision(False, matched=True, message=f"variable: {err}")
        for index, (program, message, message_expr) in enumerate(self.validations):
            try:
                passed = _evaluate(program, activation) is True
            except EvaluationError as err:  # failurePolicy: Fail
                return Decision(False, matched=True, message=str(err), refused_by=index)
            if not passed:
                text = str(_evaluate(message_expr, activation)) if message_expr else message
                return Decision(False, matched=True, message=text, refused_by=index)
        return Decision(True, matched=True)


def _maybe(fn: Any, text: str | None) -> Any:
    return fn(text) if text else None


def _listed(value: str, allowed: list[str]) -> bool:
    return "*" in allowed or value in allowed


class EvaluationError(Exception):
    pass


def _evaluate(program: Any, activation: dict[str, Any]) -> Any:
    """The expression's value as plain Python; an error (which refuses) as EvaluationError."""
    try:
        value = program.evaluate(activation)
    except celpy.CELEvalError as err:
        raise EvaluationError(str(err)) from err
    if isinstance(value, celpy.CELEvalError):
        raise EvaluationError(str(value))
    if isinstance(value, celpy.celtypes.BoolType):
        return bool(value)
    return value


# --- admission requests -------------------------------------------------------------------------


def as_object(res: Resource) -> dict[str, Any]:
    """A stored Resource as the API server holds it (the kube store's encoding)."""
    group, version, _ = RESOURCES[res.kind]
    meta: dict[str, Any] = {"name": res.name}
    if res.labels:
        meta["labels"] = dict(res.labels)
    if res.annotations:
        meta["annotations"] = dict(res.annotations)
    api_version = f"{group}/{version}" if group else version
    return {"apiVersion": api_version, "kind": res.kind, "metadata": meta, "spec": dict(res.spec)}


def request(
    operation: str,
    obj: dict[str, Any] | None = None,
    old: dict[str, Any] | None = None,
    *,
    user: str = AGENT,
    node: str | None = OWN,
    extra: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionRequest; `node` is the token's node-name claim (None:
    the token has none, and `extra` is left out as the API server's JSON omits it)."""
    subject = obj or old
    assert subject is not None
    group, version, plural = RESOURCES[subject["kind"]]
    user_info: dict[str, Any] = {"username": user, "groups": ["system:serviceaccounts"]}
    claims = dict(extra or {})
    if node is not None:
        claims[NODE_CLAIM] = [node]
    if claims:
        user_info["extra"] = claims
    return {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": group, "version": version, "kind": subject["kind"]},
        "resource": {"group": group, "version": version, "resource": plural},
        "name": subject["metadata"]["name"],
        "operation": operation,
        "userInfo": user_info,
        "object": obj,
        "oldObject": old,
    }


def node(name: str) -> dict[str, Any]:
    return as_object(Resource("Node", name, {}, {"kubernetes.io/hostname": name}))


def affinity(
    owner: str, cidr: IPNetwork, *, label: str | None = "owner", name: str | None = None
) -> dict[str, Any]:
    """The BlockAffinity the allocator writes (name, spec, l3fabric.io/node label)."""
    res = render_affinity(BlockAffinity(owner, cidr, AffinityState.PENDING))
    obj = as_object(res)
    obj["metadata"]["labels"] = (
        {} if label is None else {NODE_LABEL: owner if label == "owner" else label}
    )
    if name is not None:
        obj["metadata"]["name"] = name
    return obj


def confirmed(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "spec": {**obj["spec"], "state": AffinityState.CONFIRMED.value}}


def block(owner: str | None, cidr: IPNetwork) -> dict[str, Any]:
    """A new, empty IPAMBlock affine to `owner` (None: affine to no node)."""
    return as_object(render_block(blockmath.new_block(cidr, owner)))


def with_spec(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    spec = {k: v for k, v in {**obj["spec"], **changes}.items() if v is not None}
    return {**obj, "spec": spec}


def allocated(obj: dict[str, Any]) -> dict[str, Any]:
    """The block with its first address allocated (as a borrow or an assignment writes it)."""
    spec = obj["spec"]
    allocations = [0, *spec["allocations"][1:]]
    attribute = {"handleID": "k8s-pod-network.c1", "node": OWN, "type": "Pod"}
    return with_spec(
        obj,
        allocations=allocations,
        unallocated=spec["unallocated"][1:],
        attributes=[attribute],
        sequenceNumber=spec["sequenceNumber"] + 1,
    )


# --- fixtures -----------------------------------------------------------------------------------


def rendered_policy(
    chart: Any,
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[Any]:
    """The policy template's objects, rendered as `helm install` of release `name` would."""
    files = chart.render(values, name=name, namespace=namespace, is_install=True)
    text = files.get("l3fabric/templates/admission-policy-agent.yaml", "")
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def policy(chart: Any) -> AdmissionPolicy:
    (vap,) = by_kind(rendered_policy(chart), "ValidatingAdmissionPolicy")
    return AdmissionPolicy(vap)


# --- what ships -----------------------------------------------------------------------------------


def test_policy_and_binding_ship_by_default_and_validate_against_kubernetes_1_30(chart):
    objects = rendered_policy(chart)
    assert sorted(o["kind"] for o in objects) == [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    (vap,) = by_kind(objects, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}


def test_policy_can_be_turned_off(chart):
    assert rendered_policy(chart, merged({}, agent={"admissionPolicy": {"enabled": False}})) == []


def test_every_expression_compiles_as_standard_cel(policy):
    # The constructor compiled them all; these are what the cases below exercise.
    assert len(policy.conditions) == 1
    assert [name for name, _ in policy.variables] == ["nodeName", "hostAffinity"]
    assert len(policy.validations) == 5


def test_match_condition_names_the_releases_own_agent_service_account(chart):
    (vap,) = by_kind(
        rendered_policy(chart, None, name="edge", namespace="net"), "ValidatingAdmissionPolicy"
    )
    edge = AdmissionPolicy(vap)
    theirs = request("UPDATE", node(OTHER), node(OTHER))
    assert not edge.admit(theirs).matched  # the default release's agent is another account
    edge_agent = "system:serviceaccount:net:edge-l3fabric-agent"
    refused = edge.admit(request("UPDATE", node(OTHER), node(OTHER), user=edge_agent))
    assert (refused.matched, refused.allowed, refused.refused_by) == (True, False, 1)


# --- the cases: own node allowed, another node refused, other users not matched ----------------

OWN_AFF, OTHER_AFF = affinity(OWN, OWN_BLOCK), affinity(OTHER, OTHER_BLOCK)
OWN_BLK, OTHER_BLK = block(OWN, OWN_BLOCK), block(OTHER, OTHER_BLOCK)

# (request, allowed, index of the refusing validation)
CASES: dict[str, tuple[dict[str, Any], bool, int | None]] = {
    # Nodes: the autodetected address goes on its own Node only.
    "patch own node": (request("UPDATE", node(OWN), node(OWN)), True, None),
    "patch another node": (request("UPDATE", node(OTHER), node(OTHER)), False, 1),
    # BlockAffinity: claim (create pending), confirm (update), give up (delete).
    "create own affinity": (request("CREATE", OWN_AFF), True, None),
    "confirm own affinity": (request("UPDATE", confirmed(OWN_AFF), OWN_AFF), True, None),
    "delete own affinity": (request("DELETE", None, OWN_AFF), True, None),
    "create another node's affinity": (request("CREATE", OTHER_AFF), False, 2),
    "update another node's affinity": (
        request("UPDATE", confirmed(OTHER_AFF), OTHER_AFF),
        False,
        2,
    ),
    "delete another node's affinity": (request("DELETE", None, OTHER_AFF), False, 2),
    "take another node's affinity over": (
        request(
            "UPDATE", affinity(OWN, OTHER_BLOCK, name=OTHER_AFF["metadata"]["name"]), OTHER_AFF
        ),
        False,
        2,
    ),
    "own affinity under another node's name": (
        request("CREATE", affinity(OWN, OTHER_BLOCK, name=OTHER_AFF["metadata"]["name"])),
        False,
        2,
    ),
    "own affinity labelled for another node": (
        request("CREATE", affinity(OWN, OWN_BLOCK, label=OTHER)),
        False,
        2,
    ),
    "own affinity without the node label": (
        request("CREATE", affinity(OWN, OWN_BLOCK, label=None)),
        True,
        None,
    ),
    # IPAMBlock: create only affine to itself.
    "create own block": (request("CREATE", OWN_BLK), True, None),
    "create another node's block": (request("CREATE", OTHER_BLK), False, 3),
    "create a block affine to no node": (request("CREATE", block(None, OTHER_BLOCK)), False, 3),
    # IPAMBlock updates: allocations may change anywhere (borrowing), the owner may not.
    "assign in own block": (request("UPDATE", allocated(OWN_BLK), OWN_BLK), True, None),
    "borrow in another node's block": (
        request("UPDATE", allocated(OTHER_BLK), OTHER_BLK),
        True,
        None,
    ),
    "release own block (affinity to none)": (
        request("UPDATE", with_spec(OWN_BLK, affinity=None), OWN_BLK),
        True,
        None,
    ),
    "take another node's block": (
        request("UPDATE", with_spec(OTHER_BLK, affinity=f"host:{OWN}"), OTHER_BLK),
        False,
        4,
    ),
    "take an unowned block": (
        request("UPDATE", with_spec(OTHER_BLK, affinity=f"host:{OWN}"), block(None, OTHER_BLOCK)),
        False,
        4,
    ),
    "un-own another node's block": (
        request("UPDATE", with_spec(OTHER_BLK, affinity=None), OTHER_BLK),
        False,
        4,
    ),
    "hand own block to another node": (
        request("UPDATE", with_spec(OWN_BLK, affinity=f"host:{OTHER}"), OWN_BLK),
        False,
        4,
    ),
    "move another node's block to another network": (
        request("UPDATE", with_spec(OTHER_BLK, cidr=str(OWN_BLOCK)), OTHER_BLK),
        False,
        4,
    ),
    # A token without the node claim may write nothing, not even what would be its own.
    "token without node name": (request("UPDATE", node(OWN), node(OWN), node=None), False, 0),
    "token with other extras but no node name": (
        request(
            "CREATE", OWN_BLK, node=None, extra={"authentication.kubernetes.io/pod-name": ["p"]}
        ),
        False,
        0,
    ),
    "token with an empty node name": (request("CREATE", OWN_AFF, node=""), False, 0),
}


@pytest.mark.parametrize(("req", "allowed", "refused_by"), CASES.values(), ids=CASES.keys())
def test_agent_writes_only_its_own_nodes_objects(policy, req, allowed, refused_by):
    decision = policy.admit(req)
    assert decision.matched
    assert (decision.allowed, decision.refused_by) == (allowed, refused_by), decision.message
    if not allowed and refused_by:
        # The message says which node asked and what it may not touch.
        assert f"the agent of node {OWN} " in decision.message
        assert req["name"] in decision.message


def test_every_validation_refuses_something(policy):
    """No validation is dead weight: each one is the first to refuse at least one case."""
    refusing = {refused for _, allowed, refused in CASES.values() if not allowed}
    assert refusing == set(range(len(policy.validations)))


@pytest.mark.parametrize(
    "user",
    [GC, "kubernetes-admin", f"system:node:{OWN}", "system:serviceaccount:other-ns:l3fabric-agent"],
)
def test_other_users_are_not_matched(policy, user):
    for req, _, _ in CASES.values():
        assert not policy.admit({**req, "userInfo": {**req["userInfo"], "username": user}}).matched


def test_handles_and_reads_are_not_in_the_policys_scope(policy):
    handle = as_object(
        Resource(
            "IPAMHandle", "k8s-pod-network.c1", {"handleID": "k8s-pod-network.c1", "block": {}}
        )
    )
    for operation in ("CREATE", "UPDATE", "DELETE"):
        assert not policy.admit(request(operation, handle, handle)).matched


# --- the agent's real IPAM writes pass for its own node ---------------------------------------


@dataclass
class RecordingStore:
    """A SQLite store that turns every write into the admission request the API server would
    see for it (reads pass through)."""

    inner: SqliteStore
    writes: list[dict[str, Any]] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _record(self, operation: str, new: Resource | None, old: Resource | None) -> None:
        kind = (new or old).kind  # type: ignore[union-attr]
        if kind in RESOURCES:
            self.writes.append(
                request(operation, as_object(new) if new else None, as_object(old) if old else None)
            )

    def create(self, obj: Resource) -> Resource:
        created = self.inner.create(obj)
        self._record("CREATE", obj, None)
        return created

    def update(self, obj: Resource) -> Resource:
        old = self.inner.get(obj.kind, obj.name)
        updated = self.inner.update(obj)
        self._record("UPDATE", obj, old)
        return updated

    def delete(self, kind: str, name: str, revision: str | None = None) -> None:
        old = self.inner.get(kind, name)
        self.inner.delete(kind, name, revision)
        self._record("DELETE", None, old)


@pytest.fixture
def sqlite(tmp_path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "ipam.db")
    yield store
    store.close()


def test_the_allocators_own_writes_claim_assign_borrow_release_all_pass(policy, sqlite):
    admin = IPAM(sqlite)
    add_pool(admin, IPPool("pool", IPNetwork("10.0.0.0/28"), 30))  # four blocks of four
    for name in (OWN, OTHER):
        add_node(admin, Node(name))
    recorder = RecordingStore(sqlite)
    agent = IPAM(recorder)  # type: ignore[arg-type]
    own_ips = agent.auto_assign(AssignRequest(node=OWN, handle_id="net.own", count=4))
    IPAM(sqlite).auto_assign(AssignRequest(node=OTHER, handle_id="net.other", count=9))
    # Its block is full and every block is claimed: the next address is borrowed.
    (borrowed,) = agent.auto_assign(AssignRequest(node=OWN, handle_id="net.borrow"))
    assert IPNetwork(f"{borrowed}/30").cidr not in {IPNetwork(f"{ip}/30").cidr for ip in own_ips}
    assert agent.release_handle("net.borrow") == [borrowed]
    assert sorted(agent.release_handle("net.own")) == sorted(own_ips)

    operations = {(w["resource"]["resource"], w["operation"]) for w in recorder.writes}
    assert {
        ("blockaffinities", "CREATE"),
        ("blockaffinities", "UPDATE"),
        ("ipamblocks", "CREATE"),
        ("ipamblocks", "UPDATE"),
    } <= operations
    borrows = [
        w for w in recorder.writes
        if w["resource"]["resource"] == "ipamblocks" and w["oldObject"]
        and w["oldObject"]["spec"].get("affinity") == f"host:{OTHER}"
    ]  # fmt: skip
    assert len(borrows) == 2  # the borrow and its release
    refused = [(w, d.message) for w in recorder.writes if not (d := policy.admit(w)).allowed]
    assert refused == []
    # The same writes in another node's name: its claim of a block is refused.
    as_other = [policy.admit({**w, "userInfo": {**w["userInfo"], "extra": {NODE_CLAIM: [OTHER]}}})
                for w in recorder.writes]  # fmt: skip
    assert any(not d.allowed for d in as_other)
