"""Compile every fused kernel for a GPU architecture without a GPU, and read its resources.

Triton's wheel carries the CUDA back end (LLVM, ptxas, cuobjdump, nvdisasm), so a kernel can
be compiled to a Hopper (sm_90) cubin on any machine. That catches what the CPU interpreter
cannot: code that the GPU compiler rejects, register spills, and products that do not reach
the tensor cores. The kernels are compiled with the same block sizes, warps and stages as at
run time, with the 16-byte alignment Triton assumes for torch's allocations.

    TRITON_INTERPRET=0 python -m distdrgn.kernels.aot [--arch 90] [--json out.json]

Prints a table: kernel, activation dtype, registers per thread, local memory (spills),
shared memory, tensor-core instructions (HGMMA = Hopper warp-group MMA, HMMA = older MMA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from distdrgn.kernels import backend, frontend, residual
from distdrgn.kernels._common import BACKEND_BLOCK_N, BLOCK_G, BLOCK_M, BLOCK_N, LAUNCH

ACT_TYPES = {"bf16": ("*bf16", tl.bfloat16, False), "fp32": ("*fp32", tl.float32, True)}


@dataclass
class KernelResources:
    kernel: str
    act: str
    num_warps: int
    registers: int
    local_bytes: int  # per thread; > 0 means spills (or a stack-allocated array)
    stack_bytes: int
    shared_bytes: int
    hgmma: int  # Hopper warp-group tensor-core instructions in the SASS
    hmma: int  # pre-Hopper tensor-core instructions


def kernel_specs(act: str) -> list[tuple[str, object, dict, dict]]:
    """(name, jit function, signature, constexprs) of every kernel for activations ``act``."""
    A, dot, ieee = ACT_TYPES[act]
    f32, i32 = "*fp32", "i32"
    mm = {"DOT": dot, "IEEE": ieee, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_G": BLOCK_G}
    return [
        ("frontend_fwd", frontend._frontend_fwd,
         {"lat_ptr": f32, "rot_ptr": f32, "freq_ptr": f32, "w_ptr": A, "zb_ptr": f32, "out_ptr": A, "P": i32,
          "H": i32, "G": i32, "tiles_per_img": i32}, mm),
        ("frontend_bwd", frontend._frontend_bwd,
         {"lat_ptr": f32, "rot_ptr": f32, "freq_ptr": f32, "h_ptr": A, "gh_ptr": A, "dw_ptr": f32, "dzb_ptr": f32,
          "B": i32, "P": i32, "H": i32, "G": i32, "tiles_per_img": i32, "imgs_per_prog": i32}, mm),
        ("bias_relu", residual._bias_relu_,
         {"x_ptr": A, "bias_ptr": f32, "M": i32, "H": i32}, {"BLOCK_R": residual.BLOCK_ROWS, "BLOCK_N": BLOCK_N}),
        ("relu_grad_colsum", residual._relu_grad_colsum,
         {"go_ptr": A, "out_ptr": A, "g_ptr": A, "db_ptr": f32, "M": i32, "H": i32, "rows_per_prog": i32},
         {"BLOCK_R": residual.BLOCK_ROWS, "BLOCK_N": BLOCK_N}),
        ("backend_fwd", backend._backend_fwd,
         {"h_ptr": A, "w_ptr": f32, "bias_ptr": f32, "lat_ptr": f32, "rot_ptr": f32, "y_ptr": f32, "ctf_ptr": f32,
          "o_ptr": f32, "sse_ptr": f32, "P": i32, "H": i32, "tiles_per_img": i32},
         {"HAS_CTF": True, "BLOCK_M": BLOCK_M, "BLOCK_N": BACKEND_BLOCK_N}),
        ("backend_bwd", backend._backend_bwd,
         {"h_ptr": A, "w_ptr": f32, "bias_ptr": f32, "lat_ptr": f32, "rot_ptr": f32, "y_ptr": f32, "ctf_ptr": f32,
          "o_ptr": f32, "gsse_ptr": f32, "gh_ptr": A, "dw_ptr": f32, "dbias_ptr": f32, "B": i32, "P": i32, "H": i32,
          "tiles_per_img": i32, "imgs_per_prog": i32},
         {"HAS_CTF": True, "BLOCK_M": BLOCK_M, "BLOCK_N": BACKEND_BLOCK_N}),
    ]


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resources(cubin: bytes) -> tuple[dict, str]:
    """(cuobjdump's resource usage of the one function, the SASS from nvdisasm)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return fields, sass


def compile_kernel(name: str, fn, signature: dict, constexprs: dict, act: str, arch: int) -> KernelResources:
    # Triton specialises at launch on 16-byte aligned pointers (torch allocations are); say so
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(LAUNCH[name]))
    fields, sass = _resources(compiled.asm["cubin"])
    return KernelResources(name, act, LAUNCH[name]["num_warps"], int(fields["REG"]), int(fields["LOCAL"]), int(fields.get("STACK", 0)),
                           int(compiled.metadata.shared), sass.count("HGMMA"), sass.count("HMMA"))


def compile_all(arch: int = 90) -> list[KernelResources]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    return [compile_kernel(name, fn, sig, consts, act, arch)
            for act in ACT_TYPES for name, fn, sig, consts in kernel_specs(act)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90 = H100/H200)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = compile_all(args.arch)
    print(f"# fused kernels compiled for sm_{args.arch} (triton {triton.__version__}; tiles {BLOCK_M} points x "
          f"{BLOCK_N} units ({BACKEND_BLOCK_N} in the back end), {BLOCK_G} frequencies)")
    print("| kernel | activations | warps | registers/thread | local (spill) B | stack B | shared B | HGMMA | HMMA |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.kernel} | {r.act} | {r.num_warps} | {r.registers} | {r.local_bytes} | {r.stack_bytes} | {r.shared_bytes} | "
              f"{r.hgmma} | {r.hmma} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"arch": args.arch, "triton": triton.__version__, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
