"""``distdrgn dashboard``: the HTTP API (no browser) and the page in headless Chromium.

One tiny run is trained on a store ingested from the simulated ``particles.star`` (so .star
export has original rows to write back); the dashboard serves it on a free port in a thread.
The browser tests skip, with the reason, when chromium / chromedriver / selenium is absent
(``tests/setup/browser.sh`` installs them).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import threading
import urllib.error
import urllib.request
import zipfile

import mrcfile
import numpy as np
import pytest
import starfile

from distdrgn.analysis.analyze import analyze
from distdrgn.analysis.select import points_in_polygon
from distdrgn.dashboard.data import load_run
from distdrgn.dashboard.server import Dashboard, make_server, url_of, volume_views


def make_run(run_dir, store, n: int, D: int, zdim: int = 2, seed: int = 0):
    """A run directory as training writes it (config.yaml naming ``store``, weights.pkl, z.pkl)
    from an untrained model: the dashboard only needs the files, not a good model."""
    import dataclasses

    from distdrgn.checkpoint import save_weights, save_z
    from distdrgn.config import Config, dump_config
    from distdrgn.model import build_model
    from distdrgn.objective import Preprocess

    run_dir.mkdir(parents=True)
    cfg = Config()
    cfg.model.zdim = zdim
    cfg.model.enc_dim = cfg.model.dec_dim = 16
    cfg.model.enc_layers = cfg.model.dec_layers = 2
    cfg.data.store = str(store)
    cfg.output.dir = str(run_dir)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model = build_model(cfg.model, D, seed)
    payload = {"epoch": 1, "model_state_dict": model.state_dict(), "optimizer_state_dict": {},
               "scaler_state_dict": {}, "model_info": dataclasses.asdict(model.info),
               "preprocess": dataclasses.asdict(Preprocess(D=D)), "config": cfg.to_dict(),
               "store": {"path": str(store), "n": n, "D": D, "apix": 2.0}}
    save_weights(run_dir / "weights.1.pkl", payload)
    save_weights(run_dir / "weights.pkl", payload)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, zdim)) * 3
    z = (centres[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, zdim))).astype(np.float32)
    save_z(run_dir / "z.1.pkl", z, np.full_like(z, -2.0))
    save_z(run_dir / "z.pkl", z, np.full_like(z, -2.0))
    return run_dir


@pytest.fixture(scope="module")
def star_run(small_dataset, tmp_path_factory):
    """A zdim-2 run over a store ingested from particles.star, with analyze's k-means (K=4)."""
    from distdrgn.store import ingest
    from distdrgn.store.reader import ParticleStore

    root = tmp_path_factory.mktemp("dash")
    store = ingest(small_dataset["particles.star"], root / "store.zarr", progress=False)
    st = ParticleStore.open(store)
    run = make_run(root / "run", store, st.n, st.D)
    analyze(run, ksample=4, n_pcs=1, umap=False, volumes=False)
    return {"run": run, "store": store, "star": small_dataset["particles.star"]}


