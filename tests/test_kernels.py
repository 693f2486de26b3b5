"""Fused decoder kernels against the PyTorch reference path (forward and every gradient).

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports them); with one they run compiled on it.
"""

from __future__ import annotations

import pytest
import torch

from distdrgn.config import ModelConfig
from distdrgn.kernels import interpreting, resolve_kernels
from distdrgn.kernels.check import mse_and_grads, random_inputs
from distdrgn.kernels.check import relative_error as rel
from distdrgn.model import PositionalEncoding, build_model

pytest.importorskip("triton", reason="the fused kernels need triton (pip install -e .[test] installs it)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)


def make_case(D=16, zdim=4, pe_type="gaussian", dec_dim=64, dec_layers=3, B=3, seed=0, ctf=True, pe_dim=None):
    cfg = ModelConfig(zdim=zdim, enc_dim=32, enc_layers=2, dec_dim=dec_dim, dec_layers=dec_layers, pe_type=pe_type,
                      pe_dim=pe_dim)
    model = build_model(cfg, D, seed).to(DEVICE)
    return model, random_inputs(model, B, seed + 1, ctf=ctf)


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"pe_type": "geom_ft"},
        {"zdim": 0},
        {"ctf": False},
        # sizes that are not multiples of the tiles: H % BLOCK_N, G % BLOCK_G, P % BLOCK_M
        {"D": 20, "dec_dim": 80, "pe_dim": 5, "pe_type": "geom_lowf", "dec_layers": 2},
        {"dec_layers": 1, "B": 1},
    ],
    ids=["gaussian", "geom_ft", "zdim0", "no_ctf", "ragged", "one_layer"],
)
def test_fused_matches_reference_fp32(case):
    model, inputs = make_case(**case)
    ref_mse, ref_grads = mse_and_grads(model, inputs, "torch")
    mse, grads = mse_and_grads(model, inputs, "fused")
    torch.testing.assert_close(mse, ref_mse, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) < 2e-5, name


def test_fused_bf16_error_no_larger_than_reference_bf16():
    """With bf16 activations both paths round; the fused one must stay within the start-up
    check's bound (twice the reference's own bf16 error, at least 16 bf16 roundoffs)."""
    from distdrgn.kernels.check import low_precision_bound

    model, inputs = make_case(D=24, pe_type="geom_ft", zdim=8, dec_dim=160)
    exact_mse, exact = mse_and_grads(model, inputs, "torch")
    ref_mse, ref = mse_and_grads(model, inputs, "torch", torch.bfloat16)
    mse, fused = mse_and_grads(model, inputs, "fused", torch.bfloat16)
    assert rel(mse, exact_mse) < low_precision_bound(rel(ref_mse, exact_mse))
    for name in exact:
        assert rel(fused[name], exact[name]) < low_precision_bound(rel(ref[name], exact[name])), name


def test_fused_backend_sse_is_the_loss_of_the_predicted_slices():
    """The back end's per-image error equals slice_mse of decoder.slices (Hermitian fill, CTF)."""
    from distdrgn.objective import slice_mse

    model, inputs = make_case(D=18, zdim=2)
    model.kernels = "fused"
    with torch.no_grad():
        pred, _, _ = model.slices(inputs["rots"], inputs["y_enc"])
        fused, _, _ = model(inputs["rots"], inputs["y_enc"], sample=False, y=inputs["y"], ctf=inputs["ctf"])
    torch.testing.assert_close(fused, slice_mse(pred, inputs["y"], inputs["ctf"]), rtol=1e-5, atol=1e-7)


