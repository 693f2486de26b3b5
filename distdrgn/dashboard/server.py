"""The dashboard's HTTP server (stdlib ``ThreadingHTTPServer``): token check, JSON and binary API.

Every request must carry the session token (``?token=``, an ``X-Token`` header, or the cookie
set when the page is first opened with it); others get 403. Nothing is fetched from the
network: the page, script and style are files of this package. Arrays travel as
little-endian float32 (``application/octet-stream``) so a 1M-point column is 4 MB and is read
by the page with one ``Float32Array`` view.

API (all under the token):

- ``GET  /api/meta``                      variables, defaults, k-means centres, what is available
- ``GET  /api/column?name=NAME``           (N,) float32
- ``POST /api/selection?format=F&name=S``  body: N bytes, 1 = selected. F = pkl (ind.pkl of store
  positions), star or cs (the original rows, every column, through :func:`distdrgn.store.export.export`)
- ``GET  /api/volume?row=I``               4 x D x D float32: central slices (z, y, x) and the projection
- ``GET  /api/volume.mrc?row=I``           the volume at z[I] as .mrc
- ``GET  /api/image?row=I``                D x D float32: the particle image from the store
- ``POST /api/trajectory``                 JSON {"anchors": [rows], "points": n, "max_neighbors",
  "avg_neighbors"}: graph traversal
- ``GET  /api/trajectory.zip?id=T``        the trajectory's volumes (.mrc) and path
- ``GET  /api/file?name=F``                a file this session wrote, or a landscape PNG
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import secrets
import threading
import zipfile
from collections import OrderedDict
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from distdrgn.dashboard.data import RunData
from distdrgn.errors import DistdrgnError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
EXPORT_FORMATS = {"pkl": ".pkl", "star": ".star", "cs": ".cs"}
MAX_TRAJECTORY_VOLUMES = 50


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class VolumeCache:
    """Volumes at z rows, evaluated on demand by the run's decoder and kept (LRU, by bytes)."""

    def __init__(self, run: RunData, device: str | None, max_bytes: int = 1 << 30):
        self.run = run
        self.device = device
        self.max_bytes = max_bytes
        self._trained = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # one decoder evaluation at a time; the cache is shared

    @property
    def trained(self):
        if self._trained is None:
            import torch

            from distdrgn import volumes

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._trained = volumes.load_model(self.run.run_dir, epoch=self.run.epoch, device=device)
        return self._trained

    @property
    def apix(self) -> float:
        return float(self.trained.apix or 1.0)

    def volume(self, row: int) -> np.ndarray:
        """(D, D, D) float32 volume at z[row]."""
        with self._lock:
            if row in self._cache:
                self._cache.move_to_end(row)
                return self._cache[row]
            from distdrgn import volumes

            vol = volumes.eval_volume(self.trained, self.run.z[row])
            self._cache[row] = vol
            while sum(v.nbytes for v in self._cache.values()) > self.max_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
            return vol


def volume_views(vol: np.ndarray) -> np.ndarray:
    """(4, D, D) float32: the central z, y and x slices of ``vol`` [z, y, x] and its projection along z."""
    c = vol.shape[0] // 2
    return np.stack([vol[c], vol[:, c, :], vol[:, :, c], vol.sum(axis=0)]).astype(np.float32)


def mrc_bytes(vol: np.ndarray, apix: float) -> bytes:
    """The .mrc file of ``vol`` as bytes (written by :func:`distdrgn.formats.mrc.write_mrc`)."""
    import tempfile

    from distdrgn.formats.mrc import write_mrc

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vol.mrc"
        write_mrc(path, vol, apix, is_volume=True)
        return path.read_bytes()


