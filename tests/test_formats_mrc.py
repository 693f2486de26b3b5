
import mrcfile
import numpy as np
import pytest

from distdrgn.errors import FormatError
from distdrgn.formats import mrc as mrc_module
from distdrgn.formats.mrc import MrcStackWriter, open_mrc, read_volume, write_mrc

from fixture_files import FIXTURES, needs_fixtures, read_mrc_data


@needs_fixtures
@pytest.mark.parametrize(
    "name, n, D, apix",
    [
        ("relion31.mrcs", 5, 256, 1.0),
        ("toy_projections.mrcs", 1000, 30, 1.0),
        ("hand.mrcs", 100, 64, 1.0),
        # a real stack written with ispg 1, no MAP id, zero machine stamp and no voxel size
        ("empiar_10076_7.mrc", 7, 320, None),
    ],
)
def test_open_fixture_stacks(name, n, D, apix):
    stack = open_mrc(FIXTURES / name)
    assert (stack.n, stack.D, len(stack), stack.apix) == (n, D, n, apix)
    assert stack.dtype == np.float32
    full = read_mrc_data(FIXTURES / name)
    order = [n - 1, 0, n // 2, 0, 1]
    np.testing.assert_array_equal(stack.read(order), full[order])
    np.testing.assert_array_equal(stack.read(slice(1, 4)), full[1:4])
    np.testing.assert_array_equal(stack.read(np.array([2])), full[2:3])
    assert stack.read([]).shape == (0, D, D)


@needs_fixtures
def test_read_touches_only_requested_images(monkeypatch):
    stack = open_mrc(FIXTURES / "toy_projections.mrcs")
    bytes_read = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, k=-1):
            assert k >= 0, "must never read to the end of the file"
            data = self.f.read(k)
            bytes_read.append(len(data))
            return data

    monkeypatch.setattr(mrc_module, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    images = stack.read([10, 11, 12, 500, 11])
    assert images.shape == (5, 30, 30)
    # two contiguous runs (10-12 and 500), each read once
    assert bytes_read == [3 * 30 * 30 * 4, 30 * 30 * 4]


def test_read_out_of_range(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((3, 4, 4)))
    stack = open_mrc(tmp_path / "s.mrcs")
    with pytest.raises(IndexError):
        stack.read([3])
    with pytest.raises(IndexError):
        stack.read([-1])


def test_write_mrc_stack_and_volume_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(5, 8, 8)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", stack, apix=2.5)
    s = open_mrc(tmp_path / "s.mrcs")
    assert (s.n, s.D, s.apix) == (5, 8, 2.5)
    np.testing.assert_array_equal(s.read(slice(None)), stack)
    with mrcfile.open(tmp_path / "s.mrcs") as m:
        assert int(m.header.ispg) == 0
        assert tuple(m.header.origin.item()) == (0.0, 0.0, 0.0)

    vol = rng.normal(size=(8, 8, 8)).astype(np.float32)
    write_mrc(tmp_path / "v.mrc", vol, apix=1.5, is_volume=True)
    with mrcfile.open(tmp_path / "v.mrc") as m:
        assert int(m.header.ispg) == 1
        assert m.data.dtype == np.float32
    data, apix = read_volume(tmp_path / "v.mrc")
    assert apix == 1.5
    np.testing.assert_array_equal(data, vol)


@needs_fixtures
def test_read_volume_fixture():
    vol, apix = read_volume(FIXTURES / "hand-vol.mrc")
    assert vol.shape == (64, 64, 64) and vol.dtype == np.float32 and apix == 1.0
    np.testing.assert_array_equal(vol, read_mrc_data(FIXTURES / "hand-vol.mrc"))


def test_read_volume_rejects_non_cubic(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((3, 4, 4)))
    with pytest.raises(FormatError, match="not a cubic volume"):
        read_volume(tmp_path / "s.mrcs")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_stack_writer_streams(tmp_path, dtype):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(7, 6, 6)).astype(np.float32)
    path = tmp_path / "out.mrcs"
    with MrcStackWriter(path, n=7, D=6, apix=1.25, dtype=dtype) as w:
        w.write(images[:3])
        w.write(images[3])
        w.write(images[4:])
    s = open_mrc(path)
    assert (s.n, s.D, s.apix, s.dtype) == (7, 6, 1.25, np.dtype(dtype))
    np.testing.assert_allclose(s.read(slice(None)), images.astype(dtype), rtol=0, atol=0)
    with mrcfile.open(path) as m:
        assert int(m.header.ispg) == 0
        assert m.header.dmax == pytest.approx(images.astype(dtype).max(), rel=1e-3)
        assert m.header.dmean == pytest.approx(images.astype(dtype).astype(np.float64).mean(), abs=1e-3)


