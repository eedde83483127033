"""Issue 12: an initial alignment that sections without an outline cannot fool, mirrored
sections, and a confidence that flags a result that may be wrong.

The sections are scikit-image's immunohistochemistry image (tissue everywhere, no outline),
rendered by colour deconvolution as a dark haematoxylin + DAB section and a pale haematoxylin
one: two stains of one section, aligned by construction, then cropped inside the tissue and
turned by a known angle.
"""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch

from napari_histreg import conventions as cv
from napari_histreg.pipeline import RegistrationConfig, RegistrationNeedsCheck, register
from napari_histreg.stages.initial import InitialAlignmentConfig
from napari_histreg.stages.preprocess import PreprocessConfig

#: rigid search and affine only, on a small grid: what this file tests is the initial choice
FAST = dict(preprocess=PreprocessConfig(working_size=256), nonrigid_method="none")


@pytest.fixture(scope="module")
def ihc_stains():
    import skimage.data
    from skimage.color import hed2rgb, rgb2hed

    rgb = skimage.data.immunohistochemistry()[::2, ::2] / 255.0  # 256 x 256
    hed = rgb2hed(np.clip(rgb, 1e-4, 1))
    # a dark haematoxylin + DAB rendering (fixed) and a pale haematoxylin one (moving)
    dark = hed2rgb(hed * [1.5, 0.0, 0.3])
    pale = hed2rgb(hed * [0.6, 0.0, 0.0])
    return np.clip(dark, 0, 1).astype(np.float32), np.clip(pale, 0, 1).astype(np.float32)


def _inner_crop_pair(moving, fixed, angle, mirror=False, crop=0.55, shift=(5.0, -4.0)):
    """Target: ``fixed`` inside a centred box; source: ``moving`` over the same box turned by
    ``angle`` (and mirrored): ``source(p) = moving(c + R M (p + o - c) + shift)``. Returns the
    images and matching source / target points (``(row, col)``, crop pixels)."""
    h, w = fixed.shape[:2]
    ch, cw = round(crop * h), round(crop * w)
    r0, c0 = (h - ch) // 2, (w - cw) // 2
    centre = np.array([r0 + (ch - 1) / 2, c0 + (cw - 1) / 2])
    t = np.deg2rad(angle)
    linear = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if mirror:
        linear = linear @ np.diag([1.0, -1.0])
    grid = cv.identity_grid((ch, cw)).numpy().reshape(2, -1).T.astype(np.float64)
    mapped = (grid + [r0, c0] - centre) @ linear.T + centre + shift
    field = torch.from_numpy((mapped - grid).T.reshape(2, ch, cw).astype(np.float32))[None]
    image = torch.from_numpy(np.ascontiguousarray(1.0 - moving.transpose(2, 0, 1)))[None]
    source = (1.0 - cv.warp(image, field)[0].numpy().transpose(1, 2, 0)).astype(np.float32)
    target = np.ascontiguousarray(fixed[r0 : r0 + ch, c0 : c0 + cw])
    rows, cols = np.mgrid[12 : ch - 12 : 10, 12 : cw - 12 : 10]
    source_rc = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    target_rc = (source_rc + [r0, c0] - centre) @ linear.T + centre + shift - [r0, c0]
    keep = ((target_rc >= 0) & (target_rc <= np.array([ch, cw]) - 1)).all(axis=1)
    return source, target, source_rc[keep], target_rc[keep]


def _relative_error(result, source_rc, target_rc, shape):
    mapped = result.map_source_points(source_rc)
    return float(np.median(np.linalg.norm(mapped - target_rc, axis=1)) / np.hypot(*shape[:2]))


@pytest.mark.parametrize("angle", [0.0, 75.0, 160.0, 250.0, 330.0])
def test_inner_crop_rotation_is_recovered_at_any_angle(ihc_stains, angle):
    """A crop inside the tissue (no outline), in another stain, turned by any angle."""
    fixed, moving = ihc_stains
    source, target, source_rc, target_rc = _inner_crop_pair(moving, fixed, angle)
    initial = 0.0 if angle == 0 else float(np.median(np.linalg.norm(source_rc - target_rc, axis=1)) / np.hypot(*target.shape[:2]))
    result = register(source, target, RegistrationConfig(**FAST), threads=1)
    error = _relative_error(result, source_rc, target_rc, target.shape)
    assert error < 0.01, (angle, error, result.info["initial"]["chosen"])
    assert angle == 0 or error < initial / 10
    assert result.flag == "ok", result.confidence


