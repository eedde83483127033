"""Issue 15: serial sections registered into one reference frame (napari_histreg.stack).

The synthetic stacks are scikit-image's immunohistochemistry image on white glass, each section
the one before it turned and shifted by a known small rigid step (and rendered in another
stain every other section), so that every section's exact map into the reference is known.
"""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

from napari_histreg import conventions as cv
from napari_histreg.conventions import Frame
from napari_histreg.pipeline import RegistrationConfig, RegistrationNeedsCheck
from napari_histreg.result import RegistrationResult
from napari_histreg.stack import StackResult, chain, register_stack
from napari_histreg.stack_order import estimate_order, shortest_path
from napari_histreg.stages.preprocess import PreprocessConfig

#: small grid, short schedules: the stack's logic is under test, not the pair registration's accuracy
FAST = RegistrationConfig(preprocess=PreprocessConfig(working_size=256), nonrigid_method="none")

from stack_data import _apply, _points_inside, _rigid, _true_map, _warp_rgb, make_known_stack, make_section_base


@pytest.fixture(scope="module")
def section_base():
    return make_section_base()


@pytest.fixture(scope="module")
def known_stack(section_base):
    return make_known_stack(section_base)


# ----------------------------------------------------------------------------- composition
def _affine_result(matrix, target_frame: Frame, source_frame: Frame) -> RegistrationResult:
    """A result whose working field is the affine ``matrix`` (working pixels) on ``target_frame``'s grid."""
    field = cv.affine_to_field(matrix, target_frame.shape)[0].numpy()
    return RegistrationResult(field, source_frame, target_frame, np.asarray(matrix, dtype=np.float64))


def test_chain_composes_two_registrations_through_the_frames_of_the_section_they_share():
    """A -> B on one working grid, B -> C on another (different scales and paddings): the chain
    maps C's points to A's exactly as the two maps in turn do, and back."""
    frame_b_inner = Frame((300, 400), (160, 192), (0.4, 0.45), (10.0, 6.0))   # B on the inner (A -> B) grid
    frame_a = Frame((310, 390), (160, 192), (0.41, 0.44), (8.0, 9.0))
    frame_c = Frame((280, 420), (150, 200), (0.5, 0.47), (5.0, 2.0))
    frame_b_outer = Frame((300, 400), (150, 200), (0.48, 0.5), (3.0, 0.0))    # B on the outer (B -> C) grid
    inner = _affine_result(_rigid(7.0, (80, 96), (4.0, -2.0)), frame_b_inner, frame_a)
    outer = _affine_result(_rigid(-5.0, (75, 100), (-3.0, 5.0)), frame_c, frame_b_outer)
    chained = chain(outer, inner)
    points_c = np.array([[50.0, 60.0], [140.0, 300.0], [220.0, 180.0], [10.0, 400.0]])
    expected_a = inner.map_target_points(outer.map_target_points(points_c))
    assert np.allclose(chained.map_target_points(points_c), expected_a, atol=0.02)
    # the chained affine part agrees with the chained field (it is what map_source_points inverts beside)
    working = frame_c.to_working(points_c)
    assert np.allclose(_apply(chained.matrix, working), frame_a.to_working(expected_a), atol=0.02)
    # and the other way: A's points into C
    points_a = inner.map_target_points(outer.map_target_points(points_c))
    assert np.allclose(chained.map_source_points(points_a), points_c, atol=0.05)


# ----------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def registered(known_stack):
    images, _ = known_stack
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationNeedsCheck)
        return register_stack(images, config=FAST, threads=1)


