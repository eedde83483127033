"""Transforms other software can apply (export.py): SimpleITK reads the exported ITK transform and
maps points / resamples images as this package does; the affine CSV is the forward napari layer
affine affinder writes; the CLI and the Transforms widget write both."""

from __future__ import annotations

import numpy as np
import pytest
from console import histreg
from napari_conftest import display, qapp_cls, viewer  # noqa: F401  (fixtures)

from napari_histreg import RegistrationResult
from napari_histreg.conventions import (
    Frame,
    affine_to_field,
    rc_to_physical,
    rotation_about,
)
from napari_histreg.export import (
    affine_matrix_3x3,
    affine_residual_px,
    is_affine_only,
    sitk_map_target_points,
    to_sitk_transform,
    write_affine_csv,
    write_itk_transform,
)

sitk = pytest.importorskip("SimpleITK")

WORKING = (96, 120)
TARGET_SHAPE, SOURCE_SHAPE = (240, 300), (270, 330)
# unequal, non-unit pixel sizes and non-zero origins, ITK (x, y) order
SPACES = {"source_spacing": (0.7, 0.9), "target_spacing": (1.3, 1.1), "source_origin": (10.0, -5.0), "target_origin": (-3.0, 7.0)}


def _result(bump: float = 3.0) -> RegistrationResult:
    """A rotation + shift between two originals of different sizes placed differently on the
    working grid, plus (``bump`` px) a smooth Gaussian bump of displacement."""
    source_frame = Frame(SOURCE_SHAPE, WORKING, (WORKING[0] / SOURCE_SHAPE[0] * 0.9, WORKING[1] / SOURCE_SHAPE[1] * 0.9), (3.0, 5.0))
    target_frame = Frame(TARGET_SHAPE, WORKING, (WORKING[0] / TARGET_SHAPE[0], WORKING[1] / TARGET_SHAPE[1]), (0.0, 0.0))
    matrix = rotation_about(((WORKING[0] - 1) / 2, (WORKING[1] - 1) / 2), 12.0, (4.0, -6.0))
    field = affine_to_field(matrix, WORKING)[0].numpy()
    rr, cc = np.meshgrid(np.arange(WORKING[0]), np.arange(WORKING[1]), indexing="ij")
    gauss = bump * np.exp(-((rr - 45.0) ** 2 + (cc - 70.0) ** 2) / (2 * 12.0**2))
    field[0] += gauss
    field[1] -= 0.5 * gauss
    return RegistrationResult(field.astype(np.float32), source_frame, target_frame, matrix)


def _target_points(n: int = 300) -> np.ndarray:
    """Random target pixels plus the four corners (the rim beyond the working grid's nodes)."""
    h, w = TARGET_SHAPE
    rng = np.random.default_rng(0)
    corners = np.array([[0, 0], [0, w - 1], [h - 1, 0], [h - 1, w - 1]], dtype=np.float64)
    return np.vstack([corners, rng.uniform([0, 0], [h - 1, w - 1], (n, 2))])


def _sitk_map(transform, points_rc, spaces=SPACES) -> np.ndarray:
    """Target (row, col) pixels through a SimpleITK transform, back to source (row, col) pixels."""
    return sitk_map_target_points(transform, points_rc, **spaces)


# --------------------------------------------------------------------------- ITK
@pytest.mark.parametrize("suffix", [".h5", ".tfm"])
@pytest.mark.parametrize("composite", [True, False])
def test_simpleitk_maps_target_points_as_the_result_does(tmp_path, suffix, composite):
    result = _result()
    path = write_itk_transform(result, tmp_path / f"t{suffix}", composite=composite, **SPACES)
    transform = sitk.ReadTransform(str(path))
    points = _target_points()
    error = np.abs(_sitk_map(transform, points) - result.map_target_points(points)).max()
    assert error < 0.05, error  # measured 4e-5 px: float32 field sampling against float64


