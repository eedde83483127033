"""The registration result: a backward field on the working grid plus the two frames that tie it
to the original images, so it can be applied to the source at any resolution."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .conventions import (
    Frame,
    field_between_frames,
    map_source_to_target,
    map_target_to_source,
    to_tensor,
    warp,
)

FORMAT_VERSION = 1


@dataclasses.dataclass
class RegistrationResult:
    """What :func:`napari_histreg.register` returns.

    ``working_field``: ``(2, h, w)`` backward field on the working grid (working pixels);
    ``source_frame`` / ``target_frame``: where each original image sits on that grid;
    ``matrix``: the 2x3 backward affine (working pixels) after the initial and affine stages;
    ``timings``: seconds per stage; ``info``: configuration and stage diagnostics.
    """

    working_field: np.ndarray
    source_frame: Frame
    target_frame: Frame
    matrix: np.ndarray = dataclasses.field(default_factory=lambda: np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    working_source: np.ndarray | None = dataclasses.field(default=None, repr=False)
    working_target: np.ndarray | None = dataclasses.field(default=None, repr=False)

    # ------------------------------------------------------------------ shapes
    @property
    def source_shape(self) -> tuple[int, int]:
        return self.source_frame.original_shape

    @property
    def target_shape(self) -> tuple[int, int]:
        return self.target_frame.original_shape

    def _frames_for(self, source_shape=None):
        """Frames for a source image of ``source_shape`` (any resolution of the registered one)
        and the target grid at the same resolution ratio."""
        if source_shape is None:
            return self.source_frame, self.target_frame
        source_shape = tuple(int(s) for s in source_shape[:2])
        ratio = (source_shape[0] / self.source_shape[0], source_shape[1] / self.source_shape[1])
        target_shape = (max(1, round(self.target_shape[0] * ratio[0])), max(1, round(self.target_shape[1] * ratio[1])))
        return self.source_frame.at_shape(source_shape), self.target_frame.at_shape(target_shape)

    # ------------------------------------------------------------------ fields
    def field(self, source_shape=None, device=None) -> np.ndarray:
        """Backward field ``(2, H_t, W_t)`` in original target pixels (or at the resolution of a
        source image of ``source_shape``): ``warped(p) = source(p + u(p))``."""
        source_frame, target_frame = self._frames_for(source_shape)
        wf = to_tensor(self.working_field, device=device)
        return field_between_frames(wf, target_frame, source_frame).cpu().numpy()

    def warp(self, image: np.ndarray, order: int = 1, cval: float = 0.0, device=None) -> np.ndarray:
        """Warp ``image`` of the source (``(H, W)`` or ``(H, W, C)``, any resolution of the
        registered source) onto the target grid at the same resolution; dtype is kept.

        ``order=0`` is nearest neighbour (labels), ``1`` bilinear.
        """
        image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(f"expected (H, W) or (H, W, C) image, got shape {image.shape}")
        source_frame, target_frame = self._frames_for(image.shape[:2])
        field = field_between_frames(to_tensor(self.working_field, device=device), target_frame, source_frame)
        chw = image[..., None] if image.ndim == 2 else image
        tensor = torch.as_tensor(np.ascontiguousarray(chw.transpose(2, 0, 1)), dtype=torch.float32, device=field.device)
        mode = "nearest" if order == 0 else "bilinear"
        out = warp(tensor[None] - cval, field[None], mode=mode, padding_mode="zeros")[0] + cval
        out = out.permute(1, 2, 0).cpu().numpy()
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(image.dtype)
        return out[..., 0] if image.ndim == 2 else out

    # ------------------------------------------------------------------ points
    def map_source_points(self, points_rc) -> np.ndarray:
        """Source ``(row, col)`` points (original pixels) into the target frame (the inverse of
        the backward field, by fixed-point iteration on the working grid)."""
        working = self.source_frame.to_working(points_rc)
        mapped = map_source_to_target(working, self.working_field)
        return self.target_frame.to_original(mapped)

    def map_target_points(self, points_rc) -> np.ndarray:
        """Target ``(row, col)`` points (original pixels) into the source frame (exact)."""
        working = self.target_frame.to_working(points_rc)
        mapped = map_target_to_source(working, self.working_field)
        return self.source_frame.to_original(mapped)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.mha`` (working field, 2 components: d-row, d-col) and ``PATH.json``
        (frames, affine, timings, info). Both are written atomically. Returns the JSON path."""
        from .io import atomic_write_json, write_mha

        base = Path(path)
        if base.suffix in (".json", ".mha"):
            base = base.with_suffix("")
        field_path = base.with_suffix(".mha")
        json_path = base.with_suffix(".json")
        write_mha(field_path, np.moveaxis(self.working_field, 0, -1).astype(np.float32), vector=True)
        sidecar = {
            "format": "napari-histreg transform",
            "version": FORMAT_VERSION,
            "convention": "backward displacement on the working grid, working pixels, channels (d-row, d-col); "
            "working = (original + 0.5) * scale - 0.5 + offset",
            "field_file": field_path.name,
            "source_frame": self.source_frame.to_dict(),
            "target_frame": self.target_frame.to_dict(),
            "matrix": np.asarray(self.matrix).tolist(),
            "timings": self.timings,
            "info": _jsonable(self.info),
        }
        atomic_write_json(json_path, sidecar)
        return json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RegistrationResult":
        """Read a transform written by :meth:`save` (give either the .json or the .mha path)."""
        from .io import read_mha

        base = Path(path)
        json_path = base.with_suffix(".json") if base.suffix != ".json" else base
        if not json_path.exists():
            raise FileNotFoundError(f"{json_path}: transform sidecar not found")
        try:
            sidecar = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path}: not a valid transform sidecar ({err})") from None
        if sidecar.get("format") != "napari-histreg transform":
            raise ValueError(f"{json_path}: not a napari-histreg transform sidecar")
        field_path = json_path.parent / sidecar["field_file"]
        field = np.moveaxis(read_mha(field_path), -1, 0).astype(np.float32)
        return cls(
            working_field=field,
            source_frame=Frame.from_dict(sidecar["source_frame"]),
            target_frame=Frame.from_dict(sidecar["target_frame"]),
            matrix=np.asarray(sidecar["matrix"]),
            timings=sidecar.get("timings", {}),
            info=sidecar.get("info", {}),
        )


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
