"""The *Refine with landmarks* widget on the bundled sample pair (GUI: needs Xvfb, fails without
a display): guide points correct the Register widget's result, restart a failed one, or align
the pair on their own; bad guide points are refused before any worker starts."""

from __future__ import annotations

import napari_conftest
import numpy as np
import pytest
from napari_conftest import make_fast, run_widget, sample_names

pytestmark = pytest.mark.gui

# the GUI fixtures, bound here (not imported by name: the tests' parameters would shadow them)
display, qapp_cls = napari_conftest.display, napari_conftest.qapp_cls
viewer, sample_viewer = napari_conftest.viewer, napari_conftest.sample_viewer

N_GUIDES = 6


def _landmarks(viewer):
    """Source and target landmarks of the sample, paired by id: (ids, source rc, target rc)."""
    _, _, target_pts_name, source_pts_name = sample_names()
    src, tgt = viewer.layers[source_pts_name], viewer.layers[target_pts_name]
    src_ids, tgt_ids = [str(i) for i in src.features["id"]], [str(i) for i in tgt.features["id"]]
    ids = [i for i in src_ids if i in tgt_ids]
    source = np.asarray(src.data)[[src_ids.index(i) for i in ids]]
    target = np.asarray(tgt.data)[[tgt_ids.index(i) for i in ids]]
    return np.asarray(ids, dtype=object), source, target


def _add_guides(viewer, seed=0):
    """Guide layers made of N_GUIDES of the sample's landmarks, with their ids; the target's in
    the reverse order, so only pairing by id pairs them right. Returns the guide and the other
    landmarks' indices into :func:`_landmarks`."""
    ids, source, target = _landmarks(viewer)
    rng = np.random.default_rng(seed)
    guides = np.sort(rng.choice(len(ids), size=N_GUIDES, replace=False))
    others = np.setdiff1d(np.arange(len(ids)), guides)
    viewer.add_points(source[guides], features={"id": ids[guides]}, name="source guides", size=8)
    back = guides[::-1]
    viewer.add_points(target[back], features={"id": ids[back]}, name="target guides", size=8)
    return guides, others


def _register(viewer, qtbot):
    from napari_histreg._napari.widgets import RegisterWidget

    widget = RegisterWidget(viewer)
    make_fast(widget)
    assert run_widget(qtbot, widget) == "done", widget.status
    return widget


def _qc(viewer):
    """A Landmark QC widget on the sample's target landmarks and the registered ones."""
    from napari_histreg._napari.widgets import LandmarksWidget

    _, _, target_pts_name, source_pts_name = sample_names()
    qc = LandmarksWidget(viewer)
    viewer.window.add_dock_widget(qc)
    # chosen by itself, guide layers present or not: the landmarks, not the shorter-named "target guides"
    assert qc.target_points.value is viewer.layers[target_pts_name]
    qc.moving_points.value = viewer.layers[f"{source_pts_name} registered"]
    return qc


def _guided(viewer, action=None):
    from napari_histreg._napari.widgets import GuidedWidget

    widget = GuidedWidget(viewer)
    viewer.window.add_dock_widget(widget)
    if action is not None:
        widget.action.value = action
    return widget