def test_a_composite_applies_the_displacement_first_then_the_affine(tmp_path):
    """ITK applies a composite's transforms in reverse order of addition: the exported composite
    is [AffineTransform, DisplacementFieldTransform] and maps p to A(p + r(p))."""
    transform = sitk.ReadTransform(str(write_itk_transform(_result(), tmp_path / "t.h5", **SPACES)))
    composite = sitk.CompositeTransform(transform)
    parts = [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]
    assert [p.GetName() for p in parts] == ["AffineTransform", "DisplacementFieldTransform"]
    for point in rc_to_physical(_target_points(20), SPACES["target_spacing"], SPACES["target_origin"]):
        point = tuple(float(v) for v in point)
        np.testing.assert_allclose(composite.TransformPoint(point), parts[0].TransformPoint(parts[1].TransformPoint(point)))
    # the order rule itself, on a toy: translation added first, scale added last (applied first)
    toy = sitk.CompositeTransform(2)
    toy.AddTransform(sitk.TranslationTransform(2, (10.0, 0.0)))
    toy.AddTransform(sitk.ScaleTransform(2, (2.0, 2.0)))
    assert toy.TransformPoint((1.0, 1.0)) == (12.0, 2.0)  # T(S(p)), not S(T(p)) = (22, 2)


def test_simpleitk_resample_matches_warp():
    result = _result()
    rng = np.random.default_rng(1)
    source = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.random(SOURCE_SHAPE).astype(np.float32)), 4.0)).astype(np.float32)
    source = (source - source.min()) / (source.max() - source.min())
    moving = sitk.GetImageFromArray(source)
    moving.SetSpacing(SPACES["source_spacing"])
    moving.SetOrigin(SPACES["source_origin"])
    reference = sitk.Image(TARGET_SHAPE[1], TARGET_SHAPE[0], sitk.sitkFloat32)
    reference.SetSpacing(SPACES["target_spacing"])
    reference.SetOrigin(SPACES["target_origin"])
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, reference, to_sitk_transform(result, **SPACES), sitk.sitkLinear, 0.0))
    ours = result.warp(source)
    inside = result.warp(np.ones(SOURCE_SHAPE, np.float32)) > 0.999  # target pixels that sample inside the source
    inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False
    assert inside.mean() > 0.5
    assert np.abs(resampled - ours)[inside].mean() < 1e-3
    assert np.corrcoef(resampled[inside], ours[inside])[0, 1] > 0.999


def test_must_show_simpleitk_maps_a_development_pair_s_landmarks_within_half_a_pixel(shared_data, tmp_path):
    """Must show: SimpleITK applies the exported transform and maps the landmarks of a development
    pair to within 0.5 px of this project's own mapping (the smallest training pair, default
    settings; the result's frames, pixel sizes 0.5 / 0.5 um and a non-zero origin)."""
    from napari_histreg import register
    from napari_histreg.io import pair_landmarks, read_image, read_landmarks

    folder = shared_data / "lung-lesion-1" / "scale-5pc"
    source, target = "Izd2-29-041-w35_proSPC", "Izd2-29-041-w35_HE"
    _, _, target_lm = pair_landmarks(*read_landmarks(folder / f"{source}.csv"), *read_landmarks(folder / f"{target}.csv"))
    result = register(read_image(folder / f"{source}.jpg"), read_image(folder / f"{target}.jpg"))
    spaces = {"source_spacing": 0.5, "target_spacing": 0.5, "source_origin": (100.0, 200.0), "target_origin": (0.0, 0.0)}
    transform = sitk.ReadTransform(str(write_itk_transform(result, tmp_path / "pair.h5", **spaces)))
    error = np.linalg.norm(_sitk_map(transform, target_lm, spaces) - result.map_target_points(target_lm), axis=1)
    assert len(target_lm) > 10
    assert error.max() < 0.5, error.max()


