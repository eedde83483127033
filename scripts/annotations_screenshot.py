"""Screenshot of QuPath-style GeoJSON annotations carried from one real section onto the next.

Registers the proSPC section onto the H&E one (``../shared/data/lung-lesion-1/scale-5pc``), writes
a GeoJSON of a few annotations drawn on the proSPC section (polygons around groups of its
landmarks, one with a hole, each with a QuPath classification), opens it in napari through the
plugin's reader, maps it onto the H&E section with the Transforms widget, and saves the window
(left: proSPC with its annotations; right: H&E with them mapped) to
``docs/annotations_screenshot.png``. Needs a display; on a headless machine:

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/annotations_screenshot.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _napari_shot import run_widget, save_window

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "lung-lesion-1" / "scale-5pc"
SOURCE, TARGET = "Izd2-29-041-w35_proSPC", "Izd2-29-041-w35_HE"
CLASSES = (("Tumor", [200, 0, 0]), ("Stroma", [150, 200, 150]), ("Immune cells", [160, 90, 160]), ("Necrosis", [50, 50, 50]))


def annotations(points_rc, count: int = 4):
    """A FeatureCollection of ``count`` polygons, each the convex hull of a group of landmarks
    (x, y pixels), grown by 15 px; the first with a hole."""
    import numpy as np
    import shapely

    rng = np.random.default_rng(1)
    centres = points_rc[rng.choice(len(points_rc), size=count, replace=False)]
    features = []
    for k, centre in enumerate(centres):
        near = points_rc[np.argsort(np.linalg.norm(points_rc - centre, axis=1))[:6]]
        hull = shapely.MultiPoint(near[:, ::-1]).convex_hull.buffer(15, quad_segs=4)
        if k == 0:
            hull = hull.difference(hull.centroid.buffer(0.25 * np.sqrt(hull.area / np.pi)))
        name, colour = CLASSES[k % len(CLASSES)]
        features.append({"type": "Feature", "id": f"annotation-{k}", "geometry": shapely.geometry.mapping(hull),
                         "properties": {"objectType": "annotation", "name": f"region {k + 1}",
                                        "classification": {"name": name, "color": colour}}})
    return {"type": "FeatureCollection", "features": json.loads(json.dumps(features))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "annotations_screenshot.png")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 800), metavar=("W", "H"), help="window size")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"{args.data}: not found (the real sections of ../shared/data)", file=sys.stderr)
        return 2

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_histreg import register
    from napari_histreg._napari.session import get_session
    from napari_histreg.io import read_image, read_landmarks

    source, target = read_image(args.data / f"{SOURCE}.jpg"), read_image(args.data / f"{TARGET}.jpg")
    _, source_points = read_landmarks(args.data / f"{SOURCE}.csv")
    result = register(source, target)
    print(f"registered in {result.timings['total']:.1f} s; confidence {result.confidence.get('flag')}")

    viewer = napari.Viewer(title="napari-histreg: annotations carried across sections", show=True)
    viewer.window._qt_window.resize(*args.size)  # noqa: SLF001 - script, not plugin code
    viewer.add_image(target, name=TARGET, rgb=True)
    viewer.add_image(source, name=SOURCE, rgb=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "proSPC_annotations.geojson"
        path.write_text(json.dumps(annotations(source_points)))
        (shapes,) = [layer for layer in viewer.open(path, plugin="napari-histreg") if layer._type_string == "shapes"]
    get_session(viewer).set_result(result, SOURCE, TARGET)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-histreg", "Transforms")
    widget.layer.value = shapes
    widget.target.value = viewer.layers[TARGET]
    if not run_widget(widget, 120, "the transform"):
        return 1
    mapped = viewer.layers[f"{shapes.name} transformed"]

    # side by side: the source with its annotations, the target with them mapped
    viewer.window.remove_dock_widget(dock)
    offset = source.shape[1] + 40
    for layer in (viewer.layers[TARGET], mapped):
        layer.translate = (0.0, float(offset))
    for layer in (shapes, mapped):
        layer.edge_width = [5.0] * len(layer.data)
        layer.opacity = 1.0
    for layer in list(viewer.layers):
        if layer._type_string == "points":  # the file's points layer (empty here)
            layer.visible = False
    QApplication.processEvents()
    height, width = target.shape[0], offset + target.shape[1]
    canvas = viewer.window._qt_viewer.canvas.size  # noqa: SLF001 - script, not plugin code
    viewer.camera.center = (height / 2, width / 2)
    viewer.camera.zoom = 0.97 * min(canvas[1] / width, canvas[0] / height)
    save_window(viewer, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
