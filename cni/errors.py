"""CNI error codes and the one error type the plugin reports (CNI spec 1.1, "Error").

Standard library only: the shim imports this on every call.

    CniError(code, msg, details)
      1    incompatible CNI version
      3    container unknown (CHECK of a container the agent never attached)
      4    invalid environment variable (names the variable)
      6    undecodable configuration
      7    invalid configuration (names the field)
      11   try again later (agent unreachable, store down, contention)
      50   STATUS: plugin cannot serve ADD now
      100+ plugin-specific, below
"""

from __future__ import annotations

INCOMPATIBLE_VERSION = 1
CONTAINER_UNKNOWN = 3
INVALID_ENV = 4
UNDECODABLE_CONFIG = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# Plugin-specific codes (the spec reserves 100 and up for plugins).
POOL_EXHAUSTED = 100
NO_USABLE_POOL = 101
CHECK_FAILED = 102
NETNS_NOT_FOUND = 103
DATAPLANE_FAILED = 104
ATTACHMENT_CONFLICT = 105
INTERNAL_ERROR = 199


class CniError(Exception):
    """An error in the shape the CNI spec prints: code, msg and details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "msg": self.msg, "details": self.details}

    @classmethod
    def from_dict(cls, data: object) -> CniError:
        """Read an error back from the agent protocol; a malformed one is itself an error."""
        if not isinstance(data, dict) or not isinstance(data.get("code"), int):
            return cls(INTERNAL_ERROR, "malformed error from the agent", repr(data)[:200])
        return cls(data["code"], str(data.get("msg", "")), str(data.get("details", "")))
