"""Several "hosts" on one machine for the multi-node tests (tests/test_multinode.py; the trace
checks also for tests/test_slurm.py): helpers for tests, not part of the package
(benchmarks/scaling.py --hosts has its own copy of the host set-up: benchmarks do not import tests).

A host is an address, optionally a network namespace, and the interface gloo binds to:

- :func:`loopback_hosts`: addresses 127.0.0.11, .12, ... on this machine's loopback. As root
  each address is added to ``lo`` under its own label (``lo:ddN``, removed afterwards), which
  is what ``GLOO_SOCKET_IFNAME`` names: gloo binds to the first address of the interface it is
  given, and getifaddrs reports a labelled IPv4 address under its label, so each host's workers
  listen on the host's address. Without root all workers' gloo listens on 127.0.0.1 (``lo``);
  the agents still use their own addresses (``--local-addr``).
- :func:`netns_hosts`: one network namespace per host, each with an ``eth0`` (10.250.0.1N/24)
  whose veth peer is on a bridge inside a hub namespace: nothing is created in the machine's
  own namespace, no traffic can leave, and deleting the namespaces removes everything.

:func:`start_agent` starts one ``torchrun`` agent per host (c10d rendezvous on the first
host, ``--local-addr`` = the host's address, so the agent store that the workers join lives
on the rendezvous rank 0's address); with ``go_file`` the agent has imported torch and waits
for the file before it joins (a node that comes back at a chosen moment). :func:`read_trace` / :func:`check_exactly_once` rebuild
what a run trained on from the per-process sample traces (``debug.trace_samples``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # generous: four torch imports on two shared cores take a while


@dataclass(frozen=True)
class Host:
    name: str
    addr: str
    gloo_ifname: str  # the interface gloo (and tensorpipe) bind to
    netns: str | None = None  # run inside this network namespace

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"ddprobe{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    try:
        r = _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if r.returncode:
            return f"veth pairs cannot be created in a namespace: {r.stderr.strip()}"
        r = _ip("-n", name, "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode:
            return f"bridges cannot be created in a namespace: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


@contextlib.contextmanager
def loopback_hosts(n: int) -> Iterator[list[Host]]:
    """``n`` hosts on 127.0.0.11...; see the module docstring for what gloo binds to."""
    added: list[tuple[str, str]] = []
    hosts = []
    try:
        for i in range(1, n + 1):
            addr, label = f"127.0.0.{10 + i}", f"lo:dd{i}"
            ifname = "lo"
            if os.geteuid() == 0 and shutil.which("ip"):
                r = _ip("addr", "add", f"{addr}/32", "dev", "lo", "label", label, check=False)
                if r.returncode == 0:
                    added.append((addr, label))
                    ifname = label
            hosts.append(Host(f"host{i}", addr, ifname))
        yield hosts
    finally:
        for addr, label in added:
            _ip("addr", "del", f"{addr}/32", "dev", "lo", "label", label, check=False)


@contextlib.contextmanager
def netns_hosts(n: int) -> Iterator[list[Host]]:
    """``n`` hosts in their own network namespaces, joined by a bridge in a hub namespace."""
    tag = f"dd{os.getpid() % 100000}"
    hub = f"{tag}hub"
    made: list[str] = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        hosts = []
        for i in range(1, n + 1):
            ns, addr = f"{tag}h{i}", f"10.250.0.{10 + i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts.append(Host(f"host{i}", addr, "eth0", ns))
        yield hosts
    finally:
        for ns in reversed(made):  # a namespace's veth ends go with it
            _ip("netns", "del", ns, check=False)


def trace_overrides(trace: Path, step_delay_s: float = 0.0) -> list[str]:
    """The ``debug`` overrides that make every process write its sample trace into ``trace``."""
    return [f"debug.trace_samples={trace}", f"debug.step_delay_s={step_delay_s}"]


def base_env(host: Host | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if host is not None:
        env["GLOO_SOCKET_IFNAME"] = env["TP_SOCKET_IFNAME"] = host.gloo_ifname
    return env


# torchrun, started only once a file exists: the agent's imports (seconds on a loaded machine)
# are done before the test lets it join, so it joins the rendezvous when the test says so
GATED_TORCHRUN = """import os, sys, time
from torch.distributed import run
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.02)
sys.argv = ["torchrun", *sys.argv[2:]]
run.main()
"""


def start_agent(host: Host, hosts: list[Host], port: int, train_args: list[str], log: Path, *,
                nnodes: str | None = None, run_id: str = "distdrgn-test", max_restarts: int = 0,
                rdzv_conf: str = "", nproc: int = 1, env: dict[str, str] | None = None,
                go_file: Path | None = None) -> subprocess.Popen:
    """One torchrun agent for ``host``; the rendezvous is on ``hosts[0]``'s address. With
    ``go_file`` the agent imports torch, then waits for that file before it starts."""
    is_host = int(host == hosts[0])
    conf = f"is_host={is_host}" + (f",{rdzv_conf}" if rdzv_conf else "")
    launcher = ["-m", "torch.distributed.run"] if go_file is None else ["-c", GATED_TORCHRUN, str(go_file)]
    cmd = [*host.prefix(), sys.executable, *launcher, "--nnodes", nnodes or str(len(hosts)),
           "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].addr}:{port}",
           "--rdzv-id", run_id, "--rdzv-conf", conf, "--local-addr", host.addr, "--max-restarts", str(max_restarts),
           "--monitor-interval", "0.2", "-m", "distdrgn.train", *train_args]
    return subprocess.Popen(cmd, cwd=REPO, env={**base_env(host), **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab"), start_new_session=True)


def start_standalone(nproc: int, train_args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "distdrgn.train", *train_args]
    return subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                            start_new_session=True)


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (torchrun's workers are its children, in their own sessions)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d.name))
    return out


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_agent(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers (a node lost: nothing gets to clean up)."""
    workers = children(proc.pid)
    kill(proc.pid)
    for pid in workers:
        kill(pid)
    proc.wait(timeout=TIMEOUT)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            kill_agent(p)


