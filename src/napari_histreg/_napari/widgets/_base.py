"""Shared pieces of the widgets: layer pickers, the run/cancel/progress block."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from magicgui.widgets import ComboBox, Container, Label, ProgressBar, PushButton, SpinBox

from ...progress import ProgressEvent
from ...threads import torch_threads
from ..layers import layer_kind, unwrap
from ..session import get_session
from ..worker import Runner, overall_fraction

DEVICES = ("auto", "cpu", "cuda", "mps")


def layer_picker(viewer, label: str, kinds: Sequence[str], *, nullable: bool = False, prefer: str | None = None,
                 fallback: str = "first", avoid: ComboBox | None = None,
                 choose: Callable[[list], Any] | None = None) -> ComboBox:
    """A ComboBox of the viewer's layers of ``kinds`` (class names, lower case).

    It does not rely on being docked (it reads ``viewer`` directly) and refreshes itself when
    layers are added, removed or moved. ``prefer``: a word to look for in layer names for
    the initial choice ("source", "target", ...); without a match the ``fallback`` layer
    (``"first"`` or ``"last"`` in the layer list) that ``avoid`` (another picker) has not
    chosen, so a source and a target picker start on two different images. ``choose``: a
    function of the candidate layers returning the one to start on (or None: the rules above),
    asked first.
    """

    def choices(_widget=None):
        return [(layer.name, layer) for layer in viewer.layers if layer_kind(layer) in kinds]

    viewer = unwrap(viewer)
    combo = ComboBox(label=label, choices=choices, nullable=nullable)
    state = {"auto": True, "refreshing": False}

    def refresh(event=None):
        if state.get("dead"):
            return
        current = combo.value
        state["refreshing"] = True
        try:
            combo.reset_choices()
            present = [c for _, c in choices()]
            picked = choose(present) if state["auto"] and choose is not None else None
            if picked is not None:
                combo.value = picked
            elif state["auto"] and (prefer or avoid is not None):
                pick_default(combo, prefer, nullable, fallback, avoid.value if avoid is not None else None)
            elif current is not None and any(current is c for c in present):
                combo.value = current
        finally:
            state["refreshing"] = False

    def user_choice(value):
        if not state["refreshing"]:
            state["auto"] = False  # a choice made by hand is kept from now on

    combo.changed.connect(user_choice)
    combo.refresh_default = refresh  # type: ignore[attr-defined]
    if avoid is not None:  # re-pick when the other picker moves onto this one's layer
        avoid.changed.connect(lambda value: refresh() if value is not None and value is combo.value else None)
    emitters = (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved)
    for emitter in emitters:
        emitter.connect(refresh)

    def disconnect(*_):
        state["dead"] = True
        for emitter in emitters:
            emitter.disconnect(refresh)

    on_destroyed(combo, disconnect)
    refresh()
    return combo


def on_destroyed(widget, callback) -> None:
    """Call ``callback`` when the Qt widget behind a magicgui widget is deleted (closed dock
    widget, closed viewer): used to drop connections to layers that outlive the widget."""
    widget.native.destroyed.connect(lambda *_: callback())


def pick_preferred(combo: ComboBox, word: str, nullable: bool = False) -> None:
    """Choose the layer with the shortest name that contains ``word`` (None for a nullable picker
    without a match; otherwise the current choice stays)."""
    pick_default(combo, word, nullable, None, None)


def pick_default(combo: ComboBox, word: str | None, nullable: bool = False, fallback: str | None = "first",
                 avoid=None) -> None:
    """Choose the layer with the shortest name that contains ``word`` ("source" over "source
    registered"), other than ``avoid``; without one: None for a nullable picker, else the
    ``fallback`` (``"first"`` / ``"last"``) layer other than ``avoid``, else the current choice."""
    layers = [c for c in combo.choices if c is not None]
    matches = [layer for layer in layers if word and word.lower() in layer.name.lower() and layer is not avoid]
    if matches:
        combo.value = min(matches, key=lambda layer: len(layer.name))
        return
    if nullable:
        combo.value = None
        return
    others = [layer for layer in layers if layer is not avoid]
    if fallback and others:
        combo.value = others[0] if fallback == "first" else others[-1]


def check_pair(source, target) -> None:
    """Raise a ``ValueError`` for a missing source or target layer, or the same layer twice."""
    if source is None or target is None:
        raise ValueError("choose a source and a target image layer")
    if source is target:
        raise ValueError("source and target are the same layer")


def make_scrollable(container: Container) -> None:
    """Put the contents of ``container`` in a scroll area inside its own native widget, which is
    what napari docks (``container.native``; magicgui's ``scrollable=True`` wraps the scroll
    area *around* it, where napari never sees it). The widget asks for its natural height and
    shrinks to a scrolling strip when the window is short, so docking every widget keeps the
    window on the screen."""
    from qtpy.QtCore import QSize
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    class _Area(QScrollArea):
        def sizeHint(self):  # natural size of the contents (QScrollArea's own hint is a small fixed one)
            hint = self.widget().sizeHint()
            return QSize(hint.width() + self.verticalScrollBar().sizeHint().width(), hint.height() + 2)

        def minimumSizeHint(self):
            return QSize(super().minimumSizeHint().width(), 80)

    from qtpy.QtCore import Qt

    native = container.native
    content = QWidget()
    layout = native.layout()
    layout.addStretch(1)  # widgets stay together at the top when the dock is taller than they are
    content.setLayout(layout)  # moves the layout and every widget in it
    area = _Area()
    area.setWidgetResizable(True)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setWidget(content)
    outer = QVBoxLayout()
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    native.setLayout(outer)
    container.scroll_area = area  # type: ignore[attr-defined]


def threads_box(label: str = "threads (0: auto)") -> SpinBox:
    """Torch threads for the run; 0 picks the usable cores other processes leave free
    (:func:`napari_histreg.threads.choose_threads`)."""
    import os

    return SpinBox(value=0, min=0, max=max(1, os.cpu_count() or 1), label=label,
                   tooltip="0: the usable cores that other programs leave free (a busy core slows every thread)")


def source_target_pickers(viewer, kinds=("image",)) -> tuple[ComboBox, ComboBox]:
    """A source and a target image picker that start on two different layers: a layer named
    like "source" / "target" when there is one, else the source is the top layer and the
    target the bottom one."""
    source = layer_picker(viewer, "source (moving)", kinds, prefer="source", fallback="last")
    target = layer_picker(viewer, "target (fixed)", kinds, prefer="target", fallback="first", avoid=source)
    return source, target


class RunWidget(Container):
    """A widget whose action runs in a background worker.

    Subclasses put their own inputs in ``widgets`` and implement :meth:`prepare` (GUI thread:
    read the inputs, return ``job(progress) -> payload`` for the worker thread) and
    :meth:`apply` (GUI thread: turn the payload into layers / session state). The layers a
    widget adds carry its :attr:`owner`: it updates its own layers and never replaces anyone
    else's. The widget scrolls when docked in a short window.
    """

    run_text = "Run"
    #: who the layers this widget adds belong to (see :func:`~napari_histreg._napari.layers.add_layers`)
    owner = "widget"
    #: stages whose events move the progress bar, in order (see ``worker.STAGE_WEIGHTS``);
    #: ``None``: every event fills the bar by its own step/total
    stages: tuple[str, ...] | None = None

    def __init__(self, viewer, widgets: list, run_text: str | None = None) -> None:
        self.viewer = viewer = unwrap(viewer)
        self.session = get_session(viewer)
        self._run_button = PushButton(text=run_text or self.run_text)
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(min=0, max=1000, value=0, label="progress")
        self._status = Label(value="ready", label="status")
        self._status_is_error = False  # the label starts without the error style
        if hasattr(self._status.native, "setWordWrap"):
            self._status.native.setWordWrap(True)
        buttons = Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False)
        super().__init__(widgets=[*widgets, buttons, self._progress, self._status])
        make_scrollable(self)
        self.runner = Runner(
            on_event=self._on_event,
            on_result=self._on_result,
            on_error=self._on_error,
            on_cancelled=self._on_cancelled,
            on_finished=self._on_finished,
        )
        # a widget closed mid-run (or its viewer) stops the run at the next step
        on_destroyed(self, self.runner.cancel)
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        self._active_stages: tuple[str, ...] | None = self.stages

    # ------------------------------------------------------------------ public
    @property
    def running(self) -> bool:
        return self.runner.running

    @property
    def status(self) -> str:
        return str(self._status.value)

    def run(self, *_args) -> Any:
        """Start the action (what the Run button does); returns the worker or None."""
        if self.running:
            return None
        try:
            with torch_threads(1):  # the GUI thread keeps no OpenMP team (threads.on_one_thread)
                job = self.prepare()
        except Exception as err:  # bad inputs: say so, start nothing
            self._set_status(f"cannot start: {err}", error=True)
            return None
        if job is None:
            return None
        self._progress.value = 0
        self._set_status("starting…")
        self._run_button.enabled = False
        self._cancel_button.enabled = True
        return self.runner.start(job)

    def cancel(self, *_args) -> None:
        """Stop the running action at its next step; layers are left as they are."""
        if self.running:
            self.runner.cancel()
            self._set_status("cancelling…")

    def wait(self, timeout: float = 120.0) -> bool:
        return self.runner.wait(timeout)

    # ------------------------------------------------------------------ to implement
    def prepare(self) -> Callable[[Callable[[ProgressEvent], None]], Any] | None:
        raise NotImplementedError

    def apply(self, payload) -> str:
        """Use the payload; return the status text."""
        raise NotImplementedError

    # ------------------------------------------------------------------ runner callbacks
    def _on_event(self, event: ProgressEvent) -> None:
        if self._active_stages is None:
            fraction = event.step / event.total if event.total else 0.0
        else:
            fraction = overall_fraction(event, self._active_stages)
        self._progress.value = int(round(1000 * fraction))
        text = f"{event.stage}: {event.step}/{event.total}"
        if event.message:
            text += f" ({event.message})"
        self._set_status(text)

    def _on_result(self, payload) -> None:
        with torch_threads(1):  # as in run(): no OpenMP team left on the GUI thread
            text = self.apply(payload)
        self._progress.value = 1000
        self._set_status(text or "done")

    def _on_error(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        message = f"{type(exc).__name__}: {exc}"
        self._set_status(f"failed: {message}", error=True, tooltip=getattr(exc, "__histreg_traceback__", None))
        show_error(f"napari-histreg: {message}")

    def _on_cancelled(self) -> None:
        self._progress.value = 0
        self._set_status("cancelled: layers left unchanged")

    def _on_finished(self) -> None:
        self._run_button.enabled = True
        self._cancel_button.enabled = False

    def _set_status(self, text: str, error: bool = False, tooltip: str | None = None) -> None:
        self._status.value = text
        self._status.tooltip = tooltip or text
        # a style sheet re-polishes the label and relayouts the dock: set it only when the
        # error state changes, not on every progress step
        if self._status_is_error != error:
            self._status.native.setStyleSheet("color: #ff6b6b;" if error else "")
            self._status_is_error = error
