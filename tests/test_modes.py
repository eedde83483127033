"""Pipeline modes (optimise / learned / hybrid), the shipped weights through the pipeline, the
`histreg train` command and the checkpoint format's errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage.io import imsave

from napari_histreg import register
from console import histreg
from napari_histreg.io import pair_landmarks, read_image, read_landmarks
from napari_histreg.metrics import pair_metrics
from napari_histreg.networks import NetworkLoadError, load_network, save_network, shipped_weights_path
from napari_histreg.pipeline import RegistrationConfig
from napari_histreg.sample import make_sample_pair


@pytest.fixture(scope="module")
def sample():
    return make_sample_pair()


def _MrTRE(result, pair) -> float:
    mapped = result.map_source_points(pair.source_landmarks)
    return pair_metrics(pair.source_landmarks, mapped, pair.target_landmarks, pair.target.shape[:2])["MrTRE"]


def test_unknown_mode_and_mask_method_are_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        register(np.zeros((64, 64)), np.zeros((64, 64)), mode="fastest")
    with pytest.raises(ValueError, match="mask_method"):
        register(np.zeros((64, 64)), np.zeros((64, 64)), RegistrationConfig(use_mask=True, mask_method="magic"))


@pytest.mark.parametrize("kind", ["segmentation", "affine", "nonrigid"])
def test_shipped_weights_are_small_and_describe_their_training(kind):
    path = shipped_weights_path(kind)
    assert path.exists(), f"{path} is missing: train it with `histreg train {kind}` (see README)"
    assert path.stat().st_size < 8 * 2**20
    model = load_network(kind)
    assert model.kind == kind
    assert not model.training
    assert {"steps", "seconds", "seed"} <= set(model.meta)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("mode", ["learned", "hybrid"])
def test_modes_register_the_sample_pair(sample, mode):
    before = pair_metrics(sample.source_landmarks, sample.source_landmarks, sample.target_landmarks, sample.target.shape[:2])
    result = register(sample.source, sample.target, mode=mode)
    assert result.info["mode"] == mode
    after = _MrTRE(result, sample)
    # The sample starts at ~0.025; the networks must do most of the work in either mode.
    assert after < 0.25 * before["MrTRE"]
    assert after < 0.006


def test_learned_mode_on_a_real_pair_beats_its_own_affine(shared_data):
    """The non-rigid network lowers the landmark error of the affine network on a real pair."""
    folder = shared_data / "rat-kidney"
    source, target = folder / "Rat-Kidney_PanCytokeratin.jpg", folder / "Rat-Kidney_HE.jpg"
    _, s_pts, t_pts = pair_landmarks(
        *read_landmarks(folder / "Rat-Kidney_PanCytokeratin.csv"), *read_landmarks(folder / "Rat-Kidney_HE.csv")
    )
    shape = read_image(target).shape[:2]
    errors = {}
    for name, config in {
        "affine": RegistrationConfig(mode="learned", nonrigid_method="none"),
        "learned": RegistrationConfig(mode="learned"),
    }.items():
        result = register(source, target, config)
        errors[name] = pair_metrics(s_pts, result.map_source_points(s_pts), t_pts, shape)["MrTRE"]
    initial = pair_metrics(s_pts, s_pts, t_pts, shape)["MrTRE"]
    assert errors["affine"] < initial
    assert errors["learned"] < errors["affine"]


def test_a_failing_affine_network_is_caught_in_both_modes(sample, monkeypatch):
    """A network that misleads (here: turns the pair upside down) is caught by the NCC check:
    hybrid then runs the optimise mode's affine stage from the same start, learned keeps the
    start."""
    import napari_histreg.pipeline as pipeline

    def upside_down(source, target, matrix, *args, **kwargs):
        h, w = target.shape
        flip = np.array([[-1.0, 0.0, h - 1.0], [0.0, -1.0, w - 1.0]])
        return np.hstack([matrix[:, :2] @ flip[:, :2], (matrix[:, :2] @ flip[:, 2] + matrix[:, 2])[:, None]])

    monkeypatch.setattr(pipeline, "learned_affine", upside_down)
    with pytest.warns(pipeline.NetworkProposalRejected, match="affine network.*keeping the start"):
        learned = register(sample.source, sample.target, RegistrationConfig(mode="learned", nonrigid_method="none"))
    with pytest.warns(pipeline.NetworkProposalRejected, match="optimising the affine from the start"):
        hybrid = register(sample.source, sample.target, RegistrationConfig(mode="hybrid", nonrigid_method="none"))
    optimise = register(sample.source, sample.target, RegistrationConfig(mode="optimise", nonrigid_method="none"))
    rotation_search = register(sample.source, sample.target, RegistrationConfig(use_affine=False, nonrigid_method="none"))
    # hybrid: the optimise mode's affine stage; learned: the rotation search's result kept
    np.testing.assert_allclose(hybrid.info["matrix"], optimise.info["matrix"], atol=1e-9)
    np.testing.assert_allclose(learned.info["matrix"], rotation_search.info["matrix"], atol=1e-9)
    assert _MrTRE(hybrid, sample) < 0.006


def test_hybrid_keeps_a_helpful_network_field_and_drops_a_harmful_one(sample, monkeypatch):
    import napari_histreg.pipeline as pipeline

    starts = []
    dense = pipeline.dense_nonrigid

    def spy(source, target, field, config, device, progress, initial_residual=None):
        starts.append(initial_residual)
        return dense(source, target, field, config, device, progress, initial_residual=initial_residual)

    monkeypatch.setattr(pipeline, "dense_nonrigid", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pipeline.NetworkProposalRejected)  # the real networks are not rejected here
        good = register(sample.source, sample.target, mode="hybrid")
    assert np.abs(starts[-1]).max() > 0.5  # the network's field starts the optimisation

    rng = np.random.default_rng(0)

    def scrambled(source, target, field, *args, **kwargs):
        return field + rng.normal(0, 8, field.shape).astype(np.float32)

    monkeypatch.setattr(pipeline, "learned_nonrigid", scrambled)
    with pytest.warns(pipeline.NetworkProposalRejected, match="non-rigid network.*from the affine alignment alone"):
        bad = register(sample.source, sample.target, mode="hybrid")
    assert np.abs(starts[-1]).max() == 0  # dropped: the optimisation starts from the affine alone
    assert _MrTRE(bad, sample) < 0.006
    assert _MrTRE(good, sample) < 0.006


def test_unet_mask_in_the_pipeline(sample):
    result = register(sample.source, sample.target, RegistrationConfig(use_mask=True, mask_method="unet", nonrigid_method="none"))
    assert "mask" in result.timings
    assert _MrTRE(result, sample) < 0.01


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(NetworkLoadError, match="not found"):
        load_network(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(NetworkLoadError, match="garbage.pt: not a readable"):
        load_network(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(2)}, plain)
    with pytest.raises(NetworkLoadError, match="not a napari-histreg network"):
        load_network(plain)
    affine = load_network("affine")
    copy = save_network(affine, tmp_path / "affine.pt", affine.meta)
    with pytest.raises(NetworkLoadError, match="holds the affine network, expected the nonrigid network"):
        load_network(copy, kind="nonrigid")
    with pytest.raises(NetworkLoadError, match="unknown network kind"):
        load_network(copy, kind="bogus")
    reloaded = load_network(copy, kind="affine")
    for (name, a), (_, b) in zip(affine.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- histreg train
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two stain renderings of scikit-image's IHC image, in one folder (one tissue block)."""
    from napari_histreg.training.data import skimage_images

    folder = tmp_path_factory.mktemp("tiny") / "block"
    folder.mkdir()
    for image in skimage_images(size=160):
        imsave(folder / (image.name.split(":")[-1] + ".png"), (image.rgb * 255).astype(np.uint8), check_contrast=False)
    return folder.parent


