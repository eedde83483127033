"""The ``histreg`` command line: register, evaluate, convert, demo, help and version."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from skimage.io import imread, imsave

from napari_histreg import RegistrationResult
from console import histreg
from napari_histreg.evaluate import PAIR_COLUMNS
from napari_histreg.io import read_image, read_landmarks

# Stages cut to a few iterations: for tests of the plumbing, not of accuracy.
FAST = {
    "initial": {"angle_step": 10.0, "refine_step": 0.0},
    "affine": {"levels": [64, 128], "iterations": [20, 10]},
    "dense": {"levels": [64, 128], "iterations": [10, 5]},
    "patches": {"levels": [64], "iterations": [1]},
}

# Fewer iterations than the defaults, still the full method: about 10 s for the rat-kidney pair.
SHORT = {
    "affine": {"levels": [64, 128, 256], "iterations": [60, 40, 20]},
    "dense": {"levels": [128, 256], "iterations": [60, 30]},
}

KIDNEY = "rat-kidney"
KIDNEY_SOURCE = "Rat-Kidney_PanCytokeratin"
KIDNEY_TARGET = "Rat-Kidney_HE"


@pytest.fixture(scope="module")
def fast_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "fast.json"
    path.write_text(json.dumps(FAST))
    return path


def run_cli(args, capsys):
    code = histreg([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- register on real data
@pytest.fixture(scope="module")
def kidney_run(shared_data, tmp_path_factory):
    """One registration of the rat-kidney pair, default method, reduced working size and iterations."""
    out = tmp_path_factory.mktemp("kidney") / "out"
    config = out.parent / "short.json"
    config.write_text(json.dumps(SHORT))
    d = shared_data / KIDNEY
    args = [
        "register", d / f"{KIDNEY_SOURCE}.jpg", d / f"{KIDNEY_TARGET}.jpg", "-o", out,
        "--source-landmarks", d / f"{KIDNEY_SOURCE}.csv", "--target-landmarks", d / f"{KIDNEY_TARGET}.csv",
        "--working-size", "256", "--config", config, "-q",
    ]
    code = histreg([str(a) for a in args])
    return code, out, d


def test_register_rat_kidney_outputs(kidney_run, capsys):
    code, out, d = kidney_run
    assert code == 0
    assert sorted(os.listdir(out)) == sorted(
        [".histreg-output.json", "warped_source.png", "transform.mha", "transform.json", "warped_source_landmarks.csv",
         "overlay.png", "metrics.json"]
    )
    target = read_image(d / f"{KIDNEY_TARGET}.jpg")
    warped = imread(out / "warped_source.png")
    assert warped.shape == target.shape and warped.dtype == np.uint8  # RGB kept, on the target grid

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_landmarks"] == 69  # paired by id (71 on H&E, 69 on PanCytokeratin)
    assert metrics["MrTRE"] < metrics["initial_MrTRE"]
    assert metrics["MrTRE"] < 0.01
    assert metrics["initial_MrTRE"] == pytest.approx(0.0207, abs=5e-4)

    # warped landmarks: every source id, mapped with the saved transform, in ANHIR X,Y
    result = RegistrationResult.load(out / "transform.json")
    source_ids, source_points = read_landmarks(d / f"{KIDNEY_SOURCE}.csv")
    ids, points = read_landmarks(out / "warped_source_landmarks.csv")
    assert list(ids) == list(source_ids)
    np.testing.assert_allclose(points, result.map_source_points(source_points), atol=2e-3)
    assert (out / "warped_source_landmarks.csv").read_text().startswith(",X,Y\n")

    overlay = imread(out / "overlay.png")
    assert overlay.ndim == 3 and overlay.shape[1] > overlay.shape[0]


def test_register_16bit_grey_writes_tiff_and_only_source_landmarks(tmp_path, fast_json, capsys):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((100, 120)), 3)
    image = ((image - image.min()) / np.ptp(image) * 60000).astype(np.uint16)
    imsave(tmp_path / "s.tif", image, check_contrast=False)
    imsave(tmp_path / "t.tif", np.roll(image, 2, axis=1), check_contrast=False)
    (tmp_path / "s.csv").write_text(",X,Y\n7,10,20\n9,50.5,60\n")
    code, out, err = run_cli(
        ["register", tmp_path / "s.tif", tmp_path / "t.tif", "-o", tmp_path / "out", "--source-landmarks", tmp_path / "s.csv",
         "--config", fast_json, "--working-size", "96", "--method", "none", "-q"],
        capsys,
    )
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [".histreg-output.json", "warped_source.tif", "transform.mha", "transform.json", "warped_source_landmarks.csv",
         "overlay.png"]
    )
    warped = read_image(tmp_path / "out" / "warped_source.tif")
    assert warped.dtype == np.uint16 and warped.shape == image.shape
    ids, _ = read_landmarks(tmp_path / "out" / "warped_source_landmarks.csv")
    assert list(ids) == ["7", "9"]
    assert "outputs in" in out


# --------------------------------------------------------------------------- evaluate
def test_evaluate_records_failures_and_goes_on(cover_table, tmp_path, fast_json, capsys):
    table = cover_table
    out = tmp_path / "results"
    code, stdout, err = run_cli(
        ["evaluate", table, "-o", out, "--config", fast_json, "--working-size", "128", "--method", "none"], capsys
    )
    assert code == 3, err  # completed, one pair failed: exit 3 with the count
    assert "histreg: error: 1 of 3 pairs failed" in err
    assert sorted(os.listdir(out)) == [".histreg-output.json", "pairs.csv", "summary.json"]
    with open(out / "pairs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0].keys()) == list(PAIR_COLUMNS)
    assert [r["status"] for r in rows] == ["training", "synthetic", "synthetic"]
    for row in rows[:2]:
        assert row["error"] == ""
        assert float(row["MrTRE"]) < float(row["initial_MrTRE"])
        assert float(row["seconds"]) > 0
    assert rows[2]["MrTRE"] == "" and "missing" in rows[2]["error"] and "not found" in rows[2]["error"]
    for row in rows[:2]:  # every registered pair carries its confidence, flag and initial choice
        assert 0.0 <= float(row["confidence"]) <= 1.0 and row["flag"] in ("ok", "check")
        assert row["initial_choice"] and (row["weakest"] or row["flag"] == "ok")
        assert row["compared"] in ("grey", "haematoxylin")  # haematoxylin: the counterstain retry was kept
    assert rows[2]["flag"] == "" and rows[2]["confidence"] == ""

    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 3 and summary["failed"] == 1
    assert summary["flagged"] == sum(r["flag"] == "check" for r in rows)
    for key in ("AMrTRE", "MMrTRE", "AArTRE", "robustness", "median_seconds"):
        assert isinstance(summary[key], float)
    assert summary["per_status"]["training"]["count"] == 1
    assert summary["per_status"]["synthetic"]["count"] == 2 and summary["per_status"]["synthetic"]["failed"] == 1
    assert summary["config"]["preprocess"]["working_size"] == 128
    # the table is printed
    assert "Rat-Kidney_PanCytokeratin.jpg -> Rat-Kidney_HE.jpg" in stdout and "AMrTRE" in stdout
    assert "not found" in stdout


# --------------------------------------------------------------------------- convert
def test_convert_round_trip(tmp_path, capsys):
    import SimpleITK as sitk

    rng = np.random.default_rng(2)
    images = {
        "grey.png": rng.integers(0, 255, (70, 80), dtype=np.uint8),
        "rgb.png": rng.integers(0, 255, (70, 80, 3), dtype=np.uint8),
        "rgba.png": rng.integers(0, 255, (70, 80, 4), dtype=np.uint8),
        "deep.tif": rng.integers(0, 65535, (70, 80, 3), dtype=np.uint16),
    }
    for name, image in images.items():
        imsave(tmp_path / name, image, check_contrast=False)
    code, out, err = run_cli(["convert", *[tmp_path / n for n in images], "-o", tmp_path / "mha"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "mha")) == [".histreg-output.json", "deep.mha", "grey.mha", "rgb.mha", "rgba.mha"]
    for name, image in images.items():
        mha = tmp_path / "mha" / (name.rsplit(".", 1)[0] + ".mha")
        back = read_image(mha)
        assert back.dtype == image.dtype
        np.testing.assert_array_equal(back, image)
        components = image.shape[2] if image.ndim == 3 else 1
        assert sitk.ReadImage(str(mha)).GetNumberOfComponentsPerPixel() == components  # colour as vector pixels
    assert "rgb.png ->" in out and "3-component vector" in out


def test_convert_real_jpeg(shared_data, tmp_path, capsys):
    source = shared_data / KIDNEY / f"{KIDNEY_TARGET}.jpg"
    code, _, err = run_cli(["convert", source, "-o", tmp_path], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(read_image(tmp_path / f"{KIDNEY_TARGET}.mha"), read_image(source))


# --------------------------------------------------------------------------- demo, help, version
def test_demo(tmp_path, fast_json, capsys):
    pytest.importorskip("napari_histreg.sample", reason="the bundled sample pair module is not there yet")
    code, out, err = run_cli(["demo", "--config", fast_json, "--working-size", "128", "-q", "-o", tmp_path / "demo"], capsys)
    assert code == 0, err
    before = float(out.split("median rTRE before:")[1].split()[0])
    after = float(out.split("median rTRE after:")[1].split()[0])
    assert after < before
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["MrTRE"] == pytest.approx(after, abs=1e-5)


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as info:
        histreg(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("register", "evaluate", "convert", "demo", "--version"):
        assert command in text
    for command, words in {
        "register": ["SOURCE", "TARGET", "--source-landmarks", "--target-landmarks", "--device", "--method",
                     "--working-size", "metrics.json"],
        "evaluate": ["DATASET.csv", "--status", "--limit", "pairs.csv", "summary.json"],
        "convert": ["INPUT", "OUTDIR", "vector"],
        "demo": ["--device", "-o"],
    }.items():
        with pytest.raises(SystemExit) as info:
            histreg([command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        for word in words:
            assert word in out, (command, word)


def test_version(capsys):
    from napari_histreg import __version__

    with pytest.raises(SystemExit) as info:
        histreg(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_register_on_the_haematoxylin_channel_records_it(tmp_path, fast_json, capsys):
    """``--representation haematoxylin``: the colour pair is compared on its counterstain, which the
    transform's configuration and metrics.json say; a representation that does not exist is refused."""
    import skimage.data

    rgb = skimage.data.immunohistochemistry()[::4, ::4]
    imsave(tmp_path / "s.png", rgb, check_contrast=False)
    imsave(tmp_path / "t.png", np.roll(rgb, (3, -2), axis=(0, 1)), check_contrast=False)
    (tmp_path / "s.csv").write_text(",X,Y\n1,40,40\n2,80,60\n3,60,90\n")
    (tmp_path / "t.csv").write_text(",X,Y\n1,38,43\n2,78,63\n3,58,93\n")
    code, out, err = run_cli(
        ["register", tmp_path / "s.png", tmp_path / "t.png", "-o", tmp_path / "out", "--source-landmarks", tmp_path / "s.csv",
         "--target-landmarks", tmp_path / "t.csv", "--config", fast_json, "--working-size", "128", "--method", "none",
         "--representation", "haematoxylin", "-q"],
        capsys,
    )
    assert code == 0, err
    assert "compared on the haematoxylin channel" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["compared"] == "haematoxylin"
    assert metrics["MrTRE"] < metrics["initial_MrTRE"] / 3
    transform = json.loads((tmp_path / "out" / "transform.json").read_text())
    assert "haematoxylin" in json.dumps(transform)
    with pytest.raises(SystemExit):
        histreg(["register", str(tmp_path / "s.png"), str(tmp_path / "t.png"), "-o", str(tmp_path / "x"),
                 "--representation", "eosin"])
    assert "invalid choice" in capsys.readouterr().err
