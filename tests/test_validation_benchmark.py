"""benchmarks/validation.py: the landmark-free validation set (known warps of two stain
renderings of one section). Its ground truth must be the registration's convention: a
registration recovers it, no registration and the reversed mapping do not."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _kidney(shared_data, size):
    return [("kidney", _rgb(shared_data / "rat-kidney" / "Rat-Kidney_PanCytokeratin.jpg", size))]


def _rgb(path, size):
    from napari_histreg.io import read_image
    from napari_histreg.training.data import _rgb_float, resize_rgb

    return resize_rgb(_rgb_float(read_image(path)), size)


def test_renderings_are_aligned_and_different(shared_data, validation):
    (_, rgb), = _kidney(shared_data, 256)
    haematoxylin, others = validation.stain_renderings(rgb)
    assert haematoxylin.shape == others.shape == rgb.shape
    grey_h, grey_o = haematoxylin.mean(-1), others.mean(-1)
    correlation = np.corrcoef(grey_h.ravel(), grey_o.ravel())[0, 1]
    assert 0.2 < correlation < 0.98  # one section (related), two stains (not the same image)


def test_known_warp_is_recovered_and_its_direction_matters(shared_data, validation):
    from napari_histreg import register
    from napari_histreg.metrics import rtre

    pair, = validation.make_pairs(_kidney(shared_data, 512), warps=1, seed=0)
    assert len(pair["source_rc"]) > 100
    before = np.median(rtre(pair["source_rc"], pair["target_rc"], pair["target"].shape[:2]))
    result = register(pair["source"], pair["target"], mode="optimise")
    after = validation.score(result, pair)["MrTRE"]
    reversed_ = np.median(rtre(result.map_target_points(pair["source_rc"]), pair["target_rc"], pair["target"].shape[:2]))
    assert before > 0.02
    assert after < 0.002, f"the known warp was not recovered ({before:.4f} -> {after:.4f})"
    assert reversed_ > 10 * after


def test_command_writes_its_table(shared_data, validation, tmp_path, capsys):
    kidney = shared_data / "rat-kidney"
    table = tmp_path / "table.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Source image", "Target image"])
        writer.writerow([kidney / "Rat-Kidney_PanCytokeratin.jpg", kidney / "Rat-Kidney_HE.jpg"])
    out = tmp_path / "out"
    code = validation.main(["--table", str(table), "--size", "320", "--warps", "1", "--method", "optimise",
                            "--method", 'affine-only={"nonrigid_method": "none"}', "--out", str(out), "-q"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "validation.csv")))
    assert {r["method"] for r in rows} == {"optimise", "affine-only"}
    assert len(rows) == 2 * 3  # two kidney images + scikit-image's, one warp each
    summary = json.loads((out / "validation.json").read_text())["summary"]
    assert set(summary) == {"optimise", "affine-only"}
    assert "AMrTRE" in capsys.readouterr().out


def test_threads_hold_every_registration_of_the_run(validation, monkeypatch):
    """``--threads N`` reaches every registration: the pipeline's own per-run choice from the
    free cores (2 on a quiet machine, 1 beside a busy process) used to override it, so "one
    thread" runs were not."""
    import napari_histreg.pipeline as pipeline_module

    asked = []

    class Made(Exception):
        pass

    class Recorded(pipeline_module.Pipeline):
        def run(self, source, target, progress=None):
            asked.append(self.threads)
            raise Made  # enough: the pipeline has been made

    monkeypatch.setattr(pipeline_module, "Pipeline", Recorded)
    pair = {"source": np.zeros((8, 8), np.float32), "target": np.zeros((8, 8), np.float32), "name": "blank"}
    for threads in (1, None):
        try:
            validation.run({"hybrid": {}}, [pair], "cpu", quiet=True, threads=threads)
        except Made:
            pass
    assert asked == [1, None]


def test_one_pair_is_the_same_pair_as_in_the_whole_set(shared_data, validation):
    """``--pair NAME`` reruns one pair exactly as the full run made it: its geometry comes from a
    generator seeded with its image's place in the table, so it must be cut from the whole set
    (making one image's pairs alone gives another pair under the same name)."""
    kidney = shared_data / "rat-kidney"
    images = [("he", _rgb(kidney / "Rat-Kidney_HE.jpg", 192)), ("panck", _rgb(kidney / "Rat-Kidney_PanCytokeratin.jpg", 192))]
    whole = validation.make_variant_pairs(images, ["rotated"], warps=1, seed=2)
    chosen, = validation.pairs_named(whole, ["panck#rotated#0"])
    assert chosen is whole[1]
    alone, = validation.make_variant_pairs(images[1:], ["rotated"], warps=1, seed=2)
    assert alone["name"] == chosen["name"]
    assert not np.allclose(alone["source"], chosen["source"])  # why the whole set is needed
    with pytest.raises(KeyError, match="no validation pair named 'panck#rotated#7'.*he#rotated#0"):
        validation.pairs_named(whole, ["panck#rotated#7"])