def test_mirrored_section_is_recovered_when_mirroring_is_on(ihc_stains):
    fixed, moving = ihc_stains
    source, target, source_rc, target_rc = _inner_crop_pair(moving, fixed, 30.0, mirror=True)
    result = register(source, target, RegistrationConfig(**FAST), threads=1)
    assert result.info["initial"]["mirrored"] is True
    assert np.linalg.det(result.matrix[:, :2]) < 0  # the section is turned over, not folded
    assert _relative_error(result, source_rc, target_rc, target.shape) < 0.01
    assert result.flag == "ok", result.confidence
    # mirroring off: no hypothesis can reach it, and the result says so
    config = RegistrationConfig(**FAST, initial=InitialAlignmentConfig(mirrored=False))
    with pytest.warns(RegistrationNeedsCheck):
        unmirrored = register(source, target, config, threads=1)
    assert _relative_error(unmirrored, source_rc, target_rc, target.shape) > 0.05
    assert unmirrored.flag == "check"


def test_unrelated_images_are_flagged(ihc_stains):
    """Two images that are not sections of one block: whatever the pipeline returns, it must
    not pass as fine."""
    import skimage.data

    astronaut = skimage.data.astronaut()[::2, ::2]
    with pytest.warns(RegistrationNeedsCheck, match="needs a look"):
        result = register(astronaut, ihc_stains[0], RegistrationConfig(preprocess=PreprocessConfig(working_size=256)),
                          threads=1)
    assert result.flag == "check" and result.confidence["score"] < 0.5
    assert result.confidence["weakest"] in result.confidence["measures"]


def test_hypotheses_are_kept_in_the_result(ihc_stains):
    fixed, moving = ihc_stains
    source, target, _, _ = _inner_crop_pair(moving, fixed, 120.0)
    result = register(source, target, RegistrationConfig(**FAST), threads=1)
    initial = result.info["initial"]
    labels = [h["label"] for h in initial["hypotheses"]]
    assert sum(label.startswith("rotation peak") for label in labels) == 4
    assert sum(label.startswith("mirrored rotation peak") for label in labels) == 2
    assert "unrotated" in labels and any(label.startswith("features") for label in labels)
    assert initial["chosen"] in labels
    chosen = next(h for h in initial["hypotheses"] if h["label"] == initial["chosen"])
    # the pipeline's matrices map target to source: the section turned by 120 degrees is found at -120
    assert chosen["agrees"] and abs((chosen["angle"] + 120.0 + 180) % 360 - 180) < 5
    decisive = [h for h in initial["hypotheses"] if h["decisive"]]
    assert len(decisive) == 1 and decisive[0]["agrees"]
    best = decisive[0]["local_ncc"]
    if not decisive[0]["label"].startswith("features"):  # a trusted feature match may score lower
        assert best == max(h["local_ncc"] for h in initial["hypotheses"])
    assert best - max(h["local_ncc"] for h in initial["hypotheses"] if not h["agrees"]) == pytest.approx(initial["margin"], abs=1e-4)
    saved = result.confidence
    assert set(saved) == {"score", "flag", "weakest", "measures"} and saved["measures"]["margin"] == initial["margin"]


@pytest.mark.parametrize("angle, mirror", [(0.0, False), (90.0, False), (180.0, False), (135.0, True)])
def test_source_points_map_through_any_rotation_or_mirror(angle, mirror):
    """``map_source_to_target`` inverts the backward field for turns beyond 60 degrees and for
    mirrors (the plain fixed-point iteration diverges there), with a smooth residual on top."""
    shape = (120, 150)
    centre = (np.asarray(shape) - 1) / 2
    matrix = cv.rotation_about(centre, angle, (3.0, -2.0))
    if mirror:
        matrix = matrix @ np.array([[1.0, 0, 0], [0, -1.0, shape[1] - 1.0], [0, 0, 1.0]])
    field = cv.affine_to_field(matrix, shape)[0]
    rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    field = field + 2.0 * torch.stack((torch.sin(cols / 25.0), torch.cos(rows / 30.0)))
    targets = np.array([[20.0, 30.0], [60.0, 75.0], [100.0, 140.0], [5.0, 5.0]])
    sources = cv.map_target_to_source(targets, field)
    assert np.abs(cv.map_source_to_target(sources, field) - targets).max() < 0.01
    inverse = cv.invert_field(field[None], iterations=30)[0]
    central = np.array([[40.0, 60.0], [70.0, 90.0], [55.0, 80.0]])  # whose source points lie on the grid too
    round_trip = cv.map_target_to_source(cv.map_target_to_source(central, field), inverse)
    assert np.abs(round_trip - central).max() < 0.05


