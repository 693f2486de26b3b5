
import numpy as np
import pytest

from distdrgn.errors import FormatError
from distdrgn.formats.cs import read_cs, write_cs

from fixture_files import FIXTURES, needs_fixtures


@needs_fixtures
@pytest.mark.parametrize(
    "name, n, has_3d",
    [
        ("cryosparc_P12_J24_001_particles.cs", 2019, True),
        ("empiar_10076_7.cs", 7, False),
        ("cryosparc_J2_particles_exported.cs", 22, False),
    ],
)
def test_read_fixtures(name, n, has_3d):
    arr = read_cs(FIXTURES / name)
    assert arr.shape == (n,)
    assert "blob/path" in arr.dtype.names and "ctf/df1_A" in arr.dtype.names
    assert ("alignments3D/pose" in arr.dtype.names) == has_3d


def test_write_read_round_trip(tmp_path):
    dtype = [("uid", "<u8"), ("blob/path", "S20"), ("blob/idx", "<u4"), ("alignments3D/shift", "<f4", (2,))]
    arr = np.zeros(3, dtype=dtype)
    arr["uid"] = [7, 8, 9]
    arr["blob/path"] = [b">J1/a.mrcs", b"J1/b.mrcs", b"c.mrc"]
    arr["alignments3D/shift"] = [[1, 2], [3, 4], [5, 6]]
    path = tmp_path / "p.cs"
    write_cs(path, arr)
    assert path.exists() and not (tmp_path / "p.cs.npy").exists()
    back = read_cs(path)
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_errors(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        read_cs(tmp_path / "missing.cs")
    (tmp_path / "text.cs").write_text("not numpy")
    with pytest.raises(FormatError, match="not a cryoSPARC .cs file"):
        read_cs(tmp_path / "text.cs")
    with open(tmp_path / "plain.cs", "wb") as f:
        np.save(f, np.zeros(4))
    with pytest.raises(FormatError, match="structured"):
        read_cs(tmp_path / "plain.cs")
