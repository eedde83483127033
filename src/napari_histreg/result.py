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

    # ------------------------------------------------------------------ confidence
    @property
    def confidence(self) -> dict:
        """``{"score", "flag", "weakest", "measures"}`` (:mod:`napari_histreg.confidence`);
        empty for a result saved before confidences existed."""
        value = self.info.get("confidence")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def flag(self) -> str:
        """``"ok"`` or ``"check"`` (this registration may be wrong: look at it); ``""`` if unknown."""
        return self.confidence.get("flag", "")

    @property
    def compared(self) -> str | None:
        """The representation the result was computed on (``"grey"``, or ``"haematoxylin"`` from the
        start or by the counterstain retry); None for a result saved before it was recorded."""
        return ((self.info.get("config") or {}).get("preprocess") or {}).get("representation")

    # ------------------------------------------------------------------ shapes
    @property
    def source_shape(self) -> tuple[int, int]:
        return self.source_frame.original_shape

    @property
    def target_shape(self) -> tuple[int, int]:
        return self.target_frame.original_shape

    def _frames_for(self, source_shape=None, target_shape=None):
        """Frames for a source image of ``source_shape`` (any resolution of the registered one)
        and the target grid at the same resolution ratio, or of ``target_shape`` when given."""
        if source_shape is None and target_shape is None:
            return self.source_frame, self.target_frame
        source_frame = self.source_frame
        if source_shape is not None:
            source_shape = tuple(int(s) for s in source_shape[:2])
            source_frame = self.source_frame.at_shape(source_shape)
            if target_shape is None:
                ratio = (source_shape[0] / self.source_shape[0], source_shape[1] / self.source_shape[1])
                target_shape = (max(1, round(self.target_shape[0] * ratio[0])), max(1, round(self.target_shape[1] * ratio[1])))
        return source_frame, self.target_frame.at_shape(tuple(int(s) for s in target_shape[:2]))

    # ------------------------------------------------------------------ fields
    def field(self, source_shape=None, device=None) -> np.ndarray:
        """Backward field ``(2, H_t, W_t)`` in original target pixels (or at the resolution of a
        source image of ``source_shape``): ``warped(p) = source(p + u(p))``."""
        source_frame, target_frame = self._frames_for(source_shape)
        wf = to_tensor(self.working_field, device=device)
        return field_between_frames(wf, target_frame, source_frame).cpu().numpy()

    def warp(self, image: np.ndarray, order: int = 1, cval: float = 0.0, device=None, target_shape=None) -> np.ndarray:
        """Warp ``image`` of the source (``(H, W)`` or ``(H, W, C)``, any resolution of the
        registered source) onto the target grid at the same resolution; dtype is kept.
        ``target_shape``: the ``(H, W)`` of the output grid instead (the target at another
        resolution: a stack's sections onto one grid).

        ``order=0`` is nearest neighbour (labels), ``1`` bilinear. The output is computed in row
        strips (:func:`napari_histreg.tiled.warp_block`, the same code as the whole-slide warp),
        so the float temporaries stay small for any image size.
        """
        from .tiled import warp_block

        image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(f"expected (H, W) or (H, W, C) image, got shape {image.shape}")
        if order not in (0, 1):
            raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), not {order}")
        source_frame, target_frame = self._frames_for(image.shape[:2], target_shape)
        working_field = to_tensor(self.working_field, device=device)
        h, w = target_frame.original_shape
        channels = image.shape[2] if image.ndim == 3 else None
        with torch.no_grad():
            out = warp_block(
                working_field, source_frame, target_frame, lambda rows, cols: image[rows, cols], image.shape[:2],
                slice(0, h), slice(0, w), channels, image.dtype, order=order, cval=cval,
            )
        if out is None:  # every pixel maps outside the source
            out = np.full((h, w) + ((channels,) if channels else ()), cval).astype(image.dtype)
        return out

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
        """Read a transform written by :meth:`save` (give either the .json or the .mha path).

        A missing file, a sidecar that is not one, or one that lacks a key or holds a malformed
        frame raises :class:`~napari_histreg.io.HistRegInputError` naming the file and the key."""
        from .io import HistRegInputError, read_mha

        base = Path(path)
        json_path = base.with_suffix(".json") if base.suffix != ".json" else base
        if not json_path.exists():
            raise HistRegInputError(f"{json_path}: transform sidecar not found")
        if json_path.is_dir():
            raise HistRegInputError(f"{json_path}: is a folder, not a transform sidecar (.json)")
        try:
            sidecar = json.loads(json_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HistRegInputError(f"{json_path}: not a valid transform sidecar ({err})") from None
        if not isinstance(sidecar, dict) or sidecar.get("format") != "napari-histreg transform":
            raise HistRegInputError(f"{json_path}: not a napari-histreg transform sidecar (no \"format\": \"napari-histreg transform\")")
        missing = [key for key in SIDECAR_KEYS if key not in sidecar]
        if missing:
            raise HistRegInputError(f"{json_path}: transform sidecar lacks {', '.join(map(repr, missing))}; it is damaged or incomplete")
        version = sidecar.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise HistRegInputError(f"{json_path}: transform format version {version!r} is newer than this napari-histreg reads ({FORMAT_VERSION})")
        frames = {}
        for key in ("source_frame", "target_frame"):
            try:
                frames[key] = Frame.from_dict(sidecar[key])
                if len(frames[key].original_shape) != 2 or min(frames[key].original_shape) < 1 or 0 in frames[key].scale:
                    raise ValueError("bad shape or scale")
            except (TypeError, ValueError, AttributeError) as err:
                raise HistRegInputError(f"{json_path}: {key!r} is not a valid frame ({err})") from None
        field_path = json_path.parent / str(sidecar["field_file"])
        field = np.moveaxis(read_mha(field_path), -1, 0).astype(np.float32)
        if field.ndim != 3 or field.shape[0] != 2:
            raise HistRegInputError(f"{field_path}: not a 2-component displacement field (shape {field.shape})")
        if tuple(field.shape[1:]) != tuple(frames["target_frame"].shape):
            raise HistRegInputError(
                f"{field_path}: field grid {field.shape[1]}x{field.shape[2]} does not match the sidecar's working grid "
                f"{tuple(frames['target_frame'].shape)}; the two files do not belong together"
            )
        if not np.isfinite(field).all():
            raise HistRegInputError(f"{field_path}: displacement field contains NaN or infinite values")
        try:
            matrix = np.asarray(sidecar["matrix"], dtype=np.float64).reshape(2, 3)
        except (TypeError, ValueError):
            raise HistRegInputError(f"{json_path}: 'matrix' is not a 2x3 affine matrix") from None
        return cls(
            working_field=field,
            source_frame=frames["source_frame"],
            target_frame=frames["target_frame"],
            matrix=matrix,
            timings=sidecar.get("timings", {}),
            info=sidecar.get("info", {}),
        )

    # ------------------------------------------------------------------ provenance
    def source_fingerprint(self) -> np.ndarray | None:
        """The thumbnail of the registered source kept in ``info`` (see :func:`fingerprint`)."""
        data = self.info.get("source_fingerprint") if isinstance(self.info, dict) else None
        return None if data is None else decode_fingerprint(data)


def background_value(image: np.ndarray) -> float:
    """Fill value for pixels warped in from outside the image: the median of its outermost
    pixels (white glass for brightfield RGB, ~0 for fluorescence)."""
    image = np.asarray(image)
    border = np.concatenate([image[0].ravel(), image[-1].ravel(), image[:, 0].ravel(), image[:, -1].ravel()])
    return float(np.median(border))


#: keys a transform sidecar must hold
SIDECAR_KEYS = ("field_file", "source_frame", "target_frame", "matrix")
#: longer side of a fingerprint thumbnail
FINGERPRINT_SIZE = 64
#: Fingerprints of one image correlate above this at any resolution, format or compression;
#: others below it. Measured on the 13 development images: the same image at 1/2, 1/4 and
#: 0.15 of its size, re-encoded as JPEG quality 70, 0.995 or more; consecutive sections in
#: other stains at most 0.913, one image under two synthetic warps 0.937.
FINGERPRINT_MATCH = 0.97


def fingerprint(grey: np.ndarray) -> np.ndarray:
    """A ``FINGERPRINT_SIZE`` px (longer side) thumbnail of a grey image in ``[0, 1]`` (tissue
    either way), anti-aliased: what :func:`fingerprints_match` compares to tell whether a slide is
    the one a transform was computed for, at any resolution."""
    from .stages.preprocess import resample

    grey = np.asarray(grey, dtype=np.float32)
    h, w = grey.shape
    scale = FINGERPRINT_SIZE / max(h, w)
    shape = (max(2, round(h * scale)), max(2, round(w * scale)))
    return resample(grey, shape).cpu().numpy().astype(np.float32)


def encode_fingerprint(thumbnail: np.ndarray) -> dict:
    """A fingerprint for the sidecar: min-max scaled to 8 bits, base64 (about 5 kB)."""
    import base64

    t = np.asarray(thumbnail, dtype=np.float32)
    lo, hi = float(t.min()), float(t.max())
    scaled = np.zeros(t.shape, np.uint8) if hi <= lo else np.rint((t - lo) / (hi - lo) * 255).astype(np.uint8)
    return {"shape": list(t.shape), "uint8": base64.b64encode(scaled.tobytes()).decode("ascii")}


def decode_fingerprint(data) -> np.ndarray | None:
    """The thumbnail of :func:`encode_fingerprint` (None when ``data`` is not one)."""
    import base64

    try:
        shape = tuple(int(n) for n in data["shape"])
        raw = np.frombuffer(base64.b64decode(data["uint8"]), dtype=np.uint8)
        return raw.reshape(shape).astype(np.float32) / 255.0
    except (KeyError, TypeError, ValueError):
        return None


def fingerprint_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two fingerprints (resampled to one shape), in [-1, 1]."""
    from .stages.preprocess import resample

    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a.shape != b.shape:
        b = resample(b, a.shape).cpu().numpy()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


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
