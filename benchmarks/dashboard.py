"""``distdrgn dashboard`` in headless Chromium: time to first render and lasso selection at 100k and 1M.

For each N a run directory is made (zdim 8 latents in 6 blobs, an untrained small decoder,
``analyze.1/umap.npy`` and ``kmeans20/labels.pkl`` so the page opens on UMAP coloured by
k-means, as after ``distdrgn analyze``). The dashboard serves it on a free port; Chromium
(headless, via selenium) opens the URL and the script measures:

- ``first_render_s``: from ``driver.get(url)`` until the page reports ``dashboard.ready``
  (page, script, metadata, three 4N-byte float32 columns fetched, colours computed, all N
  points drawn);
- ``lasso_s``: a 100-vertex lasso polygon through the page's own selection code, the count
  updated and the frame redrawn with the selection (``selectPolygon`` + ``renderNow``);
- ``render_s``: one redraw of all N points (what each pan or zoom step costs), mean of 10.

Target: first render and lasso <= 2 s each at 1M. Prints a table; writes benchmarks/dashboard.json.
    .venv/bin/python benchmarks/dashboard.py [--n 100000 1000000] [--json benchmarks/dashboard.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

TARGET_S = 2.0


def make_run(root: Path, n: int, zdim: int = 8, D: int = 16, seed: int = 0) -> Path:
    from distdrgn.checkpoint import save_weights, save_z
    from distdrgn.config import Config, dump_config
    from distdrgn.model import build_model
    from distdrgn.objective import Preprocess

    run = root / f"run_{n}"
    run.mkdir(parents=True)
    cfg = Config()
    cfg.model.zdim = zdim
    cfg.model.enc_dim = cfg.model.dec_dim = 16
    cfg.model.enc_layers = cfg.model.dec_layers = 2
    cfg.output.dir = str(run)
    (run / "config.yaml").write_text(dump_config(cfg))
    model = build_model(cfg.model, D, seed)
    payload = {"epoch": 1, "model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "scaler_state_dict": {},
               "model_info": dataclasses.asdict(model.info), "preprocess": dataclasses.asdict(Preprocess(D=D)),
               "config": cfg.to_dict(), "store": {"path": "none", "n": n, "D": D, "apix": 2.0}}
    save_weights(run / "weights.1.pkl", payload)
    rng = np.random.default_rng(seed)
    blob = rng.integers(0, 6, n)
    z = (rng.normal(size=(6, zdim))[blob] * 3 + rng.normal(size=(n, zdim))).astype(np.float32)
    save_z(run / "z.1.pkl", z, np.full_like(z, -2.0))
    ana = run / "analyze.1"
    (ana / "kmeans20").mkdir(parents=True)
    # a stand-in for UMAP (a real fit takes minutes at 1M): two PCs plus noise, same shape and dtype
    emb = (z[:, :2] + 0.3 * rng.normal(size=(n, 2))).astype(np.float32)
    np.save(ana / "umap.npy", emb)
    with open(ana / "kmeans20" / "labels.pkl", "wb") as f:
        pickle.dump((blob * 3 + rng.integers(0, 3, n)).astype(np.int64), f)
    return run


def lasso_polygon(x: np.ndarray, y: np.ndarray, vertices: int = 100) -> list[list[float]]:
    """A wobbly closed curve around the centre of the point cloud (about half of it inside)."""
    cx, cy = np.median(x), np.median(y)
    rx, ry = np.subtract(*np.percentile(x, [75, 25])), np.subtract(*np.percentile(y, [75, 25]))
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = 1.0 + 0.15 * np.sin(5 * t)
    return np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1).tolist()


def measure(n: int, root: Path) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from distdrgn.analysis.select import points_in_polygon
    from distdrgn.dashboard.data import load_run
    from distdrgn.dashboard.server import Dashboard, make_server, url_of

    run = make_run(root, n)
    t0 = time.perf_counter()
    data = load_run(run)
    load_s = time.perf_counter() - t0
    dash = Dashboard(data, root / f"out_{n}", device="cpu")
    server = make_server(dash, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        t0 = time.perf_counter()
        driver.get(url_of(server, dash))
        WebDriverWait(driver, 120, poll_frequency=0.02).until(lambda d: d.execute_script(
            "return window.dashboard && (window.dashboard.ready || window.dashboard.error)"))
        first = time.perf_counter() - t0
        err = driver.execute_script("return window.dashboard.error || null")
        if err:
            raise RuntimeError(err)
        x, y = data.columns["UMAP1"], data.columns["UMAP2"]
        poly = lasso_polygon(x, y)
        res = driver.execute_script("""
            const t = performance.now();
            const c = window.dashboard.selectPolygon(arguments[0]);
            window.dashboard.renderNow();
            const total = performance.now() - t;
            const text = document.getElementById('count').textContent.replace(/,/g, '');
            return [c, total, window.dashboard.timings.lastSelection, text];""", poly)
        count, lasso_ms, select_ms, shown = res
        expected = int(points_in_polygon(np.stack([x, y], 1), np.array(poly)).sum())
        render_ms = driver.execute_script("""
            const t = performance.now();
            for (let i = 0; i < 10; i++) window.dashboard.renderNow();
            return (performance.now() - t) / 10;""")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    return {"n": n, "load_run_s": round(load_s, 3), "first_render_s": round(first, 3),
            "lasso_s": round(lasso_ms / 1000, 3), "lasso_select_only_s": round(select_ms / 1000, 3),
            "render_s": round(render_ms / 1000, 4), "selected": int(count), "count_shown": int(shown),
            "selected_expected": expected, "count_correct": int(count) == expected == int(shown),
            "meets_target": first <= TARGET_S and lasso_ms / 1000 <= TARGET_S}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "dashboard.json")
    args = parser.parse_args(argv)
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("chromium / chromedriver not found: run tests/setup/browser.sh", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            rows.append(measure(n, Path(tmp)))
    import subprocess

    version = subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip()
    meta = {"cpu": cpu_model(), "cores": os.cpu_count(), "browser": version, "date": time.strftime("%Y-%m-%d"),
            "target_s": TARGET_S, "window": "1400x900 headless"}
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"| N | first render (s) | lasso + redraw (s) | lasso select only (s) | redraw (s) | selected | correct | <= {TARGET_S} s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['n']:,} | {r['first_render_s']:.2f} | {r['lasso_s']:.3f} | {r['lasso_select_only_s']:.3f} | "
              f"{r['render_s']:.3f} | {r['selected']:,} | {r['count_correct']} | {r['meets_target']} |")
    print(f"({meta['cpu']}, {meta['cores']} cores, {version}); written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
