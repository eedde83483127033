"""What the screenshot scripts share: run a docked widget to the end, and save the window once
napari has drawn it. (Imported from the scripts beside it: ``python scripts/<name>.py``.)"""

from __future__ import annotations

import sys
import time


def run_widget(widget, timeout: float, what: str = "the run") -> bool:
    """Start ``widget``'s run and wait for it; False (with the reason on stderr) when it could
    not start or did not finish."""
    start = time.monotonic()
    if widget.run() is None:
        print(f"could not start: {widget.status}", file=sys.stderr)
        return False
    if not widget.wait(timeout) or widget.runner.outcome != "done":
        print(f"{what} did not finish: {widget.status}", file=sys.stderr)
        return False
    print(f"{widget.status} (wall {time.monotonic() - start:.1f} s)")
    return True


def save_window(viewer, out, settle: float = 0.5) -> None:
    """Let napari draw for ``settle`` seconds, write the whole window to ``out`` and close it."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + settle
    while True:
        QApplication.processEvents()
        if time.monotonic() >= end:
            break
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(f"written {out}")
    viewer.close()
