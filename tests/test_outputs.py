"""The one output rule (napari_histreg.outputs) for every command: an output never destroys an
input or data that histreg did not write, ``--overwrite`` included; checked with checksums."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imsave

from napari_histreg import RegistrationConfig, register
from console import histreg
from napari_histreg.io import HistRegInputError, write_landmarks
from napari_histreg.outputs import MARKER, check_not_inputs, check_output_folder, remove_output, staged_outputs
from napari_histreg.sample import make_sample_pair

FAST = {
    "initial": {"angle_step": 10.0, "refine_step": 0.0},
    "affine": {"levels": [64, 128], "iterations": [10, 5]},
    "dense": {"levels": [64], "iterations": [3]},
}


def tree_digest(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> sha256): what must survive a refused run."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run(args, capsys):
    code = histreg([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data(tmp_path):
    """A user's folder holding a pair, its landmarks, a cover table, a config and notes."""
    d = tmp_path / "data"
    d.mkdir()
    pair = make_sample_pair()
    imsave(d / "source.png", pair.source, check_contrast=False)
    imsave(d / "target.png", pair.target, check_contrast=False)
    ids = [str(i) for i in range(len(pair.source_landmarks))]
    write_landmarks(d / "source.csv", ids, pair.source_landmarks)
    write_landmarks(d / "target.csv", ids, pair.target_landmarks)
    with open(d / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Source image", "Source landmarks", "Target image", "Target landmarks", "status"])
        writer.writerow(["source.png", "source.csv", "target.png", "target.csv", "training"])
    (d / "fast.json").write_text(json.dumps(FAST))
    (d / "notes.txt").write_text("my notes: never to be lost\n")
    return d


@pytest.fixture
def transform(data, tmp_path):
    """A transform of the pair, saved outside the data folder."""
    config = RegistrationConfig()
    config.preprocess.working_size = 128
    config.nonrigid_method = "none"
    result = register(data / "source.png", data / "target.png", config, mode="optimise")
    return result.save(tmp_path / "tf" / "transform")


def commands(d: Path, out, transform=None):
    """Every command, writing to ``out``."""
    fast = ["--config", d / "fast.json", "--working-size", "96", "--method", "none", "-q"]
    cmds = {
        "register": ["register", d / "source.png", d / "target.png", "-o", out, *fast],
        "evaluate": ["evaluate", d / "table.csv", "-o", out, *fast],
        "register-batch": ["register-batch", d / "table.csv", "-o", out, "--workers", "1", *fast],
        "convert": ["convert", d / "source.png", "-o", out],
        "demo": ["demo", "-o", out, *fast],
    }
    if transform is not None:
        cmds["warp"] = ["warp", d / "source.png", transform, "-o", out, "-q", "--tile", "256"]
    return cmds


@pytest.mark.parametrize("command", ["register", "evaluate", "register-batch", "convert", "warp"])
def test_overwrite_at_a_folder_holding_the_inputs_refuses_and_keeps_every_file(command, data, transform, capsys):
    before = tree_digest(data)
    transform_before = tree_digest(transform.parent)
    args = commands(data, data, transform)[command]
    for extra in ([], ["--overwrite"]):
        code, _, err = run([*args, *extra], capsys)
        assert code == 2, err
        assert "holds the input" in err and "Traceback" not in err
        assert tree_digest(data) == before  # not one byte changed, nothing added
        assert tree_digest(transform.parent) == transform_before
    # nor a folder of the user's that holds no input
    mine = data.parent / "mine"
    mine.mkdir()
    (mine / "results.xlsx").write_bytes(b"precious")
    code, _, err = run([*commands(data, mine, transform)[command], "--overwrite"], capsys)
    assert code == 2 and ("not an output of histreg" in err or "not an OME-Zarr written by histreg" in err), err
    assert tree_digest(mine) == {"results.xlsx": hashlib.sha256(b"precious").hexdigest()}


def test_overwrite_at_a_plain_file_or_the_transform_refuses(data, transform, capsys):
    plain = data.parent / "plain.txt"
    plain.write_text("keep")
    for command, args in commands(data, plain, transform).items():
        if command == "demo":
            continue
        code, _, err = run([*args, "--overwrite"], capsys)
        assert code == 2, (command, err)
        assert plain.read_text() == "keep", command
    # warp's -o pointed at the transform's own folder
    before = tree_digest(transform.parent)
    code, _, err = run(["warp", data / "source.png", transform, "-o", transform.parent, "--overwrite", "-q"], capsys)
    assert code == 2 and "holds the input" in err
    assert tree_digest(transform.parent) == before
    # train's weights output is the training folder
    code, _, err = run(["train", "affine", "--data", data, "-o", data / "fast.json", "--overwrite", "--steps", "1"], capsys)
    assert code == 2 and tree_digest(transform.parent) == before


@pytest.mark.parametrize("command", ["register", "evaluate", "convert", "demo", "warp"])
def test_an_earlier_output_needs_overwrite_and_is_then_replaced(command, data, transform, tmp_path, capsys):
    out = tmp_path / ("out.zarr" if command == "warp" else "out")
    args = commands(data, out, transform)[command]
    code, _, err = run(args, capsys)
    assert code == 0, err
    first = tree_digest(out)
    code, _, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert tree_digest(out) == first
    code, _, err = run([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert set(tree_digest(out)) == set(first)  # the same outputs, replaced; no staging left
    if command != "warp":
        marker = json.loads((out / MARKER).read_text())
        assert marker["tool"] == "napari-histreg" and marker["command"] == command
        assert set(marker["files"]) == {name for name in first if name != MARKER}


def test_overwrite_removes_stale_outputs_and_keeps_foreign_files(data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["register", data / "source.png", data / "target.png", "-o", out, "--config", data / "fast.json",
            "--working-size", "96", "--method", "none", "-q"]
    lm = ["--source-landmarks", data / "source.csv", "--target-landmarks", data / "target.csv"]
    assert run([*base, *lm], capsys)[0] == 0
    assert (out / "metrics.json").exists()
    (out / "my_comment.txt").write_text("added by the user")
    code, _, err = run([*base, "--overwrite"], capsys)  # no landmarks this time
    assert code == 0, err
    assert not (out / "metrics.json").exists() and not (out / "warped_source_landmarks.csv").exists()  # stale: gone
    assert (out / "my_comment.txt").read_text() == "added by the user"  # not ours: kept


def test_register_batch_overwrite_replaces_its_pair_folders(data, tmp_path, capsys):
    out = tmp_path / "batch"
    args = commands(data, out)["register-batch"]
    assert run(args, capsys)[0] == 0
    pair_folder = next((out / "pairs").iterdir())
    assert (pair_folder / MARKER).exists() and (pair_folder / "transform.json").exists()
    code, _, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert run([*args, "--overwrite"], capsys)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert f"pairs/{pair_folder.name}" in marker["files"] and "batch.csv" in marker["files"]


def test_partial_outputs_are_named_and_never_discarded_blindly(data, transform, tmp_path, capsys):
    out = tmp_path / "w.zarr"
    partial = tmp_path / "w.zarr.partial"
    # a failing device leaves nothing behind (no ".partial" the next run would call interrupted)
    code, _, err = run(["warp", data / "source.png", transform, "-o", out, "--device", "cuda", "-q"], capsys)
    if code == 0:
        pytest.skip("CUDA is available here")
    assert code == 2 and "CUDA is not available" in err and "Traceback" not in err
    assert not out.exists() and not partial.exists()
    # a folder called like a partial that histreg did not make is left alone, --overwrite or not
    partial.mkdir()
    (partial / "thesis.tex").write_text("years of work")
    code, _, err = run(["warp", data / "source.png", transform, "-o", out, "--overwrite", "-q"], capsys)
    assert code == 2 and "not an unfinished histreg output" in err
    assert (partial / "thesis.tex").read_text() == "years of work"


def test_rule_functions():
    base = Path("/tmp/histreg-rule")
    with pytest.raises(HistRegInputError, match="is an input"):
        check_not_inputs([base / "a.png"], [base / "a.png"])
    with pytest.raises(HistRegInputError, match="holds the input"):
        check_not_inputs([base], [base / "x" / "a.png"])
    with pytest.raises(HistRegInputError, match="lies inside the input"):
        check_not_inputs([Path.cwd() / "out"], [Path.cwd()])
    check_not_inputs([base / "out"], [base / "a.png", None, ""])  # a sibling is fine


def test_staged_outputs_leave_all_or_nothing(tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError):
        with staged_outputs(out, command="test") as stage:
            (stage / "a.txt").write_text("a")
            raise RuntimeError("disk full")
    assert not (tmp_path / "deep").exists()
    with staged_outputs(out, command="test") as stage:
        (stage / "a.txt").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    with pytest.raises(HistRegInputError, match="--overwrite"):
        check_output_folder(out)
    check_output_folder(out, overwrite=True)
    remove_output(out)
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x").write_text("x")
    with pytest.raises(HistRegInputError, match="not an output of histreg"):
        remove_output(mine)
    assert (mine / "x").exists()
    # an empty folder is fine, so is a new one
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_folder(empty)
    check_output_folder(tmp_path / "new")


def test_result_warp_never_modifies_its_input():
    pair = make_sample_pair()
    config = RegistrationConfig()
    config.preprocess.working_size = 96
    config.nonrigid_method = "none"
    result = register(pair.source, pair.target, config, mode="optimise")
    image = pair.source.astype(np.float32) / 255.0
    copy = image.copy()
    result.warp(image, cval=0.7)
    np.testing.assert_array_equal(image, copy)
