"""Screenshot of the plugin at work: the sample pair registered with the Register widget.

Opens napari, loads the bundled sample (File > Open Sample > Histology registration), docks
the Register and Landmark QC widgets, runs the registration in its worker, waits for it and
saves the whole window to ``docs/screenshot.png``. Needs a display; on a headless machine:

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/screenshot.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _napari_shot import run_widget, save_window

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    parser.add_argument("--working-size", type=int, default=512)
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"), help="window size")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-histreg", show=True)
    viewer.window._qt_window.resize(*args.size)  # noqa: SLF001 - script, not plugin code
    viewer.open_sample("napari-histreg", "sections")
    from napari_histreg.sample import SOURCE_NAME, SOURCE_POINTS_NAME, TARGET_POINTS_NAME

    register_dock, register = viewer.window.add_plugin_dock_widget("napari-histreg", "Register")
    register.working_size.value = args.working_size
    register.show_vectors.value = True

    if not run_widget(register, args.timeout, "registration"):
        return 1

    qc_dock, qc = viewer.window.add_plugin_dock_widget("napari-histreg", "Landmark QC")
    qc.update()
    from qtpy.QtCore import Qt

    # give the QC table the room the Register widget does not need
    QApplication.processEvents()
    viewer.window._qt_window.resizeDocks([register_dock, qc_dock], [300, 700], Qt.Orientation.Vertical)  # noqa: SLF001
    print(f"median rTRE {qc.stats.get('MrTRE', float('nan')):.5f} over {qc.stats.get('n', 0)} landmarks")

    # show the warped source over the target; the unregistered source and its landmarks off
    viewer.layers[SOURCE_NAME].visible = False
    viewer.layers[SOURCE_POINTS_NAME].visible = False
    viewer.layers[TARGET_POINTS_NAME].visible = True
    viewer.layers.selection.active = viewer.layers[f"{SOURCE_NAME} registered"]
    viewer.reset_view()
    save_window(viewer, args.out, settle=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