@pytest.mark.parametrize("kind", ["segmentation", "affine", "nonrigid"])
def test_train_command_writes_loadable_weights_and_resumes(kind, tiny_data, tmp_path, capsys):
    out = tmp_path / f"{kind}.pt"
    code = histreg(["train", kind, "--data", str(tiny_data), "--no-skimage", "-o", str(out), "--steps", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    model = load_network(out, kind=kind)
    assert model.meta["steps"] == 2
    assert f"trained {kind} network: 2 steps" in capsys.readouterr().out
    # The weights file is an earlier output now: kept unless --overwrite.
    code = histreg(["train", kind, "--data", str(tiny_data), "--no-skimage", "-o", str(out), "--steps", "1", "--resume", "-q"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    # Resuming a finished run starts again from step 0 (its state file is gone) and says so.
    code = histreg(["train", kind, "--data", str(tiny_data), "--no-skimage", "-o", str(out), "--steps", "1", "--resume", "-q",
                 "--overwrite"])
    assert code == 0
    assert "no training state" in capsys.readouterr().err


def test_train_command_bad_input(tmp_path, capsys):
    assert histreg(["train", "affine", "--data", str(tmp_path / "nowhere"), "-o", str(tmp_path / "a.pt")]) == 2
    assert "training data not found" in capsys.readouterr().err
    assert histreg(["train", "affine", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert histreg(["train", "affine", "--data", str(empty), "--no-skimage", "-o", str(tmp_path / "a.pt"), "--steps", "1"]) == 2
    assert "no images found" in capsys.readouterr().err


def test_dense_warm_start_from_a_residual(sample):
    """``initial_residual`` starts the optimised (regularised) residual: zeros change nothing,
    and a start at the answer of a first run stays near it."""
    from napari_histreg.conventions import affine_to_field
    from napari_histreg.stages.nonrigid import DenseConfig, dense_nonrigid
    from napari_histreg.stages.preprocess import PreprocessConfig, preprocess_pair

    pair = preprocess_pair(sample.source, sample.target, PreprocessConfig(working_size=192))
    start = affine_to_field(np.eye(2, 3), pair.target.shape)[0].numpy()
    config = DenseConfig(levels=(96, 192), iterations=(20, 10))
    plain = dense_nonrigid(pair.source, pair.target, start, config)
    zeros = dense_nonrigid(pair.source, pair.target, start, config, initial_residual=np.zeros_like(start))
    np.testing.assert_allclose(zeros, plain, atol=1e-5)
    assert np.abs(plain).max() > 1.0  # the sample needs a real deformation
    again = dense_nonrigid(pair.source, pair.target, start, config, initial_residual=plain - start)
    assert np.abs(again - plain).mean() < 0.5 * np.abs(plain).mean()
