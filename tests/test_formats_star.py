
import numpy as np
import pandas as pd
import pytest

from distdrgn.errors import FormatError
from distdrgn.formats.star import StarData, particles_with_optics, read_star, write_star

from fixture_files import FIXTURES, needs_fixtures


@needs_fixtures
@pytest.mark.parametrize(
    "name, version, n, n_optics",
    [
        ("relion31.star", "3.1", 5, 1),
        ("relion31.6opticsgroups.star", "3.1", 139, 6),
        ("relion5.star", "5.0", 17, 1),
        ("toy_projections.star", "3.0", 1000, None),
        ("empiar_10076_7.star", "3.0", 7, None),
        ("FinalRefinement-OriginalParticles-PfCRT.star", "3.0", 5, None),
    ],
)
def test_read_fixtures(name, version, n, n_optics):
    star = read_star(FIXTURES / name)
    assert star.version == version
    assert len(star.particles) == n
    assert (None if star.optics is None else len(star.optics)) == n_optics
    assert "rlnImageName" in star.particles.columns
    assert star.particles["rlnImageName"].str.contains("@").all()


@needs_fixtures
def test_names_stay_strings():
    # empiar's micrograph names are "1".."7": they must not become numbers
    star = read_star(FIXTURES / "empiar_10076_7.star")
    assert star.particles["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)]


@needs_fixtures
def test_particles_with_optics_per_group():
    star = read_star(FIXTURES / "relion31.6opticsgroups.star")
    merged = particles_with_optics(star)
    assert len(merged) == 139
    optics = star.optics.set_index("rlnOpticsGroup")
    for group, rows in merged.groupby("rlnOpticsGroup"):
        for col in ["rlnImagePixelSize", "rlnSphericalAberration", "rlnVoltage", "rlnAmplitudeContrast"]:
            assert (rows[col] == optics.loc[group, col]).all()
    # the groups really differ, so a wrong merge would be seen
    assert merged["rlnImagePixelSize"].nunique() == 2
    assert merged["rlnSphericalAberration"].nunique() == 2


@needs_fixtures
def test_particles_with_optics_relion30_is_unchanged():
    star = read_star(FIXTURES / "toy_projections.star")
    pd.testing.assert_frame_equal(particles_with_optics(star), star.particles)


def test_particles_with_optics_errors():
    particles = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "rlnOpticsGroup": [1, 3]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnImagePixelSize": [1.0, 2.0]})
    with pytest.raises(FormatError, match="optics group 3"):
        particles_with_optics(StarData(particles, optics, "3.1"), "x.star")
    no_group = particles.drop(columns="rlnOpticsGroup")
    with pytest.raises(FormatError, match="no rlnOpticsGroup"):
        particles_with_optics(StarData(no_group, optics, "3.1"), "x.star")
    # a single optics group applies to all particles even without the column
    merged = particles_with_optics(StarData(no_group, optics.iloc[:1], "3.1"))
    assert merged["rlnImagePixelSize"].tolist() == [1.0, 1.0]


@needs_fixtures
def test_write_read_round_trip_with_optics(tmp_path):
    star = read_star(FIXTURES / "relion31.6opticsgroups.star")
    write_star(tmp_path / "out.star", star.particles, star.optics)
    text = (tmp_path / "out.star").read_text()
    assert "data_optics" in text and "data_particles" in text and "# version 30001" in text
    back = read_star(tmp_path / "out.star")
    assert back.version == "3.1"
    assert list(back.particles.columns) == list(star.particles.columns)
    assert list(back.optics.columns) == list(star.optics.columns)
    for col in star.particles.columns:
        if pd.api.types.is_float_dtype(star.particles[col]):
            np.testing.assert_allclose(back.particles[col], star.particles[col], rtol=0, atol=1e-6)
        else:
            assert back.particles[col].tolist() == star.particles[col].tolist()
    assert back.optics["rlnOpticsGroupName"].tolist() == star.optics["rlnOpticsGroupName"].tolist()


def test_write_read_round_trip_without_optics(tmp_path):
    particles = pd.DataFrame(
        {
            "_rlnImageName": ["000001@s.mrcs", "000002@s.mrcs"],
            "_rlnAngleRot": [10.5, -20.25],
            "_rlnDefocusU": [12000.0, 15000.5],
        }
    )
    write_star(tmp_path / "o.star", particles)
    back = read_star(tmp_path / "o.star")
    assert back.version == "3.0" and back.optics is None
    assert list(back.particles.columns) == ["rlnImageName", "rlnAngleRot", "rlnDefocusU"]
    assert back.particles["rlnImageName"].tolist() == ["000001@s.mrcs", "000002@s.mrcs"]
    np.testing.assert_allclose(back.particles["rlnAngleRot"], [10.5, -20.25])


def test_error_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        read_star(tmp_path / "missing.star")


def test_error_no_table(tmp_path):
    path = tmp_path / "empty.star"
    path.write_text("# nothing here\n")
    with pytest.raises(FormatError, match="no single particle table"):
        read_star(path)


def test_error_empty_particle_table(tmp_path):
    path = tmp_path / "empty.star"
    path.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n")
    with pytest.raises(FormatError, match="empty"):
        read_star(path)


def test_numeric_columns_names_file_column_row_and_value():
    from distdrgn.formats.star import numeric_columns

    table = pd.DataFrame({"rlnAngleRot": ["1.5", "2", "nan"], "rlnAngleTilt": ["3", "x4", "5"]})
    np.testing.assert_array_equal(numeric_columns(table, "rlnAngleRot", "f.star"), [1.5, 2.0, np.nan])
    with pytest.raises(FormatError, match=r"^f\.star: column _rlnAngleTilt must be numeric, but row 1 is 'x4'$"):
        numeric_columns(table, ["rlnAngleRot", "rlnAngleTilt"], "f.star")
    assert numeric_columns(table.iloc[:1], ["rlnAngleRot", "rlnAngleTilt"], "f.star").shape == (1, 2)