def test_refine_meets_the_guides_and_updates_landmarks_and_qc(sample_viewer, qtbot):
    from napari_histreg._napari.widgets.guided import REFINE

    viewer = sample_viewer
    target_name, source_name, _, source_pts_name = sample_names()
    _register(viewer, qtbot)
    warped = viewer.layers[f"{source_name} registered"]
    mapped = viewer.layers[f"{source_pts_name} registered"]
    qc = _qc(viewer)
    guides, _ = _add_guides(viewer)
    # the QC table stays on the landmarks when guide layers arrive (it used to jump to "target guides")
    assert qc.target_points.value is viewer.layers[sample_names()[2]]
    mapped_before = np.array(mapped.data)
    table_before = [list(row) for row in qc.table.data]
    stats_before = {i: e for i, e in zip(qc.stats["ids"], qc.stats["errors"])}

    widget = _guided(viewer)
    # the pickers start on the pair, the guide layers and the landmarks the registration maps
    assert widget.source.value is viewer.layers[source_name] and widget.target.value is viewer.layers[target_name]
    assert widget.source_guides.value is viewer.layers["source guides"]
    assert widget.target_guides.value is viewer.layers["target guides"]
    assert widget.source_points.value is viewer.layers[source_pts_name]
    assert widget.action.value == REFINE
    names = [layer.name for layer in viewer.layers]

    assert run_widget(qtbot, widget) == "done", widget.status
    assert "6 point pairs (paired by id)" in widget.status and "guides met within" in widget.status
    # the same layers, updated in place: nothing duplicated
    assert [layer.name for layer in viewer.layers] == names
    assert viewer.layers[f"{source_name} registered"] is warped
    assert viewer.layers[f"{source_pts_name} registered"] is mapped
    assert not np.allclose(mapped.data, mapped_before)

    result = widget.session.result
    guide = result.info["guide"]
    assert guide["points"] == N_GUIDES and guide["restarted_from_points"] is False
    assert ("needs a look" in widget.status) == (result.flag == "check")  # flagged: said (and notified)
    assert (widget.session.result_source_name, widget.session.result_target_name) == (source_name, target_name)
    ids, source, target = _landmarks(viewer)
    np.testing.assert_allclose(mapped.data, result.map_source_points(viewer.layers[source_pts_name].data), atol=1e-6)
    # each source guide lands within 2 px of its target guide
    miss = np.linalg.norm(result.map_source_points(source[guides]) - target[guides], axis=1)
    assert miss.max() < 2.0, miss

    # the QC table followed the registered landmarks
    assert [list(row) for row in qc.table.data] != table_before
    after = {i: e for i, e in zip(qc.stats["ids"], qc.stats["errors"])}
    assert set(after) == set(stats_before)
    for i in ids[guides]:
        assert after[i] < 2.0
    assert any(abs(after[i] - stats_before[i]) > 1e-3 for i in ids[guides])


def test_refine_restarts_a_failed_registration(sample_viewer, qtbot):
    from napari_histreg.guided import turned_result

    viewer = sample_viewer
    target_name, source_name, _, source_pts_name = sample_names()
    register = _register(viewer, qtbot)
    session = register.session
    failed = turned_result(session.result, 90.0)  # the automatic result made to fail
    session.set_result(failed, source_name, target_name)
    guides, others = _add_guides(viewer)
    ids, source, target = _landmarks(viewer)
    diagonal = np.hypot(*viewer.layers[target_name].data.shape[:2])
    failed_error = np.median(np.linalg.norm(failed.map_source_points(source[others]) - target[others], axis=1))
    assert failed_error > 0.1 * diagonal

    widget = _guided(viewer)
    assert run_widget(qtbot, widget) == "done", widget.status
    result = session.result
    assert result is not failed and result.info["guide"]["restarted_from_points"] is True
    assert "restarted from the points' affine" in widget.status
    error = np.median(np.linalg.norm(result.map_source_points(source[others]) - target[others], axis=1))
    assert error < 0.05 * failed_error and error < 0.01 * diagonal, (error, failed_error)
    miss = np.linalg.norm(result.map_source_points(source[guides]) - target[guides], axis=1)
    assert miss.max() < 2.0, miss
    mapped = viewer.layers[f"{source_pts_name} registered"]
    np.testing.assert_allclose(mapped.data, result.map_source_points(viewer.layers[source_pts_name].data), atol=1e-6)


