"""The benchmark script (benchmarks/compare.py) and its elastix peer (benchmarks/elastix_peer.py).

* the elastix landmark direction, checked on the synthetic pairs (known rigid / affine warps):
  the inverse mapping we use gives a small error, the transform applied the other way a large
  one, and the field read from transformix agrees with transformix's own point mapping;
* a smoke run of compare.py on a two-pair cover table with a reduced configuration;
* the method list (one entry per row, ``register_kwargs`` reach ``register``) and the
  behaviour without itk-elastix.

Tests that need elastix skip when ``itk`` (``pip install -e .[bench]``) is missing; tests that
need the real pairs skip when ../shared/data is missing. Torch and ITK run on one thread here.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
NO_ELASTIX = "itk-elastix is not installed (pip install -e .[bench])"

# itk's SWIG modules warn once per wrapped type on import (hundreds of lines): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


def _load_compare():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    name = "histreg_benchmarks_compare"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare():
    return _load_compare()


@pytest.fixture
def one_thread():
    """Torch (and ITK, if loaded) on one thread for the test, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    itk_before = None
    if "itk" in sys.modules:
        itk_before = sys.modules["itk"].MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if "itk" in sys.modules:
        itk = sys.modules["itk"]
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(itk_before or itk.MultiThreaderBase.GetGlobalMaximumNumberOfThreads())


def _require_elastix(compare):
    if not compare.elastix_peer.available():
        pytest.skip(NO_ELASTIX)


def _synthetic(shared_data: Path, kind: str):
    from napari_histreg.io import pair_landmarks, read_image, read_landmarks

    folder = shared_data / "synthetic"
    source = folder / f"artificial_moving-{kind}.jpg"
    if not source.exists():
        pytest.skip(f"{source} not found in the shared data")
    s_ids, s_pts = read_landmarks(folder / f"artificial_moving-{kind}.csv")
    t_ids, t_pts = read_landmarks(folder / "artificial_reference.csv")
    _, s_pts, t_pts = pair_landmarks(s_ids, s_pts, t_ids, t_pts)
    return read_image(source), read_image(folder / "artificial_reference.jpg"), s_pts, t_pts


# --------------------------------------------------------------------------- elastix direction
@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_elastix_landmark_direction_on_synthetic_pair(compare, shared_data, one_thread, kind):
    """elastix's transform maps target (fixed) points to source (moving) points. Inverting it
    brings the source landmarks onto the target ones; applying it to them instead doubles the
    known warp. Both directions are measured, so a swap anywhere shows as a large error."""
    _require_elastix(compare)
    from napari_histreg.metrics import rtre

    peer = compare.elastix_peer
    source, target, source_pts, target_pts = _synthetic(shared_data, kind)
    config = peer.ElastixConfig(working_size=256, max_iterations=32, initialisation="CenterOfGravity", threads=1)
    result = peer.register(source, target, config)

    initial = np.median(rtre(source_pts, target_pts, target.shape))
    right = np.median(rtre(result.map_source_points(source_pts), target_pts, target.shape))
    wrong = np.median(rtre(peer.wrong_direction_points(result, source_pts), target_pts, target.shape))
    assert initial > 0.05  # the synthetic warp is large: the check can tell the directions apart
    assert right < 0.006, f"inverse mapping: median rTRE {right:.4f} (initial {initial:.4f})"
    assert right < initial / 10
    assert wrong > initial, f"wrong direction: median rTRE {wrong:.4f} should exceed the initial {initial:.4f}"

    # The field taken from transformix has the layout RegistrationResult expects: target points
    # through the field (exact direction) agree with transformix's own point transform.
    through_field = result.map_target_points(target_pts)
    through_transformix = peer.transformix_points(result, target_pts)
    scale = 1.0 / min(result.target_frame.scale)
    assert np.abs(through_field - through_transformix).max() < 0.1 * scale


