"""Issue 15: the Register stack widget (GUI: needs Xvfb, fails without a display)."""

from __future__ import annotations

import numpy as np
import pytest
from napari_conftest import display, make_fast, qapp_cls, run_widget, viewer  # noqa: F401  (fixtures)
from stack_data import _points_inside, make_known_stack, make_section_base

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def sections():
    return make_known_stack(make_section_base(), count=3)


def _stack_viewer(viewer, sections):
    """Three sections as image layers (bottom to top = stack order) and landmarks, named like
    their images, on sections 0 and 1 (the reference)."""
    images, to_base = sections
    points = _points_inside()
    for k, image in enumerate(images):
        viewer.add_image((image * 255).astype(np.uint8), name=f"section_{k}", rgb=True)
    for k in (0, 1):
        a, b = np.asarray(to_base[k])[:, :2], np.asarray(to_base[k])[:, 2]
        in_section = (points - b) @ np.linalg.inv(a).T
        viewer.add_points(in_section, name=f"section_{k}", features={"id": [str(i) for i in range(len(points))]})
    return viewer


def test_stack_widget_makes_a_3d_layer_and_3d_landmarks(viewer, qtbot, sections):
    from napari_histreg._napari.widgets.stack import StackWidget

    images, to_base = sections
    _stack_viewer(viewer, sections)
    widget = StackWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert [layer.name for layer in widget.ordered_sections()] == ["section_0", "section_1", "section_2"]
    make_fast(widget)
    widget.mode.value = "optimise"
    assert run_widget(qtbot, widget) == "done", widget.status

    stack = viewer.layers["registered stack"]
    assert stack.data.shape == (3, 320, 320, 3) and stack.rgb and stack.ndim == 3
    # section 1 (the middle) is the reference: its plane is its own image
    assert np.abs(stack.data[1].astype(float) - viewer.layers["section_1"].data).mean() < 1.0
    landmarks = viewer.layers["stack landmarks"]
    assert landmarks.data.shape[1] == 3 and set(np.unique(landmarks.data[:, 0])) == {0.0, 1.0}
    moved = landmarks.data[landmarks.data[:, 0] == 0][:, 1:]
    reference = landmarks.data[landmarks.data[:, 0] == 1][:, 1:]
    # the same structures (ids in the same order): section 0's landmarks land on the reference's
    assert np.median(np.linalg.norm(moved - reference, axis=1)) < 3.0
    assert list(landmarks.features["section"][:2]) == ["section_0", "section_0"]

    table = widget.qc.value
    rows = {row[0]: row for row in table["data"]}
    assert rows["section_1"][1] == "reference" and rows["section_0"][1] == "ok"
    assert float(rows["section_0"][6]) < float(rows["section_0"][5]) / 3  # MrTRE after < before
    assert "registered 3 sections" in widget.status

    # viewed as a volume: the same layer, napari's 3D display
    viewer.dims.ndisplay = 3
    assert viewer.layers["registered stack"].ndim == 3


def test_stack_widget_cancel_leaves_the_layers(viewer, qtbot, sections):
    from napari_histreg._napari.widgets.stack import StackWidget

    _stack_viewer(viewer, sections)
    placeholder = viewer.add_points(np.zeros((1, 3)), name="stack landmarks")  # the user's own layer of that name
    names = [layer.name for layer in viewer.layers]
    widget = StackWidget(viewer)
    make_fast(widget)
    seen = []
    original = widget._on_event

    def on_event(event):
        seen.append(event)
        original(event)
        if event.step >= 30:  # a third of the way into the first pair
            widget.cancel()

    widget.runner.on_event = on_event
    assert run_widget(qtbot, widget) == "cancelled"
    assert seen and "cancel" in widget.status
    assert [layer.name for layer in viewer.layers] == names
    assert viewer.layers["stack landmarks"] is placeholder
    assert widget.qc.value["data"] == []
