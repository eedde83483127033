"""The napari widgets on the bundled sample pair (GUI: needs Xvfb, fails without a display)."""

from __future__ import annotations

import numpy as np
import pytest
from napari_conftest import (  # noqa: F401  (fixtures)
    display,
    make_fast,
    qapp_cls,
    run_widget,
    sample_names,
    sample_viewer,
    viewer,
    world_extent,
)

from napari_histreg.conventions import affine_to_field
from napari_histreg.metrics import rtre

pytestmark = pytest.mark.gui


def _layer_types(viewer):
    return {layer.name: type(layer).__name__ for layer in viewer.layers}


def test_register_widget_on_sample(sample_viewer, qtbot):
    from napari_histreg._napari.widgets import LandmarksWidget, RegisterWidget

    viewer = sample_viewer
    target_name, source_name, target_pts_name, source_pts_name = sample_names()
    target, target_pts = viewer.layers[target_name], viewer.layers[target_pts_name]
    # a target placed elsewhere in the world: every output must follow it
    for layer in (target, target_pts):
        layer.scale = (0.5, 0.5)
        layer.translate = (10.0, -20.0)

    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.source.value is viewer.layers[source_name]
    assert widget.target.value is target
    assert widget.source_points.value is viewer.layers[source_pts_name]
    make_fast(widget)
    widget.show_magnitude.value = True
    widget.show_jacobian.value = True
    events = []
    widget._progress.changed.connect(events.append)

    assert run_widget(qtbot, widget) == "done", widget.status
    # the bar advanced on progress events before the result set it full
    assert widget._progress.value == 1000 and any(0 < value < 1000 for value in events), events

    warped = viewer.layers[f"{source_name} registered"]
    assert warped.rgb and warped.data.shape == target.data.shape
    np.testing.assert_allclose(warped.scale, target.scale)
    np.testing.assert_allclose(warped.translate, target.translate)

    vectors = viewer.layers[f"{source_name} deformation"]
    assert type(vectors).__name__ == "Vectors" and vectors.data.ndim == 3 and vectors.data.shape[1:] == (2, 2)
    assert 16**2 <= len(vectors.data) <= 22**2  # thinned to ~20 arrows a side: readable, not a carpet
    np.testing.assert_allclose(vectors.features["magnitude"], np.linalg.norm(vectors.data[:, 1], axis=1), rtol=1e-5)
    # drawn no longer than the grid spacing, so arrows do not cross (the magnitude keeps the truth)
    spacing = max(target.data.shape[:2]) / 20
    assert vectors.length * np.percentile(vectors.features["magnitude"], 90) <= 0.8 * spacing + 1e-6
    starts = vectors.data[:, 0]
    assert starts.min() >= 0 and (starts.max(axis=0) < target.data.shape[:2]).all()
    np.testing.assert_allclose(vectors.scale, target.scale)
    np.testing.assert_allclose(vectors.translate, target.translate)
    for extra in ("displacement magnitude", "Jacobian determinant"):
        layer = viewer.layers[f"{source_name} {extra}"]
        np.testing.assert_allclose(world_extent(layer), world_extent(target), atol=1.0)

    mapped = viewer.layers[f"{source_pts_name} registered"]
    source_pts = viewer.layers[source_pts_name]
    result = widget.session.result
    np.testing.assert_allclose(mapped.data, result.map_source_points(source_pts.data), atol=1e-6)
    assert list(mapped.features["id"]) == [str(i) for i in source_pts.features["id"]]
    before = np.median(rtre(source_pts.data, target_pts.data, target.data.shape))
    after = np.median(rtre(mapped.data, target_pts.data, target.data.shape))
    assert after < before

    # QC widget: pairs by id, distances in target pixels despite the world scale
    qc = LandmarksWidget(viewer)
    viewer.window.add_dock_widget(qc)
    assert qc.target_points.value is target_pts and qc.moving_points.value is mapped
    assert qc.stats["n"] == len(target_pts.data)
    assert qc.stats["MrTRE"] == pytest.approx(after, rel=1e-6)

    # running again (cheaper: rigid+affine only) updates the same layers in place
    widget.nonrigid_method.value = "none"
    widget.use_initial.value = False
    before_layers = list(viewer.layers)
    assert run_widget(qtbot, widget) == "done", widget.status
    assert viewer.layers[f"{source_name} registered"] is warped
    assert list(viewer.layers) == before_layers