def wait_until(predicate, what: str, procs: list[subprocess.Popen] = (), timeout: float = TIMEOUT,
               logs: list[Path] = ()):
    """Poll ``predicate`` until it is truthy; fail when a process in ``procs`` ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process ended (rc {p.returncode}) before {what}\n{tails(logs)}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails(logs)}")


def wait_all(procs: list[subprocess.Popen], logs: list[Path] = (), timeout: float = TIMEOUT) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run did not finish within {timeout:.0f}s\n{tails(logs)}") from None


def tails(logs, n: int = 2500) -> str:
    return "\n".join(f"--- {p}:\n{Path(p).read_text(errors='replace')[-n:]}" for p in logs if Path(p).exists())


# ---------------------------------------------------------------------------------------
# Sample traces (debug.trace_samples)
# ---------------------------------------------------------------------------------------


def read_trace(trace: Path) -> dict[tuple, dict]:
    """(resume point, world size) -> {"time", "resume", "world_size", "pids", "steps": [(epoch, lo, ids)]}.

    An attempt (the processes of one rendezvous round) is keyed by where it resumed and its
    world size, not by the trace's ``attempt`` (run id / restart count): after a lost node the
    agents' restart counts differ (a membership-change restart is not counted), so one round's
    processes carry different counts. Two rounds resuming at the same point with the same
    world size would merge and fail the exactly-once check (never silently pass it).
    """
    attempts: dict[str, dict] = {}
    for f in sorted(trace.glob("samples.*.jsonl")):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.endswith("}")]
        if not lines:
            continue
        head = lines[0]
        a = attempts.setdefault((tuple(head["resume"]), head["world_size"]), {"time": head["time"], "resume": tuple(head["resume"]),
                                                  "world_size": head["world_size"], "pids": [], "steps": []})
        a["time"] = min(a["time"], head["time"])
        a["pids"].append(int(f.name.split(".")[1]))
        a["steps"] += [(s["epoch"], s["lo"], s["ids"]) for s in lines[1:]]
    return attempts


def trained_steps(trace: Path) -> int:
    """Steps trained so far, summed over processes and attempts (for waiting on progress)."""
    return sum(len(a["steps"]) for a in read_trace(trace).values())


def check_exactly_once(trace: Path, store, epochs: int, seed: int, window_chunks: int) -> dict[str, dict]:
    """:func:`check_attempts_exactly_once` on the traces of ``trace``."""
    return check_attempts_exactly_once(read_trace(trace), store, epochs, seed, window_chunks)


def check_attempts_exactly_once(attempts: dict[str, dict], store, epochs: int, seed: int,
                                window_chunks: int) -> dict[str, dict]:
    """Rebuild the effective history of ``attempts`` ({key: {"time", "resume", "steps"}}: each
    attempt replaces what earlier ones did from its resume point on) and check that every epoch
    consumed its global order, each particle once."""
    from distdrgn.loader import GlobalOrder

    kept: dict[tuple[int, int], list[list[int]]] = {}
    for a in sorted(attempts.values(), key=lambda a: a["time"]):
        for key in [k for k in kept if k >= a["resume"]]:
            del kept[key]
        for epoch, lo, ids in a["steps"]:
            kept.setdefault((epoch, lo), []).append(ids)
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    for epoch in range(1, epochs + 1):
        sigma = GlobalOrder(chunks, seed=seed, epoch=epoch, window_chunks=window_chunks).order()
        los = sorted(lo for e, lo in kept if e == epoch)
        assert los and los[0] == 0, f"epoch {epoch} does not start at image 0"
        seen = []
        for lo, hi in zip(los, los[1:] + [store.n]):
            ids = np.concatenate(kept[(epoch, lo)])
            assert np.array_equal(np.sort(ids), np.sort(sigma[lo:hi])), f"epoch {epoch} images {lo}:{hi}"
            seen.append(ids)
        seen = np.concatenate(seen)
        assert len(seen) == store.n and len(np.unique(seen)) == store.n, f"epoch {epoch}: not each particle once"
    return attempts


# ---------------------------------------------------------------------------------------
# Sockets: which address a process listens on
# ---------------------------------------------------------------------------------------


def listening_addresses(pid: int) -> set[str]:
    """IPv4 addresses on which process ``pid`` has listening TCP sockets (in its namespace)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    addrs = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                hex_addr = local.split(":")[0]
                addrs.add(socket.inet_ntoa(bytes.fromhex(hex_addr)[::-1]))
    return addrs
