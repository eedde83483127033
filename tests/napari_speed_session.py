"""One side of ``tests/test_napari_speed.py``, run as its own process: a fresh napari session
with the Register widget (``--widget``), or a fresh Python process calling ``register()`` as the
CLI does (``--library CONFIG.json``).

Why separate processes: torch keeps an OpenMP team of helper threads for every thread that has
run a parallel region, and once a process holds more of them than cores libgomp "throttles" them
all (``napari_histreg.threads.on_one_thread``). A timing taken inside the test suite's process
depends on what earlier tests left there, and a library call on the test's main thread both
slowed the widget's worker and was slowed by it. Each side here starts clean, as a user's napari
session and a ``histreg`` run do.

Protocol: the process prints ``ready`` once warmed up (networks loaded, one registration run),
then answers each command line on stdin with one JSON line: ``go`` (library), ``created`` or
``updated`` (widget: the result layers first removed, or kept and updated in place) give
``{"seconds": wall, "own": the registration's own total, "field": path of its working field}``;
``quit`` ends it. The widget side prints its configuration first: ``config <json>``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import napari_histreg  # noqa: F401  (first: libgomp's settings apply only before torch loads)
import numpy as np

THREADS = 2


def _answer(payload) -> None:
    print(json.dumps(payload) if not isinstance(payload, str) else payload, flush=True)


def _save_field(result, folder: Path, name: str) -> str:
    path = folder / f"{name}.npy"
    np.save(path, np.asarray(result.working_field))
    return str(path)


def library(config_path: str, folder: Path) -> None:
    from napari_histreg import register
    from napari_histreg.config import RegistrationConfig
    from napari_histreg.sample import make_sample_pair

    config = RegistrationConfig.from_dict(json.loads(Path(config_path).read_text()))
    pair = make_sample_pair()
    register(pair.source, pair.target, config, threads=THREADS)  # warm-up
    _answer("ready")
    count = 0
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        result = register(pair.source, pair.target, config, threads=THREADS)
        seconds = time.perf_counter() - start
        count += 1
        _answer({"seconds": seconds, "own": result.timings["total"], "field": _save_field(result, folder, f"library{count}")})


def widget(folder: Path) -> None:
    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_histreg._napari.layers import add_layers
    from napari_histreg._napari.session import get_session
    from napari_histreg._napari.widgets import RegisterWidget
    from napari_histreg.sample import sample_layer_data

    viewer = napari.Viewer()
    add_layers(viewer, sample_layer_data())
    panel = RegisterWidget(viewer)
    viewer.window.add_dock_widget(panel)
    panel.threads.value = THREADS
    _answer("config " + json.dumps(panel.config().to_dict()))

    def idle(ms: int) -> None:
        """Let Qt draw for ``ms`` as a user's session would between clicks (no busy polling)."""
        loop = QEventLoop()
        QTimer.singleShot(ms, loop.quit)
        loop.exec()

    def run() -> tuple[float, object]:
        start = time.perf_counter()
        panel.run()
        if not panel.wait(600):
            raise RuntimeError(f"the Register widget did not finish: {panel.status}")
        seconds = time.perf_counter() - start
        if panel.runner.outcome != "done":
            raise RuntimeError(f"the Register widget ended '{panel.runner.outcome}': {panel.status}")
        return seconds, get_session(viewer).result

    idle(1000)  # the viewer drawn once, as a user sees it before pressing Register
    originals = {layer.name for layer in viewer.layers}
    run()  # warm-up
    _answer("ready")
    count = 0
    for line in sys.stdin:
        command = line.strip()
        if command not in ("created", "updated"):
            break
        if command == "created":
            for name in [layer.name for layer in viewer.layers if layer.name not in originals]:
                viewer.layers.remove(name)
            idle(200)  # the removal drawn
        seconds, result = run()
        count += 1
        added = sorted({layer.name for layer in viewer.layers} - originals)
        _answer({"seconds": seconds, "own": result.timings["total"], "layers": added,
                 "field": _save_field(result, folder, f"widget{count}")})
        QApplication.processEvents()
    viewer.close()


if __name__ == "__main__":
    if sys.argv[1] == "--widget":
        widget(Path(sys.argv[2]))
    elif sys.argv[1] == "--library":
        library(sys.argv[2], Path(sys.argv[3]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --widget FOLDER | --library CONFIG.json FOLDER")
