"""Kubernetes label selectors: the structured form used in CRDs and the `kubectl -l` text form.

Both forms parse into one `LabelSelector` value; an empty selector selects everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ipam_blocks.errors import InvalidInput

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SET_EXPR = re.compile(r"^\s*(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case Operator.IN:
                return labels.get(self.key) in self.values
            case Operator.NOT_IN:
                return labels.get(self.key) not in self.values
            case Operator.EXISTS:
                return self.key in labels
            case Operator.DOES_NOT_EXIST:
                return self.key not in labels


@dataclass(frozen=True)
class LabelSelector:
    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        return all(r.matches(labels) for r in self.match_expressions)

    def to_dict(self) -> dict[str, Any]:
        """The structured (CRD) form; empty parts are left out."""
        out: dict[str, Any] = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [
                {
                    "key": r.key,
                    "operator": str(r.operator),
                    **({"values": list(r.values)} if r.values else {}),
                }
                for r in self.match_expressions
            ]
        return out

    def to_text(self) -> str:
        """The `kubectl -l` form, as the Kubernetes API's labelSelector parameter takes it."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for r in self.match_expressions:
            match r.operator:
                case Operator.IN:
                    parts.append(f"{r.key} in ({','.join(r.values)})")
                case Operator.NOT_IN:
                    parts.append(f"{r.key} notin ({','.join(r.values)})")
                case Operator.EXISTS:
                    parts.append(r.key)
                case Operator.DOES_NOT_EXIST:
                    parts.append(f"!{r.key}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.to_text() or "<all>"


EVERYTHING = LabelSelector()


def _check_key(key: str, field_name: str) -> str:
    if not _LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise InvalidInput(field_name, f"invalid label key {key!r}")
    return key


def _check_value(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > 63:
        raise InvalidInput(field_name, f"invalid label value {value!r}")
    return value


def parse_selector_dict(
    raw: Mapping[str, Any] | None, field_name: str = "nodeSelector"
) -> LabelSelector:
    """Parse the structured form {matchLabels: {...}, matchExpressions: [...]}."""
    if raw is None:
        return EVERYTHING
    if not isinstance(raw, Mapping):
        raise InvalidInput(field_name, "must be an object with matchLabels/matchExpressions")
    unknown = set(raw) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise InvalidInput(field_name, f"unknown keys {sorted(unknown)}")
    labels_raw = raw.get("matchLabels") or {}
    if not isinstance(labels_raw, Mapping):
        raise InvalidInput(f"{field_name}.matchLabels", "must be a map of strings")
    labels = {
        _check_key(k, f"{field_name}.matchLabels"): _check_value(v, f"{field_name}.matchLabels.{k}")
        for k, v in labels_raw.items()
    }
    requirements = []
    for i, expr in enumerate(raw.get("matchExpressions") or []):
        where = f"{field_name}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            raise InvalidInput(where, "must be an object")
        op = _parse_operator(expr.get("operator"), f"{where}.operator")
        values = tuple(_check_value(v, f"{where}.values") for v in expr.get("values") or ())
        if op in (Operator.IN, Operator.NOT_IN) and not values:
            raise InvalidInput(f"{where}.values", f"required for operator {op}")
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
            raise InvalidInput(f"{where}.values", f"must be empty for operator {op}")
        requirements.append(
            Requirement(_check_key(str(expr.get("key", "")), f"{where}.key"), op, values)
        )
    return LabelSelector(labels, tuple(requirements))


def _parse_operator(value: object, field_name: str) -> Operator:
    for op in Operator:
        if value == op.value:
            return op
    raise InvalidInput(field_name, f"must be one of {[str(o) for o in Operator]}")


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_selector_text(text: str | None, field_name: str = "selector") -> LabelSelector:
    """Parse kubectl syntax: `rack=r1,zone in (a,b),!spare,gpu,tier!=db`."""
    if not text or not text.strip():
        return EVERYTHING
    if text.count("(") != text.count(")"):
        raise InvalidInput(field_name, f"unbalanced parentheses in {text!r}")
    labels: dict[str, str] = {}
    requirements: list[Requirement] = []
    for part in _split_top_level(text):
        if m := _SET_EXPR.match(part):
            values = tuple(
                _check_value(v.strip(), field_name) for v in m["values"].split(",") if v.strip()
            )
            if not values:
                raise InvalidInput(field_name, f"empty value set in {part!r}")
            op = Operator.IN if m["op"] == "in" else Operator.NOT_IN
            requirements.append(Requirement(_check_key(m["key"], field_name), op, values))
        elif "!=" in part:
            key, value = (s.strip() for s in part.split("!=", 1))
            requirements.append(
                Requirement(
                    _check_key(key, field_name), Operator.NOT_IN, (_check_value(value, field_name),)
                )
            )
        elif "=" in part:
            key, value = (s.strip() for s in part.replace("==", "=").split("=", 1))
            labels[_check_key(key, field_name)] = _check_value(value, field_name)
        elif part.startswith("!"):
            requirements.append(
                Requirement(_check_key(part[1:].strip(), field_name), Operator.DOES_NOT_EXIST)
            )
        else:
            requirements.append(Requirement(_check_key(part, field_name), Operator.EXISTS))
    return LabelSelector(labels, tuple(requirements))


def parse_labels(pairs: list[str] | None, field_name: str = "label") -> dict[str, str]:
    """Parse `k=v` pairs (e.g. repeated --label flags) into a label map."""
    labels: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InvalidInput(field_name, f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        labels[_check_key(key.strip(), field_name)] = _check_value(value.strip(), field_name)
    return labels