def test_register_widget_compares_the_haematoxylin_channel(sample_viewer, qtbot):
    """The advanced *compare* choice reaches the registration, and the status line says it."""
    from napari_histreg._napari.widgets import RegisterWidget

    viewer = sample_viewer
    target_name, source_name, target_pts_name, source_pts_name = sample_names()
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    make_fast(widget)
    assert widget.representation.value == "grey"
    widget.representation.value = "haematoxylin"
    assert run_widget(qtbot, widget) == "done", widget.status
    result = widget.session.result
    assert result.info["config"]["preprocess"]["representation"] == "haematoxylin"
    assert "compared on the haematoxylin channel" in widget.status
    target = viewer.layers[target_name]
    mapped, target_pts = viewer.layers[f"{source_pts_name} registered"], viewer.layers[target_pts_name]
    before = np.median(rtre(viewer.layers[source_pts_name].data, target_pts.data, target.data.shape))
    assert np.median(rtre(mapped.data, target_pts.data, target.data.shape)) < before / 3


def test_cancel_stops_and_leaves_layers(sample_viewer, qtbot):
    from napari_histreg._napari.widgets import RegisterWidget

    viewer = sample_viewer
    _, source_name, _, _ = sample_names()
    placeholder = viewer.add_image(np.zeros((16, 16), np.uint8), name=f"{source_name} registered")
    names = [layer.name for layer in viewer.layers]

    widget = RegisterWidget(viewer)
    make_fast(widget)
    widget.iterations.value = 4.0  # long enough to be caught mid-run
    seen = []
    original = widget._on_event

    def on_event(event):
        seen.append(event)
        original(event)
        if event.stage in ("initial", "affine"):
            widget.cancel()

    widget.runner.on_event = on_event
    assert run_widget(qtbot, widget) == "cancelled"
    assert seen and seen[-1].stage in ("initial", "affine")
    assert "cancel" in widget.status
    assert [layer.name for layer in viewer.layers] == names
    assert viewer.layers[f"{source_name} registered"] is placeholder and not placeholder.data.any()
    assert widget.session.result is None
    assert widget._run_button.enabled and not widget._cancel_button.enabled

    # cancel before the first step: nothing at all happens
    widget.runner.on_event = original
    widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert widget.runner.outcome == "cancelled"
    assert [layer.name for layer in viewer.layers] == names


def test_progress_events_are_throttled_to_the_newest(qtbot):
    """Progress events closer together than PROGRESS_INTERVAL reach the widget as one: the
    first at once, the newest of the rest when the interval is over, the ones between never
    (each would repaint the window beside napari's canvas while the registration runs)."""
    from napari_histreg._napari import worker
    from napari_histreg.progress import ProgressEvent

    shown = []
    runner = worker.Runner(on_event=shown.append)
    runner.worker = object()  # as while a run is in progress
    events = [ProgressEvent("nonrigid", k, 10, "") for k in range(1, 6)]
    for event in events:
        runner._forward_event(event)
    assert shown == events[:1]
    qtbot.waitUntil(lambda: len(shown) == 2, timeout=int(3000 * worker.PROGRESS_INTERVAL))
    assert shown == [events[0], events[-1]]
    runner._forward_event(events[2])  # within the interval again: kept for later...
    runner._finished()  # ...and dropped when the run ends (the result's status replaces it)
    qtbot.wait(int(1500 * worker.PROGRESS_INTERVAL))
    assert shown == [events[0], events[-1]]

    # a step still held when the result arrives (before the worker's "finished") is dropped
    # too: it would overwrite the result's status line
    results = []
    runner = worker.Runner(on_event=shown.append, on_result=results.append)
    runner.worker = object()
    runner._forward_event(events[0])
    runner._forward_event(events[1])
    runner._returned("the result")
    qtbot.wait(int(1500 * worker.PROGRESS_INTERVAL))
    assert results == ["the result"] and shown[-1] is events[0]