@pytest.fixture(scope="module")
def served(star_run, tmp_path_factory):
    """(dashboard, base URL with token) of a server running in a thread."""
    data = load_run(star_run["run"])
    dash = Dashboard(data, tmp_path_factory.mktemp("dash_out") / "selections", device="cpu")
    server = make_server(dash, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield dash, url_of(server, dash)
    server.shutdown()
    server.server_close()


def _base(url: str) -> str:
    return url.split("?")[0]


def _get(url: str, token: str | None = None, data: bytes | None = None, ctype: str | None = None):
    req = urllib.request.Request(url, data=data)
    if token is not None:
        req.add_header("X-Token", token)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:  # say what the server answered
        exc.msg = f"{exc.msg}: {exc.read().decode(errors='replace')}"
        raise


def _status(url: str, **kw) -> int:
    try:
        return _get(url, **kw)[0]
    except urllib.error.HTTPError as exc:
        return exc.code


# ---- HTTP API --------------------------------------------------------------------------


def test_requests_without_the_token_are_refused(served):
    dash, url = served
    base = _base(url)
    assert _status(base + "api/meta") == 403
    assert _status(base + "api/meta", token="wrong") == 403
    assert _status(base) == 403
    assert _status(base + "static/app.js") == 403
    assert _status(base + "api/meta?token=" + dash.token) == 200
    status, _, body = _get(base + "api/meta", token=dash.token)
    meta = json.loads(body)
    assert meta["n"] == dash.run.n == 192
    names = [c["name"] for c in meta["columns"]]
    # latents, PCA, k-means from analyze, CTF and poses from the store, star columns
    for name in ("z1", "z2", "PC1", "|z|", "k-means (4)", "defocus (A)", "tilt (deg)", "rlnDefocusU"):
        assert name in names, name
    assert "star" in meta["exports"] and len(meta["centers"]) == 4


def test_page_is_served_with_no_external_reference(served):
    dash, url = served
    _, headers, page = _get(url)
    assert "distdrgn_token=" in headers["Set-Cookie"]
    text = page.decode()
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    _, _, js = _get(_base(url) + "static/app.js", token=dash.token)
    assert b"https://" not in js and b"http://" not in js


def test_columns_are_float32_rows_of_z(served):
    dash, url = served
    _, _, body = _get(_base(url) + "api/column?name=z2", token=dash.token)
    np.testing.assert_array_equal(np.frombuffer(body, dtype="<f4"), dash.run.z[:, 1])
    assert _status(_base(url) + "api/column?name=nope", token=dash.token) == 404


def test_selection_is_saved_as_ind_pkl_and_star_with_every_column(served, star_run):
    dash, url = served
    rows = np.array([0, 5, 17, 100, 191])
    mask = np.zeros(dash.run.n, dtype=np.uint8)
    mask[rows] = 1
    base = _base(url)
    _, _, body = _get(base + "api/selection?format=pkl&name=sel", token=dash.token, data=mask.tobytes(),
                      ctype="application/octet-stream")
    res = json.loads(body)
    assert res["count"] == 5 and res["files"] == ["sel.pkl"]
    with open(dash.out_dir / "sel.pkl", "rb") as f:
        ind = pickle.load(f)
    assert ind.dtype == np.int64
    np.testing.assert_array_equal(ind, dash.run.positions[rows])
    # the same name again is refused: a saved file is never replaced
    assert _status(base + "api/selection?format=pkl&name=sel", token=dash.token, data=mask.tobytes()) == 409
    _, _, body = _get(base + "api/selection?format=star&name=sel", token=dash.token, data=mask.tobytes())
    assert json.loads(body)["files"] == ["sel.star"]
    original = starfile.read(star_run["star"], always_dict=True)
    exported = starfile.read(dash.out_dir / "sel.star", always_dict=True)
    table = next(v for k, v in original.items() if k != "optics")
    got = next(v for k, v in exported.items() if k != "optics")
    assert list(got.columns) == list(table.columns)
    np.testing.assert_array_equal(got["rlnImageName"].to_numpy(),
                                  table["rlnImageName"].to_numpy()[_original_index(dash)[ind]])
    # bad requests: mask of the wrong length, empty selection, bad name or format
    assert _status(base + "api/selection?format=pkl&name=x", token=dash.token, data=b"\x01" * 3) == 400
    assert _status(base + "api/selection?format=pkl&name=x", token=dash.token, data=bytes(dash.run.n)) == 400
    assert _status(base + "api/selection?format=pkl&name=../x", token=dash.token, data=mask.tobytes()) == 400
    assert _status(base + "api/selection?format=mrc&name=x", token=dash.token, data=mask.tobytes()) == 400


def test_volume_at_a_row_matches_eval_volume(served, tmp_path):
    from distdrgn import volumes

    dash, url = served
    base = _base(url)
    _, headers, body = _get(base + "api/volume?row=7", token=dash.token)
    D = int(headers["X-D"])
    views = np.frombuffer(body, dtype="<f4").reshape(4, D, D)
    trained = volumes.load_model(dash.run.run_dir, device="cpu")
    vol = volumes.eval_volume(trained, dash.run.z[7])
    np.testing.assert_allclose(views, volume_views(vol), rtol=1e-5, atol=1e-6)
    _, _, mrc = _get(base + "api/volume.mrc?row=7", token=dash.token)
    path = tmp_path / "vol.mrc"
    path.write_bytes(mrc)
    with mrcfile.open(path, permissive=True) as m:
        np.testing.assert_allclose(np.asarray(m.data), vol, rtol=1e-5, atol=1e-6)
    _, headers, img = _get(base + "api/image?row=7", token=dash.token)
    assert np.frombuffer(img, dtype="<f4").size == int(headers["X-D"]) ** 2
    assert _status(base + "api/volume?row=192", token=dash.token) == 400
    assert _status(base + "api/volume?row=x", token=dash.token) == 400


def test_trajectory_follows_the_graph_between_anchors(served):
    dash, url = served
    z = dash.run.z
    # the 4 latent clusters are apart: anchors at both ends of the k-means cluster of particle 0
    a = 0
    labels = dash.run.columns["k-means (4)"]
    same = labels == labels[a]
    b = int(np.argmax(np.where(same, np.linalg.norm(z - z[a], axis=1), -1)))
    base = _base(url)
    # every kNN edge kept (avg_neighbors = max_neighbors): 48 particles per cluster stay connected
    body = json.dumps({"anchors": [a, b], "points": 4, "max_neighbors": 10, "avg_neighbors": 10}).encode()
    _, _, res = _get(base + "api/trajectory", token=dash.token, data=body, ctype="application/json")
    res = json.loads(res)
    assert res["path"][0] == a and res["path"][-1] == b
    assert res["rows"][0] == a and res["rows"][-1] == b and len(res["rows"]) == min(4, len(res["path"]))
    _, _, zdata = _get(base + f"api/trajectory.zip?id={res['id']}", token=dash.token)
    names = zipfile.ZipFile(io.BytesIO(zdata)).namelist()
    assert [n for n in names if n.endswith(".mrc")] == [f"vol_{i:03d}.mrc" for i in range(len(res["rows"]))]
    bad = json.dumps({"anchors": [a], "points": 4}).encode()
    assert _status(base + "api/trajectory", token=dash.token, data=bad) == 400


def test_cli_refuses_a_missing_run(tmp_path, capsys):
    from distdrgn import cli

    assert cli.main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


# ---- headless Chromium -----------------------------------------------------------------


def chrome_driver(width: int = 1400, height: int = 900):
    """A headless Chromium WebDriver, or pytest.skip saying what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_bin = shutil.which("chromedriver")
    if browser is None or driver_bin is None:
        pytest.skip("chromium / chromedriver not found (run tests/setup/browser.sh)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_bin), options=opts)


def wait_for(driver, script: str, timeout: float = 30.0):
    """Poll a JS expression until it is truthy (page-side state, not a fixed sleep)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script("return " + script))