def test_affine_and_spline_from_points_without_a_registration(sample_viewer, qtbot):
    from napari_histreg._napari.widgets.guided import REFINE

    viewer = sample_viewer
    target_name, source_name, _, source_pts_name = sample_names()
    guides, others = _add_guides(viewer)
    ids, source, target = _landmarks(viewer)
    widget = _guided(viewer, REFINE)
    assert widget.source_points.value is viewer.layers[source_pts_name]  # nothing mapped yet: the landmarks
    names = [layer.name for layer in viewer.layers]
    assert widget.run() is None and "no registration to refine" in widget.status
    assert [layer.name for layer in viewer.layers] == names

    widget.action.value = "Affine from points"
    assert run_widget(qtbot, widget) == "done", widget.status
    assert "affine of" in widget.status and "6 point pairs (paired by id)" in widget.status
    assert "largest miss at a guide" in widget.status
    result = widget.session.result
    assert result.info["mode"] == "points" and result.info["guide"]["model"] == "affine"
    warped = viewer.layers[f"{source_name} registered"]
    assert warped.data.shape == viewer.layers[target_name].data.shape
    mapped = viewer.layers[f"{source_pts_name} registered"]
    before = np.median(np.linalg.norm(source[others] - target[others], axis=1))
    after = np.median(np.linalg.norm(result.map_source_points(source[others]) - target[others], axis=1))
    assert after < 0.3 * before

    widget.action.value = "Thin-plate spline from points"
    assert run_widget(qtbot, widget) == "done", widget.status
    result = widget.session.result
    assert result.info["guide"]["model"] == "tps" and "thin-plate spline" in widget.status
    assert viewer.layers[f"{source_name} registered"] is warped and viewer.layers[f"{source_pts_name} registered"] is mapped
    miss = np.linalg.norm(result.map_source_points(source[guides]) - target[guides], axis=1)
    assert miss.max() < 0.5, miss  # a spline passes through its points
    np.testing.assert_allclose(mapped.data, result.map_source_points(viewer.layers[source_pts_name].data), atol=1e-6)

    # a transform from points alone is not refined: the pair must be registered first
    widget.action.value = REFINE
    assert widget.run() is None and "from the points alone" in widget.status


def test_bad_guide_points_are_refused_before_starting(sample_viewer):
    from napari_histreg._napari.widgets.guided import pair_guides

    viewer = sample_viewer
    ids, source, target = _landmarks(viewer)
    viewer.add_points(source[:5], name="source guides")  # no ids: paired by order
    viewer.add_points(target[:4], name="target guides")
    widget = _guided(viewer, "Affine from points")
    names = [layer.name for layer in viewer.layers]
    data = {layer.name: np.array(layer.data) for layer in viewer.layers}

    assert widget.run() is None and not widget.running
    assert "cannot start" in widget.status
    assert "5 source guide points but 4 target guide points" in widget.status
    assert [layer.name for layer in viewer.layers] == names
    for layer in viewer.layers:
        np.testing.assert_array_equal(layer.data, data[layer.name])
    assert widget.session.result is None

    viewer.layers["source guides"].data = source[:2]
    viewer.layers["target guides"].data = target[:2]
    widget.action.value = "Thin-plate spline from points"
    assert widget.run() is None and "needs at least 3 point pairs" in widget.status
    widget.target_guides.value = viewer.layers["source guides"]
    assert widget.run() is None and "same layer" in widget.status
    assert [layer.name for layer in viewer.layers] == names and widget.session.result is None

    # pairing: by the ids in common (the others left out, said so), else by order
    s, t, how = pair_guides(["a", "b", "c"], ["c", "x", "a"], 3, 3)
    assert list(s) == [2, 0] and list(t) == [0, 2] and "by id" in how and "2 points without a partner" in how
    s, t, how = pair_guides(None, ["a", "b"], 2, 2)
    assert list(s) == [0, 1] and how == "paired by order"
    with pytest.raises(ValueError, match="no guide points"):
        pair_guides(None, None, 0, 0)
    with pytest.raises(ValueError, match="repeated"):
        pair_guides(["a", "a"], ["a", "b"], 2, 2)
