"""The training engines: DDP and DeepSpeed give the same run, 2 CPU processes under gloo."""

from __future__ import annotations

import csv
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distdrgn.checkpoint import load_weights, load_z
from distdrgn.config import load_config
from distdrgn.engine import deepspeed_config, deepspeed_import_error
from distdrgn.errors import DistdrgnError

REPO = Path(__file__).resolve().parents[1]
DS_MISSING = deepspeed_import_error()
needs_deepspeed = pytest.mark.skipif(DS_MISSING is not None, reason=f"DeepSpeed does not import: {DS_MISSING}")


def torchrun(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    overrides = [*overrides, "train.checkpoint_every=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "distdrgn.train", str(REPO / "configs" / "tiny.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def loss_rows(run: Path) -> list[dict]:
    with open(run / "loss.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_run(a: Path, b: Path, atol: float = 1e-6) -> None:
    """Same loss curve, weights, Adam state and latents (fp32 on CPU, same data order)."""
    la, lb = loss_rows(a), loss_rows(b)
    assert len(la) == len(lb)
    for ra, rb in zip(la, lb):
        for key in ("loss", "mse", "kl"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-6, abs=atol), (key, ra, rb)
    wa, wb = load_weights(a / "weights.pkl"), load_weights(b / "weights.pkl")
    assert wa["model_state_dict"].keys() == wb["model_state_dict"].keys()
    for k, v in wa["model_state_dict"].items():
        torch.testing.assert_close(wb["model_state_dict"][k], v, rtol=0, atol=atol, msg=k)
    sa, sb = wa["optimizer_state_dict"]["state"], wb["optimizer_state_dict"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(wa["model_state_dict"]) - 1  # all params (+1 buffer)
    for i in sa:
        assert float(sa[i]["step"]) == float(sb[i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[i][key], sa[i][key], rtol=1e-5, atol=atol)
    torch.testing.assert_close(torch.from_numpy(load_z(b / "z.pkl")[0]), torch.from_numpy(load_z(a / "z.pkl")[0]),
                               rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def ddp_run(small_dataset, tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "ddp"
    torchrun(tiny_overrides(small_dataset["store"], out))
    return out


@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_matches_ddp_on_two_cpu_processes(stage, ddp_run, small_dataset, tiny_overrides, tmp_path):
    out = tmp_path / f"ds{stage}"
    proc = torchrun(tiny_overrides(small_dataset["store"], out, **{"train.engine": "deepspeed",
                                                                   "train.zero_stage": stage}))
    assert f"engine: deepspeed (ZeRO stage {stage})" in (out / "run.log").read_text(), proc.stderr[-2000:]
    for name in ("weights.1.pkl", "weights.2.pkl", "weights.pkl", "z.1.pkl", "z.pkl", "loss.csv", "config.yaml"):
        assert (out / name).is_file(), name
    assert [int(r["images"]) for r in loss_rows(out)] == [192, 192]
    # stage 0 steps our Adam directly; stage 2 partitions gradients and Adam state across the
    # two ranks and the checkpoint gathers them back: both must reproduce the DDP run
    assert_same_run(ddp_run, out)
    # the run directory is usable by the downstream tools
    from distdrgn.volumes import eval_volume, load_model

    vol = eval_volume(load_model(out), z=[0.0, 0.0])
    assert vol.shape == (16, 16, 16) and torch.isfinite(torch.as_tensor(vol)).all()


def test_bf16_gradient_communication_is_close_to_fp32(ddp_run, small_dataset, tiny_overrides, tmp_path):
    """train.grad_comm_dtype=bf16 (DDP comm hook): the all-reduce is rounded, so close, not equal."""
    out = tmp_path / "bf16comm"
    torchrun(tiny_overrides(small_dataset["store"], out, **{"train.grad_comm_dtype": "bf16"}))
    la, lb = loss_rows(ddp_run), loss_rows(out)
    assert float(lb[-1]["loss"]) == pytest.approx(float(la[-1]["loss"]), rel=1e-2)
    wa, wb = load_weights(ddp_run / "weights.pkl"), load_weights(out / "weights.pkl")
    diffs = [float((wa["model_state_dict"][k] - wb["model_state_dict"][k]).abs().max()) for k in wa["model_state_dict"]]
    assert 0 < max(diffs) < 1e-2  # rounded gradients move the weights a little


@needs_deepspeed
def test_deepspeed_zero1_resume_and_cross_engine_resume(ddp_run, small_dataset, tiny_overrides, tmp_path):
    """1 epoch under DDP, resumed for the 2nd under DeepSpeed ZeRO-1 = the 2-epoch DDP run."""
    out = tmp_path / "mixed"
    torchrun(tiny_overrides(small_dataset["store"], out, **{"train.epochs": 1}))
    torchrun(tiny_overrides(small_dataset["store"], out, **{"train.engine": "deepspeed", "train.zero_stage": 1}))
    assert "resumed from weights.1.pkl" in (out / "run.log").read_text()
    assert_same_run(ddp_run, out)


@needs_deepspeed
def test_deepspeed_single_process_in_process(small_dataset, tiny_overrides, tmp_path):
    """One process: DeepSpeed gets a 1-rank gloo group; two runs in one process work (groups reset)."""
    from distdrgn.train import train

    import torch.distributed as dist

    for name in ("a", "b"):
        train(load_config(None, tiny_overrides(small_dataset["store"], tmp_path / name,
                                               **{"train.engine": "deepspeed", "train.epochs": 1})))
        assert not dist.is_initialized()
    train(load_config(None, tiny_overrides(small_dataset["store"], tmp_path / "ddp", **{"train.epochs": 1})))
    assert_same_run(tmp_path / "ddp", tmp_path / "b")


def test_deepspeed_config_follows_ours():
    cfg = load_config(None, ["train.batch_size=32", "train.zero_stage=2", "train.bucket_cap_mb=50"])

    class RT:
        world_size, amp_dtype, device = 8, torch.bfloat16, torch.device("cpu")

    ds = deepspeed_config(cfg, RT)
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.0
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50 * 2**20 // 2  # bf16 elements
    RT.amp_dtype = None
    assert not deepspeed_config(cfg, RT)["bf16"]["enabled"]


def test_zero_stage_is_validated():
    with pytest.raises(DistdrgnError, match="train.zero_stage must be 0, 1, 2 or 3"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(DistdrgnError, match="bucket_cap_mb"):
        load_config(None, ["train.bucket_cap_mb=0"])
    with pytest.raises(DistdrgnError, match="grad_comm_dtype"):
        load_config(None, ["train.grad_comm_dtype=fp16"])


def test_missing_deepspeed_is_a_one_line_error(monkeypatch, small_dataset, tiny_overrides, tmp_path):
    """Without DeepSpeed importable, train.engine=deepspeed stops with an install hint."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    from distdrgn.train import train

    with pytest.raises(DistdrgnError, match="no-build-isolation") as err:
        train(load_config(None, tiny_overrides(small_dataset["store"], tmp_path / "x", **{"train.engine": "deepspeed"})))
    assert "\n" not in str(err.value)


def _small_model_and_cfg(*overrides):
    from distdrgn.model import CryoDRGN, ModelInfo

    cfg = load_config(None, ["model.zdim=2", "model.enc_dim=16", "model.dec_dim=16", "model.enc_layers=1",
                             "model.dec_layers=1", "train.engine=deepspeed", *overrides])
    return CryoDRGN(ModelInfo.from_config(cfg.model, 16, seed=0)), cfg


@pytest.fixture()
def one_rank_group():
    """A 1-rank gloo group in this process, as distdrgn.train makes for DeepSpeed."""
    import torch.distributed as dist

    from distdrgn.runtime import close_process_group, init_process_group

    init_process_group("deepspeed", "gloo", torch.device("cpu"), 1)
    yield
    if dist.is_initialized():
        close_process_group()


@needs_deepspeed
@pytest.mark.parametrize("old_cast", [False, True], ids=["installed", "pre_0.19.2_cast"])
def test_deepspeed_keeps_buffers_float32(old_cast, one_rank_group, monkeypatch):
    """bf16 DeepSpeed (CPU, gloo): the positional-encoding frequencies and lattice stay float32
    and exact, also when deepspeed.initialize casts the whole module (DeepSpeed < 0.19.2 did
    ``module.bfloat16()``, emulated here)."""
    import deepspeed

    from distdrgn.engine import DeepSpeedEngine
    from distdrgn.runtime import Runtime

    model, cfg = _small_model_and_cfg()
    originals = {n: b.clone() for n, b in model.named_buffers()}
    if old_cast:
        real = deepspeed.initialize

        def casting_initialize(*args, model, **kwargs):
            return real(*args, model=model.bfloat16(), **kwargs)

        monkeypatch.setattr(deepspeed, "initialize", casting_initialize)
    engine = DeepSpeedEngine(model, cfg, Runtime(0, 1, torch.device("cpu"), torch.bfloat16))
    buffers = dict(engine.module.named_buffers())
    assert buffers.keys() == originals.keys()
    for name, buf in buffers.items():
        assert buf.dtype == torch.float32, name
        assert torch.equal(buf, originals[name]), name
    assert next(engine.module.parameters()).dtype == torch.bfloat16  # the parameters are DeepSpeed's bf16


@needs_deepspeed
def test_deepspeed_step_never_reads_a_device_value_on_the_host(one_rank_group, monkeypatch):
    """As tests/test_train.py checks for DDP: the DeepSpeed step queues work only, and a
    non-finite step is skipped on the device."""
    from distdrgn.engine import build_engine
    from distdrgn.lattice import random_rotations
    from distdrgn.objective import Batch, Preprocess
    from distdrgn.runtime import Runtime
    from distdrgn.train import train_step

    model, cfg = _small_model_and_cfg()
    rt = Runtime(0, 1, torch.device("cpu"), None)
    engine = build_engine(model, cfg, rt)
    gen = torch.Generator().manual_seed(0)
    ctf = torch.tensor([[16, 1.0, 15000, 14000, 30, 300, 2.7, 0.1, 0]]).repeat(4, 1)
    batch = Batch(torch.arange(4), torch.randn(4, 16, 16, generator=gen), random_rotations(4, gen).float(),
                  torch.zeros(4, 2), ctf)
    prep = Preprocess(16)
    train_step(engine, batch, prep, model.lattice, 0.5, 0.25, rt)  # caches filled, Adam state created

    def host_read(self, *args, **kwargs):
        raise AssertionError("a device value was read on the host inside train_step")

    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    _, nonfinite = train_step(engine, batch, prep, model.lattice, 0.5, 0.25, rt)
    monkeypatch.undo()
    assert float(nonfinite) == 0.0
    assert any(not torch.equal(before[k], v) for k, v in engine.module.state_dict().items())

    batch.images[1, 3, 3] = float("nan")
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    _, nonfinite = train_step(engine, batch, prep, model.lattice, 0.5, 0.25, rt)
    assert float(nonfinite) == 1.0
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())


def test_ddp_does_not_broadcast_constant_buffers(monkeypatch):
    """The DDP wrapper is built without a buffer sync before each forward (buffers are constants):
    forward_sync_buffers=False where torch has it (2.13), broadcast_buffers=False before."""
    import distdrgn.engine as engine_module
    from distdrgn.model import CryoDRGN, ModelInfo
    from distdrgn.runtime import Runtime

    seen = {}

    class Recorder:
        def __init__(self, module, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(engine_module, "DistributedDataParallel", Recorder)
    cfg = load_config(None, ["model.zdim=2", "model.enc_dim=8", "model.dec_dim=8"])
    engine_module.DDPEngine(CryoDRGN(ModelInfo.from_config(cfg.model, 8, seed=0)), cfg,
                            Runtime(0, 2, torch.device("cpu"), None))
    expected = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        torch.nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
    assert seen == {**seen, expected: False} and len({"forward_sync_buffers", "broadcast_buffers"} & set(seen)) == 1
