"""What a new napari user hit (GUI: needs Xvfb, fails without a display): landmark files opened
without a reader dialog, distinct landmark colours, widgets that scroll, step widgets that keep
every result layer current, layers never replaced across widgets, pickers on two images."""

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
)

from napari_histreg.io import write_landmarks

pytestmark = pytest.mark.gui


@pytest.fixture
def csv_preference():
    """napari's reader preference for ``*.csv`` set to this plugin (what the README tells users
    to do), restored afterwards."""
    from napari.settings import get_settings

    settings = get_settings().plugins
    previous = dict(settings.extension2reader)
    settings.extension2reader = {**previous, "*.csv": "napari-histreg"}
    yield
    settings.extension2reader = previous


def test_landmark_csvs_open_with_the_preference_and_get_distinct_colours(viewer, tmp_path, csv_preference):
    from napari_histreg._napari.layers import LANDMARK_PALETTE, REGISTERED_COLOUR

    points = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 15.0]])
    write_landmarks(tmp_path / "HE.csv", ["1", "2", "3"], points)
    write_landmarks(tmp_path / "PanCK.csv", ["1", "2", "3"], points + 5)
    # plugin=None is what File > Open and drag-and-drop pass: the preference picks this plugin's reader
    (he,) = viewer.open(tmp_path / "HE.csv", plugin=None)
    (panck,) = viewer.open(tmp_path / "PanCK.csv", plugin=None)
    assert type(he).__name__ == "Points" and list(he.features["id"]) == ["1", "2", "3"]
    np.testing.assert_allclose(he.data, points)
    colours = [tuple(np.round(layer.face_color[0], 3)) for layer in (he, panck)]
    assert colours[0] != colours[1]
    assert he.metadata["histreg_colour"] in LANDMARK_PALETTE and panck.metadata["histreg_colour"] in LANDMARK_PALETTE
    assert REGISTERED_COLOUR not in (he.metadata["histreg_colour"], panck.metadata["histreg_colour"])
    # another CSV is handed back to napari's own readers (a dialog in the GUI, an error in a script)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(Exception):
        viewer.open(tmp_path / "table.csv", plugin=None)


def test_without_the_preference_napari_asks(viewer, tmp_path):
    """Why the README gives the preference: npe2 has no reader priority, and napari's builtins
    also claim ``*.csv``, so without it napari asks (a dialog in the GUI, this error in a script)."""
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    if "*.csv" in get_settings().plugins.extension2reader:
        pytest.skip("a *.csv reader preference is set in this napari profile")
    write_landmarks(tmp_path / "HE.csv", ["1"], np.array([[1.0, 2.0]]))
    with pytest.raises(MultipleReaderError):
        viewer.open(tmp_path / "HE.csv", plugin=None)


def test_sample_and_registered_landmarks_have_three_colours(sample_viewer, qtbot):
    from napari_histreg._napari.widgets import RegisterWidget

    viewer = sample_viewer
    target_name, source_name, target_pts_name, source_pts_name = sample_names()
    widget = RegisterWidget(viewer)
    make_fast(widget)
    widget.threads.value = 1
    assert run_widget(qtbot, widget) == "done", widget.status
    assert "(1 thread)" in widget.status
    registered = viewer.layers[f"{source_pts_name} registered"]
    colours = {tuple(np.round(viewer.layers[n].face_color[0], 3)) for n in (target_pts_name, source_pts_name)}
    colours.add(tuple(np.round(registered.face_color[0], 3)))
    assert len(colours) == 3


def test_all_widgets_docked_fit_the_screen(viewer, qtbot):
    """Every widget scrolls, so docking all of them keeps the window on a 1200 px screen (it
    grew to 2700 px)."""
    from qtpy.QtWidgets import QScrollArea

    from napari_histreg._napari import widgets as W
    from napari_histreg._napari.widgets.slide import SlideWarpWidget

    viewer.window._qt_window.resize(1200, 800)
    viewer.window.show()
    kinds = [W.RegisterWidget, W.PreprocessWidget, W.InitialAlignmentWidget, W.AffineWidget, W.NonrigidWidget,
             W.LandmarksWidget, W.TransformsWidget, SlideWarpWidget]
    for kind in kinds:
        widget = kind(viewer)
        assert isinstance(widget.scroll_area, QScrollArea) and widget.native.isAncestorOf(widget.scroll_area), kind.__name__
        viewer.window.add_dock_widget(widget, area="right", name=kind.__name__)
    qtbot.wait(200)
    assert viewer.window._qt_window.height() <= 1200


def test_pickers_start_on_two_different_images(viewer):
    from napari_histreg._napari.widgets import AffineWidget, RegisterWidget

    rng = np.random.default_rng(0)
    he = viewer.add_image(rng.random((64, 64)), name="Rat-Kidney_HE")
    panck = viewer.add_image(rng.random((64, 64)), name="Rat-Kidney_PanCytokeratin")
    for kind in (RegisterWidget, AffineWidget):
        widget = kind(viewer)
        assert widget.source.value is panck and widget.target.value is he  # top layer moves onto the bottom one
        widget.source.value = he  # choosing the target's layer as source moves the (untouched) target away
        assert widget.target.value is panck
    # with names that say it, the names win
    viewer.layers.clear()
    src = viewer.add_image(rng.random((64, 64)), name="my source")
    tgt = viewer.add_image(rng.random((64, 64)), name="my target")
    widget = RegisterWidget(viewer)
    assert widget.source.value is src and widget.target.value is tgt


