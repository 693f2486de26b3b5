"""The embedded default job behind ``make demo``: simulate -> ingest -> train (2 processes) -> analyze.

Everything runs on the CPU in a few minutes: a small heterogeneous dataset from
``distdrgn simulate``, a Zarr store from ``distdrgn ingest``, training under
``torchrun --nproc_per_node 2`` with ``configs/tiny.yaml``, then ``distdrgn analyze``.
Each step is the command a user would type, so the demo doubles as a walkthrough.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    ap.add_argument("--n", type=int, default=4000, help="particles to simulate")
    ap.add_argument("-D", type=int, default=32, help="box size")
    ap.add_argument("--snr", type=float, default=0.3, help="signal-to-noise ratio")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    args = ap.parse_args(argv)

    out = args.out.resolve()
    data, store, run = out / "data", out / "particles.zarr", out / "train"
    py = sys.executable
    t0 = time.time()
    _run([py, "-m", "distdrgn.cli", "simulate", str(data), "--n", str(args.n), "-D", str(args.D),
          "--snr", str(args.snr), "--seed", "0", "--force"])
    _run([py, "-m", "distdrgn.cli", "ingest", str(data / "particles.star"), "-o", str(store), "--force"])
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
          "-m", "distdrgn.train", str(args.config), f"data.store={store}", f"output.dir={run}",
          f"train.epochs={args.epochs}", "train.analyze=false"])
    _run([py, "-m", "distdrgn.cli", "analyze", str(run), "-o", str(out / "analyze")])
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  dataset + ground truth: {data}")
    print(f"  particle store:         {store}")
    print(f"  training run:           {run}  (z.pkl, weights.pkl, run.log, loss.png)")
    print(f"  report:                 {out / 'analyze' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
