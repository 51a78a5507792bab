"""containerlab's own JSON schema, vendored under tests/lab/containerlab/ with its license
(containerlab is BSD-licensed), so topology validation never depends on where the checkout
sits. `test_vendored_schema_is_shared_one` keeps the copy equal to `../shared`'s when present.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).resolve().parent / "containerlab" / "clab.schema.json"
SHARED_SCHEMA = REPO.parent / "shared" / "containerlab" / "clab.schema.json"
TOPOLOGIES = REPO / "tests" / "topologies"


@functools.cache
def _validator() -> Any:
    import jsonschema

    # Draft7Validator directly: the schema's \p{L} escapes are not Python `re` syntax, so
    # `jsonschema.validate` (which checks the schema first) would reject the schema itself.
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def schema_errors(doc: Any) -> list[str]:
    """Where `doc` breaks containerlab's schema; empty when it is a valid topology file."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in _validator().iter_errors(doc)
    ]
