"""Screenshot of a real stack registered with the Register stack widget, shown in 3D.

Opens napari, reads the five greyscale CLAHE sections of ``../shared/data/lung-lesion-1/
grey-10pc-clahe/`` (H&E, CD31, proSPC, CC10, Ki67) and their landmarks as layers, docks the
Register stack widget, runs it, switches the viewer to 3D with the stack as a volume and the
landmarks of every section mapped into the reference, and saves the window to
``docs/stack_screenshot.png``. Needs a display; on a headless machine:

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/stack_screenshot.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _napari_shot import run_widget, save_window

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "lung-lesion-1" / "grey-10pc-clahe"
SECTIONS = ("he", "cd31", "prospc", "cc10", "ki67")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "stack_screenshot.png")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"), help="window size")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"{args.data}: not found (the real sections of ../shared/data)", file=sys.stderr)
        return 2

    import napari
    import numpy as np

    from napari_histreg._napari.layers import add_layers, landmark_layer
    from napari_histreg.io import read_image, read_landmarks

    viewer = napari.Viewer(title="napari-histreg: a stack of serial sections", show=True)
    viewer.window._qt_window.resize(*args.size)  # noqa: SLF001 - script, not plugin code
    for name in SECTIONS:
        viewer.add_image(read_image(args.data / f"lung_lesion_{name}.jpg"), name=f"lung_lesion_{name}", colormap="gray")
    for name in SECTIONS:
        ids, points = read_landmarks(args.data / f"lung_lesion_{name}.csv")
        add_layers(viewer, [landmark_layer(points, ids, name=f"lung_lesion_{name}", visible=False)], owner="console")

    dock, widget = viewer.window.add_plugin_dock_widget("napari-histreg", "Register stack")
    if not run_widget(widget, args.timeout, "the stack"):
        return 1
    for row in widget.qc.value["data"]:
        print("  " + " | ".join(str(v) for v in row))

    for layer in list(viewer.layers):
        if layer.name not in ("registered stack", "stack landmarks"):
            layer.visible = False
    stack = viewer.layers["registered stack"]
    points = viewer.layers["stack landmarks"]
    stack.scale = (60.0, 1.0, 1.0)  # sections drawn 60 px apart: the volume reads as a block
    points.scale = (60.0, 1.0, 1.0)
    # tissue is dark on bright glass: shown bright (inverted colour map), each ray the average
    # of the sections it crosses, so structures that line up through the block stay sharp
    stack.rendering = "average"
    stack.colormap = "gray_r"
    stack.contrast_limits = (float(np.percentile(stack.data, 5)), float(np.percentile(stack.data, 70)))
    points.face_color = "section"  # one colour per section: the same structure, section after section
    points.text.visible = False
    points.size = 7
    viewer.dims.ndisplay = 3
    viewer.camera.angles = (-10.0, 30.0, 100.0)
    viewer.camera.zoom = 0.9 * viewer.camera.zoom
    save_window(viewer, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
