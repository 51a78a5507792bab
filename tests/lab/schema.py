"""containerlab's own JSON schema, read from the shared checkout beside this repository.

CI clones the repository next to `shared/`; the product never reads it (only tests do).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "containerlab" / "clab.schema.json"
TOPOLOGIES = REPO / "tests" / "topologies"


@functools.cache
def _validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.exists():
        pytest.skip(f"containerlab schema not found at {SCHEMA} (shared/ beside the clone)")
    # Draft7Validator directly: the schema's \p{L} escapes are not Python `re` syntax, so
    # `jsonschema.validate` (which checks the schema first) would reject the schema itself.
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def schema_errors(doc: Any) -> list[str]:
    """Where `doc` breaks containerlab's schema; empty when it is a valid topology file."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in _validator().iter_errors(doc)
    ]