def _voluntary_switches() -> int | None:
    """Times this thread went to sleep (Linux), or None where /proc does not tell."""
    import threading

    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches"))
    except (OSError, StopIteration):
        return None


def test_runner_wait_sleeps_until_the_run_ends(qtbot):
    """``wait`` returns False at its timeout and True once the run has finished, with the
    result handed over; in between the GUI thread sleeps in Qt's event loop instead of waking
    every 10 ms (which took the CPU from a registration's threads on 2 cores)."""
    import time

    from napari_histreg._napari import worker

    results = []
    runner = worker.Runner(on_result=results.append)

    def job(progress):
        time.sleep(1.0)
        return "the result"

    runner.start(job)
    assert runner.wait(0.05) is False and runner.running
    before = _voluntary_switches()
    assert runner.wait(30) is True
    after = _voluntary_switches()
    assert not runner.running and runner.outcome == "done" and results == ["the result"]
    if before is not None:
        # polling every 10 ms slept about 95 times in this second; the event loop a few times
        assert after - before < 40, f"the GUI thread woke {after - before} times while waiting"
    assert runner.wait(0.05) is True  # nothing running: at once


def test_unavailable_device_is_refused_before_starting(sample_viewer):
    import torch

    from napari_histreg._napari.widgets import RegisterWidget

    unavailable = "cuda" if not torch.cuda.is_available() else "mps"
    widget = RegisterWidget(sample_viewer)
    widget.device.value = unavailable
    assert widget.run() is None and not widget.running
    assert "cannot start" in widget.status and unavailable in widget.status.lower()


def test_stage_widgets_continue_from_each_other(sample_viewer, qtbot):
    from napari_histreg._napari.widgets import AffineWidget, InitialAlignmentWidget, NonrigidWidget, PreprocessWidget

    viewer = sample_viewer
    target_name, source_name, _, _ = sample_names()
    target = viewer.layers[target_name]

    pre = PreprocessWidget(viewer)
    make_fast(pre)
    assert run_widget(qtbot, pre) == "done", pre.status
    session = pre.session
    pair = session.pair
    assert max(pair.target.shape) == 256 and pair.source.shape == pair.target.shape
    working = viewer.layers[f"{target_name} (working)"]
    assert f"{source_name} (working)" in viewer.layers
    # a target pixel and its working pixel sit at the same world position
    p = np.array([[100.0, 300.0]])
    w = pair.target_frame.to_working(p)
    np.testing.assert_allclose(w * working.scale + working.translate, p * target.scale + target.translate, atol=1e-6)

    init = InitialAlignmentWidget(viewer)
    assert run_widget(qtbot, init) == "done", init.status
    assert session.pair is pair and session.matrix_stage == "initial"
    assert "rotation" in init.status
    warped = viewer.layers[f"{source_name} registered"]
    assert warped.data.shape == target.data.shape

    aff = AffineWidget(viewer)
    make_fast(aff)
    assert run_widget(qtbot, aff) == "done", aff.status
    assert "started from initial" in aff.status
    assert session.matrix_stage == "affine" and session.pair is pair
    assert viewer.layers[f"{source_name} registered"] is warped

    nonrigid = NonrigidWidget(viewer)
    make_fast(nonrigid)
    assert run_widget(qtbot, nonrigid) == "done", nonrigid.status
    assert "started from affine" in nonrigid.status
    result = session.result
    assert result.info["stage"] == "nonrigid"
    np.testing.assert_allclose(result.matrix, session.matrix)
    assert result.working_field.shape == (2,) + pair.target.shape
    assert f"{source_name} deformation" in viewer.layers