NONWHITE_JS = """
const c = document.getElementById(arguments[0]);
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i+1] < 250 || d[i+2] < 250) n++;
return n;"""


def test_dashboard_in_headless_chromium(served, star_run, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    dash, url = served
    driver = chrome_driver()
    try:
        driver.get(url)
        wait_for(driver, "window.dashboard && (window.dashboard.ready || window.dashboard.error)")
        assert driver.execute_script("return window.dashboard.error || null") is None
        # the scatter is drawn: points in the plot area are not background
        assert driver.execute_script(NONWHITE_JS, "plot") >= 50

        # box selection by dragging with the mouse
        driver.find_element(By.CSS_SELECTOR, 'input[name="tool"][value="box"]').click()
        overlay = driver.find_element(By.ID, "overlay")
        rect = overlay.rect
        x0, y0 = int(rect["width"] * 0.2), int(rect["height"] * 0.2)
        x1, y1 = int(rect["width"] * 0.7), int(rect["height"] * 0.8)
        (ActionChains(driver).move_to_element_with_offset(overlay, x0 - rect["width"] // 2, y0 - rect["height"] // 2)
         .click_and_hold().move_by_offset((x1 - x0) // 2, (y1 - y0) // 2).move_by_offset((x1 - x0) - (x1 - x0) // 2,
         (y1 - y0) - (y1 - y0) // 2).release().perform())
        count = int(wait_for(driver, "window.dashboard.count()"))
        corners = driver.execute_script("return [window.dashboard.toData(arguments[0], arguments[1]),"
                                        " window.dashboard.toData(arguments[2], arguments[3])]", x0, y0, x1, y1)
        meta = json.loads(_get(_base(url) + "api/meta", token=dash.token)[2])
        xs, ys = dash.run.columns[meta["x"]], dash.run.columns[meta["y"]]
        (ax, ay), (bx, by) = corners
        inside = (xs >= min(ax, bx)) & (xs <= max(ax, bx)) & (ys >= min(ay, by)) & (ys <= max(ay, by))
        # the mouse lands on whole pixels: allow the points on the box edge to differ
        assert abs(count - int(inside.sum())) <= 2 and 0 < count < dash.run.n
        assert driver.find_element(By.ID, "count").text.replace(",", "") == str(count)

        # a lasso through the page's API: exactly the points matplotlib puts inside the polygon
        (xa, xb), (ya, yb) = np.percentile(xs, [10, 90]), np.percentile(ys, [10, 90])
        poly = [[float(xa), float(ya)], [float(xb), float(ya)], [float((xa + xb) / 2), float(yb)]]
        n_lasso = driver.execute_script("return window.dashboard.selectPolygon(arguments[0])", poly)
        rows = driver.execute_script("return window.dashboard.selectedRows()")
        expected = np.flatnonzero(points_in_polygon(np.stack([xs, ys], 1), np.array(poly)))
        assert n_lasso == len(expected) > 0
        np.testing.assert_array_equal(rows, expected)

        # layers: keep, invert, intersect with the layer -> empty; union -> all
        driver.execute_script("window.dashboard.keepLayer('lasso')")
        assert driver.execute_script("return window.dashboard.invert()") == dash.run.n - len(expected)
        assert driver.execute_script("return window.dashboard.layerOp('lasso', 'and')") == 0
        driver.execute_script("window.dashboard.invert()")
        assert driver.execute_script("return window.dashboard.layerOp('lasso', 'and')") == len(expected)

        # export through the page: name, format, save button -> a .star with those particles
        name = driver.find_element(By.ID, "savename")
        name.clear()
        name.send_keys("lasso_sel")
        Select(driver.find_element(By.ID, "savefmt")).select_by_value("star")
        driver.find_element(By.ID, "save").click()
        wait_for(driver, "document.getElementById('saved').textContent.includes('saved')")
        assert driver.find_element(By.LINK_TEXT, "lasso_sel.star")
        got = starfile.read(dash.out_dir / "lasso_sel.star", always_dict=True)
        table = next(v for k, v in got.items() if k != "optics")
        src = starfile.read(star_run["star"], always_dict=True)
        src_table = next(v for k, v in src.items() if k != "optics")
        source_rows = _original_index(dash)[dash.run.positions[expected]]
        np.testing.assert_array_equal(table["rlnImageName"].to_numpy(), src_table["rlnImageName"].to_numpy()[source_rows])

        # click a k-means centre with the pick tool: its volume and image are drawn
        driver.find_element(By.CSS_SELECTOR, 'input[name="tool"][value="pick"]').click()
        centre = int(dash.run.centers_ind[0])
        sx, sy = driver.execute_script("return window.dashboard.toScreen(arguments[0], arguments[1])",
                                       float(xs[centre]), float(ys[centre]))
        (ActionChains(driver).move_to_element_with_offset(overlay, int(sx - rect["width"] / 2),
                                                          int(sy - rect["height"] / 2)).click().perform())
        wait_for(driver, "document.getElementById('status').textContent.startsWith('volume in')", timeout=60)
        assert driver.find_element(By.ID, "pickinfo").text == f"row {centre}"
        assert driver.execute_script(NONWHITE_JS, "vp") > 0
        assert "vol_row" in driver.find_element(By.ID, "mrclink").text
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


def _original_index(dash) -> np.ndarray:
    from distdrgn.store.reader import ParticleStore

    return ParticleStore.open(dash.run.store).original_index
