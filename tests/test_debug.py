"""The ``debug`` section: the per-process sample trace and the step delay (distdrgn.debug)."""

import json
import os

import torch

from distdrgn.config import DebugConfig
from distdrgn.debug import DebugHooks


def test_inert_by_default(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr("time.sleep", slept.append)
    hooks = DebugHooks(DebugConfig(), rank=0, world_size=1, resume=(1, 0))
    hooks.after_step(1, 0, torch.arange(4))
    hooks.close()
    assert slept == [] and list(tmp_path.iterdir()) == []


def test_trace_records_the_resume_point_and_every_step(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    hooks = DebugHooks(DebugConfig(trace_samples=str(tmp_path / "trace"), step_delay_s=0.25), rank=1, world_size=4,
                       resume=(3, 48))
    hooks.after_step(3, 48, torch.tensor([5, 9]))
    hooks.after_step(3, 64, torch.tensor([1]))
    hooks.close()
    lines = [json.loads(x) for x in (tmp_path / "trace" / f"samples.{os.getpid()}.jsonl").read_text().splitlines()]
    head = lines[0]
    assert head["resume"] == [3, 48] and head["rank"] == 1 and head["world_size"] == 4
    assert head["attempt"] == "job7/2" and head["restart"] == 2 and head["pid"] == os.getpid()
    assert lines[1:] == [{"epoch": 3, "lo": 48, "ids": [5, 9]}, {"epoch": 3, "lo": 64, "ids": [1]}]
    assert slept == [0.25, 0.25]


def test_the_package_reads_no_test_variables():
    """Nothing in distdrgn/ looks at DISTDRGN_TEST_* variables: tests go through the config."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "distdrgn"
    offenders = [str(p) for p in package.rglob("*.py") if "DISTDRGN_TEST" in p.read_text()]
    assert offenders == []
