"""The real RELION / cryoSPARC / cryoDRGN files in ../shared/fixtures/formats (next to the repo).

Tests that need them are marked ``@needs_fixtures`` and skip, with the path, where the folder
is absent.
"""

import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "formats"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"format fixtures not found at {FIXTURES}")
CRYODRGN_RUNS = FIXTURES.parent / "cryodrgn_runs"  # real cryoDRGN 4.3.1 run directories


def read_mrc_data(path) -> np.ndarray:
    """The whole data block of an MRC file as float32, read by mrcfile (the reference reader)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # some fixtures lack the MAP id
        with mrcfile.open(path, permissive=True) as m:
            return np.array(m.data, dtype=np.float32)
