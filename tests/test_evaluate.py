"""Evaluation of an ANHIR cover table (evaluate.py) through the library: which pairs, the
progress it reports, cancellation, and that nothing is written without an output folder."""

from __future__ import annotations

import pytest

from napari_histreg import RegistrationConfig
from napari_histreg.evaluate import evaluate_table
from napari_histreg.progress import RegistrationCancelled

# Stages cut to a few iterations: the plumbing, not the accuracy.
FAST = {"initial": {"angle_step": 10.0, "refine_step": 0.0}, "affine": {"levels": [64, 128], "iterations": [20, 10]}}


def test_evaluate_table_api_status_limit_and_progress(cover_table, tmp_path):
    table = cover_table
    config = RegistrationConfig.from_dict(FAST)
    config.preprocess.working_size = 96
    config.nonrigid_method = "none"
    events = []
    rows, summary = evaluate_table(table, statuses="synthetic", config=config, progress=events.append, limit=1)
    assert len(rows) == 1 and rows[0]["status"] == "synthetic" and rows[0]["error"] == ""
    assert summary["count"] == 1 and summary["failed"] == 0 and summary["statuses"] == ["synthetic"]
    pair_events = [(e.step, e.total) for e in events if e.stage == "pair"]
    assert pair_events == [(0, 1), (1, 1)]
    assert {e.stage for e in events} >= {"preprocess", "affine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cover.csv"]  # no out_dir: nothing written


def test_evaluate_cancel_writes_nothing(cover_table, tmp_path):
    table = cover_table

    def cancel(event):
        if event.stage == "initial":
            raise RegistrationCancelled

    with pytest.raises(RegistrationCancelled):
        evaluate_table(table, tmp_path / "out", progress=cancel)
    assert not (tmp_path / "out").exists()