class Dashboard:
    """State shared by the request handlers: the run's data, the volume cache, the output folder."""

    def __init__(self, run: RunData, out_dir: Path, token: str | None = None, device: str | None = None):
        self.run = run
        self.out_dir = Path(out_dir)
        self.token = token or secrets.token_urlsafe(24)
        self.volumes = VolumeCache(run, device)
        self.trajectories: dict[str, dict] = {}
        self._lock = threading.Lock()

    # ---- API ----------------------------------------------------------------------------
    def meta(self) -> dict:
        run = self.run
        cols = []
        for name, values in run.columns.items():
            finite = values[np.isfinite(values)]
            cols.append({"name": name, "categorical": name in run.categorical,
                         "min": float(finite.min()) if finite.size else 0.0,
                         "max": float(finite.max()) if finite.size else 0.0})
        names = list(run.columns)
        x, y = ("UMAP1", "UMAP2") if "UMAP1" in run.columns else (names[0], names[1] if len(names) > 1 else names[0])
        colour = next((c for c in names if c in run.categorical), "|z|")
        landscape = []
        if run.landscape_dir is not None:
            landscape = sorted(p.name for p in run.landscape_dir.glob("*.png"))
        return {
            "run": str(run.run_dir), "epoch": run.epoch_label, "n": run.n, "zdim": int(run.z.shape[1]),
            "columns": cols, "x": x, "y": y, "color": colour,
            "centers": [] if run.centers_ind is None else [int(i) for i in run.centers_ind],
            "store": str(run.store) if run.store else None,
            "exports": ["pkl"] + (["star", "cs"] if run.store else []),
            "landscape": landscape, "out_dir": str(self.out_dir), "notes": run.notes,
        }

    def column(self, name: str) -> bytes:
        if name not in self.run.columns:
            raise ApiError(404, f"no variable {name!r}")
        return np.ascontiguousarray(self.run.columns[name], dtype="<f4").tobytes()

    def _row(self, text: str | None) -> int:
        try:
            row = int(text)
        except (TypeError, ValueError):
            raise ApiError(400, f"row must be an integer, got {text!r}") from None
        if not 0 <= row < self.run.n:
            raise ApiError(400, f"row {row} out of range [0, {self.run.n})")
        return row

    def _name(self, text: str | None, what: str) -> str:
        if not text or not NAME_RE.match(text):
            raise ApiError(400, f"{what} must be letters, digits, '_', '-' or '.', got {text!r}")
        return text

    def save_selection(self, mask_bytes: bytes, fmt: str, name: str) -> dict:
        """Write the selected rows (mask, N bytes) as NAME.pkl / .star / .cs in the output folder."""
        if fmt not in EXPORT_FORMATS:
            raise ApiError(400, f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        name = self._name(name, "name")
        if len(mask_bytes) != self.run.n:
            raise ApiError(400, f"selection mask has {len(mask_bytes)} bytes for {self.run.n} particles")
        rows = np.flatnonzero(np.frombuffer(mask_bytes, dtype=np.uint8))
        if rows.size == 0:
            raise ApiError(400, "nothing selected")
        positions = self.run.positions[rows]
        path = self.out_dir / (name + EXPORT_FORMATS[fmt])
        with self._lock:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a user's file is never replaced
                raise ApiError(409, f"{path} already exists; choose another name")
            if fmt == "pkl":
                from distdrgn.formats.ind import save_indices

                save_indices(path, positions)
                written = [path]
            else:
                if self.run.store is None:
                    raise ApiError(400, "no particle store: start the dashboard with --store to export .star/.cs")
                from distdrgn.store.export import export

                try:
                    written = export(self.run.store, path, ind=positions, progress=False)
                except DistdrgnError as exc:
                    raise ApiError(400, str(exc)) from None
        return {"count": int(rows.size), "files": [p.name for p in written], "path": str(path)}

    def volume(self, row: int) -> tuple[bytes, int]:
        vol = self.volumes.volume(row)
        return np.ascontiguousarray(volume_views(vol), dtype="<f4").tobytes(), vol.shape[0]

    def image(self, row: int) -> tuple[bytes, int]:
        if self.run.store is None:
            raise ApiError(404, "no particle store (start the dashboard with --store)")
        from distdrgn.store.reader import ParticleStore

        img = ParticleStore.open(self.run.store).images([int(self.run.positions[row])])[0]
        return np.ascontiguousarray(img, dtype="<f4").tobytes(), img.shape[0]

    def trajectory(self, anchors: list, points: int, max_neighbors: int = 10, avg_neighbors: float = 5.0) -> dict:
        """Graph traversal between anchor rows (:func:`distdrgn.analysis.graph.graph_traversal`, its
        kNN options); volumes at ``points`` nodes evenly spaced along the path."""
        from distdrgn.analysis.graph import graph_traversal

        try:
            anchors = [self._row(a) for a in anchors]
            points = int(points)
            max_neighbors, avg_neighbors = int(max_neighbors), float(avg_neighbors)
        except (TypeError, ValueError):
            raise ApiError(400, "anchors must be rows and points an integer") from None
        if not 2 <= points <= MAX_TRAJECTORY_VOLUMES:
            raise ApiError(400, f"points must be in [2, {MAX_TRAJECTORY_VOLUMES}], got {points}")
        try:
            path = graph_traversal(self.run.z, anchors, max_neighbors=max_neighbors, avg_neighbors=avg_neighbors)
        except DistdrgnError as exc:
            raise ApiError(400, str(exc)) from None
        take = np.unique(np.round(np.linspace(0, len(path.path) - 1, min(points, len(path.path)))).astype(int))
        rows = path.path[take]
        projections = [volume_views(self.volumes.volume(int(r)))[3] for r in rows]
        with self._lock:
            tid = f"t{len(self.trajectories) + 1}"
            self.trajectories[tid] = {"path": path.path, "rows": rows}
        return {"id": tid, "path": path.path.tolist(), "rows": rows.tolist(), "D": int(projections[0].shape[0]),
                "projections": [p.ravel().round(5).tolist() for p in projections], "length": path.length}

    def trajectory_zip(self, tid: str) -> bytes:
        if tid not in self.trajectories:
            raise ApiError(404, f"no trajectory {tid!r}")
        t = self.trajectories[tid]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            lines = ["volume\trow\tstore_position\tz"]
            for i, r in enumerate(t["rows"]):
                zf.writestr(f"vol_{i:03d}.mrc", mrc_bytes(self.volumes.volume(int(r)), self.volumes.apix))
                z = " ".join(f"{v:.6g}" for v in self.run.z[r])
                lines.append(f"vol_{i:03d}.mrc\t{int(r)}\t{int(self.run.positions[r])}\t{z}")
            zf.writestr("volumes.tsv", "\n".join(lines) + "\n")
            zf.writestr("path_rows.txt", "\n".join(str(int(r)) for r in t["path"]) + "\n")
        return buf.getvalue()

    def file(self, name: str) -> tuple[bytes, str]:
        name = self._name(name, "file name")
        for folder in (self.out_dir, self.run.landscape_dir):
            if folder is not None and (folder / name).is_file():
                return (folder / name).read_bytes(), STATIC_TYPES.get(Path(name).suffix, "application/octet-stream")
        raise ApiError(404, f"no file {name!r}")


def make_handler(dash: Dashboard):
    class Handler(BaseHTTPRequestHandler):
        server_version = "distdrgn-dashboard"

        def log_message(self, fmt, *args):  # quiet: the terminal shows the URL, not every request
            log.debug("%s " + fmt, self.address_string(), *args)

        # ---- plumbing ----------------------------------------------------------------------
        def _authorised(self, query: dict) -> bool:
            given = (query.get("token") or [None])[0] or self.headers.get("X-Token")
            if given is None:
                cookie = SimpleCookie(self.headers.get("Cookie", ""))
                given = cookie["distdrgn_token"].value if "distdrgn_token" in cookie else None
            return given is not None and hmac.compare_digest(str(given), dash.token)

        def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, status: int = 200):
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _binary(self, body: bytes, headers: dict | None = None):
            self._send(200, body, "application/octet-stream", headers)

        def _dispatch(self, method: str):
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if not self._authorised(query):
                self._send(403, b"forbidden: open the URL with the token printed by 'distdrgn dashboard'\n",
                           "text/plain; charset=utf-8")
                return
            q = {k: v[0] for k, v in query.items()}
            try:
                self._route(method, url.path, q)
            except ApiError as exc:
                self._json({"error": str(exc)}, exc.status)
            except DistdrgnError as exc:
                self._json({"error": str(exc)}, 400)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # a bug must not kill the server thread silently
                log.exception("dashboard request %s failed", self.path)
                self._json({"error": f"{type(exc).__name__}: {exc}"}, 500)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _route(self, method: str, path: str, q: dict):
            if method == "GET" and path in ("/", "/index.html"):
                body = (STATIC / "index.html").read_bytes()
                cookie = f"distdrgn_token={dash.token}; Path=/; HttpOnly; SameSite=Strict"
                self._send(200, body, STATIC_TYPES[".html"], {"Set-Cookie": cookie})
            elif method == "GET" and path.startswith("/static/"):
                name = path[len("/static/"):]
                if not NAME_RE.match(name) or not (STATIC / name).is_file():
                    raise ApiError(404, f"no static file {name!r}")
                self._send(200, (STATIC / name).read_bytes(), STATIC_TYPES.get(Path(name).suffix, "text/plain"))
            elif method == "GET" and path == "/api/meta":
                self._json(dash.meta())
            elif method == "GET" and path == "/api/column":
                self._binary(dash.column(q.get("name", "")))
            elif method == "POST" and path == "/api/selection":
                self._json(dash.save_selection(self._body(), q.get("format", "pkl"), q.get("name", "")))
            elif method == "GET" and path == "/api/volume":
                body, D = dash.volume(dash._row(q.get("row")))
                self._binary(body, {"X-D": str(D)})
            elif method == "GET" and path == "/api/volume.mrc":
                row = dash._row(q.get("row"))
                body = mrc_bytes(dash.volumes.volume(row), dash.volumes.apix)
                self._send(200, body, "application/octet-stream",
                           {"Content-Disposition": f'attachment; filename="vol_row{row}.mrc"'})
            elif method == "GET" and path == "/api/image":
                body, D = dash.image(dash._row(q.get("row")))
                self._binary(body, {"X-D": str(D)})
            elif method == "POST" and path == "/api/trajectory":
                try:
                    req = json.loads(self._body() or b"{}")
                except json.JSONDecodeError as exc:
                    raise ApiError(400, f"bad JSON ({exc})") from None
                self._json(dash.trajectory(req.get("anchors") or [], req.get("points", 10),
                                           req.get("max_neighbors", 10), req.get("avg_neighbors", 5.0)))
            elif method == "GET" and path == "/api/trajectory.zip":
                tid = q.get("id", "")
                self._send(200, dash.trajectory_zip(tid), "application/zip",
                           {"Content-Disposition": f'attachment; filename="trajectory_{tid}.zip"'})
            elif method == "GET" and path == "/api/file":
                body, ctype = dash.file(q.get("name", ""))
                self._send(200, body, ctype, {"Content-Disposition": f'inline; filename="{q.get("name")}"'})
            else:
                raise ApiError(404, f"no such endpoint {method} {path}")

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

    return Handler


def make_server(dash: Dashboard, host: str = "127.0.0.1", port: int = 8050) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (``server.server_address``)."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(dash))
    except OSError as exc:
        raise DistdrgnError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); try another --port") from None
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer, dash: Dashboard) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/?token={dash.token}"