def test_step_widgets_update_every_result_layer_and_never_replace_others(sample_viewer, qtbot):
    from napari_histreg._napari.widgets import AffineWidget, LandmarksWidget, RegisterWidget, TransformsWidget

    viewer = sample_viewer
    target_name, source_name, target_pts_name, source_pts_name = sample_names()
    # a layer of the user's that happens to carry a result's name is never replaced
    mine = viewer.add_image(np.zeros((16, 16), np.uint8), name=f"{source_name} registered")

    register = RegisterWidget(viewer)
    make_fast(register)
    assert run_widget(qtbot, register) == "done", register.status
    assert viewer.layers[f"{source_name} registered"] is mine and not mine.data.any()
    warped = next(layer for layer in viewer.layers if layer.metadata.get("histreg_owner") == "registration"
                  and layer.metadata.get("histreg_name") == f"{source_name} registered")
    assert warped is not mine and warped.data.shape[:2] == viewer.layers[target_name].data.shape[:2]
    registered = viewer.layers[f"{source_pts_name} registered"]
    vectors = viewer.layers[f"{source_name} deformation"]
    qc = LandmarksWidget(viewer)
    qc.target_points.value = viewer.layers[target_pts_name]
    qc.moving_points.value = registered
    before = qc.update()["MrTRE"]
    arrows_before = vectors.data.copy()

    # a step widget from the identity: a different result, and every result layer shows it
    affine = AffineWidget(viewer)
    affine.start.value = "identity"
    affine.iterations.value = 0.05
    assert affine.source_points.value is viewer.layers[source_pts_name]
    assert run_widget(qtbot, affine) == "done", affine.status
    result = affine.session.result
    assert viewer.layers[f"{source_pts_name} registered"] is registered
    expected = result.map_source_points(viewer.layers[source_pts_name].data)
    np.testing.assert_allclose(registered.data, expected, atol=1e-3)
    assert not np.allclose(vectors.data, arrows_before)  # the arrows follow the new result too
    after = qc.update()["MrTRE"]
    assert after != before  # the QC describes the result on screen
    assert viewer.layers[f"{source_name} registered"] is mine  # still untouched

    # the Transforms widget adds its own layer, never the Register result's
    transforms = TransformsWidget(viewer)
    transforms.layer.value = viewer.layers[source_name]
    transforms.target.value = viewer.layers[target_name]
    assert run_widget(qtbot, transforms, timeout=60_000) == "done", transforms.status
    assert f"{source_name} transformed" in viewer.layers
    assert warped in viewer.layers and viewer.layers[f"{source_name} registered"] is mine


def test_result_layers_updated_in_place_show_the_new_result_after_one_refresh(viewer, monkeypatch):
    """Re-running a registration updates its layers in place: the new data, the changed
    properties, and what is drawn (slice, thumbnail, arrow colours) all follow, while each layer
    is refreshed once rather than once per property (each refresh re-slices the layer and redraws
    its thumbnail: 0.26-0.44 s of the GUI thread for the three result layers before)."""
    from napari.layers import Vectors

    from napari_histreg._napari.layers import add_layers, magnitude_limits

    def arrows(projections):
        data = np.zeros((4, 2, 2))
        data[:, 0] = [[5, 5], [5, 20], [20, 5], [20, 20]]
        data[:, 1] = projections
        return data, {"magnitude": np.linalg.norm(projections, axis=1)}

    def outputs(image, scale, projections, points, ids):
        vectors, features = arrows(np.asarray(projections, float))
        return [
            (image, {"name": "warped", "contrast_limits": (0, 1)}, "image"),
            (vectors, {"name": "arrows", "features": features, "edge_color": "magnitude", "edge_colormap": "viridis",
                       **magnitude_limits(features["magnitude"]), "scale": scale}, "vectors"),
            (points, {"name": "mapped", "features": {"id": ids}, "scale": scale}, "points"),
        ]

    dark = np.zeros((64, 48), np.float32)
    half = dark.copy()
    half[:, :24] = 1.0
    first = add_layers(viewer, outputs(dark, (1, 1), [[1, 0], [20, 0], [1, 0], [1, 0]], np.zeros((3, 2)), ["a", "b", "c"]), owner="test")
    thumbnail_before = first[0].thumbnail.copy()

    redraws = {"n": 0}
    original = Vectors._update_thumbnail

    def counted(self, *args, **kwargs):
        redraws["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Vectors, "_update_thumbnail", counted)
    second = add_layers(viewer, outputs(half, (2, 2), [[0, 4], [3, 0], [0, 0.5], [6, 8]], np.full((5, 2), 7.0),
                                        list("abcde")), owner="test")
    assert all(a is b for a, b in zip(first, second))  # the same layers, updated
    image, vectors, points = second
    assert image.data is half and image._slice.image.raw.mean() == pytest.approx(0.5)  # re-sliced
    assert not np.array_equal(image.thumbnail, thumbnail_before)
    np.testing.assert_allclose(vectors.scale, (2, 2))
    np.testing.assert_allclose(points.scale, (2, 2))
    # arrows coloured by the new magnitudes: the shortest darkest, the longest brightest
    brightness = vectors.edge_color[:, :3].sum(axis=1)
    assert np.argmin(brightness) == 2 and np.argmax(brightness) == 3
    assert redraws["n"] <= 2, f"the arrows' thumbnail was redrawn {redraws['n']} times for one update"
    assert points.data.shape == (5, 2) and points._view_data.shape == (5, 2)
    assert list(points.features["id"]) == list("abcde")
