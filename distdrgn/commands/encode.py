"""``distdrgn encode RUN_DIR STORE -o z.pkl``: latents of every particle of a store."""

from __future__ import annotations


def add_args(parser) -> None:
    parser.add_argument("run_dir", help="training run directory (or a weights .pkl file)")
    parser.add_argument("store", help="particle store (with poses; CTF if the model was trained with it)")
    parser.add_argument("-o", "--output", required=True, help="output z.pkl (z_mu then z_logvar, cryoDRGN layout)")
    parser.add_argument("--epoch", type=int, default=None, help="use weights.EPOCH.pkl (default: weights.pkl)")
    parser.add_argument("--level", type=int, default=None, help="store level (box size); default: the training box")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def main(args) -> int:
    from tqdm import tqdm

    from distdrgn.checkpoint import save_z
    from distdrgn.encode import encode_store
    from distdrgn.errors import DistdrgnError
    from distdrgn.store import ParticleStore
    from distdrgn.volumes import load_model

    trained = load_model(args.run_dir, epoch=args.epoch)
    store = ParticleStore.open(args.store)
    level = args.level if args.level is not None else trained.D
    if level != trained.D or level not in store.levels:
        raise DistdrgnError(f"{args.store}: the store's box is {store.D} (levels {store.levels}) but the model "
                            f"{trained.path} was trained at box {trained.D}; encode a store with box {trained.D} "
                            f"(ingest -D {trained.D} or --levels {trained.D})")
    store = store.at_level(level)
    with tqdm(total=store.n, desc="encode", unit="img") as bar:
        z_mu, z_logvar = encode_store(trained.model, trained.prep, store, batch_size=args.batch_size,
                                      device=args.device, num_workers=args.num_workers, progress=bar)
    save_z(args.output, z_mu, z_logvar)
    print(f"wrote {args.output}: {z_mu.shape[0]} x {z_mu.shape[1]} latents")
    return 0