def test_stack_maps_every_section_into_the_middle_reference(registered, known_stack):
    images, to_base = known_stack
    stack = registered
    assert stack.reference == 2 and stack.sections[2].flag == "reference"
    assert [s.registered_to for s in stack.sections] == [1, 2, None, 2]  # neighbours towards the reference
    points = _points_inside()
    for k in (0, 1, 3):
        mapped = stack.map_points(points, k, stack.reference)
        true = _true_map(to_base, k, stack.reference, points)
        before = np.median(np.linalg.norm(points - true, axis=1))
        after = np.median(np.linalg.norm(mapped - true, axis=1))
        assert after < 2.0 and after < before / 5, (k, before, after)  # section 0 went through section 1
    # any section to any other, through the reference, and back
    there = stack.map_points(points, 0, 3)
    assert np.median(np.linalg.norm(there - _true_map(to_base, 0, 3, points), axis=1)) < 2.5
    back = stack.map_points(there, 3, 0)
    assert np.median(np.linalg.norm(back - points, axis=1)) < 0.5


def test_aligned_stack_lines_the_sections_up(registered, known_stack):
    images, _ = known_stack
    aligned = registered.aligned(images)
    assert aligned.shape == (4,) + images[2].shape and aligned.dtype == images[2].dtype
    ref = 1.0 - aligned[2].mean(axis=2)
    for k in (0, 1, 3):
        before = np.corrcoef(1.0 - images[k].mean(axis=2).ravel(), ref.ravel())[0, 1]
        after = np.corrcoef(1.0 - aligned[k].mean(axis=2).ravel(), ref.ravel())[0, 1]
        assert after > before + 0.05 and after > 0.8, (k, before, after)
    # another output size: the reference grid at half resolution
    half = registered.aligned([im[::2, ::2] for im in images], shape=(160, 160))
    assert half.shape == (4, 160, 160, 3)


