"""report.html is readable at a normal window width: checked in headless Chromium.

Each summary label sits on the same line as its value, and the wide figures (loss curves, the
strip of 10 traversal volumes, ~1,400-1,500 px) are shown at >= 1000 px in a 1500 px window
instead of being squeezed into thumbnails. The screenshot is kept in the test's tmp folder.
"""

from __future__ import annotations

import numpy as np
import pytest

from distdrgn.analysis import plots
from distdrgn.analysis.report import Figure, Section, Table, png_width, write_report
from test_dashboard import chrome_driver


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report with the figures analyze makes: 3 loss panels, 10 traversal volumes, a scatter."""
    out = tmp_path_factory.mktemp("report")
    csv = out / "loss.csv"
    csv.write_text("epoch,loss,mse,kl,beta,images,seconds,images_per_second\n"
                   + "".join(f"{e},{1 / e},{0.9 / e},{0.1 * e},0.3,100,1,100\n" for e in range(1, 6)))
    loss = plots.plot_loss(csv, out / "loss.png")
    rng = np.random.default_rng(0)
    strip = plots.plot_projections([rng.normal(size=(32, 32)) for _ in range(10)],
                                   [f"vol_{i:03d}" for i in range(10)], out / "projections.png")
    xy = rng.normal(size=(500, 2))
    scatter = plots.plot_clusters(xy, rng.integers(0, 4, 500), out / "kmeans.png", "PC1", "PC2", "k-means")
    summary = {"run directory": "/a/rather/long/path/to/a/training/run/directory/that/wraps/on/small/windows/run",
               "latents": "z.pkl", "epoch": "20", "particles": 4000, "zdim": 8, "k-means clusters": 20,
               "voxel size (A)": "3.5", "output directory": "/another/long/path/analyze.20", "analysis time (s)": "12.3"}
    sections = [Section("Training", figures=[Figure(loss, "Loss curves.")]),
                Section("Latent space", figures=[Figure(scatter, "k-means."), Figure(scatter, "again.")]),
                Section("PC1 traversal", figures=[Figure(strip, "Projections.")],
                        tables=[Table(["point", "z"], [[i, f"{i:.3f}"] for i in range(10)])])]
    path = write_report(out / "report.html", "distdrgn analyze: run (epoch 20)", summary, sections)
    return {"path": path, "summary": summary, "widths": {p.name: png_width(p.read_bytes()) for p in (loss, strip, scatter)}}


def test_wide_figures_are_wider_than_1000_px(report):
    # the premise of the layout test: analyze's loss and traversal figures are that wide
    assert report["widths"]["loss.png"] >= 1000 and report["widths"]["projections.png"] >= 1000
    assert report["widths"]["kmeans.png"] < 1000


def test_report_layout_in_headless_chromium(report, tmp_path):
    from selenium.webdriver.common.by import By

    driver = chrome_driver(1500, 1000)
    try:
        driver.get(report["path"].as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "table.summary tr")
        assert [r.find_element(By.TAG_NAME, "th").text for r in rows] == list(report["summary"])
        for row, value in zip(rows, report["summary"].values()):
            label, cell = row.find_element(By.TAG_NAME, "th"), row.find_element(By.TAG_NAME, "td")
            assert cell.text == str(value)
            # the value starts on the label's line, to its right
            assert abs(label.rect["y"] - cell.rect["y"]) <= 2, (label.text, label.rect, cell.rect)
            assert cell.rect["x"] >= label.rect["x"] + label.rect["width"]
        rendered = {img.get_attribute("data-file"): img.rect["width"] for img in driver.find_elements(By.TAG_NAME, "img")}
        for name in ("loss.png", "projections.png"):
            assert rendered[name] >= 1000, (name, rendered[name])
            assert rendered[name] <= report["widths"][name] + 2  # its own size (+ the 1 px border): never scaled up
        assert rendered["kmeans.png"] == pytest.approx(report["widths"]["kmeans.png"] + 2, abs=1)
        # at a narrower window the page still fits: no figure wider than the body
        driver.set_window_size(1100, 900)
        body = driver.find_element(By.TAG_NAME, "body").rect["width"]
        assert all(img.rect["width"] <= body + 1 for img in driver.find_elements(By.TAG_NAME, "img"))
        driver.set_window_size(1500, 1000)
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
