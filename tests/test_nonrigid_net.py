"""The learned non-rigid stage: patch U-Net, its patch-group trainer, the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_histreg.conventions import to_tensor, warp
from napari_histreg.networks.checkpoint import load_network, save_network, shipped_weights_path
from napari_histreg.networks.nonrigid import PatchFieldUNet
from napari_histreg.stages.learned_nonrigid import (
    CPU_GROUP_BUDGET,
    LearnedNonrigidConfig,
    NetworkPredictor,
    bytes_per_patch,
    choose_group_size,
    learned_nonrigid,
    load_nonrigid_network,
)
from napari_histreg.training.data import random_smooth_field, skimage_images
from napari_histreg.training.loop import TrainOptions
from napari_histreg.training.nonrigid import NonrigidSamples, NonrigidTrainConfig, make_batch, region_loss, train_nonrigid

needs_weights = pytest.mark.skipif(
    not shipped_weights_path("nonrigid").exists(), reason="no shipped non-rigid weights (train them with `histreg train nonrigid`)"
)


def _untrained_weights(tmp_path, **config) -> str:
    net = PatchFieldUNet(**config)
    return str(save_network(net, tmp_path / "untrained.pt"))


def _real_grey(shared_data, size: int = 384) -> np.ndarray:
    from napari_histreg.io import read_image
    from napari_histreg.training.data import make_training_image

    rgb = read_image(shared_data / "rat-kidney" / "Rat-Kidney_HE.jpg")
    return make_training_image(rgb, "he", "rat", size).grey


# --------------------------------------------------------------------------- the network
@pytest.mark.parametrize("config", [{}, {"channels": [8, 16, 32, 32], "input_stride": 1, "output_stride": 2}])
def test_forward_shapes_and_zero_at_initialisation(config):
    torch.manual_seed(0)
    net = PatchFieldUNet(**config).eval()
    source, target = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        field = net(source, target)
    assert field.shape == (3, 2, 64, 64) and field.dtype == torch.float32
    # zero-initialised last layer: an untrained network is exactly the identity
    assert torch.count_nonzero(field) == 0
    # rebuilt from its config (what a checkpoint stores)
    assert PatchFieldUNet(**net.config).config == net.config


def test_forward_rejects_bad_patches():
    net = PatchFieldUNet()
    with pytest.raises(ValueError, match="multiple"):
        net(torch.rand(1, 1, 60, 60), torch.rand(1, 1, 60, 60))
    with pytest.raises(ValueError, match="one shape"):
        net(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="output_stride"):
        PatchFieldUNet(channels=[16, 32], input_stride=2, output_stride=8)


def test_predictor_has_no_gradient_and_network_is_cached(tmp_path):
    weights = _untrained_weights(tmp_path)
    net = load_nonrigid_network(weights)
    assert load_nonrigid_network(weights) is net
    out = NetworkPredictor(net)(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 2, 64, 64) and not out.requires_grad


# --------------------------------------------------------------------------- group size
def test_group_size_follows_memory(tmp_path, monkeypatch):
    net = PatchFieldUNet()
    per_patch = bytes_per_patch(net, 64)
    assert bytes_per_patch(net, 128) == 4 * per_patch  # activations grow with the patch area
    assert choose_group_size(net, 64, "cpu") == min(1024, CPU_GROUP_BUDGET // per_patch)
    assert choose_group_size(net, 64, "cpu", budget=10 * per_patch) == 10
    assert choose_group_size(net, 64, "cpu", budget=1) == 1  # never zero
    # on CUDA: half the free memory, as torch reports it
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * per_patch, 10**12))
    assert choose_group_size(net, 64, "cuda") == 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (400 * per_patch, 10**12))
    assert choose_group_size(net, 64, "cuda") == 200


def test_result_does_not_depend_on_group_size(tmp_path):
    torch.manual_seed(1)
    net = PatchFieldUNet()
    torch.nn.init.normal_(net.head.weight, std=0.05)  # a non-trivial (random) predictor
    weights = str(save_network(net, tmp_path / "random.pt"))
    rng = np.random.default_rng(0)
    source = rng.random((96, 128), dtype=np.float32)
    target = rng.random((96, 128), dtype=np.float32)
    initial = np.zeros((2, 96, 128), np.float32)
    fields = [
        learned_nonrigid(source, target, initial, LearnedNonrigidConfig(weights=weights, levels=(96, 128), patch_size=32, group_size=g))
        for g in (3, None)
    ]
    assert fields[0].shape == (2, 96, 128) and fields[0].dtype == np.float32
    assert np.abs(fields[0]).max() > 0.01
    np.testing.assert_allclose(fields[0], fields[1], atol=1e-4)


# --------------------------------------------------------------------------- training
def test_a_few_training_steps_lower_the_loss(tmp_path):
    # tiny data: a few regions of scikit-image's IHC image (two stain renderings, one warped by
    # a known smooth field); the trainer's loss on them goes down within a few dozen steps
    from napari_histreg.training.loop import train

    images = skimage_images(size=256)
    config = NonrigidTrainConfig(
        levels=(256,), patches_per_side=3, regions=3, self_warp=6.0, extra_warp=0.0, stain_variants=1, supervised=0.2
    )
    samples = NonrigidSamples(images, config, include_pairs=False)
    batch = make_batch(samples, np.random.default_rng(5))
    assert batch["known"].all() and float(batch["truth"].abs().max()) > 1.0

    def loss_fn(net, b):
        return region_loss(net, b, config.patch_size, config.window, config.regularisation, supervised=config.supervised)

    torch.manual_seed(0)
    net = PatchFieldUNet()
    with torch.no_grad():
        before = float(loss_fn(net, batch))
    report = train(net, lambda rng, step: batch, loss_fn, tmp_path / "tiny.pt", TrainOptions(steps=60, learning_rate=2e-3, progress=False))
    with torch.no_grad():
        after = float(loss_fn(load_network(tmp_path / "tiny.pt", kind="nonrigid"), batch))
    assert after < before - 0.02, (before, after)
    assert np.mean(report.losses[-10:]) < np.mean(report.losses[:10])

    # and the trainer itself runs end to end on such data and records how it was made
    report = train_nonrigid(None, tmp_path / "nonrigid.pt", TrainOptions(steps=3, progress=False), config=config, samples=samples)
    trained = load_network(tmp_path / "nonrigid.pt", kind="nonrigid")
    assert report.steps == 3 and trained.meta["steps"] == 3 and trained.meta["train_config"]["supervised"] == 0.2


def test_training_region_is_cut_and_blended_like_inference():
    # a region through predict_region equals the engine's fold of the same patches
    from napari_histreg.stages.nonrigid import fold_patches, unfold_patches
    from napari_histreg.training.nonrigid import predict_region

    torch.manual_seed(0)
    net = PatchFieldUNet().eval()
    torch.nn.init.normal_(net.head.weight, std=0.05)
    # glass (zero) around the region's interior: there the engine's zero padding and the
    # region's context are the same pixels
    src, tgt = F.pad(torch.rand(1, 1, 96, 96), (16,) * 4), F.pad(torch.rand(1, 1, 96, 96), (16,) * 4)
    with torch.no_grad():
        region = predict_region(net, src, tgt, 64)  # interior: 128 - 32 = 96
        # the engine on the interior: it pads by half a stride, so its patches are the region's
        s_p, padded = unfold_patches(src[..., 16:-16, 16:-16], 64, 32)
        t_p, _ = unfold_patches(tgt[..., 16:-16, 16:-16], 64, 32)
    assert region.shape == (1, 2, 96, 96)
    assert tuple(padded) == (128, 128)
    with torch.no_grad():
        engine = fold_patches(net(s_p, t_p), padded, (96, 96), 64, 32)
    assert float(region.abs().max()) > 0.01
    np.testing.assert_allclose(region.numpy(), engine.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- shipped weights
@needs_weights
def test_shipped_network_is_near_identity_on_identical_patches(shared_data):
    net = load_network("nonrigid", kind="nonrigid")
    grey = torch.from_numpy(_real_grey(shared_data, 256))[None, None]
    patches = grey.unfold(2, 64, 64).unfold(3, 64, 64).reshape(-1, 1, 64, 64)
    with torch.no_grad():
        field = net(patches, patches)
    assert float(field.abs().mean()) < 0.25  # pixels (the trained network gives about 0.1)
    assert net.meta.get("steps", 0) > 0 and "command" in net.meta


@needs_weights
def test_shipped_network_recovers_a_known_warp_of_a_real_image(shared_data, tmp_path):
    image = _real_grey(shared_data, 512)
    shape = image.shape
    truth = random_smooth_field(np.random.default_rng(3), shape, magnitude=6.0, control_points=4)
    # target = source seen through the field, so the backward field to find is `truth` itself
    target = warp(to_tensor(image)[None, None], to_tensor(truth)[None], padding_mode="border")[0, 0].numpy()
    zero = np.zeros((2,) + shape, np.float32)
    config = LearnedNonrigidConfig(levels=(256, 384))
    found = learned_nonrigid(image, target, zero, config)
    tissue = image > 0.15
    error_before = np.linalg.norm(truth, axis=0)[tissue].mean()
    error_after = np.linalg.norm(found - truth, axis=0)[tissue].mean()
    assert error_after < 0.6 * error_before, (error_before, error_after)

    # an untrained network (zero last layer) leaves exactly the initial field
    untrained = learned_nonrigid(image, target, zero, LearnedNonrigidConfig(weights=_untrained_weights(tmp_path), levels=(256, 384)))
    assert np.count_nonzero(untrained) == 0


@needs_weights
def test_shipped_network_improves_a_real_cross_stain_pair(shared_data):
    from napari_histreg.conventions import affine_to_field
    from napari_histreg.io import read_image
    from napari_histreg.similarity import local_ncc
    from napari_histreg.stages.affine import optimise_affine
    from napari_histreg.stages.initial import initial_alignment
    from napari_histreg.stages.preprocess import PreprocessConfig, preprocess_pair

    folder = shared_data / "lung-lesion-1" / "scale-5pc"
    pair = preprocess_pair(
        read_image(folder / "Izd2-29-041-w35_proSPC.jpg"), read_image(folder / "Izd2-29-041-w35_HE.jpg"), PreprocessConfig(working_size=512)
    )
    src, tgt = pair.source, pair.target
    matrix = initial_alignment(src, tgt).matrix
    matrix = optimise_affine(src, tgt, matrix)
    affine = affine_to_field(matrix, tgt.shape)[0].numpy()
    field = learned_nonrigid(src, tgt, affine, LearnedNonrigidConfig())
    t = to_tensor(tgt)[None, None]

    def similarity(f):
        return float(local_ncc(warp(to_tensor(src)[None, None], to_tensor(f)[None]), t, 7))

    assert similarity(field) > 1.1 * similarity(affine)  # measured: 0.067 -> 0.080
    assert np.abs(field - affine).max() < 30  # a correction, not a different registration
