import pytest

from distdrgn.errors import StoreError
from distdrgn.store import ParticleStore, ingest
from distdrgn.store.verify import info, verify
from store_helpers import SMALL_LAYOUT, make_dataset


def _store(tmp_path, **kw):
    paths, data = make_dataset(tmp_path, n=100)
    return ingest(paths["stack"], tmp_path / "s.zarr", poses=paths["poses"], ctf=paths["ctf"], progress=False,
                  workers=1, layout_overrides=SMALL_LAYOUT, **kw)


def test_verify_ok_and_info(tmp_path):
    out = _store(tmp_path, extra_levels=(16,))
    result = verify(out)
    layout = info(out)["layout"]
    expected = sum(-(-100 // layout[str(d)]["chunk_images"]) for d in (32, 16))
    assert result["ok"] and result["chunks_checked"] == expected
    summary = info(out)
    assert summary["n"] == 100 and summary["levels"] == [32, 16] and summary["files"] > 0


def test_verify_detects_flipped_byte(tmp_path):
    out = _store(tmp_path)
    shard = out / "images" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01  # inside the first chunk of shard 1
    shard.write_bytes(bytes(raw))
    layout = info(out)["layout"]["32"]
    with pytest.raises(StoreError, match=f"checksum mismatch in chunk {layout['shard_images'] // layout['chunk_images']} "):
        verify(out)


def test_verify_detects_metadata_change(tmp_path):
    import zarr

    out = _store(tmp_path)
    arr = zarr.open_array(out / "ctf", mode="r+")
    arr[3, 2] = arr[3, 2] + 1
    with pytest.raises(StoreError, match="checksum mismatch in ctf"):
        verify(out)


def test_verify_detects_missing_shard(tmp_path):
    out = _store(tmp_path)
    (out / "images" / "c" / "2" / "0" / "0").unlink()  # zarr would read it back as zeros (the fill value)
    layout = info(out)["layout"]["32"]
    first = 2 * layout["shard_images"] // layout["chunk_images"]
    with pytest.raises(StoreError, match=f"chunk file images/c/2/0/0 is missing \\(chunk {first}, ") as exc:
        verify(out)
    assert "checksum mismatch" not in str(exc.value)
    record = ParticleStore.open(out).verification
    assert not record["ok"] and record["chunk"] == first and "is missing" in record["error"]


def test_verify_accepts_unwritten_all_zero_chunk(tmp_path):
    import mrcfile

    paths, data = make_dataset(tmp_path, n=100)
    images = data["images"]
    images[32:64] = 0  # zarr leaves chunks of fill values unwritten
    with mrcfile.new(paths["stack"], overwrite=True) as m:
        m.set_data(images)
    out = ingest(paths["stack"], tmp_path / "s.zarr", progress=False, workers=1, layout_overrides=SMALL_LAYOUT)
    assert not (out / "images" / "c" / "2" / "0" / "0").exists()
    assert verify(out)["ok"]
