"""`l3fabric cni install`: put the plugin where the runtime looks (`$CNI_PATH/l3fabric`) and
the network configuration where it reads it (`10-l3fabric.conflist`).

The plugin file is a launcher for `cni.shim` on this interpreter, started with `-I -S`: no
site-packages scan and no user environment, which roughly halves the shim's start-up (the
shim needs only the standard library and the directory holding the `cni` package).
Both files are written atomically (temporary file, then rename): a runtime starting a pod
meanwhile sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cni
from cni.protocol import DEFAULT_SOCKET
from cni.request import LOG_LEVELS
from ipam_blocks.errors import InvalidInput

PLUGIN_NAME = "l3fabric"
CONFLIST_NAME = "10-l3fabric.conflist"
NETWORK_NAME = "l3fabric"
# The reference plugins chained below speak up to 1.0.0; STATUS/GC need a 1.1.0 list.
CONFLIST_VERSION = "1.0.0"
SHEBANG_MAX = 255  # the kernel truncates longer #! lines


@dataclass(frozen=True)
class Installed:
    plugin: Path
    conflist: Path


def render_launcher(python: str, code_root: str) -> str:
    shebang = f"#!{python} -IS"
    if len(shebang) > SHEBANG_MAX or any(c.isspace() for c in python):
        raise InvalidInput("python", f"{python!r} cannot be used in a #! line")
    return f"""{shebang}
# l3fabric CNI plugin, written by `l3fabric cni install`: runs the shim on this interpreter
# without the site-packages scan (-S) or user environment (-I), for fast start-up.
import sys

sys.path.insert(0, {code_root!r})
from cni.shim import main

sys.exit(main())
"""


def render_conflist(
    *,
    mtu: int | None = None,
    socket: str = DEFAULT_SOCKET,
    log_level: str = "info",
    pools: tuple[str, ...] = (),
) -> dict[str, Any]:
    """l3fabric first, then the reference plugins that adjust what it built."""
    if mtu is not None and not 68 <= mtu <= 65535:
        raise InvalidInput("mtu", f"{mtu} is outside 68..65535")
    if not socket.startswith("/"):
        raise InvalidInput("socket", f"{socket!r} is not an absolute path")
    if log_level not in LOG_LEVELS:
        raise InvalidInput("log_level", f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    plugin: dict[str, Any] = {"type": PLUGIN_NAME}
    if mtu is not None:
        plugin["mtu"] = mtu
    plugin["socket"] = socket
    plugin["log_level"] = log_level
    plugin["ipam"] = {"pools": list(pools)}
    return {
        "cniVersion": CONFLIST_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            plugin,
            # A namespaced sysctl applied inside every pod, as an example of tuning.
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "1024"}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def install(
    bin_dir: Path,
    conf_dir: Path,
    *,
    mtu: int | None = None,
    socket: str = DEFAULT_SOCKET,
    python: str = sys.executable,
) -> Installed:
    conflist = render_conflist(mtu=mtu, socket=socket)
    code_root = str(Path(cni.__file__).resolve().parent.parent)
    plugin = bin_dir / PLUGIN_NAME
    conf = conf_dir / CONFLIST_NAME
    write_atomic(plugin, render_launcher(python, code_root).encode(), 0o755)
    write_atomic(conf, (json.dumps(conflist, indent=2) + "\n").encode(), 0o644)
    return Installed(plugin, conf)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        # rename replaces atomically, even over a plugin binary being executed right now
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