def test_residual_layer_matches_reference():
    from distdrgn.kernels.residual import residual_layer

    gen = torch.Generator().manual_seed(3)
    h = torch.relu(torch.randn(70, 48, generator=gen)).to(DEVICE).requires_grad_()
    w = (torch.randn(48, 48, generator=gen) / 7).to(DEVICE).requires_grad_()
    b = torch.randn(48, generator=gen).to(DEVICE).requires_grad_()
    up = torch.randn(70, 48, generator=gen).to(DEVICE)
    ref = torch.relu(h + torch.nn.functional.linear(h, w, b))
    ref_grads = torch.autograd.grad((ref * up).sum(), (h, w, b))
    out = residual_layer(h, w, b)
    grads = torch.autograd.grad((out * up).sum(), (h, w, b))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_frequency_matrix_reproduces_the_encoding():
    coords = torch.rand(2, 9, 3) - 0.5
    for pe_type in ("gaussian", "geom_ft", "linear_lowf"):
        pe = PositionalEncoding(pe_type, pe_dim=6, D=16, seed=2)
        phase = coords @ pe.frequency_matrix().T
        torch.testing.assert_close(pe(coords), torch.cat([phase.sin(), phase.cos()], -1), rtol=0, atol=1e-6)


def test_resolve_kernels(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernels("torch", cuda, "gaussian", "fourier")[0] == "torch"
    assert resolve_kernels("auto", cuda, "gaussian", "fourier")[0] == "fused"
    assert resolve_kernels("auto", cuda, "gaussian", "hartley") == ("torch", "auto: the fused decoder implements "
                                                                    "model.domain=fourier, not hartley")
    assert resolve_kernels("auto", cpu, "gaussian", "fourier")[0] == "torch"
    with pytest.raises(ValueError, match="sinusoidal"):
        resolve_kernels("fused", cuda, "none", "fourier")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA device"):
        resolve_kernels("fused", cpu, "gaussian", "fourier")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_kernels("fast", cpu, "gaussian", "fourier")
    assert resolve_kernels("compile", cpu, "gaussian", "hartley")[0] == "compile"  # any model, any device
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="model.kernels=compile: .*no C\\+\\+ compiler"):
        resolve_kernels("compile", cpu, "gaussian", "fourier")


def test_kernel_choices_are_the_configs():
    from distdrgn.config import load_config
    from distdrgn.errors import DistdrgnError
    from distdrgn.kernels import KERNEL_CHOICES

    assert "compile" in KERNEL_CHOICES
    for choice in KERNEL_CHOICES:
        assert load_config(None, [f"model.kernels={choice}"]).model.kernels == choice
    with pytest.raises(DistdrgnError, match="model.kernels must be one of auto, fused, compile, torch"):
        load_config(None, ["model.kernels=fast"])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU interpreter's own limitation")