def test_networks_in_the_widgets(sample_viewer, qtbot):
    """The learned mode of the Register widget and the network choices of the stage widgets
    (U-Net mask, affine network, patch-group network) run on the sample and register it."""
    from napari_histreg._napari.widgets import AffineWidget, NonrigidWidget, PreprocessWidget, RegisterWidget

    viewer = sample_viewer
    target_name, source_name, target_pts_name, source_pts_name = sample_names()
    target_pts, source_pts = viewer.layers[target_pts_name], viewer.layers[source_pts_name]
    shape = viewer.layers[target_name].data.shape

    def median_error() -> float:
        mapped = viewer.layers[f"{source_pts_name} registered"].data
        return float(np.median(rtre(mapped, target_pts.data, shape)))

    before = float(np.median(rtre(source_pts.data, target_pts.data, shape)))
    reg = RegisterWidget(viewer)
    reg.mode.value = "learned"
    reg.source_points.value = source_pts
    assert run_widget(qtbot, reg) == "done", reg.status
    assert reg.session.result.info["mode"] == "learned"
    assert median_error() < 0.3 * before

    pre = PreprocessWidget(viewer)
    pre.mask.value = "tissue U-Net"
    assert run_widget(qtbot, pre) == "done", pre.status
    pair = pre.session.pair
    assert pre.session.mask_method == "unet"
    # the padding around the working sections stays background and the tissue is kept
    assert pair.target[0].max() == 0 and pair.target[:, 0].max() == 0
    assert (pair.target > 0.1).mean() > 0.2

    aff = AffineWidget(viewer)
    aff.method.value = "network"
    aff.start.value = "identity"
    assert run_widget(qtbot, aff) == "done", aff.status
    assert not np.allclose(aff.session.matrix, np.eye(2, 3), atol=1e-3)

    nonrigid = NonrigidWidget(viewer)
    nonrigid.method.value = "network"
    assert run_widget(qtbot, nonrigid) == "done", nonrigid.status
    result = nonrigid.session.result
    assert result.info["method"] == "network"
    affine_part = affine_to_field(result.matrix, result.working_field.shape[1:])[0].numpy()
    assert float(np.abs(result.working_field - affine_part).max()) > 0.2  # the network moved something

    nonrigid.method.value = "network + dense"  # the hybrid refinement, as --mode hybrid runs it
    make_fast(nonrigid)
    assert run_widget(qtbot, nonrigid) == "done", nonrigid.status
    refined = nonrigid.session.result
    assert refined.info["method"] == "network + dense"
    assert not np.allclose(refined.working_field, result.working_field, atol=0.05)


def test_landmark_qc_is_live(viewer, qtbot, tmp_path):
    from napari_histreg._napari.layers import add_layers, landmark_layer
    from napari_histreg._napari.widgets import LandmarksWidget

    image = viewer.add_image(np.zeros((300, 400), np.uint8), name="target")
    rng = np.random.default_rng(0)
    points = rng.uniform(20, 280, (10, 2))
    ids = [str(i) for i in range(10)]
    target_pts, moved = add_layers(
        viewer,
        [
            landmark_layer(points, ids, name="target landmarks"),
            landmark_layer(points + [3.0, 4.0], ids, name="source landmarks registered"),
        ],
    )
    qc = LandmarksWidget(viewer)
    assert qc.target_image.value is image
    assert qc.target_points.value is target_pts and qc.moving_points.value is moved
    diagonal = np.hypot(300, 400)
    assert qc.stats["n"] == 10
    assert qc.stats["MrTRE"] == pytest.approx(5.0 / diagonal)
    assert qc.table.shape[0] == 10

    # moving one point (as a drag does) changes the numbers at once
    data = moved.data.copy()
    data[:6] = points[:6] + [30.0, 40.0]
    moved.data = data
    assert qc.stats["MrTRE"] == pytest.approx(50.0 / diagonal)
    assert qc.stats["max_rTRE"] == pytest.approx(50.0 / diagonal)

    # deleting points
    moved.selected_data = {0, 1, 2, 3, 4, 5}
    moved.remove_selected()
    assert qc.stats["n"] == 4 and qc.stats["MrTRE"] == pytest.approx(5.0 / diagonal)

    # adding a point to each layer: both get the next free id and pair up
    target_pts.add([[150.0, 150.0]])
    moved.add([[150.0, 160.0]])
    assert list(target_pts.features["id"])[-1] == "10"
    assert list(moved.features["id"])[-1] == "10"
    assert qc.stats["n"] == 5 and "10" in qc.stats["ids"]
    assert "10" in [row[0] for row in qc.table.data.to_list()]

    # pairing is by id, not by row order
    features = moved.features.copy()
    moved.data = moved.data[::-1].copy()
    features = features.iloc[::-1].reset_index(drop=True)
    moved.features = features
    assert qc.stats["n"] == 5 and qc.stats["MrTRE"] == pytest.approx(5.0 / diagonal)

    # the registered landmarks written back as an ANHIR CSV through the writer
    from napari_histreg.io import read_landmarks

    written = qc.save(moved, tmp_path / "registered.csv")
    ids, rc = read_landmarks(written)
    assert list(ids) == list(moved.features["id"])
    np.testing.assert_allclose(rc, moved.data, atol=1e-3)