def test_stack_writer_count_mismatch_removes_file(tmp_path):
    path = tmp_path / "out.mrcs"
    with pytest.raises(FormatError, match="2 images written but 3 declared"):
        with MrcStackWriter(path, n=3, D=4, apix=1.0) as w:
            w.write(np.zeros((2, 4, 4)))
    assert not path.exists()
    with pytest.raises(ValueError, match="exceed"):
        with MrcStackWriter(path, n=1, D=4, apix=1.0) as w:
            w.write(np.zeros((2, 4, 4)))
    assert not path.exists()
    with pytest.raises(ValueError, match=r"\(k, 4, 4\)"):
        with MrcStackWriter(path, n=1, D=4, apix=1.0) as w:
            w.write(np.zeros((1, 5, 5)))
    assert not path.exists()


# ----- errors -----

def _raw_mrc(path, nx, ny, nz, mode=2, data_bytes=None):
    """An MRC file with a hand-written header (mrcfile refuses to write some of these)."""
    header = np.zeros((), dtype=mrcfile.dtypes.HEADER_DTYPE)
    header["nx"], header["ny"], header["nz"], header["mode"] = nx, ny, nz, mode
    header["mx"], header["my"], header["mz"] = nx, ny, nz
    header["map"] = b"MAP "
    header["machst"] = np.frombuffer(bytes([0x44, 0x44, 0, 0]), dtype="u1")
    itemsize = {0: 1, 1: 2, 2: 4, 4: 8, 6: 2, 12: 2}.get(mode, 4)
    n_bytes = nx * ny * nz * itemsize if data_bytes is None else data_bytes
    path.write_bytes(header.tobytes() + bytes(n_bytes))
    return path


def test_error_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_mrc(tmp_path / "nope.mrcs")


def test_error_directory(tmp_path):
    with pytest.raises(FormatError, match="not a regular file"):
        open_mrc(tmp_path)


def test_error_short_header(tmp_path):
    (tmp_path / "short.mrcs").write_bytes(b"\0" * 100)
    with pytest.raises(FormatError, match="bad MRC header"):
        open_mrc(tmp_path / "short.mrcs")


def test_error_not_an_mrc(tmp_path):
    path = tmp_path / "text.mrcs"
    path.write_bytes(b"this is not an MRC file " * 100)
    with pytest.raises(FormatError, match="bad MRC header"):
        open_mrc(path)


def test_error_truncated(tmp_path):
    path = _raw_mrc(tmp_path / "trunc.mrcs", 8, 8, 10, data_bytes=8 * 8 * 4 * 9 + 5)
    with pytest.raises(FormatError, match="truncated"):
        open_mrc(path)
    # the complete file is accepted
    open_mrc(_raw_mrc(tmp_path / "ok.mrcs", 8, 8, 10))


def test_error_unsupported_mode(tmp_path):
    with pytest.raises(FormatError, match="unsupported MRC mode 4"):
        open_mrc(_raw_mrc(tmp_path / "complex.mrcs", 8, 8, 2, mode=4))


def test_error_non_square(tmp_path):
    with pytest.raises(FormatError, match="8 x 6.*square"):
        open_mrc(_raw_mrc(tmp_path / "rect.mrcs", 6, 8, 2))


def test_error_odd_box(tmp_path):
    write_mrc(tmp_path / "odd.mrcs", np.zeros((2, 5, 5)))
    with pytest.raises(FormatError, match="odd"):
        open_mrc(tmp_path / "odd.mrcs")


def test_error_messages_are_one_line(tmp_path):
    path = _raw_mrc(tmp_path / "trunc.mrcs", 8, 8, 10, data_bytes=10)
    with pytest.raises(FormatError) as info:
        open_mrc(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("mode, dtype", [(0, np.int8), (1, np.int16), (6, np.uint16), (12, np.float16)])
def test_integer_and_half_modes_read_as_float32(tmp_path, mode, dtype):
    data = (np.arange(2 * 4 * 4) % 50).astype(dtype).reshape(2, 4, 4)
    with mrcfile.new(tmp_path / "m.mrcs") as m:
        m.set_data(data)
    s = open_mrc(tmp_path / "m.mrcs")
    assert s.dtype == np.dtype(dtype)
    out = s.read([1, 0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data[[1, 0]].astype(np.float32))


def test_big_endian_file(tmp_path):
    data = np.arange(3 * 4 * 4, dtype=">f4").reshape(3, 4, 4)
    with mrcfile.new(tmp_path / "be.mrcs") as m:
        m.set_data(data)
    s = open_mrc(tmp_path / "be.mrcs")
    np.testing.assert_array_equal(s.read([2, 0]), data[[2, 0]].astype(np.float32))