def test_interpreter_bf16_dot_workaround_is_needed():
    """dot_dtype maps bf16 to fp32 under the interpreter because its bf16 tl.dot is wrong
    (triton #11584); if a Triton release fixes that, this fails and the workaround can go."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot16(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    a = torch.randint(-2, 3, (16, 16)).bfloat16()
    c = torch.zeros(16, 16)
    dot16[(1,)](a, a, c)
    assert not torch.equal(c, a.float() @ a.float())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU interpreter run; on a GPU the benchmarks train fused")
def test_training_with_fused_kernels_matches_the_reference(small_dataset, tiny_overrides, tmp_path):
    """One epoch of `distdrgn train` with model.kernels=fused (interpreted) follows the reference run."""
    import csv

    from distdrgn.config import load_config
    from distdrgn.train import train

    losses = {}
    for kernels in ("torch", "fused"):
        out = tmp_path / kernels
        train(load_config(None, tiny_overrides(small_dataset["store"], out, **{"train.epochs": 1,
                                                                              "model.kernels": kernels})))
        assert f"decoder kernels: {kernels}" in (out / "run.log").read_text()
        with open(out / "loss.csv", newline="") as fh:
            losses[kernels] = float(next(csv.DictReader(fh))["loss"])
    assert losses["fused"] == pytest.approx(losses["torch"], rel=1e-4)


def test_startup_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    from distdrgn.kernels import backend
    from distdrgn.kernels.check import check_fused

    model, _ = make_case(D=16, zdim=3)
    assert check_fused(model, None) is None
    assert check_fused(model, torch.bfloat16) is None
    assert model.kernels == "torch" and all(p.grad is None for p in model.parameters())

    def off_by_one_percent(*args):
        return backend.FusedBackEnd.apply(*args) * 1.01

    monkeypatch.setattr(backend, "backend_sse", off_by_one_percent)
    assert "float32 MSE differs" in check_fused(model, None)

    def broken(*args):
        raise RuntimeError("PTX compile failed\nmore lines")

    monkeypatch.setattr(backend, "backend_sse", broken)
    assert check_fused(model, None) == "RuntimeError: PTX compile failed"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (a planted kernel bug)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def test_startup_check_catches_a_wrong_gradient(monkeypatch):
    """A fused backward whose weight gradient is 1% off (forward exact) fails the float32 check,
    naming the parameter; one 50% off in bf16 only fails the bf16 check."""
    from distdrgn.kernels import residual
    from distdrgn.kernels.check import check_fused

    model, _ = make_case(D=16, zdim=3)
    real = residual.residual_layer

    def one_percent_off(h, w, b):
        return real(h, _ScaleGrad.apply(w, 1.01) if w is model.decoder.mlp.hidden[1].weight else w, b)

    monkeypatch.setattr(residual, "residual_layer", one_percent_off)
    problem = check_fused(model, None)
    assert problem.startswith("float32 gradient of decoder.mlp.hidden.1.weight differs"), problem

    def off_in_bf16(h, w, b):
        return real(h, _ScaleGrad.apply(w, 1.5) if h.dtype == torch.bfloat16 else w, b)

    monkeypatch.setattr(residual, "residual_layer", off_in_bf16)
    assert check_fused(model, None) is None  # float32 is right
    problem = check_fused(model, torch.bfloat16)
    assert problem.startswith("bfloat16 gradient of decoder.mlp.hidden.0.weight differs"), problem


def test_low_precision_bound():
    from distdrgn.kernels.check import BF16_FLOOR, low_precision_bound

    assert BF16_FLOOR == pytest.approx(16 / 256)
    assert low_precision_bound(0.0) == BF16_FLOOR and low_precision_bound(0.1) == pytest.approx(0.2)


def test_training_falls_back_from_auto_and_stops_on_fused_when_the_check_fails(monkeypatch):
    import distdrgn.kernels as kernels_module
    import distdrgn.kernels.check as check_module
    from distdrgn.errors import DistdrgnError

    model, _ = make_case()
    monkeypatch.setattr(kernels_module, "resolve_kernels", lambda choice, *a: ("fused", f"{choice}: as if on a GPU"))
    monkeypatch.setattr(check_module, "check_fused", lambda model, amp: "RuntimeError: PTX compile failed")
    kernels, why, warning = kernels_module.choose_kernels(model, "auto", DEVICE, None)
    assert (kernels, why) == ("torch", "auto: fused kernels failed their start-up check: RuntimeError: PTX compile failed")
    assert "training with the PyTorch path" in warning
    with pytest.raises(DistdrgnError, match="failed its start-up check .*PTX compile failed"):
        kernels_module.choose_kernels(model, "fused", DEVICE, None)
    monkeypatch.setattr(check_module, "check_fused", lambda model, amp: None)
    assert kernels_module.choose_kernels(model, "auto", DEVICE, None) == ("fused", "auto: as if on a GPU", None)


def test_every_kernel_compiles_for_hopper_without_spills(tmp_path):
    """Compiled for sm_90 with the bundled CUDA tools (no GPU needed): what the interpreter
    cannot check. bf16 kernels must not spill registers (the 32-byte stack is libdevice's sin/cos
    range reduction) and the front end's products must run on the tensor cores."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "aot.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "distdrgn.kernels.aot", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["kernel"], r["act"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 12
    for (kernel, act), r in rows.items():
        if act == "bf16":
            assert r["local_bytes"] == 0 and r["stack_bytes"] <= 32, (kernel, r)
    for kernel in ("frontend_fwd", "frontend_bwd"):
        assert rows[(kernel, "bf16")]["hgmma"] + rows[(kernel, "bf16")]["hmma"] > 0, kernel