def test_transforms_widget_save_load_apply(viewer, qtbot, tmp_path):
    from napari_histreg._napari import layers as L
    from napari_histreg._napari.widgets import TransformsWidget
    from napari_histreg.conventions import Frame, affine_to_field, rotation_about
    from napari_histreg.result import RegistrationResult

    shape = (200, 240)
    matrix = rotation_about(((shape[0] - 1) / 2, (shape[1] - 1) / 2), 10.0, (5.0, -3.0))
    frame = Frame(shape, shape, (1.0, 1.0), (0.0, 0.0))
    result = RegistrationResult(affine_to_field(matrix, shape)[0].numpy(), frame, frame, matrix, info={"stage": "test"})

    target = viewer.add_image(np.zeros(shape, np.uint8), name="target", scale=(2.0, 2.0), translate=(5.0, 7.0))
    rgb = viewer.add_image(np.random.default_rng(1).integers(0, 255, shape + (3,), dtype=np.uint8), name="other stain")
    half = viewer.add_image(np.ones((100, 120), np.float32), name="half resolution")
    labels = np.zeros(shape, np.int32)
    labels[50:150, 60:180] = 7
    labels[80:100, 100:120] = 3
    lab = viewer.add_labels(labels, name="regions")
    pts = viewer.add_points(np.array([[100.0, 120.0], [60.0, 80.0]]), name="cells", features={"id": ["a", "b"]})
    shp = viewer.add_shapes([np.array([[60.0, 60.0], [60.0, 160.0], [140.0, 160.0], [140.0, 60.0]])], shape_type="rectangle", name="roi")

    widget = TransformsWidget(viewer)
    assert "none yet" in widget.current.value
    widget.session.set_result(result, "source", "target")
    assert "test" in widget.current.value and widget.target.value is target

    # save and load round trip
    json_path = widget.save(tmp_path / "transform.json")
    assert json_path.exists() and json_path.with_suffix(".mha").exists()
    widget.session.result = None
    loaded = widget.load(json_path)
    assert loaded is widget.session.result
    np.testing.assert_allclose(loaded.working_field, result.working_field, atol=1e-5)
    widget.target.value = target

    def apply(layer):
        widget.layer.value = layer
        assert run_widget(qtbot, widget, timeout=60_000) == "done", widget.status
        return viewer.layers[f"{layer.name} transformed"]  # never the Register result's name

    out = apply(rgb)
    assert out.rgb and out.data.shape == shape + (3,) and out.data.dtype == np.uint8
    np.testing.assert_array_equal(out.data, result.warp(rgb.data, cval=L.background_value(rgb.data)))
    np.testing.assert_allclose(out.scale, target.scale)
    np.testing.assert_allclose(out.translate, target.translate)

    out = apply(half)  # another resolution of the source: warped onto the target grid at that resolution
    assert out.data.shape == (100, 120)
    np.testing.assert_allclose(world_extent(out), world_extent(target) + [[1.0, 1.0], [-1.0, -1.0]], atol=1e-6)

    out = apply(lab)
    assert type(out).__name__ == "Labels" and set(np.unique(out.data)) <= {0, 3, 7}

    out = apply(pts)
    np.testing.assert_allclose(out.data, result.map_source_points(pts.data), atol=1e-6)
    assert list(out.features["id"]) == ["a", "b"]

    out = apply(shp)
    assert out.shape_type == ["polygon"] and len(out.data[0]) > 4
    mapped_corner = result.map_source_points([[60.0, 60.0]])[0]
    assert np.min(np.linalg.norm(out.data[0] - mapped_corner, axis=1)) < 1e-3

    # nothing to apply without a transform: a message, no worker
    widget.session.result = None
    assert widget.run() is None and "no transform" in widget.status


