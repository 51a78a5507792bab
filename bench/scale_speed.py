"""bench/scale.py --speed-sweep: bare ExaBGP as the agent runs it (its config and environment
rendered by bgp_speaker/exabgp/config.py, its API process the agent's relay), with S quiet
sessions to simulated BIRD peers, at several `exabgp.reactor.speed` values.

Per (S, speed): ExaBGP started in the node-under-test namespace; once every session is up
and ExaBGP's CPU use has settled, its idle CPU (ExaBGP + relay) over --idle s; at S <= 10
also the latency of an API `announce route` (sent to the relay's socket) until the route is
in a BIRD peer's kernel (simulated node 0 exports it with a kernel protocol; the bench waits
for the RTM_NEWROUTE on a netlink multicast socket), then `withdraw`, --latency-samples
times at random phases of the reactor's sleep; the median.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

import scale_dut as dut
from converge import settle
from results import load_average
from scale_sim import DUT, DUT_IP, SIM, Accounting, Fleet, Namespaces, kill_tree, sim_ip, spawn

from bgp_speaker.bgp.routes import PeerType, SessionSpec
from bgp_speaker.exabgp.config import render_config, render_env
from bgp_speaker.exabgp.process import RELAY_SCRIPT
from bgp_speaker.kernel.netns import open_netns, run_in_netns

START, END = "<!-- scale-speed:start -->", "<!-- scale-speed:end -->"
PROBE = IPv4Network("10.200.0.0/16")  # announced through the API, outside the pool
LATENCY_MAX_SESSIONS = 10
WATCHER = f"""
protocol direct {{ ipv4; interface "sim0"; }}
protocol kernel {{ ipv4 {{ import none; export where net ~ [ {PROBE}+ ]; }}; }}
"""
RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_DST = 1
BIRD_PROTO = 12


class Api:
    """The agent's side of ExaBGP's relay: a unix socket; lines in, acks counted."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.acks: queue.Queue[str] = queue.Queue()
        self.up: set[str] = set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        self.conn, _ = self.server.accept()
        buf = b""
        while chunk := self.conn.recv(1 << 20):
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                if line in (b"done", b"error"):
                    self.acks.put(line.decode())
                elif b'"state"' in line:
                    msg = json.loads(line)
                    peer = msg.get("neighbor", {}).get("address", {}).get("peer")
                    state = msg.get("neighbor", {}).get("state")
                    (self.up.add if state == "up" else self.up.discard)(peer)

    def command(self, text: str) -> None:
        assert self.conn is not None
        self.conn.sendall(text.encode() + b"\n")

    def close(self) -> None:
        for sock in (self.conn, self.server):
            if sock is not None:
                sock.close()


class RouteWatch:
    """RTM_NEWROUTE/RTM_DELROUTE of BIRD's kernel protocol in the simulated nodes' namespace."""

    def __init__(self) -> None:
        def new() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_IPV4_ROUTE))
            return sock

        with open_netns(f"/run/netns/{SIM}") as fd:
            self.sock = run_in_netns(fd, new)

    def wait(self, kind: int, net: IPv4Network, timeout: float) -> float:
        """Monotonic time the route event arrived."""
        deadline = time.monotonic() + timeout
        want = net.network_address.packed
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                break
            now = time.monotonic()
            offset = 0
            while offset + 16 <= len(data):
                length, msg = struct.unpack_from("=IH", data, offset)
                if msg == kind and data[offset + 16 + 5] == BIRD_PROTO:
                    attr = offset + 28
                    while attr + 4 <= offset + length:
                        alen, atype = struct.unpack_from("=HH", data, attr)
                        if atype == RTA_DST and data[attr + 4 : attr + 8] == want:
                            return now
                        attr += (alen + 3) & ~3
                offset += (length + 3) & ~3
        raise SystemExit(f"no route event {kind} for {net} in {timeout:g} s")


