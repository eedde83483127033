"""GUI test helpers for the napari widget tests (imported by tests/test_napari_*.py).

GUI tests never skip for want of a display: without one they FAIL with instructions, because
a silently skipped GUI suite looks green while testing nothing. Run them under Xvfb with Mesa:
``xvfb-run -a python -m pytest tests/test_napari_*.py``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

FAST_WORKING_SIZE = 256
FAST_ITERATIONS = 0.25
RUN_TIMEOUT_MS = 180_000


def require_display() -> None:
    """Fail (not skip) when Qt cannot open a window with an OpenGL canvas."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform in ("offscreen", "minimal"):
        pytest.fail(
            f"QT_QPA_PLATFORM={platform} cannot create napari's OpenGL canvas: unset it and run the GUI tests "
            "under Xvfb with Mesa (`xvfb-run -a python -m pytest tests/test_napari_*.py`)",
            pytrace=False,
        )
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.fail(
            "no display for the napari GUI tests (DISPLAY is unset): run them under Xvfb with Mesa, e.g. "
            "`xvfb-run -a python -m pytest tests/test_napari_*.py` (apt: xvfb libgl1-mesa-dri ...). "
            "They fail on purpose instead of skipping.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def qapp_cls():
    """pytest-qt's QApplication class, checked for a display first: ``qapp`` is session-scoped
    and so set up before any function fixture, and Qt aborts the whole process (no test
    report at all) when it cannot connect to a display."""
    require_display()
    from pytestqt.qt_compat import qt_api

    return qt_api.QtWidgets.QApplication


@pytest.fixture
def display():
    require_display()


@pytest.fixture
def viewer(display, make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def sample_viewer(viewer):
    """A viewer holding the bundled sample pair (target, source, target and source landmarks)."""
    from napari_histreg._napari.layers import add_layers
    from napari_histreg.sample import sample_layer_data

    add_layers(viewer, sample_layer_data())
    return viewer


def sample_names():
    from napari_histreg import sample

    return sample.TARGET_NAME, sample.SOURCE_NAME, sample.TARGET_POINTS_NAME, sample.SOURCE_POINTS_NAME


def make_fast(widget) -> None:
    """Small working size and fewer iterations so a whole run takes seconds."""
    if hasattr(widget, "working_size"):
        widget.working_size.value = FAST_WORKING_SIZE
    if hasattr(widget, "iterations"):
        widget.iterations.value = FAST_ITERATIONS


def run_widget(qtbot, widget, timeout: int = RUN_TIMEOUT_MS):
    """Start the widget's run, wait for the worker to finish, and return the outcome."""
    worker = widget.run()
    assert worker is not None, f"widget did not start: {widget.status}"
    # the widget's own wait sleeps in Qt's event loop until the run ends; qtbot.waitUntil would
    # wake the GUI thread every 10 ms, taking CPU from the run's threads on a 2-core machine
    assert widget.wait(timeout / 1000), f"the run did not finish within {timeout / 1000:.0f} s: {widget.status}"
    return widget.runner.outcome


def world_extent(layer) -> np.ndarray:
    """``(2, 2)`` world min/max corners (row, col) of a 2D image layer's pixel centres."""
    shape = np.asarray(layer.data.shape[:2], dtype=np.float64)
    corners = np.array([[0.0, 0.0], shape - 1])
    return corners * np.asarray(layer.scale[-2:]) + np.asarray(layer.translate[-2:])
