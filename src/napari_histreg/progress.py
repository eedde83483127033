"""Progress events and cooperative cancellation shared by the pipeline, the CLI and the GUI."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional


class RegistrationCancelled(Exception):
    """Raised by a progress callback to stop a registration at the next step."""


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """``stage`` names the stage, ``step`` of ``total`` steps within it is done."""

    stage: str
    step: int
    total: int
    message: str = ""


ProgressCallback = Optional[Callable[[ProgressEvent], None]]


def report(progress: ProgressCallback, stage: str, step: int, total: int, message: str = "") -> None:
    """Send one event; a callback stops the run by raising :class:`RegistrationCancelled`."""
    if progress is not None:
        progress(ProgressEvent(stage, step, total, message))
