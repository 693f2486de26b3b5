"""Static resources of the fused kernels compiled for a GPU, on any machine (no GPU needed).

Compiles every kernel of ``distdrgn/kernels`` for ``--arch`` (90 = H100/H200) with Triton's
bundled CUDA tools and reads registers, spills, shared memory and tensor-core instructions
from the cubin (``distdrgn.kernels.aot``). Not a speed measurement: it shows that the kernels
compile for the GPU, where they would spill, and whether the products reach the tensor cores.

    python benchmarks/kernel_resources.py [--arch 90] [--json benchmarks/kernel_resources.json]
    distdrgn bench kernels [same options]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# before Triton is imported: interpreted kernels cannot be compiled
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from distdrgn.kernels.aot import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv:
        argv += ["--json", str(REPO / "benchmarks" / "kernel_resources.json")]
    sys.exit(main(argv))