def test_widgets_through_the_manifest(sample_viewer, qtbot):
    from napari._app_model import get_app_model

    from napari_histreg._napari.widgets import LandmarksWidget, RegisterWidget, TransformsWidget

    viewer = sample_viewer
    _, widget = viewer.window.add_plugin_dock_widget("napari-histreg", "Register")
    assert isinstance(widget, RegisterWidget) and widget.viewer is viewer
    _, qc = viewer.window.add_plugin_dock_widget("napari-histreg", "Landmark QC")
    assert isinstance(qc, LandmarksWidget)
    _, tr = viewer.window.add_plugin_dock_widget("napari-histreg", "Transforms")
    assert isinstance(tr, TransformsWidget)
    assert tr.session is widget.session  # one session per viewer

    app = get_app_model()
    submenus = [item for item in app.menus.get_menu("napari/layers/register") if hasattr(item, "submenu")]
    assert any(item.submenu == "napari-histreg.sections" for item in submenus)
    commands = {item.command.id for item in app.menus.get_menu("napari-histreg.sections") if hasattr(item, "command")}
    assert {"napari-histreg.register_widget", "napari-histreg.nonrigid_widget", "napari-histreg.landmarks_widget"} <= commands


def test_sample_data_contribution(viewer):
    names = sample_names()
    viewer.open_sample("napari-histreg", "sections")
    assert [layer.name for layer in viewer.layers] == [names[0], names[1], names[2], names[3]]
    assert viewer.layers[names[0]].rgb and len(viewer.layers[names[2]].data) == len(viewer.layers[names[3]].data)


def test_closed_widgets_do_not_break_layer_edits(sample_viewer, qtbot):
    from napari_histreg._napari.widgets import LandmarksWidget, RegisterWidget, TransformsWidget

    viewer = sample_viewer
    points = viewer.layers[sample_names()[2]]
    emitters = [viewer.layers.events.inserted, viewer.layers.events.removed, points.events.data]

    def ours():  # callbacks of this plugin still connected to the viewer's layer events
        names = [getattr(getattr(cb, "func", cb), "__qualname__", "") for e in emitters for cb in e.callbacks]
        return [n for n in names if "layer_picker" in n or "LandmarksWidget" in n]

    assert not ours()
    widgets = [RegisterWidget(viewer), LandmarksWidget(viewer), TransformsWidget(viewer)]
    assert ours()
    docks = [viewer.window.add_dock_widget(w) for w in widgets]
    for dock in docks:
        viewer.window.remove_dock_widget(dock)
    for w in widgets:
        w.native.deleteLater()
    del widgets, docks
    qtbot.wait(50)
    # the widgets let go of the layers: edits after they are gone reach no dead Qt object
    assert not ours()
    viewer.add_image(np.zeros((64, 64)), name="late")
    points.data = points.data + 1.0
    viewer.layers.move(0, len(viewer.layers) - 1)
    viewer.layers.remove("late")
