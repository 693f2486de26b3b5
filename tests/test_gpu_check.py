"""benchmarks/gpu_check.sh --cpu: every part of the prepared GPU check runs at tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]  # at most 8 files come back
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert sorted(parts) == sorted(["ceiling", "precision", "train", "e2e", "quality", "ddp", "knn", "search"])
    for name, rec in parts.items():
        assert rec["status"] == "ok", (name, rec)
    assert report["info"]["cpu_mode"] is True
    assert parts["ceiling"]["tflops"] > 0 and parts["ceiling"]["timer"] == "wall time"
    rows = parts["precision"]["rows"]
    assert {(r["kernels"], r["dtype"]) for r in rows} == {("torch", "bf16"), ("compile", "fp32"), ("compile", "bf16"),
                                                          ("fused", "fp32"), ("fused", "bf16")}
    for r in rows:
        assert r["mse_rel"] < (1e-5 if r["dtype"] == "fp32" else 0.1), r
    measured = [r for r in parts["train"]["rows"] if "images_per_s" in r]
    assert {r["kernels"] for r in measured} == {"torch", "fused"} and all(r["images_per_s"] > 0 for r in measured)
    assert any(r.get("status") == "skipped: no CUDA" and r["cuda_graphs"] for r in parts["train"]["rows"])
    assert parts["e2e"]["images_per_s"] > 0
    assert parts["ddp"]["finite"] and parts["ddp"]["world_size"] == 1 and parts["ddp"]["backend"] == "gloo"
    assert parts["knn"]["recall_50_probes"] == 1.0
    assert [r["zdim"] for r in parts["search"]["rows"]] == [0, 2]
    assert all(r["images_per_s"] > 0 and r["local_images_per_s"] > 0 for r in parts["search"]["rows"])
    assert "## train" in (out / "gpu_check.md").read_text()
