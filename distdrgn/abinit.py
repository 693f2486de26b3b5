"""Reconstruct with unknown poses (cryoDRGN ``abinit_homo`` / ``abinit_het``): poses by a hierarchical search.

    python -m distdrgn.abinit [CONFIG] [section.key=value ...]
    torchrun --nproc_per_node N -m distdrgn.abinit CONFIG ...
    distdrgn abinit [CONFIG] ...

The same program as :mod:`distdrgn.train` (store, loader, engine, checkpoints, metrics,
fault tolerance and the run directory's files), with the poses found instead of read from
the store: for the first ``abinit.search_epochs`` epochs every batch's poses come from a
search over SO(3) x in-plane shifts against the model as it is (a coarse grid, then the best
``abinit.keep`` candidates subdivided ``abinit.levels`` times, compared within a lattice
radius that grows from ``abinit.radius_start`` to ``abinit.radius_end``); afterwards they
are refined by gradient (``abinit.refine``, at ``model.pose_lr_rot`` / ``model.pose_lr_trans``)
and/or searched again near where they are (``abinit.local_search``). ``abinit.attempts`` > 1
first runs that many searches from different seeds and goes on from the best
(:mod:`distdrgn.attempts`).
``model.zdim=0`` reconstructs one homogeneous map; zdim > 0 a heterogeneous model whose z
comes from the encoder. The poses are per-particle state owned by the rank that trains the
particle (:mod:`distdrgn.particle_table`); each epoch writes ``poses.N.pkl`` (cryoDRGN layout)
next to ``weights.N.pkl`` and ``z.N.pkl``.
"""

from __future__ import annotations

import sys

from distdrgn.train import main as train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, search=True, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
