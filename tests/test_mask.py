"""The Otsu tissue mask (stages/mask.py) on a real section, a known outline and a blank image.

Data: :mod:`stage_data` (two stains of one section, exactly aligned; the rat kidney pair)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_histreg.stages.mask import otsu_tissue_mask


def test_otsu_mask_on_a_real_section(kidney, kidney_working):
    for working, frame, landmarks, image in (
        (kidney_working.target, kidney_working.target_frame, kidney.target_lm, kidney.target),
        (kidney_working.source, kidney_working.source_frame, kidney.source_lm, kidney.source),
    ):
        mask = otsu_tissue_mask(working)
        assert mask.dtype == bool and mask.shape == working.shape
        assert 0.3 < mask.mean() < 0.9
        q = np.round(frame.to_working(landmarks)).astype(int)
        assert mask[q[:, 0], q[:, 1]].mean() > 0.9  # landmarks are on tissue
        h, w = image.shape[:2]
        corners = np.round(frame.to_working([[8, 8], [8, w - 9], [h - 9, 8], [h - 9, w - 9]])).astype(int)
        assert not mask[corners[:, 0], corners[:, 1]].any()  # glass is not


def test_otsu_mask_matches_a_known_outline(stains, stains_working):
    frame = stains_working.target_frame
    mask = otsu_tissue_mask(stains_working.target)
    rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
    back = np.round(frame.to_original(np.stack((rows.ravel(), cols.ravel()), axis=1))).astype(int)
    ok = (back >= 0).all(1) & (back[:, 0] < stains.outline.shape[0]) & (back[:, 1] < stains.outline.shape[1])
    truth = np.zeros(mask.size, bool)
    truth[ok] = stains.outline[back[ok, 0], back[ok, 1]]
    truth = truth.reshape(mask.shape)
    # Glass is never taken for tissue; most of the tissue is found (Otsu drops pale stroma
    # that opens onto the section's edge: a baseline, not the learned mask).
    assert (mask & ~truth).sum() / mask.sum() < 0.05
    assert (mask & truth).sum() / truth.sum() > 0.85


def test_otsu_mask_of_a_blank_image_is_empty():
    assert not otsu_tissue_mask(np.zeros((64, 64), np.float32)).any()





@pytest.mark.parametrize("radius", [1, 3, 5])
def test_opencv_morphology_equals_scipy(radius):
    """The mask's closing and dilation (OpenCV, for speed) are scipy's, borders included."""
    from scipy import ndimage as ndi

    from napari_histreg.stages.mask import _disk, binary_closing, binary_dilation

    rng = np.random.default_rng(radius)
    mask = ndi.gaussian_filter(rng.random((97, 130)), 2) > 0.5  # blobs touching every edge
    mask[:, :3] = True  # a band along the border: where the closing's border rule shows
    structure = _disk(radius)
    assert np.array_equal(binary_closing(mask, radius), ndi.binary_closing(mask, structure=structure))
    assert np.array_equal(binary_dilation(mask, radius), ndi.binary_dilation(mask, structure=structure))
