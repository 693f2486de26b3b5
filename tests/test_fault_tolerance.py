"""Fault tolerance on CPU with real SIGKILLs: torchrun restarts, whole-job relaunch, a truncated
checkpoint, and resuming with another world size.

The runs set the ``debug`` config section: ``debug.trace_samples`` makes each process write
its PID, resume point and the particle ids of every step it trained (distdrgn.debug), and
``debug.step_delay_s`` slows the steps so the harness can act mid-epoch: it waits until the
trace shows the run at the chosen point, then kills. From the logs the effective history is rebuilt
(each attempt replaces what earlier ones did from its resume point on) and checked: every
epoch consumes exactly the world-size-independent global order, each particle once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distdrgn.checkpoint import load_z, resume_points
from multihost import check_attempts_exactly_once

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEP_SECONDS = 0.03
TIMEOUT = 120


def overrides(store, run, tiny_overrides):
    return [str(REPO / "configs" / "tiny.yaml"), *tiny_overrides(store, run, **{"train.epochs": EPOCHS, "train.batch_size": 8,
                                          "train.checkpoint_every_steps": 2, "train.log_every": 1000,
                                                                           "train.checkpoint_every": 1})]


def launch(cmd_args, tmp: Path, nproc: int | None, max_restarts: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd_args = [*cmd_args, f"debug.trace_samples={tmp / 'samples'}", f"debug.step_delay_s={STEP_SECONDS}"]
    if nproc is None:  # one plain process, no torchrun
        cmd = [sys.executable, "-m", "distdrgn.train", *cmd_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "--max-restarts", str(max_restarts), "-m", "distdrgn.train", *cmd_args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "stderr.log", "a"),
                            start_new_session=True)


def read_samples(tmp: Path) -> dict[str, dict]:
    """attempt key -> {"time", "resume", "world_size", "pids", "steps": [(epoch, lo, ids)]}."""
    attempts: dict[str, dict] = {}
    for f in sorted((tmp / "samples").glob("samples.*.jsonl")):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.endswith("}")]
        if not lines:
            continue
        head = lines[0]
        a = attempts.setdefault(head["attempt"], {"time": head["time"], "resume": tuple(head["resume"]),
                                                  "world_size": head["world_size"], "pids": [], "steps": []})
        assert a["resume"] == tuple(head["resume"]), "the processes of one attempt resume at the same point"
        a["time"] = min(a["time"], head["time"])
        a["pids"].append(int(f.name.split(".")[1]))
        a["steps"] += [(s["epoch"], s["lo"], s["ids"]) for s in lines[1:]]
    return attempts


def wait_for(predicate, proc: subprocess.Popen, what: str):
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pids(tmp: Path, restart: int, since: float = 0.0) -> list[int]:
    """PIDs of the workers of torchrun attempt ``restart`` that started after ``since``."""
    pids = []
    for f in (tmp / "samples").glob("samples.*.jsonl"):
        lines = f.read_text().splitlines()
        head = json.loads(lines[0]) if lines and lines[0].endswith("}") else None
        if head and head["restart"] == restart and head["time"] >= since:
            pids.append(head["pid"])
    return pids


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_history(tmp: Path, store) -> dict[str, dict]:
    """Rebuild what the run effectively trained on and check it epoch by epoch."""
    return check_attempts_exactly_once(read_samples(tmp), store, EPOCHS, seed=0, window_chunks=4)


def check_z(run: Path, store) -> None:
    """z.pkl holds every particle in store order: re-encoding with the final weights agrees."""
    from distdrgn.encode import encode_store
    from distdrgn.volumes import load_model

    z_mu, _ = load_z(run / "z.pkl")
    tm = load_model(run)
    assert tm.epoch == EPOCHS
    mu, _ = encode_store(tm.model, tm.prep, store, device="cpu")
    np.testing.assert_allclose(mu, z_mu, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def store(small_dataset):
    from distdrgn.store import ParticleStore

    return ParticleStore.open(small_dataset["store"])


def test_three_random_worker_kills_under_torchrun_max_restarts(small_dataset, tiny_overrides, store, tmp_path):
    run = tmp_path / "run"
    proc = launch(overrides(small_dataset["store"], run, tiny_overrides), tmp_path, nproc=2, max_restarts=3)
    rng = np.random.default_rng(12345)
    try:
        for restart in range(3):
            def started(restart=restart):
                pids = worker_pids(tmp_path, restart)
                return len(pids) == 2 and pids

            pids = wait_for(started, proc, f"the workers of attempt {restart}")
            target = int(rng.integers(2, 9))  # steps this attempt trains (both ranks) before a kill

            def progressed(pids=pids, target=target):
                mine = [a for a in read_samples(tmp_path).values() if set(a["pids"]) & set(pids)]
                return mine and len(mine[0]["steps"]) >= 2 * target

            wait_for(progressed, proc, f"{target} steps of attempt {restart}")
            kill(int(rng.choice(pids)))
        assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill(proc.pid)
            for pid in worker_pids(tmp_path, 3):
                kill(pid)
    attempts = check_history(tmp_path, store)
    assert len(attempts) == 4 and all(a["world_size"] == 2 for a in attempts.values())
    resumes = [a["resume"] for a in sorted(attempts.values(), key=lambda a: a["time"])]
    assert resumes[0] == (1, 0) and all(r > (1, 0) for r in resumes[1:])  # restarts resumed, not restarted
    assert (run / "run.log").read_text().count("resumed from") == 3
    check_z(run, store)


def test_whole_job_kill_relaunch_truncated_checkpoint_and_fewer_processes(small_dataset, tiny_overrides, store,
                                                                          tmp_path):
    run = tmp_path / "run"
    args = overrides(small_dataset["store"], run, tiny_overrides)

    def kill_job(proc, when, what, since):
        try:
            wait_for(when, proc, what)
        finally:
            kill(proc.pid)
            for pid in worker_pids(tmp_path, 0, since):  # torchrun's workers run in their own sessions
                kill(pid)
            proc.wait(timeout=TIMEOUT)

    def newest():
        points = resume_points(run)
        return points[0][0] if points else None

    # 1: the whole job is SIGKILLed once it is inside epoch 1
    started = time.time()
    first = launch(args, tmp_path, nproc=2)
    kill_job(first, lambda: (newest() or (0, 0)) >= (1, 32), "a step checkpoint in epoch 1", started)
    at_kill = newest()
    # 2: the same command resumes from there; killed again a few checkpoints later
    started = time.time()
    second = launch(args, tmp_path, nproc=2)
    kill_job(second, lambda: (newest() or (0, 0)) >= (at_kill[0], at_kill[1] + 64), "three more checkpoints", started)
    # the relaunch continued at the newest checkpoint
    assert at_kill in [a["resume"] for a in read_samples(tmp_path).values()]
    # 3: the newest checkpoint is cut short; one process (W=1) resumes from the previous one
    (key_new, path_new), (key_prev, _) = resume_points(run)[:2]
    data = path_new.read_bytes()
    path_new.write_bytes(data[: len(data) // 3])
    third = launch(args, tmp_path, nproc=None)
    assert third.wait(timeout=TIMEOUT) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    attempts = check_history(tmp_path, store)
    last = max(attempts.values(), key=lambda a: a["time"])
    assert last["world_size"] == 1 and last["resume"] == key_prev and key_prev < key_new
    log = (run / "run.log").read_text()
    assert f"{path_new.name}: cannot read checkpoint" in log and "using the previous checkpoint" in log
    check_z(run, store)


@pytest.mark.parametrize("nproc", [None, 2], ids=["one-process", "torchrun-2"])
def test_sigterm_checkpoints_and_the_rerun_finishes_identical(nproc, small_dataset, tiny_overrides, store, tmp_path):
    """SLURM preemption: SIGTERM mid-epoch -> a step checkpoint, a log line, exit 143; the same
    command then resumes and ends bitwise where an uninterrupted run ends."""
    import torch

    from distdrgn.checkpoint import load_weights

    straight, run = tmp_path / "straight", tmp_path / "run"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert launch(overrides(small_dataset["store"], straight, tiny_overrides), plain, nproc).wait(TIMEOUT) == 0
    args = overrides(small_dataset["store"], run, tiny_overrides)
    proc = launch(args, tmp_path, nproc)
    try:
        def in_epoch_2():
            return any(s[0] == 2 and s[1] >= 16 for a in read_samples(tmp_path).values() for s in a["steps"])

        wait_for(in_epoch_2, proc, "training inside epoch 2")
        os.kill(proc.pid, signal.SIGTERM)  # the process, or torchrun's agent, which forwards it
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            kill(proc.pid)
    log = (run / "run.log").read_text()
    assert rc != 0, "a stopped run must exit non-zero so that the scheduler requeues it"
    assert "stopped by SIGTERM at epoch 2" in log and "rerun the same command to resume" in log
    stopped_at = resume_points(run)[0][0]
    assert stopped_at[0] == 2 and stopped_at[1] > 0  # a step checkpoint where it stopped
    assert launch(args, tmp_path, nproc).wait(timeout=TIMEOUT) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    assert f"continuing at epoch 2, image {stopped_at[1]}" in (run / "run.log").read_text()
    a, b = load_weights(straight / "weights.pkl"), load_weights(run / "weights.pkl")
    for k in a["model_state_dict"]:
        assert torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]), k
    np.testing.assert_array_equal(load_z(straight / "z.pkl")[0], load_z(run / "z.pkl")[0])
    check_history(tmp_path, store)
