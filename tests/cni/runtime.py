"""A tiny container runtime for tests: executes CNI plugins exactly as libcni does.

Test infrastructure, not product code: a plugin is run as an executable with the CNI_*
environment and the configuration on stdin; a conflist runs its plugins in order on ADD
(each one's result is the next one's prevResult), in reverse on DEL, and with the final
result as prevResult on CHECK, injecting `name`, `cniVersion` and the `runtimeConfig` of
each plugin's declared capabilities, like libcni's `buildOneConfig`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_PLUGINS = Path("/usr/lib/cni")


@dataclass(frozen=True)
class PluginRun:
    returncode: int
    stdout: bytes
    stderr: bytes

    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class PluginFailed(AssertionError):
    def __init__(self, plugin: str, command: str, run: PluginRun) -> None:
        super().__init__(
            f"{plugin} {command} exited {run.returncode}: "
            f"{run.stdout.decode(errors='replace')} {run.stderr.decode(errors='replace')}"
        )
        self.run = run


@dataclass(frozen=True)
class Container:
    """What a runtime knows about one sandbox attachment."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    pod: str = ""
    namespace: str = "default"

    @property
    def cni_args(self) -> str:
        if not self.pod:
            return ""
        # IgnoreUnknown=1: the reference plugins reject unknown args otherwise (as kubelet knows)
        return f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.pod}"


def plugin_env(command: str, c: Container | None, cni_path: Sequence[Path | str]) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_PATH": os.pathsep.join(map(str, cni_path))}
    if c is not None:
        env |= {"CNI_CONTAINERID": c.container_id, "CNI_NETNS": c.netns, "CNI_IFNAME": c.ifname}
        if c.cni_args:
            env["CNI_ARGS"] = c.cni_args
    # The runtime's own PATH, for plugins that run helpers (portmap runs iptables).
    env["PATH"] = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def exec_plugin(
    executable: Path | str,
    env: Mapping[str, str],
    stdin: bytes,
    *,
    wrapper: Sequence[str] = (),
    timeout: float = 60,
) -> PluginRun:
    """Run one plugin: env + stdin in, stdout + exit status out (`wrapper` e.g. enters the
    host's network namespace, where a runtime's plugins run)."""
    proc = subprocess.run(
        [*wrapper, str(executable)],
        input=stdin,
        env=dict(env),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return PluginRun(proc.returncode, proc.stdout, proc.stderr)


def find_plugin(kind: str, cni_path: Sequence[Path | str]) -> Path:
    for directory in cni_path:
        candidate = Path(directory) / kind
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"plugin {kind!r} not in {list(map(str, cni_path))}")


@dataclass
class ConflistRuntime:
    conflist: dict[str, Any]
    cni_path: Sequence[Path | str]
    wrapper: Sequence[str] = ()
    runtime_config: dict[str, Any] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)

    def plugin_conf(
        self, plugin: Mapping[str, Any], prev_result: Any = None, extra: Mapping[str, Any] = {}
    ) -> dict[str, Any]:
        conf = {**plugin, "name": self.conflist["name"], "cniVersion": self.conflist["cniVersion"]}
        wanted = {k for k, on in (plugin.get("capabilities") or {}).items() if on}
        runtime = {k: v for k, v in self.runtime_config.items() if k in wanted}
        if runtime:
            conf["runtimeConfig"] = runtime
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return {**conf, **extra}

    def _run(self, plugin: Mapping[str, Any], command: str, c: Container, prev: Any) -> Any:
        executable = find_plugin(plugin["type"], self.cni_path)
        stdin = json.dumps(self.plugin_conf(plugin, prev)).encode()
        env = plugin_env(command, c, self.cni_path) | self.extra_env
        run = exec_plugin(executable, env, stdin, wrapper=self.wrapper)
        if not run.ok:
            raise PluginFailed(plugin["type"], command, run)
        return run.json()

    def add(self, c: Container) -> Any:
        result = None
        for plugin in self.conflist["plugins"]:
            result = self._run(plugin, "ADD", c, result)
        return result

    def check(self, c: Container, result: Any) -> None:
        for plugin in self.conflist["plugins"]:
            self._run(plugin, "CHECK", c, result)

    def delete(self, c: Container, result: Any = None) -> None:
        for plugin in reversed(self.conflist["plugins"]):
            self._run(plugin, "DEL", c, result)


def assert_cni_error(run: PluginRun, code: int, *words: str) -> dict[str, Any]:
    """The plugin failed as the spec says: exit 1, one error object on stdout with `code`,
    whose msg or details name every one of `words`, and no traceback."""
    assert run.returncode == 1, run
    assert b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")
    err = json.loads(run.stdout)
    assert set(err) == {"cniVersion", "code", "msg", "details"}, err
    assert err["code"] == code, err
    text = f"{err['msg']} {err['details']}"
    for word in words:
        assert word in text, err
    return err
