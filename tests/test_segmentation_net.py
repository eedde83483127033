"""Tissue segmentation U-Net: shapes, training, shipped weights, and masks of real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_histreg.io import read_image
from napari_histreg.networks.checkpoint import build_network, cached_network, load_network, shipped_weights_path
from napari_histreg.networks.segmentation import TissueUNet
from napari_histreg.stages.mask import otsu_tissue_mask
from napari_histreg.stages.preprocess import PreprocessConfig, preprocess_pair
from napari_histreg.stages.segment import UNetMaskConfig, tissue_probability, unet_tissue_mask
from napari_histreg.training.data import make_training_image
from napari_histreg.training.loop import TrainOptions
from napari_histreg.training.segmentation import (
    AugmentConfig,
    dice,
    pseudo_tissue_label,
    train_segmentation,
)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")),
]

KIDNEY_HE = "rat-kidney/Rat-Kidney_HE.jpg"
KIDNEY_PCK = "rat-kidney/Rat-Kidney_PanCytokeratin.jpg"
LUNG_HE = "lung-lesion-1/scale-5pc/Izd2-29-041-w35_HE.jpg"


def _working(shared_data, name, size=768):
    """RGB and working grey (tissue bright) of a real image at longer side ``size``."""
    image = make_training_image(read_image(shared_data / name), name, "test", size)
    return image.rgb, image.grey


# --------------------------------------------------------------------------- network
@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 1, 37, 53), (1, 1, 129, 300)])
def test_forward_keeps_any_shape(shape):
    torch.manual_seed(0)
    model = TissueUNet().eval()
    with torch.no_grad():
        out = model(torch.rand(shape))
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_config_is_json_and_rebuilds():
    model = TissueUNet(channels=[4, 8, 16], stem_stride=1, convs_per_level=2)
    assert model.kind == "segmentation"
    config = json.loads(json.dumps(model.config))
    rebuilt = build_network("segmentation", config)
    assert rebuilt.config == model.config
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
    with torch.no_grad():
        assert rebuilt(torch.rand(1, 1, 20, 28)).shape == (1, 1, 20, 28)  # multiple 4, padded inside
    with pytest.raises(ValueError):
        TissueUNet(stem_stride=3)


def test_padding_does_not_shift_the_output():
    """Zero-padding inside forward must be centred and cropped back exactly: a network of
    identity-like behaviour is hard to build, so compare a padded input's result with the
    unpadded result of the same (multiple-sized) interior."""
    torch.manual_seed(0)
    model = TissueUNet(channels=[4, 8, 16], stem_stride=1).eval()
    x = torch.zeros(1, 1, 64, 64)
    x[..., 16:48, 16:48] = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        full = model(x)
        inner = model(x[..., 1:63, 1:63])  # 62 -> padded to 64 by one zero pixel each side
    torch.testing.assert_close(inner, full[..., 1:63, 1:63], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- training
def _tiny_images():
    """Two tiny RGB 'slides': pink and brown blobs on white glass."""
    yy, xx = np.mgrid[:96, :128]
    images = []
    for k, colour in enumerate(([0.85, 0.45, 0.65], [0.6, 0.4, 0.25])):
        blob = ((yy - 48) / 30.0) ** 2 + ((xx - 50 - 20 * k) / 40.0) ** 2 < 1
        rgb = np.full((96, 128, 3), 0.95, np.float32)
        rgb[blob] = colour
        rgb += np.random.default_rng(k).normal(0, 0.01, rgb.shape).astype(np.float32)
        images.append(make_training_image(np.clip(rgb, 0, 1), f"tiny{k}", f"group{k}", 128))
    return images


def test_pseudo_label_of_a_blob_is_the_blob():
    image = _tiny_images()[0]
    yy, xx = np.mgrid[:96, :128]
    blob = ((yy - 48) / 30.0) ** 2 + ((xx - 50) / 40.0) ** 2 < 1
    label = pseudo_tissue_label(image.rgb)
    # The whole blob, and at most a thin rim of glass (the threshold sits just above the glass).
    assert label[blob].all()
    assert not label[~ndi.binary_dilation(blob, iterations=3)].any()


def test_training_steps_lower_the_loss(tmp_path):
    weights = tmp_path / "seg.pt"
    options = TrainOptions(steps=40, learning_rate=1e-2, seed=1, checkpoint_every=1000, progress=False)
    report = train_segmentation(
        _tiny_images(), weights, options, device="cpu", size=96, batch_size=4,
        augment=AugmentConfig(crop=64), network={"channels": [4, 8, 16, 32]}, include_skimage=False,
    )
    first, last = np.mean(report.losses[:8]), np.mean(report.losses[-8:])
    assert last < 0.75 * first, (first, last)
    model = load_network(weights, kind="segmentation")
    assert model.config["channels"] == [4, 8, 16, 32]
    assert "pseudo-labels" in model.meta["labels"] and model.meta["steps"] == 40


# --------------------------------------------------------------------------- shipped weights, real images
def test_shipped_weights_exist_and_describe_their_training():
    assert shipped_weights_path("segmentation").exists()
    model = load_network("segmentation")
    assert isinstance(model, TissueUNet)
    assert model.meta["steps"] > 0 and "pseudo-labels" in model.meta["labels"]
    assert shipped_weights_path("segmentation").stat().st_size < 5e6


def test_shipped_weights_beat_an_untrained_network(shared_data):
    rgb, grey = _working(shared_data, KIDNEY_PCK)
    label = pseudo_tissue_label(rgb)
    trained = dice(unet_tissue_mask(grey), label)
    torch.manual_seed(0)
    untrained = TissueUNet(**load_network("segmentation").config).eval()
    random_mask = tissue_probability(grey, model=untrained) > 0.5
    assert trained > 0.95
    assert trained > dice(random_mask, label) + 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_mask_separates_tissue_from_glass_and_padding(shared_data, device):
    """On the rat kidney pair as the pipeline prepares it (working size 768, zero padding):
    tissue far inside the cleaned Otsu mask is tissue, glass and padding far outside it is
    not."""
    pair = preprocess_pair(read_image(shared_data / KIDNEY_PCK), read_image(shared_data / KIDNEY_HE), PreprocessConfig())
    for image in (pair.source, pair.target):
        probability = tissue_probability(image, device=device)
        mask = unet_tissue_mask(image, device=device)  # dilated by 8 px
        assert mask.shape == image.shape and mask.dtype == bool
        otsu = otsu_tissue_mask(image)
        inside = ndi.binary_erosion(otsu, iterations=10)
        # Otsu misses some pale tissue of the hilum next to its mask: "glass" starts 20 px out.
        glass = ~ndi.binary_dilation(otsu, iterations=20)
        assert probability[inside].mean() > 0.95
        assert probability[glass].mean() < 0.02
        assert (probability[glass] > 0.5).mean() < 0.005  # glass and padding labelled tissue
        assert mask[inside].all()
        assert not mask[~ndi.binary_dilation(otsu, iterations=40)].any()


def test_mask_keeps_pale_tissue_of_a_full_field_section(shared_data):
    """The lung lesion section fills the whole field of view: a dark lesion in pale
    parenchyma. The U-Net keeps the parenchyma (most of the image is tissue), and all of the
    lesion."""
    _, grey = _working(shared_data, LUNG_HE)
    mask = unet_tissue_mask(grey)
    lesion = ndi.binary_erosion(otsu_tissue_mask(grey), iterations=10)
    assert mask.mean() > 0.8
    assert mask[lesion].mean() > 0.99


def test_mask_stage_contract_and_cache(shared_data):
    _, grey = _working(shared_data, KIDNEY_HE, size=576)
    square = np.zeros((576, 576), np.float32)
    square[: grey.shape[0]] = grey
    cached_network.cache_clear()
    first = unet_tissue_mask(square)
    second = unet_tissue_mask(square, UNetMaskConfig())
    info = cached_network.cache_info()
    assert info.misses == 1 and info.hits >= 1
    np.testing.assert_array_equal(first, second)
    assert first.shape == (576, 576) and first.dtype == bool
    assert not first[grey.shape[0] + 10 :].any()  # the zero padding is background (8 px dilation)
    undilated = unet_tissue_mask(square, UNetMaskConfig(dilation=0))
    assert undilated.sum() < first.sum() and first[undilated].all()
    # Larger threshold -> smaller mask; an explicit weights path works like the kind name.
    stricter = unet_tissue_mask(square, UNetMaskConfig(weights=str(shipped_weights_path("segmentation")), threshold=0.9))
    assert stricter.sum() <= first.sum() and dice(stricter, first) > 0.95