def start_exabgp(tmp: Path, sessions: int, speed: float) -> tuple[subprocess.Popen[bytes], Api]:
    api_path = tmp / f"api-{sessions}-{speed}.sock"
    api = Api(api_path)
    specs = [
        SessionSpec(
            ip_address(sim_ip(i)),
            dut.ASN,
            dut.ASN,
            ip_address(DUT_IP),
            IPv4Address(DUT_IP),
            PeerType.GLOBAL,
        )
        for i in range(sessions)
    ]
    relay = [sys.executable, "-I", "-S", str(RELAY_SCRIPT), str(api_path)]
    conf = tmp / f"exabgp-{sessions}-{speed}.conf"
    conf.write_text(render_config(IPv4Address(DUT_IP), dut.ASN, specs, relay, listen=True))
    env = render_env([ip_address(DUT_IP)], extra={"exabgp.reactor.speed": str(speed)})
    exabgp = shutil.which("exabgp")
    argv = [exabgp] if exabgp else [sys.executable, "-m", "exabgp"]
    # as the agent does (process.py, _child_env): no inherited exabgp.* or PYTHON* settings
    base = {k: v for k, v in os.environ.items() if not k.startswith(("exabgp", "PYTHON"))}
    proc = spawn(DUT, [*argv, "server", str(conf)], conf.with_suffix(".log"), {**base, **env})
    return proc, api


def latency(api: Api, watch: RouteWatch, samples: int) -> list[float]:
    out = []
    for k in range(samples):
        net = IPv4Network((int(PROBE.network_address) + 256 * k, 24))
        time.sleep(random.uniform(0.05, 0.3))  # any phase of the reactor's sleep
        since = time.monotonic()
        api.command(f"announce route {net} next-hop {DUT_IP}")
        out.append(watch.wait(RTM_NEWROUTE, net, 10) - since)
        api.command(f"withdraw route {net} next-hop {DUT_IP}")
        watch.wait(RTM_DELROUTE, net, 10)
    return out


def sweep(args: argparse.Namespace, tmp: Path) -> dict[tuple[int, float], dict[str, float]]:
    out: dict[tuple[int, float], dict[str, float]] = {}
    spaces = Namespaces()
    fleet = Fleet(tmp)
    try:
        spaces.open()
        spaces.add_sim_addresses(max(args.sessions))
        watch = RouteWatch()
        for sessions in args.sessions:
            for speed in args.speeds:
                fleet.start(sessions, [DUT_IP], WATCHER)
                proc, api = start_exabgp(tmp, sessions, speed)
                try:
                    acct = Accounting(proc.pid)
                    deadline = time.monotonic() + args.timeout
                    while len(api.up) < sessions:
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise SystemExit(f"ExaBGP: {len(api.up)}/{sessions} sessions up")
                        time.sleep(0.1)
                    settle(acct.poll())
                    row = {"idle": acct.idle(args.idle)}
                    if sessions <= LATENCY_MAX_SESSIONS:
                        row["latency"] = statistics.median(
                            latency(api, watch, args.latency_samples)
                        )
                    out[sessions, speed] = row
                    print(f"{sessions} sessions speed {speed}: {row}", file=sys.stderr, flush=True)
                finally:
                    kill_tree(proc)
                    api.close()
    finally:
        fleet.stop()
        spaces.close()
    return out


def main(args: argparse.Namespace, tmp: Path, before: str) -> str:
    results = sweep(args, tmp)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = " | ".join(f"speed {s:g}" for s in args.speeds)
    lines = [
        START,
        "## ExaBGP reactor speed sweep (`bench/scale.py --speed-sweep`)",
        "",
        f"`{args.command}` — {when}, {os.cpu_count()} CPUs, {dut.versions()}. Bare ExaBGP "
        "with the agent's rendered config/env and relay, S quiet iBGP sessions to simulated "
        f"BIRD peers. Idle: CPU % of a core (ExaBGP + relay) over {args.idle:g} s once "
        f"settled. Announce: API `announce route` → route in a BIRD peer's kernel, median of "
        f"{args.latency_samples}, ms. Load average before: {before}, after: {load_average()}.",
        "",
        f"| sessions | | {head} |",
        "| ---: | --- |" + " ---: |" * len(args.speeds),
    ]
    for sessions in args.sessions:
        for label, key, scale in (("idle CPU %", "idle", 100), ("announce ms", "latency", 1000)):
            cells = [results.get((sessions, s), {}).get(key) for s in args.speeds]
            if all(c is None for c in cells):
                continue
            lines.append(f"| {sessions} | {label} | " + " | ".join(
                "—" if c is None else f"{c * scale:.1f}" for c in cells) + " |")  # fmt: skip
    lines.append(END)
    return "\n".join(lines)
