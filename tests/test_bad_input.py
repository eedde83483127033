"""Bad input gives a clear error naming the file/array and the problem, never a deep traceback;
inputs are never modified; outputs appear atomically (all or nothing, no temporary files)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.io import imsave

from napari_histreg import register
from console import histreg
from napari_histreg.io import HistRegInputError, write_landmarks
from napari_histreg.pipeline import RegistrationConfig

# A configuration that runs every stage in about a second: these tests are about behaviour.
FAST = {
    "preprocess": {"working_size": 96},
    "initial": {"angle_step": 15.0, "refine_step": 0.0},
    "affine": {"levels": [64], "iterations": [5]},
    "dense": {"levels": [64], "iterations": [5]},
    "patches": {"levels": [64], "iterations": [1]},
}


def fast_config() -> RegistrationConfig:
    return RegistrationConfig.from_dict(FAST)


def tissue(shape=(120, 150), seed=0, rgb=True) -> np.ndarray:
    """A smooth random 'stained section' (dark blobs on white), uint8."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.random(shape), 4)
    blobs = (blobs - blobs.min()) / (blobs.max() - blobs.min())
    grey = 255 - np.clip(blobs * 1.6 - 0.3, 0, 1) * 200
    if not rgb:
        return grey.astype(np.uint8)
    return np.stack([grey, grey * 0.8 + 20, grey * 0.9], axis=-1).clip(0, 255).astype(np.uint8)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or staging folders anywhere under ``folder`` (the output marker
    is meant to be there)."""
    return [str(p) for p in Path(folder).rglob(".*") if p.name != ".histreg-output.json"]


@pytest.fixture
def pair(tmp_path):
    """A small valid pair on disk with landmarks, plus a fast configuration file."""
    d = tmp_path / "inputs"
    d.mkdir()
    source, target = tissue(seed=1), tissue(seed=1)
    target = np.roll(target, (3, -4), axis=(0, 1))
    imsave(d / "source.png", source, check_contrast=False)
    imsave(d / "target.png", target, check_contrast=False)
    points = np.array([[30.0, 40.0], [80.0, 100.0], [60.0, 20.0], [100.0, 130.0]])
    write_landmarks(d / "source.csv", ["a", "b", "c", "d"], points)
    write_landmarks(d / "target.csv", ["a", "b", "c", "d"], points + [3, -4])
    (d / "fast.json").write_text(json.dumps(FAST))
    return d


def run_cli(args, capsys):
    code = histreg([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_input_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("histreg: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --------------------------------------------------------------------------- register() on arrays
GOOD = tissue()


@pytest.mark.parametrize(
    "bad, problem",
    [
        (np.full((100, 100), np.nan), "NaN or infinite"),
        (np.where(np.eye(100, dtype=bool), np.inf, 0.5), "NaN or infinite"),
        (np.zeros((30, 200), np.uint8), "at least 64 px"),
        (np.zeros((0, 0)), "at least 64 px"),
        (np.zeros((100, 100, 3, 2)), "expected a grey"),
        (np.zeros((100, 100, 5)), "expected a grey"),
        (np.zeros((100, 100), complex), "not a numeric image"),
        (np.array([["a"] * 100] * 100), "not a numeric image"),
        (None, "not a numeric image"),
    ],
)
@pytest.mark.parametrize("which", ["source", "target"])
def test_register_rejects_bad_arrays(bad, problem, which):
    args = (bad, GOOD) if which == "source" else (GOOD, bad)
    with pytest.raises(HistRegInputError, match=problem) as info:
        register(*args, fast_config())
    assert str(info.value).startswith(f"{which}:")


def test_register_rejects_wildly_different_sizes():
    with pytest.raises(HistRegInputError, match="sizes differ by 5.0x") as info:
        register(tissue((100, 100)), tissue((500, 500)), fast_config())
    assert "source" in str(info.value) and "target" in str(info.value)


def test_register_names_the_file(tmp_path):
    (tmp_path / "text.png").write_text("this is not a picture\n")
    with pytest.raises(HistRegInputError, match="text.png: cannot be read as an image"):
        register(tmp_path / "text.png", GOOD, fast_config())
    with pytest.raises(HistRegInputError, match="nothere.jpg: file not found"):
        register(GOOD, str(tmp_path / "nothere.jpg"), fast_config())


@pytest.mark.parametrize(
    "blank",
    [
        np.full((120, 150), 255, np.uint8),  # same size as the other image
        np.full((90, 100), 255, np.uint8),  # smaller: padding must not hide it
        np.full((90, 100, 3), (250, 240, 245), np.uint8),  # constant colour
        np.zeros((100, 130), np.float32),
    ],
)
def test_blank_image_warns_and_gives_identity(blank):
    for source, target, name in ((blank, GOOD, "source"), (GOOD, blank, "target")):
        with pytest.warns(UserWarning, match=f"{name} image is blank"):
            result = register(source, target, fast_config())
        np.testing.assert_allclose(result.matrix, [[1, 0, 0], [0, 1, 0]])
        assert np.abs(result.working_field).max() == 0
        assert result.info["blank"] == [name]


def test_input_arrays_are_not_modified():
    source, target = tissue(seed=3), tissue(seed=4)
    s0, t0 = source.copy(), target.copy()
    register(source, target, fast_config())
    np.testing.assert_array_equal(source, s0)
    np.testing.assert_array_equal(target, t0)


def test_unknown_method_and_device():
    config = fast_config()
    config.nonrigid_method = "magic"
    with pytest.raises(ValueError, match="nonrigid_method"):
        register(GOOD, GOOD, config)
    if not _cuda():
        with pytest.raises(ValueError, match="CUDA is not available"):
            register(GOOD, GOOD, fast_config(), device="cuda")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- the CLI, in process
def register_args(d, out, *extra):
    return ["register", d / "source.png", d / "target.png", "-o", out, "--config", d / "fast.json", "-q", *extra]


def test_cli_missing_file(pair, tmp_path, capsys):
    code, _, err = run_cli(["register", pair / "nope.png", pair / "target.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "nope.png", "file not found")
    assert not (tmp_path / "out").exists()


def test_cli_folder_as_image(pair, tmp_path, capsys):
    code, _, err = run_cli(["register", pair, pair / "target.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, str(pair), "is a folder")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"hello, I am a text file\n", "cannot be read as an image"),
        (b"", "file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "cannot be read as an image"),  # truncated PNG
    ],
)
def test_cli_not_an_image(pair, tmp_path, capsys, content, problem):
    (pair / "fake.png").write_bytes(content)
    code, _, err = run_cli(["register", pair / "fake.png", pair / "target.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "fake.png", problem)


def test_cli_truncated_jpeg(pair, tmp_path, capsys):
    imsave(pair / "whole.jpg", tissue(seed=5), check_contrast=False)
    data = (pair / "whole.jpg").read_bytes()
    (pair / "cut.jpg").write_bytes(data[: len(data) // 3])
    code, _, err = run_cli(["register", pair / "cut.jpg", pair / "target.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "cut.jpg", "cannot be read as an image")


def test_cli_tiny_image(pair, tmp_path, capsys):
    imsave(pair / "tiny.png", tissue((40, 50)), check_contrast=False)
    code, _, err = run_cli(["register", pair / "source.png", pair / "tiny.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "tiny.png", "40x50 pixels", "at least 64 px")


def test_cli_nan_image(pair, tmp_path, capsys):
    import tifffile

    image = tissue(rgb=False).astype(np.float32)
    image[10, 10] = np.nan
    tifffile.imwrite(pair / "nan.tif", image)
    code, _, err = run_cli(["register", pair / "nan.tif", pair / "target.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "nan.tif", "NaN")


def test_cli_wildly_different_sizes(pair, tmp_path, capsys):
    imsave(pair / "huge.png", tissue((600, 700)), check_contrast=False)
    code, _, err = run_cli(["register", pair / "source.png", pair / "huge.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "source.png", "huge.png", "sizes differ")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("id;x;y\n1;2;3\n", "needs 'X' and 'Y' columns"),
        (",X,Y\n1,12\n", "line 2 is not a landmark"),
        (",X,Y\n1,nan,3\n", "non-finite coordinate"),
        ("", "landmark file is empty"),
    ],
)
def test_cli_malformed_landmarks(pair, tmp_path, capsys, text, problem):
    (pair / "bad.csv").write_text(text)
    args = register_args(pair, tmp_path / "out", "--source-landmarks", pair / "bad.csv", "--target-landmarks", pair / "target.csv")
    code, _, err = run_cli(args, capsys)
    assert_input_error(code, err, "bad.csv", problem)
    assert not (tmp_path / "out").exists()


def test_cli_missing_landmark_file(pair, tmp_path, capsys):
    args = register_args(pair, tmp_path / "out", "--source-landmarks", pair / "gone.csv")
    code, _, err = run_cli(args, capsys)
    assert_input_error(code, err, "gone.csv", "not found")


def test_cli_landmark_ids_do_not_match(pair, tmp_path, capsys):
    write_landmarks(pair / "other.csv", ["x", "y"], [[10.0, 10.0], [20.0, 20.0]])
    args = register_args(pair, tmp_path / "out", "--source-landmarks", pair / "source.csv", "--target-landmarks", pair / "other.csv")
    code, _, err = run_cli(args, capsys)
    assert_input_error(code, err, "source.csv", "other.csv", "no landmark id is shared")


def test_cli_landmarks_of_another_image(pair, tmp_path, capsys):
    write_landmarks(pair / "far.csv", ["a", "b"], [[5000.0, 10.0], [6000.0, 20.0]])
    args = register_args(pair, tmp_path / "out", "--source-landmarks", pair / "far.csv")
    code, _, err = run_cli(args, capsys)
    assert_input_error(code, err, "far.csv", "outside")


def test_cli_partial_id_overlap_warns_and_runs(pair, tmp_path, capsys):
    write_landmarks(pair / "more.csv", ["a", "b", "c", "d", "e"], [[33, 36], [83, 96], [63, 16], [103, 126], [50, 50]])
    args = register_args(pair, tmp_path / "out", "--source-landmarks", pair / "source.csv", "--target-landmarks", pair / "more.csv")
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "histreg: warning:" in err and "4 landmark ids shared" in err and "1 only in the target" in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_landmarks"] == 4


def test_cli_blank_image_is_bad_input(pair, tmp_path, capsys):
    # the README's promise: a constant image ends with exit code 2 and one line, nothing written
    imsave(pair / "blank.png", np.full((100, 110, 3), 255, np.uint8), check_contrast=False)
    code, out, err = run_cli(["register", pair / "blank.png", pair / "target.png", "-o", tmp_path / "out", "-q"], capsys)
    assert_input_error(code, err, "blank.png", "constant")
    assert not (tmp_path / "out").exists()


def test_cli_bad_config_and_options(pair, tmp_path, capsys):
    (pair / "bad.json").write_text('{"affine": {"iterations": "many"}}')
    code, _, err = run_cli(["register", pair / "source.png", pair / "target.png", "-o", tmp_path / "out", "--config", pair / "bad.json"], capsys)
    assert_input_error(code, err, "bad.json", "'iterations'")
    (pair / "bad.json").write_text('{"no_such_stage": 1}')
    code, _, err = run_cli(["register", pair / "source.png", pair / "target.png", "-o", tmp_path / "out", "--config", pair / "bad.json"], capsys)
    assert_input_error(code, err, "bad.json", "unknown setting 'no_such_stage'")
    (pair / "bad.json").write_text("{not json")
    code, _, err = run_cli(["register", pair / "source.png", pair / "target.png", "-o", tmp_path / "out", "--config", pair / "bad.json"], capsys)
    assert_input_error(code, err, "bad.json", "not a JSON configuration")
    for bad in (["--method", "magic"], ["--working-size", "10"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as info:
            histreg(["register", str(pair / "source.png"), str(pair / "target.png"), "-o", str(tmp_path / "out"), *bad])
        assert info.value.code == 2
    capsys.readouterr()
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(_cuda(), reason="CUDA is available here")
def test_cli_unavailable_device(pair, tmp_path, capsys):
    code, _, err = run_cli(["register", pair / "source.png", pair / "target.png", "-o", tmp_path / "out", "--device", "cuda"], capsys)
    assert_input_error(code, err, "cuda", "not available")


def test_cli_output_is_a_file(pair, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    code, _, err = run_cli(register_args(pair, tmp_path / "taken"), capsys)
    assert_input_error(code, err, "taken", "not a folder")
    assert (tmp_path / "taken").read_text() == "x"


def test_cli_refuses_to_overwrite_an_input(pair, capsys):
    # the source is called like an output and OUT is its folder
    shutil.copy(pair / "source.png", pair / "overlay.png")
    before = {p.name: digest(p) for p in pair.iterdir()}
    code, _, err = run_cli(["register", pair / "overlay.png", pair / "target.png", "-o", pair, "-q"], capsys)
    assert_input_error(code, err, "overlay.png", "holds the input")
    assert {p.name: digest(p) for p in pair.iterdir()} == before


def test_cli_convert_refuses_to_overwrite_and_duplicates(pair, tmp_path, capsys):
    from napari_histreg.io import write_mha

    write_mha(pair / "image.mha", tissue())
    code, _, err = run_cli(["convert", pair / "image.mha", "-o", pair], capsys)
    assert_input_error(code, err, "image.mha", "holds the input")
    (tmp_path / "b").mkdir()
    shutil.copy(pair / "source.png", tmp_path / "b" / "source.png")
    code, _, err = run_cli(["convert", pair / "source.png", tmp_path / "b" / "source.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "source.mha")
    code, _, err = run_cli(["convert", pair / "source.png", pair / "missing.png", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "missing.png", "file not found")
    assert not (tmp_path / "out").exists()  # nothing written when one input is bad


def test_cli_evaluate_bad_tables(tmp_path, capsys):
    code, _, err = run_cli(["evaluate", tmp_path / "none.csv", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "none.csv", "not found")
    (tmp_path / "t.csv").write_text("Source image,Target image\na.png,b.png\n")
    code, _, err = run_cli(["evaluate", tmp_path / "t.csv", "-o", tmp_path / "out"], capsys)
    assert_input_error(code, err, "t.csv", "'Source landmarks'")
    (tmp_path / "t.csv").write_text("Source image,Source landmarks,Target image,Target landmarks,status\na,b,c,d,training\n")
    code, _, err = run_cli(["evaluate", tmp_path / "t.csv", "-o", tmp_path / "out", "--status", "test"], capsys)
    assert_input_error(code, err, "t.csv", "no pair has status 'test'", "training")
    code, _, err = run_cli(["evaluate", tmp_path / "t.csv", "-o", tmp_path], capsys)  # the folder holds the table
    assert_input_error(code, err, "holds the input", "t.csv")
    code, _, err = run_cli(["evaluate", tmp_path / "t.csv", "-o", tmp_path / "out", "-q"], capsys)
    assert code == 3, err  # the run completes, its one pair failed: exit 3 and the count
    assert "histreg: error: 1 of 1 pairs failed" in err
    assert (tmp_path / "out" / "pairs.csv").exists()


# --------------------------------------------------------------------------- inputs kept, outputs atomic
def test_success_keeps_inputs_and_leaves_no_temp_files(pair, tmp_path, capsys):
    before = {p.name: digest(p) for p in pair.iterdir()}
    out = tmp_path / "out"
    args = register_args(pair, out, "--source-landmarks", pair / "source.csv", "--target-landmarks", pair / "target.csv")
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert {p.name: digest(p) for p in pair.iterdir()} == before
    assert sorted(os.listdir(out)) == sorted(
        [".histreg-output.json", "warped_source.png", "transform.mha", "transform.json", "warped_source_landmarks.csv",
         "overlay.png", "metrics.json"]
    )
    assert leftovers(tmp_path) == []
    # a second run into the same folder is refused without --overwrite...
    code, _, err = run_cli(args, capsys)
    assert_input_error(code, err, "earlier histreg output", "--overwrite")
    # ...and replaces the outputs with it, still without leftovers
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert leftovers(tmp_path) == [] and len(os.listdir(out)) == 7


def test_failure_after_registration_leaves_nothing(pair, tmp_path, capsys, monkeypatch):
    import napari_histreg.overlay

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", "overlay.png")

    monkeypatch.setattr(napari_histreg.overlay, "save_overlay", broken)
    before = {p.name: digest(p) for p in pair.iterdir()}
    code, _, err = run_cli(register_args(pair, tmp_path / "out", "--source-landmarks", pair / "source.csv"), capsys)
    assert code == 1 and "histreg: error: overlay.png: No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert {p.name: digest(p) for p in pair.iterdir()} == before


@pytest.mark.parametrize("where", ["registration", "writing"])
def test_keyboard_interrupt_exits_130_without_partial_outputs(pair, tmp_path, capsys, monkeypatch, where):
    import napari_histreg.overlay
    import napari_histreg.pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "registration":
        monkeypatch.setattr(napari_histreg.pipeline.Pipeline, "run", interrupt)
    else:
        monkeypatch.setattr(napari_histreg.overlay, "save_overlay", interrupt)
    existing = tmp_path / "existing"  # an earlier output, replaced with --overwrite (or not at all)
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    (existing / ".histreg-output.json").write_text(json.dumps({"tool": "napari-histreg", "files": []}))
    before = {p.name: digest(p) for p in pair.iterdir()}
    for out in (tmp_path / "new" / "deeper", existing):
        code, _, err = run_cli(register_args(pair, out, "--source-landmarks", pair / "source.csv", "--overwrite"), capsys)
        assert code == 130, err
        assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(existing)) == [".histreg-output.json", "notes.txt"]
    assert leftovers(tmp_path) == []
    assert {p.name: digest(p) for p in pair.iterdir()} == before


# --------------------------------------------------------------------------- the console script
def _histreg_exe() -> list[str]:
    exe = Path(sys.executable).parent / "histreg"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("histreg")
    if found is None:
        pytest.skip("the histreg console script is not installed (pip install -e .)")
    return [found]


def test_console_script_bad_input_exit_code(pair, tmp_path):
    (pair / "notes.png").write_text("a text file renamed .png\n")
    before = digest(pair / "notes.png")
    proc = subprocess.run(
        [*_histreg_exe(), "register", str(pair / "notes.png"), str(pair / "target.png"), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert proc.stderr.startswith(f"histreg: error: {pair / 'notes.png'}: cannot be read as an image")
    assert "Traceback" not in proc.stderr
    assert digest(pair / "notes.png") == before
    assert not (tmp_path / "out").exists()


def test_console_script_version_and_help():
    from napari_histreg import __version__

    proc = subprocess.run([*_histreg_exe(), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and __version__ in proc.stdout
    proc = subprocess.run([*_histreg_exe()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "COMMAND" in proc.stderr
