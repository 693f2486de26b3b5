"""``distdrgn dashboard``: explore a trained run in a browser (served locally, token-protected)."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="training run directory (distdrgn or cryoDRGN)")
    parser.add_argument("--epoch", type=int, default=None,
                        help="epoch to show (from 1, as in z.N.pkl; negative from the end; default: the final z.pkl)")
    parser.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: reach it over SSH port forwarding)")
    parser.add_argument("--store", default=None,
                        help="particle store (default: data.store of the run's config.yaml): images, CTF, poses, "
                             ".star/.cs columns and export")
    parser.add_argument("-o", "--out", default=None,
                        help="folder for saved selections and exports (default RUN/dashboard.EPOCH)")
    parser.add_argument("--device", default=None, help="torch device for volumes (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from distdrgn.dashboard.data import load_run
    from distdrgn.dashboard.server import Dashboard, make_server, url_of

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = load_run(args.run_dir, args.epoch, args.store)
    out = Path(args.out) if args.out else run.run_dir / f"dashboard.{run.epoch_label}"
    dash = Dashboard(run, out, device=args.device)
    server = make_server(dash, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"distdrgn dashboard: {run.n:,} particles of {run.run_dir} (epoch {run.epoch_label})", flush=True)
    for note in run.notes:
        print(f"  note: {note}", flush=True)
    print(f"selections are saved in {out}", flush=True)
    print(f"open {url_of(server, dash)}", flush=True)
    if host in ("127.0.0.1", "localhost"):
        print(f"from your computer: ssh -N -L {port}:127.0.0.1:{port} THIS_HOST, then open the URL above", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