def test_stack_saves_and_loads_with_the_same_maps(registered, tmp_path):
    path = registered.save(tmp_path / "stack")
    index = json.loads(path.read_text())
    assert index["reference"] == 2 and [e["flag"] for e in index["sections"]][2] == "reference"
    loaded = StackResult.load(tmp_path / "stack")
    points = _points_inside()
    for k in range(4):
        assert np.allclose(loaded.map_points(points, k, 2), registered.map_points(points, k, 2), atol=1e-3)
    # a folder that histreg did not write is refused, the user's file untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="mine"):
        registered.save(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_refine_registers_far_sections_once_more_to_the_reference(known_stack):
    """refine=True: section 0 (two steps from the reference) gets a direct non-rigid refinement
    chained onto its composed transform; its map stays right, its neighbour's is untouched."""
    images, to_base = known_stack
    stack = register_stack(images, config=FAST, refine=True, threads=1)
    assert stack.to_reference(0).info.get("refined") and not stack.to_reference(1).info.get("refined")
    points = _points_inside()
    mapped = stack.map_points(points, 0, 2)
    assert np.median(np.linalg.norm(mapped - _true_map(to_base, 0, 2, points), axis=1)) < 2.0


def test_direct_mode_registers_every_section_to_the_reference(known_stack):
    images, to_base = known_stack
    stack = register_stack(images[:3], reference=0, config=FAST, direct=True, threads=1)
    assert [s.registered_to for s in stack.sections] == [None, 0, 0]
    points = _points_inside()
    mapped = stack.map_points(points, 2, 0)
    assert np.median(np.linalg.norm(mapped - _true_map(to_base, 2, 0, points), axis=1)) < 2.0


def test_a_failing_section_is_reported_and_skipped_across_the_gap(known_stack):
    """Section 1 is unrelated noise: its registration is flagged; with skip_failed it has no
    transform and section 0 is registered across the gap to the reference."""
    images, to_base = known_stack
    rng = np.random.default_rng(3)
    noise = np.clip(0.85 + 0.15 * rng.standard_normal(images[1].shape), 0, 1).astype(np.float32)
    broken = [images[0], noise, images[2], images[3]]
    with pytest.warns(RegistrationNeedsCheck, match="section 1"):
        kept = register_stack(broken, reference=2, config=FAST, threads=1)
    assert kept.sections[1].flag == "check" and 1 in kept.flagged
    with pytest.warns(RegistrationNeedsCheck, match="left out"):
        skipped = register_stack(broken, reference=2, config=FAST, skip_failed=True, threads=1)
    assert skipped.sections[1].flag == "skipped" and skipped.sections[1].transform is None
    assert skipped.sections[0].registered_to == 2  # across the gap
    with pytest.raises(ValueError, match="section 1"):
        skipped.to_reference(1)
    points = _points_inside()
    mapped = skipped.map_points(points, 0, 2)
    assert np.median(np.linalg.norm(mapped - _true_map(to_base, 0, 2, points), axis=1)) < 2.5


def test_bad_stacks_get_clear_errors(known_stack):
    images, _ = known_stack
    from napari_histreg.io import HistRegInputError

    with pytest.raises(HistRegInputError, match="at least two"):
        register_stack(images[:1])
    with pytest.raises(HistRegInputError, match="reference section 7"):
        register_stack(images, reference=7)
    with pytest.raises(ValueError, match="each of the 4 sections once"):
        register_stack(images, order=[0, 1, 1, 2])


# ----------------------------------------------------------------------------- order
def test_shortest_path_finds_the_chain():
    positions = np.array([0.0, 3.0, 1.0, 7.0, 2.0, 5.0])
    distances = np.abs(positions[:, None] - positions[None, :])
    assert shortest_path(distances) in ([0, 2, 4, 1, 5, 3], [3, 5, 1, 4, 2, 0])
    big = np.arange(11.0)[[3, 9, 0, 5, 10, 1, 7, 2, 8, 4, 6]]  # beyond the exact search
    d = np.abs(big[:, None] - big[None, :])
    order = shortest_path(d)
    assert list(big[order]) in (list(np.arange(11.0)), list(np.arange(11.0))[::-1])


def test_estimate_order_recovers_a_shuffled_stack(section_base):
    """Sections drifting further from the first with every step: the order is recovered from
    the images alone (up to its direction)."""
    centre = np.array([159.5, 159.5])
    sections = [_warp_rgb(section_base[0], _rigid(0.0, centre, (0.0, 0.0)))]
    rng = np.random.default_rng(0)
    for k in range(1, 5):  # a growing deformation: each section a little further from the first
        yy, xx = np.mgrid[0:320, 0:320]
        bulge = 6.0 * k * np.exp(-((yy - 160) ** 2 + (xx - 200) ** 2) / (2 * 50.0**2))
        field = np.stack([bulge, -bulge]).astype(np.float32)
        import torch

        image = torch.from_numpy(np.ascontiguousarray(1.0 - section_base[0].transpose(2, 0, 1)))[None]
        warped = 1.0 - cv.warp(image, torch.from_numpy(field)[None])[0].numpy().transpose(1, 2, 0)
        sections.append(np.clip(warped + 0.02 * rng.standard_normal(warped.shape), 0, 1).astype(np.float32))
    shuffle = [3, 0, 4, 1, 2]
    order, distances = estimate_order([sections[k] for k in shuffle])
    recovered = [shuffle[k] for k in order]
    assert recovered in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]), (recovered, np.round(distances, 3))


# ----------------------------------------------------------------------------- the command line
def _write_stack_table(folder, images, to_base, with_landmarks=True):
    from skimage.io import imsave

    from napari_histreg.io import write_landmarks

    points_base = _points_inside()
    lines = ["Image,Landmarks"]
    for k, image in enumerate(images):
        name = f"section_{k}.png"
        imsave(folder / name, (image * 255).astype(np.uint8), check_contrast=False)
        # the base points as they appear in section k: p with to_base[k](p) = base point
        a, b = np.asarray(to_base[k])[:, :2], np.asarray(to_base[k])[:, 2]
        in_section = (points_base - b) @ np.linalg.inv(a).T
        if with_landmarks:
            write_landmarks(folder / f"section_{k}.csv", [str(i) for i in range(len(in_section))], in_section)
        lines.append(f"{name},{f'section_{k}.csv' if with_landmarks else ''}")
    (folder / "stack.csv").write_text("\n".join(lines) + "\n")
    return folder / "stack.csv"