# --------------------------------------------------------------------------- affine
def test_affine_csv_is_the_forward_layer_affine_affinder_writes(tmp_path):
    result = _result(bump=0.0)
    assert is_affine_only(result) and affine_residual_px(result) < 0.01
    path = write_affine_csv(result, tmp_path / "affine.csv")
    forward = np.loadtxt(path, delimiter=",")  # how affinder's "load affine" reads it
    assert forward.shape == (3, 3)
    np.testing.assert_allclose(forward, affine_matrix_3x3(result, "forward"))
    np.testing.assert_allclose(forward @ affine_matrix_3x3(result, "backward"), np.eye(3), atol=1e-12)
    h, w = SOURCE_SHAPE
    source_points = np.random.default_rng(2).uniform([0.2 * h, 0.2 * w], [0.8 * h, 0.8 * w], (50, 2))
    mapped = source_points @ forward[:2, :2].T + forward[:2, 2]
    assert np.abs(mapped - result.map_source_points(source_points)).max() < 0.01
    backward = np.loadtxt(write_affine_csv(result, tmp_path / "back.csv", "backward"), delimiter=",")
    # target pixels where the working field has nodes (beyond the outermost ones every map holds the border value)
    target_points = np.random.default_rng(5).uniform([2, 2], [TARGET_SHAPE[0] - 3, TARGET_SHAPE[1] - 3], (50, 2))
    assert np.abs(target_points @ backward[:2, :2].T + backward[:2, 2] - result.map_target_points(target_points)).max() < 0.01


def test_is_affine_only_tells_a_non_rigid_result_apart():
    assert is_affine_only(_result(bump=0.0))
    assert not is_affine_only(_result(bump=0.5))
    assert affine_residual_px(_result(bump=3.0)) > 1.0


def test_a_registration_without_the_non_rigid_stage_is_affine_only():
    from napari_histreg import register
    from napari_histreg.config import build_config
    from napari_histreg.sample import make_sample_pair

    pair = make_sample_pair()
    result = register(pair.source, pair.target, build_config(nonrigid_method="none"))
    assert is_affine_only(result), affine_residual_px(result)  # measured 5e-5 px


def test_an_existing_file_is_replaced_only_when_ours_and_asked(tmp_path):
    from napari_histreg.io import HistRegInputError

    result = _result()
    csv_path = tmp_path / "affine.csv"
    write_affine_csv(result, csv_path)
    with pytest.raises(HistRegInputError, match="--overwrite"):
        write_affine_csv(result, csv_path)
    write_affine_csv(result, csv_path, overwrite=True)
    user = tmp_path / "user.csv"
    user.write_text("1,0,0\n0,1,0\n0,0,1\n")
    with pytest.raises(HistRegInputError, match="not a histreg"):
        write_affine_csv(result, user, overwrite=True)
    with pytest.raises(HistRegInputError, match="must end in"):
        write_itk_transform(result, tmp_path / "t.json")


# --------------------------------------------------------------------------- CLI
def test_cli_export_transform(tmp_path, capsys):
    result = _result()
    sidecar = result.save(tmp_path / "transform.json")
    itk, csv_path = tmp_path / "t.h5", tmp_path / "affine.csv"
    code = histreg(["export-transform", str(sidecar), "--itk", str(itk), "--affine-csv", str(csv_path),
                    "--source-pixel-size", "0.7", "--target-pixel-size", "1.3"])
    assert code == 0, capsys.readouterr().err
    assert "non-rigid" in capsys.readouterr().out
    spaces = {"source_spacing": 0.7, "target_spacing": 1.3, "source_origin": (0.0, 0.0), "target_origin": (0.0, 0.0)}
    points = _target_points(30)
    assert np.abs(_sitk_map(sitk.ReadTransform(str(itk)), points, spaces) - result.map_target_points(points)).max() < 0.05
    np.testing.assert_allclose(np.loadtxt(csv_path, delimiter=","), affine_matrix_3x3(result))

    # again: refused without --overwrite, nothing touched; replaced with it
    before = itk.stat().st_mtime_ns
    assert histreg(["export-transform", str(sidecar), "--itk", str(itk)]) == 2
    assert "--overwrite" in capsys.readouterr().err and itk.stat().st_mtime_ns == before
    assert histreg(["export-transform", str(sidecar), "--itk", str(itk), "--overwrite"]) == 0


