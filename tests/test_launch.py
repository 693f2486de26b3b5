"""launch/: every script parses, and the local recipes train for real with 2 CPU processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distdrgn.checkpoint import load_weights
from distdrgn.engine import deepspeed_import_error

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
OUTPUTS = ("config.yaml", "weights.1.pkl", "weights.2.pkl", "weights.pkl", "z.pkl", "loss.csv", "run.log")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(cmd: list, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_args(small_dataset, tiny_overrides, out: Path) -> list[str]:
    return [str(REPO / "configs" / "tiny.yaml"), *tiny_overrides(small_dataset["store"], out),
            "train.checkpoint_every=1"]


def check_run(out: Path, world_size: int = 2) -> None:
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert f"{world_size} process(es) on cpu" in (out / "run.log").read_text()
    assert load_weights(out / "weights.pkl")["epoch"] == 2


def test_there_are_recipes():
    names = {p.name for p in LAUNCH.iterdir()}
    assert {"single_node.sh", "slurm_multinode.sbatch", "deepspeed_launch.sh", "deepspeed_hostfile",
            "prometheus.yml", "README.md"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_print_usage_without_a_config(script):
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_prometheus_config_is_valid_yaml_with_a_distdrgn_job():
    cfg = yaml.safe_load((LAUNCH / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "distdrgn")
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.rsplit(":", 1)[1].isdigit() for t in targets)
    from distdrgn.config import load_config

    assert f":{load_config(REPO / 'configs' / 'large.yaml').metrics.port}" in " ".join(targets)


def test_deepspeed_hostfile_format():
    lines = [ln.split() for ln in (LAUNCH / "deepspeed_hostfile").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(len(ln) == 2 and ln[1].startswith("slots=") and ln[1][6:].isdigit() for ln in lines)


def test_single_node_script_trains_with_two_cpu_processes(small_dataset, tiny_overrides, tmp_path):
    out = tmp_path / "single"
    run_script(["bash", str(LAUNCH / "single_node.sh"), *train_args(small_dataset, tiny_overrides, out)],
               {"NPROC": "2"})
    check_run(out)


def test_slurm_script_runs_one_node_with_stub_slurm_commands(small_dataset, tiny_overrides, tmp_path):
    """The sbatch script under stand-ins for scontrol/srun: 1 node x 2 CPU processes, c10d
    rendezvous on the "first node" of the allocation, store staged to a node-local directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo localhost\n')
    # srun: drop its own --options, run the command once (one node)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out, stage = tmp_path / "slurm", tmp_path / "nvme"
    proc = run_script(["bash", str(LAUNCH / "slurm_multinode.sbatch"), *train_args(small_dataset, tiny_overrides, out)],
                      {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
                       "SLURM_NNODES": "1", "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "2",
                       "RDZV_PORT": str(free_port()), "STAGE_TO": str(stage), "MAX_RESTARTS": "0"})
    assert "rendezvous localhost:" in proc.stdout
    check_run(out)
    staged = stage / Path(small_dataset["store"]).name
    assert staged.is_dir() and f"store {staged}" in (out / "run.log").read_text()


@pytest.mark.skipif(deepspeed_import_error() is not None, reason=f"DeepSpeed does not import: {deepspeed_import_error()}")
def test_deepspeed_launcher_runs_locally_on_cpu(small_dataset, tiny_overrides, tmp_path):
    out = tmp_path / "ds"
    run_script(["bash", str(LAUNCH / "deepspeed_launch.sh"), *train_args(small_dataset, tiny_overrides, out)],
               {"HOSTFILE": "none", "NPROC": "2", "ZERO_STAGE": "2", "MASTER_PORT": str(free_port())})
    check_run(out)
    assert "engine: deepspeed (ZeRO stage 2)" in (out / "run.log").read_text()
