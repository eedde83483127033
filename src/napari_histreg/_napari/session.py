"""Per-viewer registration state shared by the widgets.

The stage widgets continue from each other through a :class:`Session`: Preprocess stores the
working pair, Initial alignment and Affine store the 2x3 matrix, Non-rigid / Register store the
:class:`~napari_histreg.RegistrationResult`; the Transforms and Landmarks widgets use the last
result. ``get_session(viewer)`` returns the one session of a viewer.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np
from psygnal import Signal

from ..result import RegistrationResult
from .layers import unwrap

_SESSIONS: "weakref.WeakKeyDictionary[Any, Session]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class PairKey:
    """Which layers (and which data) a prepared pair belongs to."""

    source_name: str
    target_name: str
    source_data_id: int
    target_data_id: int

    @classmethod
    def of(cls, source_layer, target_layer) -> "PairKey":
        return cls(source_layer.name, target_layer.name, id(source_layer.data), id(target_layer.data))


class Session:
    """What the last runs produced for one viewer. ``changed`` is emitted with the name of the
    field that changed (``"pair"``, ``"matrix"``, ``"result"``)."""

    changed = Signal(str)

    def __init__(self) -> None:
        self.key: PairKey | None = None
        self.pair = None  # stages.preprocess.PreparedPair
        self.preprocess_config = None  # PreprocessConfig used for ``pair``
        self.mask_method: str | None = None  # the tissue mask ``pair`` was made with: "otsu", "unet" or None
        self.matrix: np.ndarray | None = None  # 2x3 backward affine, working pixels
        self.matrix_stage: str | None = None  # "initial" or "affine"
        self.result: RegistrationResult | None = None
        self.result_source_name: str | None = None
        self.result_target_name: str | None = None

    # ------------------------------------------------------------------ pair
    def has_pair_for(self, source_layer, target_layer) -> bool:
        return self.pair is not None and self.key == PairKey.of(source_layer, target_layer)

    def set_pair(self, key: PairKey, pair, config, mask_method: str | None = None) -> None:
        if key != self.key:
            self.matrix = None
            self.matrix_stage = None
        self.key, self.pair, self.preprocess_config, self.mask_method = key, pair, config, mask_method
        self.changed.emit("pair")

    def set_matrix(self, matrix, stage: str) -> None:
        self.matrix = np.asarray(matrix, dtype=np.float64)
        self.matrix_stage = stage
        self.changed.emit("matrix")

    def set_result(self, result: RegistrationResult, source_name: str | None = None, target_name: str | None = None) -> None:
        self.result = result
        self.result_source_name = source_name
        self.result_target_name = target_name
        self.changed.emit("result")


def get_session(viewer) -> Session:
    """The :class:`Session` of ``viewer`` (created on first use, dropped with the viewer)."""
    viewer = unwrap(viewer)  # plugin widgets get a proxy of the viewer
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = Session()
    return session