def test_evaluate_flags_an_unrelated_pair_in_pairs_csv(tmp_path, ihc_stains):
    """The confidence columns of ``pairs.csv`` and the summary's count of flagged pairs."""
    import skimage.data
    from skimage.io import imsave

    from napari_histreg.evaluate import evaluate_table

    fixed, moving = ihc_stains
    source, target, source_rc, target_rc = _inner_crop_pair(moving, fixed, 200.0)
    imsave(tmp_path / "dab.png", (source * 255).astype(np.uint8), check_contrast=False)
    imsave(tmp_path / "h.png", (target * 255).astype(np.uint8), check_contrast=False)
    imsave(tmp_path / "astronaut.png", skimage.data.astronaut()[::3, ::3], check_contrast=False)
    for name, points in (("dab", source_rc), ("h", target_rc), ("astronaut", source_rc)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["", "X", "Y"])
            writer.writerows([k, c, r] for k, (r, c) in enumerate(points))
    table = tmp_path / "cover.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Source image", "Source landmarks", "Target image", "Target landmarks", "status"])
        writer.writerow(["dab.png", "dab.csv", "h.png", "h.csv", "related"])
        writer.writerow(["astronaut.png", "astronaut.csv", "h.png", "h.csv", "unrelated"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, summary = evaluate_table(table, tmp_path / "out", config=RegistrationConfig(**FAST), threads=1)
    with open(tmp_path / "out" / "pairs.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["flag"] for r in written] == ["ok", "check"]
    assert float(written[0]["confidence"]) >= 0.5 > float(written[1]["confidence"])
    assert float(written[0]["MrTRE"]) < 0.01
    assert summary["flagged"] == 1 and summary["per_status"]["unrelated"]["flagged"] == 1
    named = [str(w.message) for w in caught if issubclass(w.category, RegistrationNeedsCheck)]
    assert named == ["astronaut.png -> h.png needs a look: " + named[0].split("needs a look: ")[1]]


def test_padding_edges_do_not_score_a_placement(ihc_stains):
    """The choice criterion counts only windows inside both images' content: a crop laid on an
    unrelated, turned crop of the same size scores far below the right placement, even though
    its zero-padded frame lines up exactly (the inner-crop failure: whole-grid local NCC rated
    the unrotated start above the right 55 degree turn)."""
    from napari_histreg.pipeline import Pipeline
    from napari_histreg.stages.initial import _local_scores, content_box

    fixed, moving = ihc_stains
    source, target, _, _ = _inner_crop_pair(moving, fixed, 55.0)
    pair = Pipeline(RegistrationConfig(**FAST)).preprocess(source, target)
    assert not content_box(pair.target).all()  # the padding is there to be ignored
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    right = register(source, target, RegistrationConfig(**FAST), threads=1).matrix
    wrong, good = _local_scores(pair.source, pair.target, np.stack([identity, right]), InitialAlignmentConfig(), None)
    assert good > 2 * wrong, (good, wrong)


def test_affine_result_that_lowers_local_ncc_is_dropped_for_its_start(ihc_stains):
    """``affine_or_start`` keeps a right start over a worse "refinement" and says so, and keeps
    a refinement that does not lower the criterion."""
    from napari_histreg.pipeline import AffineResultRejected, Pipeline, affine_or_start

    fixed, moving = ihc_stains
    source, target, _, _ = _inner_crop_pair(moving, fixed, 30.0)
    pair = Pipeline(RegistrationConfig(**FAST)).preprocess(source, target)
    right = register(source, target, RegistrationConfig(**FAST), threads=1).matrix
    turn = cv.rotation_about((np.array(pair.target.shape) - 1) / 2, 12.0)
    drifted = (np.vstack([right, [0, 0, 1]]) @ np.vstack([turn, [0, 0, 1]]))[:2]  # 12 degrees off
    with pytest.warns(AffineResultRejected):
        kept, info = affine_or_start(pair.source, pair.target, right, drifted)
    assert info["kept"] == "start" and np.allclose(kept, right)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AffineResultRejected)
        kept, info = affine_or_start(pair.source, pair.target, drifted, right)
    assert info["kept"] == "affine" and np.allclose(kept, right)
