"""The bundled sample pair (``napari_histreg.sample``): built from scikit-image's data only,
deterministic, with a ground-truth field and landmarks that agree with it, and registrable."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_histreg import conventions as cv
from napari_histreg.metrics import pair_metrics, rtre
from napari_histreg.sample import SamplePair, make_sample_pair, sample_layer_data


@pytest.fixture(scope="module")
def pair() -> SamplePair:
    return make_sample_pair(0)


def _grey(rgb):
    return np.asarray(rgb, dtype=np.float64) @ np.array([0.2125, 0.7154, 0.0721]) / 255.0


def test_shapes_and_dtypes(pair):
    assert pair.source.shape == pair.target.shape == (512, 512, 3)
    assert pair.source.dtype == pair.target.dtype == np.uint8
    n = len(pair.ids)
    assert 15 <= n <= 20
    assert pair.source_landmarks.shape == pair.target_landmarks.shape == (n, 2)
    assert pair.source_landmarks.dtype == pair.target_landmarks.dtype == np.float64
    assert pair.ids.dtype.kind == "U" and len(set(pair.ids.tolist())) == n
    assert pair.true_field.shape == (2, 512, 512) and pair.true_field.dtype == np.float32
    assert pair.matrix.shape == (2, 3)


def test_cached_but_each_caller_gets_its_own_arrays():
    make_sample_pair(0)
    hits = make_sample_pair.cache_info().hits
    mine = make_sample_pair(0)
    assert make_sample_pair.cache_info().hits == hits + 1  # not rebuilt
    for name in ("source", "target", "source_landmarks", "target_landmarks", "true_field"):
        array = getattr(mine, name)
        assert array.flags.writeable, name
        array[...] = 0  # scribbling on my copy ...
    assert make_sample_pair(0).source.any()  # ... leaves the cache intact


def test_deterministic_and_seeded(pair):
    from napari_histreg.sample import _build_sample_pair

    fresh = _build_sample_pair.__wrapped__(0)  # recomputed without the cache
    for name in ("source", "target", "source_landmarks", "target_landmarks", "ids", "true_field"):
        np.testing.assert_array_equal(getattr(fresh, name), getattr(pair, name), err_msg=name)
    other = make_sample_pair(1)
    assert not np.array_equal(other.source, pair.source)
    assert not np.allclose(other.true_field, pair.true_field)


def test_looks_like_two_stains_on_glass(pair):
    # White glass around the tissue in both images, as on a slide.
    for image in (pair.source, pair.target):
        assert (image[:5, :5] >= 250).all() and (image[-5:, -5:] >= 250).all()
    # Haematoxylin is blue (B > R); the DAB section is brown (R > B) inside the tissue.
    tissue = _grey(pair.target) < 0.85
    assert pair.target[tissue][:, 2].mean() > pair.target[tissue][:, 0].mean() + 20
    tissue_s = _grey(pair.source) < 0.85
    assert pair.source[tissue_s][:, 0].mean() > pair.source[tissue_s][:, 2].mean() + 20


def test_landmarks_inside_the_tissue(pair):
    h, w = pair.target.shape[:2]
    for points in (pair.target_landmarks, pair.source_landmarks):
        assert (points >= 10).all() and (points[:, 0] <= h - 11).all() and (points[:, 1] <= w - 11).all()
    rows, cols = np.round(pair.target_landmarks).astype(int).T
    assert (_grey(pair.target)[rows, cols] < 0.95).all()  # not on glass
    # Well spread: no two closer than 5% of the image size.
    d = np.linalg.norm(pair.target_landmarks[:, None] - pair.target_landmarks[None], axis=-1)
    assert d[np.triu_indices(len(d), 1)].min() > 0.05 * min(h, w)


def test_landmarks_follow_the_true_field(pair):
    field = pair.true_field
    np.testing.assert_allclose(cv.map_target_to_source(pair.target_landmarks, field), pair.source_landmarks, atol=1e-4)
    rows, cols = pair.target_landmarks.astype(int).T  # integer pixel positions: no interpolation
    np.testing.assert_allclose(pair.target_landmarks + field[:, rows, cols].T, pair.source_landmarks, atol=1e-4)
    back = cv.map_source_to_target(pair.source_landmarks, field)
    assert np.abs(back - pair.target_landmarks).max() < 0.05


def test_true_field_brings_the_source_onto_the_target(pair):
    """warp(source, true_field) is the DAB section before it was moved: the same tissue outline
    as the target and the same pixels as the unwarped DAB rendering."""
    from napari_histreg import sample as sample_module

    dark = torch.as_tensor(255.0 - pair.source.transpose(2, 0, 1).astype(np.float32))[None]
    field = torch.as_tensor(np.array(pair.true_field))[None]
    warped = 255.0 - cv.warp(dark, field)[0].numpy().transpose(1, 2, 0)
    rng = np.random.default_rng(0)  # the outline is the first thing drawn from the seed
    haem, dab = sample_module._stains()
    soft = sample_module._tissue_outline(haem.shape, rng)
    moving = sample_module._render(soft, h=haem, d=dab)
    outline = soft > 0.5

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    tissue = _grey(moving) < 0.99
    assert iou(tissue, outline) > 0.95  # the sections are on white glass
    assert iou(_grey(warped) < 0.99, tissue) > 0.98
    assert iou(_grey(pair.source) < 0.99, tissue) < 0.93
    inner = (slice(40, -40), slice(40, -40))
    close = np.abs(warped[inner] - moving[inner]).mean()  # two bilinear resamplings apart
    assert close < 3.0
    assert np.abs(pair.source[inner] - moving[inner].astype(np.float64)).mean() > 5 * close


def test_initial_error_is_clearly_nonzero(pair):
    before = np.median(rtre(pair.source_landmarks, pair.target_landmarks, pair.target.shape))
    assert 0.015 < before < 0.05
    for seed in (1, 2):
        other = make_sample_pair(seed)
        assert np.median(rtre(other.source_landmarks, other.target_landmarks, other.target.shape)) > 0.01


def test_registration_recovers_the_sample(pair):
    from napari_histreg import register

    result = register(pair.source, pair.target)
    mapped = result.map_source_points(pair.source_landmarks)
    metrics = pair_metrics(pair.source_landmarks, mapped, pair.target_landmarks, pair.target.shape)
    assert metrics["initial_MrTRE"] > 0.015
    assert metrics["MrTRE"] < 0.01
    assert metrics["MrTRE"] < metrics["initial_MrTRE"] / 5
    assert metrics["robustness"] > 0.9
    # The recovered field is close to the truth inside the tissue.
    field = result.field()
    err = np.linalg.norm(field - pair.true_field, axis=0)
    inner = _grey(pair.target)[100:-100, 100:-100] < 0.95
    assert np.median(err[100:-100, 100:-100][inner]) < 3.0


def test_layer_data_tuples(pair):
    layers = sample_layer_data()
    assert [kind for _, _, kind in layers] == ["image", "image", "points", "points"]
    (target, t_meta, _), (source, s_meta, _), (t_pts, tp_meta, _), (s_pts, sp_meta, _) = layers
    assert t_meta["name"] == "sample target (H-stain)"
    assert len({m["name"] for _, m, _ in layers}) == 4
    np.testing.assert_array_equal(target, pair.target)
    np.testing.assert_array_equal(source, pair.source)
    np.testing.assert_array_equal(t_pts, pair.target_landmarks)
    np.testing.assert_array_equal(s_pts, pair.source_landmarks)
    np.testing.assert_array_equal(tp_meta["features"]["id"], pair.ids)
    np.testing.assert_array_equal(sp_meta["features"]["id"], pair.ids)
    # A layer that edits its data (moving a point) must be able to, without touching the cache.
    assert target.flags.writeable and t_pts.flags.writeable
    t_pts[0] = -1.0
    assert (sample_layer_data()[2][0][0] == pair.target_landmarks[0]).all()


def test_layer_data_builds_napari_layers():
    layers_module = pytest.importorskip("napari.layers")
    for data, meta, kind in sample_layer_data():
        layer = layers_module.Layer.create(data, meta, kind)
        assert layer.name == meta["name"]
        if kind == "image":
            assert layer.rgb
        else:
            assert list(layer.features["id"]) == list(meta["features"]["id"])


def test_sample_does_not_import_napari_or_qt():
    code = (
        "import sys; from napari_histreg.sample import sample_layer_data; sample_layer_data(); "
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
