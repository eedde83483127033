"""Run a core call in a napari thread worker, with progress and cooperative cancellation.

The core reports progress by calling ``progress(event)`` from the worker thread. The callback
given to the core here (1) raises :class:`~napari_histreg.RegistrationCancelled` once
:meth:`Runner.cancel` was called, which stops the core at its next step, and (2) otherwise
emits the event through a Qt signal whose receiver lives on the GUI thread (a queued
connection), so the progress bar is only ever touched from the GUI thread.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable

from qtpy.QtCore import QObject, QTimer, Signal

from ..progress import ProgressEvent, RegistrationCancelled

#: share of the progress bar per pipeline stage (a whole ``register`` run)
STAGE_WEIGHTS = {"preprocess": 0.06, "mask": 0.02, "initial": 0.17, "affine": 0.25, "nonrigid": 0.45, "layers": 0.05}


class _Relay(QObject):
    event = Signal(object)


#: at most one progress update of the widget per this many seconds: each update repaints the
#: window, which beside napari's OpenGL canvas (software-rendered on a machine without a GPU)
#: costs the GUI thread several milliseconds that the registration's threads then miss
PROGRESS_INTERVAL = 0.5


class Runner:
    """One background run at a time for one widget.

    ``start(fn)`` runs ``fn(progress)`` in a napari ``FunctionWorker``; ``fn`` must pass
    ``progress`` to the core (and may call it itself between its own steps). Callbacks, all on
    the GUI thread: ``on_event(ProgressEvent)``, ``on_result(value)``, ``on_error(exc)``,
    ``on_cancelled()``, ``on_finished()``.
    """

    def __init__(
        self,
        on_event: Callable[[ProgressEvent], None] | None = None,
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        self.on_event = on_event
        self.on_result = on_result
        self.on_error = on_error
        self.on_cancelled = on_cancelled
        self.on_finished = on_finished
        self.worker = None
        self._cancel = threading.Event()
        self._relay: _Relay | None = None
        self.last_error: BaseException | None = None
        self.outcome: str | None = None  # "done", "cancelled", "error"
        self._last_shown = float("-inf")  # time.monotonic() of the last event passed on
        self._pending = None  # the newest event not yet passed on (throttled)
        self._timer = QTimer()  # passes the pending event on when the interval is over
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._show_pending)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, fn: Callable[[Callable[[ProgressEvent], None]], Any]):
        from napari.qt.threading import create_worker

        if self.running:
            raise RuntimeError("a registration is already running")
        self._cancel = threading.Event()
        self._last_shown, self._pending = float("-inf"), None
        cancel = self._cancel
        relay = self._relay = _Relay()
        relay.event.connect(self._forward_event)

        def progress(event: ProgressEvent) -> None:
            if cancel.is_set():
                raise RegistrationCancelled(f"cancelled during {event.stage}")
            relay.event.emit(event)

        def job():
            try:
                return fn(progress)
            except RegistrationCancelled:
                raise
            except Exception as err:  # keep the traceback text for the status tooltip
                err.__histreg_traceback__ = traceback.format_exc()
                raise

        self.outcome = None
        self.last_error = None
        # connecting "errored" through _connect stops napari/superqt re-raising the error
        # in the GUI thread: errors (and cancellation) are handled here
        worker = self.worker = create_worker(
            job,
            _start_thread=False,
            _connect={"returned": self._returned, "errored": self._errored, "finished": self._finished, "warned": self._warned},
        )
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the run to stop at its next progress step."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float = 120.0) -> bool:
        """Run Qt's event loop until the run has finished or ``timeout`` seconds have passed
        (scripts and tests); True when it has finished.

        The loop sleeps until an event arrives (the run's end, a progress step, a repaint)
        rather than polling: a GUI thread woken every 10 ms took the CPU from the run's own
        threads on a 2-core machine (about 140 wake-ups a second during a registration)."""
        from qtpy.QtCore import QEventLoop
        from qtpy.QtWidgets import QApplication

        if self.running:
            loop, timer = QEventLoop(), QTimer()
            timer.setSingleShot(True)
            timer.timeout.connect(loop.quit)
            # connected after the runner's own handlers (create_worker's _connect), so those
            # have run when the loop returns; Qt drops the connection with the loop
            self.worker.finished.connect(loop.quit)
            timer.start(max(0, int(timeout * 1000)))
            loop.exec()
            timer.stop()
        QApplication.processEvents()
        return not self.running

    # ------------------------------------------------------------------ slots (GUI thread)
    def _forward_event(self, event) -> None:
        """Pass ``event`` on at once if the last one is :data:`PROGRESS_INTERVAL` old, else keep
        it (newer events replace it) for a single-shot timer to pass on: the bar still moves
        several times a second, and the GUI thread is not busy repainting."""
        if self.on_event is None or self._cancel.is_set():
            return
        wait = self._last_shown + PROGRESS_INTERVAL - time.monotonic()
        if wait <= 0:
            self._show(event)
            return
        if self._pending is None:
            self._timer.start(int(wait * 1000) + 1)
        self._pending = event

    def _show(self, event) -> None:
        self._last_shown = time.monotonic()
        self.on_event(event)

    def _show_pending(self) -> None:
        event, self._pending = self._pending, None
        if event is not None and self.on_event is not None and not self._cancel.is_set() and self.running:
            self._show(event)

    def _drop_pending(self) -> None:
        """Forget a throttled progress event: once the run has an outcome, its status line (the
        result's, the error's) must not be overwritten by a step the timer was still holding."""
        self._pending = None
        self._timer.stop()

    def _returned(self, value) -> None:
        self._drop_pending()
        if self._cancel.is_set():  # cancelled after the core finished: drop the result
            self.outcome = "cancelled"
            if self.on_cancelled:
                self.on_cancelled()
            return
        try:
            if self.on_result:
                self.on_result(value)
            self.outcome = "done"
        except Exception as err:  # an error while adding layers is still reported
            self._errored(err)

    def _errored(self, exc: BaseException) -> None:
        self._drop_pending()
        if isinstance(exc, RegistrationCancelled):
            self.outcome = "cancelled"
            if self.on_cancelled:
                self.on_cancelled()
            return
        self.outcome = "error"
        self.last_error = exc
        if self.on_error:
            self.on_error(exc)

    def _warned(self, warning) -> None:
        from napari.utils.notifications import show_warning

        show_warning(str(warning[0]) if isinstance(warning, tuple) else str(warning))

    def _finished(self) -> None:
        self.worker = None
        self._relay = None
        self._drop_pending()
        if self.on_finished:
            self.on_finished()


def overall_fraction(event: ProgressEvent, stages: tuple[str, ...] | None = None) -> float:
    """Position in ``[0, 1]`` of a whole-run progress bar for ``event``, from stage weights
    (only the ``stages`` that will run count)."""
    names = [s for s in STAGE_WEIGHTS if stages is None or s in stages]
    weights = [STAGE_WEIGHTS[s] for s in names]
    total = sum(weights) or 1.0
    if event.stage not in names:
        return 0.0
    index = names.index(event.stage)
    done = sum(weights[:index])
    within = event.step / event.total if event.total else 1.0
    return min(1.0, (done + weights[index] * min(1.0, max(0.0, within))) / total)
