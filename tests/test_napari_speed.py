"""The napari Register widget against the library call it wraps, on the same pair with the same
settings (issue 14: "the napari worker as fast as the CLI"). Timings are printed, never
asserted (a shared CI machine is no timer); what is asserted is that both runs did the same
registration."""

from __future__ import annotations

import time

import numpy as np
import pytest

import napari_conftest
from napari_conftest import run_widget, sample_names

pytestmark = pytest.mark.gui

# the GUI fixtures, bound here (not imported by name: the tests' parameters would shadow them)
display, qapp_cls = napari_conftest.display, napari_conftest.qapp_cls
viewer, sample_viewer = napari_conftest.viewer, napari_conftest.sample_viewer


def test_register_widget_time_against_the_library_call(sample_viewer, qtbot, capsys):
    from napari_histreg import register
    from napari_histreg._napari.widgets import RegisterWidget

    viewer = sample_viewer
    target_name, source_name, _, _ = sample_names()
    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.threads.value = 2  # one thread count for both runs, whatever the machine's load
    config = widget.config()
    source, target = viewer.layers[source_name].data, viewer.layers[target_name].data
    register(source, target, config, threads=2)  # warm-up: networks loaded, kernels chosen
    # the viewer drawn once, as a user sees it before pressing Register: without this its very
    # first paint (the sample's images, its landmarks' labels) falls inside the first timed run
    qtbot.waitExposed(viewer.window._qt_window)
    qtbot.wait(1000)

    from napari_histreg._napari.session import get_session

    lines = []
    for attempt in ("first run (layers created)", "second run (layers updated)"):
        start = time.perf_counter()
        library = register(source, target, config, threads=2)
        library_seconds = time.perf_counter() - start
        start = time.perf_counter()
        assert run_widget(qtbot, widget) == "done", widget.status
        widget_seconds = time.perf_counter() - start
        shown = get_session(viewer).result
        # the same registration: same settings, same threads, so the same field to float noise
        np.testing.assert_allclose(shown.working_field, library.working_field, atol=0.05)
        lines.append(f"{attempt}: Register widget {widget_seconds:.2f} s (run to layers shown; its registration "
                     f"{shown.timings['total']:.2f} s), register() {library_seconds:.2f} s, "
                     f"ratio {widget_seconds / library_seconds:.2f}")
    with capsys.disabled():
        print("\nthe sample pair at the default settings, 2 threads:\n  " + "\n  ".join(lines))