def test_elastix_config_uses_default_maps(compare):
    _require_elastix(compare)
    peer = compare.elastix_peer
    params = peer.parameter_object(peer.ElastixConfig())
    maps = [dict(params.GetParameterMap(i)) for i in range(params.GetNumberOfParameterMaps())]
    assert [m["Transform"][0] for m in maps] == ["AffineTransform", "BSplineTransform"]
    assert maps[0]["MaximumNumberOfIterations"] == ("256",)
    assert "AutomaticTransformInitialization" not in maps[0]
    cog = peer.parameter_object(peer.ElastixConfig(initialisation="CenterOfGravity", max_iterations=8))
    first = dict(cog.GetParameterMap(0))
    assert first["AutomaticTransformInitializationMethod"] == ("CenterOfGravity",)
    assert first["MaximumNumberOfIterations"] == ("8",)
    assert "AutomaticTransformInitialization" not in dict(cog.GetParameterMap(1))


# --------------------------------------------------------------------------- compare.py
def _tiny_table(shared_data: Path, folder: Path) -> Path:
    """A cover table with one training and one synthetic pair (absolute paths)."""
    wanted = [("rat-kidney/Rat-Kidney_PanCytokeratin", "rat-kidney/Rat-Kidney_HE", "training"),
              ("synthetic/artificial_moving-rigid", "synthetic/artificial_reference", "synthetic")]
    lines = ["Source image,Source landmarks,Target image,Target landmarks,status,note"]
    for source, target, status in wanted:
        if not (shared_data / f"{source}.jpg").exists() or not (shared_data / f"{target}.jpg").exists():
            pytest.skip(f"{source}.jpg or {target}.jpg not found in the shared data")
        s, t = shared_data / source, shared_data / target
        lines.append(f"{s}.jpg,{s}.csv,{t}.jpg,{t}.csv,{status},test")
    table = folder / "table.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def test_compare_smoke(compare, shared_data, one_thread, tmp_path, capsys):
    """compare.py end to end on two pairs, working size 256, the affine-only mode and (when
    installed) elastix with 16 iterations: every output is written and published."""
    table = _tiny_table(shared_data, tmp_path)
    have_elastix = compare.elastix_peer.available()
    methods = ["histreg-affine"] + (["elastix"] if have_elastix else [])
    out, docs = tmp_path / "out", tmp_path / "docs" / "benchmarks"
    code = compare.main([
        "--data", str(table), "--out", str(out), "--working-size", "256", "--methods", ",".join(methods),
        "--elastix-iterations", "16", "--threads", "1", "--devices", "cpu", "--publish", "--publish-dir", str(docs),
    ])
    assert code == 0, capsys.readouterr().err

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(methods)
    assert {r["method"] for r in rows} == set(methods)
    assert {r["status"] for r in rows} == {"training", "synthetic"}
    for row in rows:
        assert row["error"] == "", row["error"]
        for column in ("MrTRE", "mean_rTRE", "max_rTRE", "robustness", "seconds"):
            assert np.isfinite(float(row[column])), column
    ours = [r for r in rows if r["method"] == "histreg-affine"]
    assert all(float(r["MrTRE"]) < float(r["initial_MrTRE"]) for r in ours)
    if have_elastix:
        synthetic = next(r for r in rows if r["method"] == "elastix" and r["status"] == "synthetic")
        assert float(synthetic["wrong_direction_MrTRE"]) > float(synthetic["MrTRE"])

    md = (out / "benchmark.md").read_text()
    assert "## `training` pairs (1)" in md and "## `synthetic` pairs (1)" in md
    assert "AMrTRE" in md and "MMrTRE" in md and "median s/pair" in md and "÷ elastix" in md
    assert "## Stage profile" in md and "| histreg-affine |" in md
    for name in ("rtre.png", "stages.png", "overlay.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert (docs / name).read_bytes() == data
    assert (docs / "benchmark.md").read_text() == md
    assert not any(p.name.startswith(".") for p in docs.iterdir())  # no staging left behind

    with open(out / "stages.csv", newline="") as handle:
        stages = {(r["method"], r["stage"]) for r in csv.DictReader(handle)}
    assert {("histreg-affine", s) for s in ("preprocess", "initial", "affine", "landmarks")} <= stages
    if have_elastix:
        assert ("elastix", "registration") in stages
    summary = json.loads((out / "summary.json").read_text())
    env = summary["environment"]
    assert env["torch_threads"] == 1 and env["cpu"] and env["torch"]
    assert set(summary["summary"]) == {"training", "synthetic"}


def test_methods_are_one_entry_each(compare, monkeypatch):
    """A new mode is one Method entry: its register_kwargs reach napari_histreg.register."""
    import napari_histreg
    from napari_histreg import RegistrationConfig

    names = [m.name for m in compare.METHODS]
    assert len(names) == len(set(names))
    assert {"histreg-dense", "histreg-patches", "histreg-affine", compare.REFERENCE} <= set(names)
    modes = {m.config.get("nonrigid_method") for m in compare.METHODS if m.kind == "histreg"}
    assert {"dense", "patches", "none"} <= modes

    seen = {}

    def fake_register(source, target, config=None, **kwargs):
        seen.update(kwargs, method=config.nonrigid_method)
        return "result"

    monkeypatch.setattr(napari_histreg, "register", fake_register)
    future = compare.Method("histreg-learned", "histreg", "a future mode", config={"nonrigid_method": "none"},
                            register_kwargs={"mode": "learned"})
    args = argparse.Namespace(seed=3, elastix_size="same", elastix_iterations=None, threads=None)
    runners = compare.build_runners([future], ["cpu", "cuda"], RegistrationConfig(), args)
    assert [r.label for r in runners] == ["histreg-learned", "histreg-learned@cuda"]
    assert runners[0].run(np.zeros((8, 8)), np.zeros((8, 8))) == "result"
    assert seen == {"mode": "learned", "device": "cpu", "method": "none"}


def test_without_elastix(compare, monkeypatch, capsys):
    """Without itk-elastix the peer rows are dropped with a warning, or (when asked for by name)
    the script stops with the install command."""
    monkeypatch.setattr(compare.elastix_peer, "available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        methods, notes = compare.select_methods(argparse.Namespace(methods=None))
    assert methods and all(m.kind == "histreg" for m in methods)
    assert any("pip install -e .[bench]" in str(w.message) for w in caught)
    assert notes
    code = compare.main(["--methods", "histreg-affine,elastix", "--data", "missing.csv"])
    assert code == 2
    assert "pip install -e .[bench]" in capsys.readouterr().err


def test_guided_benchmark_shift_oracle_removes_a_common_shift():
    """``benchmarks/guided.py``'s oracle: the pair's MrTRE with every mapped landmark moved by the
    landmarks' mean miss. A result that misses every landmark by one shift (plus small clicking
    noise) must drop to the noise; one whose misses are noise alone must barely move."""
    from napari_histreg.guided import points_result
    from napari_histreg.scoring import LandmarkPair

    spec = importlib.util.spec_from_file_location("histreg_benchmarks_guided", BENCH / "guided.py")
    guided = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guided)
    rng = np.random.default_rng(0)
    shape = (400, 600)
    points = rng.uniform([20, 20], [380, 580], size=(40, 2))
    identity = points_result(shape, shape, points[:3], points[:3], "translation")  # maps every point to itself
    noise = rng.normal(0, 1.0, size=points.shape)
    diagonal = float(np.hypot(*shape))

    shifted = LandmarkPair.from_points(points, points + [12.0, -9.0] + noise, shape)
    before, after = guided.shift_oracle(identity, shifted)
    assert before == pytest.approx(15.0 / diagonal, rel=0.1)  # the 12, -9 shift's 15 px
    assert after < 2.0 / diagonal < before

    noisy = LandmarkPair.from_points(points, points + noise, shape)
    before, after = guided.shift_oracle(identity, noisy)
    assert after == pytest.approx(before, rel=0.25)