def test_register_stack_command_writes_the_stack_folder(tmp_path, known_stack):
    """``histreg register-stack``: sections.csv with flags and landmark errors, summary.json,
    the transforms (loadable), the landmarks in the reference frame and the aligned preview."""
    import tifffile

    from console import histreg

    images, to_base = known_stack
    table = _write_stack_table(tmp_path, images, to_base)
    out = tmp_path / "out"
    code = histreg(["register-stack", str(table), "-o", str(out), "--working-size", "256", "--method", "none",
                    "--threads", "1", "-q", "--preview-size", "200"])
    assert code == 0
    with open(out / "sections.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["flag"] for r in rows] == ["ok", "ok", "reference", "ok"]
    for r in rows:
        if r["flag"] != "reference":
            assert float(r["MrTRE"]) < float(r["initial_MrTRE"]) / 4 and float(r["MrTRE"]) < 0.01, r
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == 2 and summary["flagged"] == 0 and summary["MMrTRE"] < 0.01
    stack = StackResult.load(out / "stack")
    assert [s.flag for s in stack.sections] == ["ok", "ok", "reference", "ok"]
    preview = tifffile.imread(out / "aligned.ome.tif")
    assert preview.shape == (4, 200, 200, 3)
    mapped = sorted(p.name for p in (out / "landmarks").iterdir())
    assert mapped == [f"{k:03d}-section_{k}_in_reference.csv" for k in range(4)]
    # a table whose image is missing: exit 2, the line named, nothing written
    (tmp_path / "bad.csv").write_text("Image\nsection_0.png\nmissing.png\n")
    code = histreg(["register-stack", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "bad_out"), "-q"])
    assert code == 2 and not (tmp_path / "bad_out").exists()


def test_whole_slide_stack_is_written_plane_by_plane_into_one_ome_zarr(tmp_path, registered, known_stack):
    """warp_stack: the sections at full resolution, tile by tile, as the z planes of one
    OME-Zarr (NGFF axes c, z, y, x), equal to the in-memory aligned stack; a pyramid below."""
    import zarr

    from napari_histreg.stack_slides import warp_stack

    images, _ = known_stack
    uint8 = [(im * 255).round().astype(np.uint8) for im in images]
    out = warp_stack(registered, uint8, tmp_path / "stack.ome.zarr", tile=128, workers=2, threads=1)
    group = zarr.open_group(str(out), mode="r")
    attrs = group.attrs["multiscales"][0]
    assert [a["name"] for a in attrs["axes"]] == ["c", "z", "y", "x"]
    level0 = np.asarray(group["0"])
    assert level0.shape == (3, 4, 320, 320)
    expected = registered.aligned(uint8, cval=float(np.median(uint8[2][0])))
    planes = np.moveaxis(level0, 0, -1)
    assert np.abs(planes.astype(int) - expected.astype(int)).max() <= 1
    assert np.asarray(group["1"]).shape == (3, 4, 160, 160)
    assert not (tmp_path / "stack.ome.zarr.partial").exists()
    # napari's slide reader opens it as one multiscale layer, z = section; the 2D slide path refuses it
    from napari_histreg._napari.widgets.slide import slide_layer_data
    from napari_histreg.io import HistRegInputError
    from napari_histreg.slides import open_slide

    data, meta, kind = slide_layer_data(out)
    assert kind == "image" and meta["rgb"] and meta["multiscale"] and data[0].shape == (4, 320, 320, 3)
    np.testing.assert_array_equal(np.asarray(data[0][1]), planes[1])
    with pytest.raises(HistRegInputError, match="stack of 4 planes"):
        open_slide(out)


def test_neighbour_pairs_run_in_parallel_on_dask_workers(known_stack, registered):
    """workers=2: the pair registrations run on a local dask cluster (worker processes) and give
    the same maps as the in-process run."""
    images, _ = known_stack
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationNeedsCheck)
        parallel = register_stack(images, config=FAST, workers=2, threads=1)
    assert [s.flag for s in parallel.sections] == [s.flag for s in registered.sections]
    points = _points_inside()
    for k in (0, 1, 3):
        np.testing.assert_allclose(parallel.map_points(points, k, 2), registered.map_points(points, k, 2), atol=0.05)