def test_cli_export_transform_reads_pixel_sizes_from_slides_and_row_col_pairs(tmp_path, capsys):
    import tifffile

    result = _result()
    sidecar = result.save(tmp_path / "transform.json")
    slide = tmp_path / "source.ome.tif"  # anisotropic: 0.5 um per row, 0.25 um per column
    tifffile.imwrite(slide, np.zeros((8, 8), np.uint8), ome=True, metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5})
    itk = tmp_path / "t.h5"
    code = histreg(["export-transform", str(sidecar), "--itk", str(itk), "--source-pixel-size-from", str(slide),
                    "--target-pixel-size", "0.4,0.8"])
    assert code == 0, capsys.readouterr().err
    # ITK's (x, y) order: x = column
    spaces = {"source_spacing": (0.25, 0.5), "target_spacing": (0.8, 0.4), "source_origin": (0.0, 0.0),
              "target_origin": (0.0, 0.0)}
    points = _target_points(30)
    assert np.abs(_sitk_map(sitk.ReadTransform(str(itk)), points, spaces) - result.map_target_points(points)).max() < 0.05
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((8, 8), np.uint8))
    capsys.readouterr()
    assert histreg(["export-transform", str(sidecar), "--itk", str(tmp_path / "u.h5"), "--source-pixel-size-from", str(plain)]) == 2
    assert "--source-pixel-size" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "not a transform", "no output", "onto the input"])
def test_cli_export_transform_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    sidecar = _result().save(tmp_path / "transform.json")
    args = {
        "missing": [str(tmp_path / "nope.json"), "--itk", str(tmp_path / "t.h5")],
        "not a transform": [str(tmp_path / "junk.json"), "--itk", str(tmp_path / "t.h5")],
        "no output": [str(sidecar)],
        "onto the input": [str(sidecar), "--itk", str(tmp_path / "t.h5"), "--affine-csv", str(sidecar), "--overwrite"],
    }[case]
    (tmp_path / "junk.json").write_text("{}")
    assert histreg(["export-transform", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("histreg: error: ") and "\n" not in err, err
    assert not (tmp_path / "t.h5").exists()


# --------------------------------------------------------------------------- napari
@pytest.mark.gui
def test_transforms_widget_exports_and_shows_an_affine_layer(viewer, tmp_path):  # noqa: F811 (the fixture)
    from napari_histreg._napari.widgets import TransformsWidget

    rng = np.random.default_rng(3)
    target = viewer.add_image(np.zeros(TARGET_SHAPE, np.uint8), name="target", scale=(2.0, 2.0), translate=(5.0, 7.0))
    source = viewer.add_image(rng.integers(0, 255, SOURCE_SHAPE + (3,), dtype=np.uint8), name="source")
    widget = TransformsWidget(viewer)

    widget.session.set_result(_result(bump=3.0), "source", "target")
    assert not widget.affine_button.enabled  # non-rigid: no layer affine
    assert widget.show_affine() is None and "affine-only" in widget.status

    result = _result(bump=0.0)
    widget.session.set_result(result, "source", "target")
    assert widget.affine_button.enabled and widget.source_image.value is source
    layer = widget.show_affine()
    assert layer is not None and layer.rgb and layer.data is source.data  # not resampled
    points = np.random.default_rng(4).uniform([50, 60], [200, 260], (20, 2))
    world = np.array([layer.data_to_world(p) for p in points])
    expected = np.array([target.data_to_world(p) for p in result.map_source_points(points)])
    assert np.abs(world - expected).max() < 0.02 * 2.0  # 0.02 target px at scale 2

    h5 = widget.export(tmp_path / "t.h5")
    assert h5 is not None and sitk.ReadTransform(str(h5)).GetName() == "CompositeTransform"
    csv_path = widget.export(tmp_path / "a.csv")
    np.testing.assert_allclose(np.loadtxt(csv_path, delimiter=","), affine_matrix_3x3(result))
    assert "affine 3x3" in widget.status
