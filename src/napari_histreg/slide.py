"""Whole-slide images: lazy pyramids in, OME-Zarr / OME-TIFF pyramids out.

A :class:`Slide` is a list of lazy dask arrays, one per pyramid level, each ``(H, W)`` grey or
``(H, W, C)`` colour (channels last, as everywhere in the core). Nothing here reads level 0
whole: arrays are read chunk by chunk, and only the chunks a computation touches.

* **Pyramidal (OME-)TIFF** (also SVS, NDPI, ... anything tifffile reads) through tifffile's zarr
  store (``TiffPageSeries.aszarr()``): each TIFF tile or strip is one chunk.
* **OME-Zarr** multiscales, NGFF 0.1 to 0.4 (zarr v2, ``.zattrs``) and 0.5 (zarr v3,
  ``zarr.json`` with an ``ome`` attribute); ``t`` / ``z`` axes are reduced to their first plane,
  ``c`` is moved last.
* **Flat images** (a one-level TIFF or zarr array, a numpy or dask array): the lower levels are
  *virtual*, 2x2 means computed lazily from level 0 (reading one of them streams through level 0
  chunk by chunk). :func:`to_zarr_pyramid` converts such an image, chunk by chunk, into an
  OME-Zarr pyramid on disk once. JPEG / PNG files cannot be read partially: they are decoded
  whole and then handled as arrays.

Downsample factors (``Slide.downsamples``): level-0 pixels per level pixel along ``(row, col)``.
They are taken from the OME-Zarr ``scale`` transforms when present, otherwise from the shapes:
a level whose size is ``floor`` or ``ceil`` of ``H0 / f`` for an integer ``f`` has factor ``f``
exactly, anything else the ratio of the sizes. A level pixel ``j`` covers level-0 pixels
``[f j, f (j + 1))``, so ``level = (level0 + 0.5) / f - 0.5`` (the :class:`Frame` convention).

Output pyramids are written as **OME-NGFF 0.4** (zarr v2 format, ``/`` chunk-key separator),
the version every current reader understands (ome-zarr-py, napari-ome-zarr, QuPath, Fiji/MoBIE,
vizarr); this module reads 0.5 as well. Colour is stored channels-first ``(c, y, x)`` as the
specification wants, with ``omero`` channel colours red/green/blue; each chunk holds all
channels. Levels are 2x2 means (``floor`` sizes) down to a longer side of at most ``min_size``.

A pyramid is built inside ``OUT.zarr.partial`` and renamed to ``OUT.zarr`` only when complete
(see :class:`PartialOutput`); the multiscales metadata is also written last. A folder named
``*.partial`` or without ``multiscales`` metadata is never a finished output.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .conventions import Frame
from .io import HistRegInputError, atomic_path, atomic_write_json, check_image
from .progress import ProgressCallback, report

__all__ = [
    "OmeZarrWriter",
    "PartialOutput",
    "Slide",
    "TIFF_SUFFIXES",
    "frame_to_level0",
    "halve",
    "open_slide",
    "register_slides",
    "release_memory",
    "run_blocks",
    "to_zarr_pyramid",
    "write_ome_tiff",
]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi", ".scn", ".qptiff", ".bif", ".lsm")
NGFF_VERSION = "0.4"
DEFAULT_CHUNK = 1024
DEFAULT_MIN_SIZE = 256
#: share of the available memory a slide that must be decoded whole (JPEG, PNG) may take
SLIDE_MEMORY_SHARE = 1 / 3
JOB_FILE = ".histreg-job.json"
PROGRESS_FILE = ".histreg-progress"


# --------------------------------------------------------------------------- the slide
@dataclasses.dataclass
class Slide:
    """A pyramid of lazy levels. ``levels[k]`` is a dask array ``(H_k, W_k)`` or
    ``(H_k, W_k, C)``; ``downsamples[k]`` the ``(row, col)`` level-0 pixels per level-k pixel;
    ``virtual[k]`` whether level ``k`` is computed from level 0 on the fly (not stored)."""

    levels: list
    downsamples: list[tuple[float, float]]
    name: str = "slide"
    path: Path | None = None
    format: str = "array"
    virtual: list[bool] = dataclasses.field(default_factory=list)
    _closers: list = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.levels:
            raise HistRegInputError(f"{self.name}: no image data")
        if not self.virtual:
            self.virtual = [False] * len(self.levels)

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of level 0."""
        return tuple(int(n) for n in self.levels[0].shape[:2])

    @property
    def channels(self) -> int | None:
        """Number of channels (``None`` for grey)."""
        return int(self.levels[0].shape[2]) if self.levels[0].ndim == 3 else None

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def rgb(self) -> bool:
        return self.channels in (3, 4)

    def level_shape(self, level: int) -> tuple[int, int]:
        return tuple(int(n) for n in self.levels[level].shape[:2])

    # ------------------------------------------------------------------ levels
    def level_for_downsample(self, factor: float) -> int:
        """The coarsest level whose downsample is at most ``factor`` (0 when none is)."""
        best = 0
        for k, (dr, dc) in enumerate(self.downsamples):
            if max(dr, dc) <= factor * (1 + 1e-6):
                if max(dr, dc) >= max(self.downsamples[best]):
                    best = k
        return best

    def level_for(self, working_size: int) -> int:
        """The level whose longer side is closest to ``working_size`` without going below it
        (level 0 when even level 0 is smaller)."""
        return self.level_for_downsample(max(self.shape) / float(working_size))

    def read(self, level: int) -> np.ndarray:
        """One whole level as a numpy array (meant for the small ones). A virtual level is
        computed from level 0 in bands of rows (:func:`block_mean_bands`), so memory stays at
        one band whatever the slide's size. The local threaded scheduler is named explicitly: on
        a dask.distributed worker the default would ship the graph to the cluster."""
        if self.virtual[level]:
            factor = int(round(self.downsamples[level][0]))
            return block_mean_bands(self.levels[0], factor, self.level_shape(level))
        return np.asarray(self.levels[level].compute(scheduler="threads"))

    def read_region(self, level: int, rows: slice, cols: slice) -> np.ndarray:
        """``levels[level][rows, cols]`` as numpy, reading only the chunks it overlaps (in the
        calling thread: callers parallelise over regions)."""
        return np.asarray(self.levels[level][rows, cols].compute(scheduler="synchronous"))

    def frame_to_level0(self, frame: Frame, level: int) -> Frame:
        """A :class:`Frame` of an image of level ``level`` re-expressed against level 0."""
        return frame_to_level0(frame, self.shape, self.downsamples[level])

    # ------------------------------------------------------------------ resources
    def close(self) -> None:
        for close in self._closers:
            with contextlib.suppress(Exception):
                close()
        self._closers.clear()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s[1]}x{s[0]}" for s in (lv.shape[:2] for lv in self.levels))
        return f"Slide({self.name!r}, {self.format}, {self.channels or 1} channel(s), {self.dtype}, levels w x h: {sizes})"


def frame_to_level0(frame: Frame, level0_shape: Sequence[int], downsample: Sequence[float]) -> Frame:
    """``frame`` places an image of some pyramid level on the working grid; return the frame of
    level 0, given the level's ``downsample`` (level-0 pixels per level pixel, ``(row, col)``).

    ``level = (level0 + 0.5) / f - 0.5`` so ``working = (level0 + 0.5) * scale / f - 0.5 + offset``.
    With ``downsample = level0_shape / frame.original_shape`` this equals
    ``frame.at_shape(level0_shape)``; with an exact integer factor it also stays exact when the
    level's size was rounded."""
    return Frame(
        original_shape=(int(level0_shape[0]), int(level0_shape[1])),
        shape=tuple(frame.shape),
        scale=(frame.scale[0] / float(downsample[0]), frame.scale[1] / float(downsample[1])),
        offset=tuple(frame.offset),
    )


def _downsample_from_shapes(level0_shape, shape) -> tuple[float, float]:
    out = []
    for n0, n in zip(level0_shape[:2], shape[:2]):
        ratio = n0 / max(int(n), 1)
        factor = max(1, round(ratio))
        exact = int(n) in (n0 // factor, -(-n0 // factor))
        out.append(float(factor) if exact else float(ratio))
    return tuple(out)


# --------------------------------------------------------------------------- lazy 2x means
def _to_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """Float ``values`` as ``dtype``: rounded and clipped to its range when it is an integer type."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype)


def halve(array):
    """Lazy 2x2 mean of a dask array ``(H, W[, C])`` (odd last row / column dropped), same dtype."""
    import dask.array as da

    h, w = (int(n) // 2 * 2 for n in array.shape[:2])
    array = array[:h, :w]
    chunks = []
    for axis in (0, 1):
        size = max(2, (max(array.chunks[axis]) // 2) * 2)
        chunks.append(size)
    array = array.rechunk({0: chunks[0], 1: chunks[1]})
    # an odd-sized last chunk only happens when the axis length is odd, and it was trimmed
    dtype = array.dtype

    def block_mean(block):
        bh, bw = block.shape[0] // 2, block.shape[1] // 2
        shaped = block[: bh * 2, : bw * 2].reshape((bh, 2, bw, 2) + block.shape[2:])
        return _to_dtype(shaped.astype(np.float32).mean(axis=(1, 3)), dtype)

    out_chunks = tuple(tuple(c // 2 for c in array.chunks[a]) for a in (0, 1)) + tuple(array.chunks[2:])
    return da.map_blocks(block_mean, array, chunks=out_chunks, dtype=dtype)


#: float32 bytes per band of :func:`block_mean_bands`
BAND_BYTES = 64 * 2**20


def block_mean_bands(level0, factor: int, shape, band_bytes: int | None = None) -> np.ndarray:
    """``factor x factor`` block means of a lazy ``(H, W[, C])`` array, of output ``shape``
    (floor sizes, as chained 2x2 halving gives), computed band of rows by band of rows (each
    band at most about ``band_bytes`` of float32, default :data:`BAND_BYTES`), dtype kept."""
    band_bytes = band_bytes or BAND_BYTES
    h, w = int(shape[0]), int(shape[1])
    channels = level0.shape[2:]
    out = np.empty((h, w) + tuple(channels), dtype=level0.dtype)
    row_bytes = factor * w * factor * int(np.prod(channels or (1,))) * 4
    band = max(1, band_bytes // max(row_bytes, 1))  # output rows per band
    for o0 in range(0, h, band):
        o1 = min(h, o0 + band)
        block = np.asarray(level0[o0 * factor : o1 * factor, : w * factor].compute(scheduler="synchronous"))
        shaped = block.reshape((o1 - o0, factor, w, factor) + tuple(channels)).astype(np.float32)
        out[o0:o1] = _to_dtype(shaped.mean(axis=(1, 3)), level0.dtype)
    return out


def _virtual_levels(level0, min_size: int) -> list:
    levels = [level0]
    while max(levels[-1].shape[:2]) > min_size and min(levels[-1].shape[:2]) >= 4:
        levels.append(halve(levels[-1]))
    return levels


# --------------------------------------------------------------------------- opening
def open_slide(
    source,
    *,
    name: str | None = None,
    series: int = 0,
    store_wrapper: Callable | None = None,
    virtual_pyramid: bool = True,
    min_size: int = DEFAULT_MIN_SIZE,
    chunk: int = DEFAULT_CHUNK,
) -> Slide:
    """Open ``source`` lazily as a :class:`Slide`.

    ``source``: a :class:`Slide` (returned as is), a numpy / dask array ``(H, W[, C])``, or a
    path: a TIFF family file (``TIFF_SUFFIXES``), a zarr folder (OME-Zarr multiscales or a plain
    array), or any other image :func:`napari_histreg.io.read_image` reads (decoded whole).
    ``store_wrapper``: called with each zarr store before it is opened and returns the store to
    use (e.g. a ``zarr.storage.WrapperStore`` that counts or caches reads). ``virtual_pyramid``:
    give a one-level image lazy 2x2-mean levels down to ``min_size``. ``chunk``: dask chunk size
    for arrays given in memory.
    """
    import dask.array as da

    if isinstance(source, Slide):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise HistRegInputError(f"{path}: file not found")
        label = name or path.name
        if path.is_dir() or path.suffix.lower() == ".zarr":
            slide = _open_zarr(path, label, store_wrapper)
        elif path.suffix.lower() in TIFF_SUFFIXES:
            slide = _open_tiff(path, label, series, store_wrapper)
        else:
            from .io import read_image

            # a JPEG / PNG cannot be read in parts: decoded whole, it is the only large copy here
            image = read_image(path, memory_share=SLIDE_MEMORY_SHARE, lazy_hint=False)
            slide = _from_array(da.from_array(image, chunks=_array_chunks(image, chunk)), label, path, "image")
    else:
        if hasattr(source, "compute") and hasattr(source, "chunks"):
            array = source
        else:
            array = np.asarray(source)
            array = da.from_array(array, chunks=_array_chunks(array, chunk))
        slide = _from_array(array, name or "array", None, "array")
    if virtual_pyramid and len(slide.levels) == 1:
        levels = _virtual_levels(slide.levels[0], min_size)
        slide.levels = levels
        slide.downsamples = [(1.0, 1.0)] + [(float(2**k), float(2**k)) for k in range(1, len(levels))]
        slide.virtual = [False] + [True] * (len(levels) - 1)
    _check_slide(slide)
    return slide


def _array_chunks(array, chunk: int):
    return (chunk, chunk) + tuple(array.shape[2:])


def _from_array(array, name, path, fmt) -> Slide:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = array.transpose(1, 2, 0)  # channels first
    return Slide([array], [(1.0, 1.0)], name=name, path=path, format=fmt)


def _check_slide(slide: Slide) -> None:
    level0 = slide.levels[0]
    if level0.ndim not in (2, 3):
        raise HistRegInputError(f"{slide.name}: expected a (H, W) or (H, W, C) image, got shape {tuple(level0.shape)}")
    dtype = np.dtype(level0.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise HistRegInputError(f"{slide.name}: not a numeric image (dtype {dtype})")
    if min(slide.shape) < 1:
        raise HistRegInputError(f"{slide.name}: image is empty (shape {tuple(level0.shape)})")


def _dask_level(array, name: str, chunks=None):
    import dask.array as da

    return da.from_array(array, chunks=chunks or array.chunks, name=f"{name}-{uuid.uuid4().hex}", lock=False, asarray=True)


#: rows per chunk of a flat, uncompressed TIFF read by :class:`ContiguousTiffArray`
CONTIGUOUS_ROWS = 512


class ContiguousTiffArray:
    """An uncompressed, contiguous TIFF image read row range by row range from the file
    (``os.pread``), so any region costs its rows only. tifffile's zarr store sees such a file
    as one chunk (one strip for the whole image: what ``tifffile.imwrite`` and many scanners'
    exporters write), which would decode the whole image for any read."""

    def __init__(self, path, offset: int, shape, dtype):
        self.path, self.offset = str(path), int(offset)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.chunks = (min(CONTIGUOUS_ROWS, self.shape[0]),) + self.shape[1:]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = key[0] if key else slice(None)
        if isinstance(rows, (int, np.integer)):
            rows = slice(int(rows), int(rows) + 1)
            squeeze = True
        else:
            squeeze = False
        r0, r1, step = rows.indices(self.shape[0])
        count = max(0, r1 - r0)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, count * self.row_bytes, self.offset + r0 * self.row_bytes)
        finally:
            os.close(fd)
        if len(data) != count * self.row_bytes:
            raise HistRegInputError(f"{self.path}: file is truncated (rows {r0}..{r1} are missing)")
        block = np.frombuffer(data, dtype=self.dtype).reshape((count,) + self.shape[1:])[::step]
        block = block[(slice(None),) + tuple(key[1:])]
        return block[0] if squeeze else block


def _contiguous_reader(tif, series, path) -> "ContiguousTiffArray | None":
    """A :class:`ContiguousTiffArray` for a one-page, uncompressed, contiguous ``YX`` / ``YXS``
    series whose image is a single strip taller than a chunk; otherwise None."""
    with contextlib.suppress(Exception):
        page = series.pages[0] if len(series.pages) == 1 else None
        if page is None or series.axes not in ("YX", "YXS") or page.compression != 1:
            return None
        if not page.is_contiguous or len(page.dataoffsets) != 1 or page.shape[0] <= CONTIGUOUS_ROWS:
            return None
        dtype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
        shape = tuple(series.shape)
        if int(page.databytecounts[0]) != int(np.prod(shape)) * dtype.itemsize:
            return None
        return ContiguousTiffArray(path, page.dataoffsets[0], shape, dtype)
    return None


def _to_yxc(array, axes: str, name: str):
    """Reorder a dask array with tifffile / NGFF axis letters to ``(Y, X[, C])``."""
    axes = axes.upper()
    index = []
    kept = []
    for k, axis in enumerate(axes):
        if axis in "YX":
            index.append(slice(None))
            kept.append(axis)
        elif axis in "CS" and ("S" not in axes or axis == "S"):
            index.append(slice(None))
            kept.append("C")
        else:  # time, depth, series, ...: the first plane
            index.append(0)
    if "Y" not in kept or "X" not in kept:
        raise HistRegInputError(f"{name}: image axes {axes!r} have no Y and X")
    array = array[tuple(index)]
    order = [kept.index("Y"), kept.index("X")] + ([kept.index("C")] if "C" in kept else [])
    array = array.transpose(order)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _open_tiff(path: Path, name: str, series: int, store_wrapper) -> Slide:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:
        raise HistRegInputError(f"{path}: cannot be read as a TIFF ({type(err).__name__}: {err})") from None
    try:
        if not tif.series or series >= len(tif.series):
            raise HistRegInputError(f"{path}: TIFF has no image series {series}")
        ser = tif.series[series]
        axes = ser.axes
        store = ser.aszarr()
        opened = zarr.open(store_wrapper(store) if store_wrapper else store, mode="r")
        if isinstance(opened, zarr.Array):
            arrays = [opened]
        else:
            datasets = opened.attrs.get("multiscales", [{}])[0].get("datasets") or [{"path": str(k)} for k in range(len(ser.levels))]
            arrays = [opened[d["path"]] for d in datasets]
        contiguous = _contiguous_reader(tif, ser, path) if len(arrays) == 1 else None
        if contiguous is not None:
            # one strip holding the whole image is one zarr chunk: read rows from the file instead
            levels = [_dask_level(contiguous, f"tiff-{path.name}-0", chunks=contiguous.chunks)]
        else:
            levels = [_to_yxc(_dask_level(a, f"tiff-{path.name}-{k}"), axes, str(path)) for k, a in enumerate(arrays)]
    except HistRegInputError:
        tif.close()
        raise
    except Exception as err:
        tif.close()
        raise HistRegInputError(f"{path}: cannot be read lazily as a TIFF ({type(err).__name__}: {err})") from None
    level0 = levels[0].shape
    downsamples = [_downsample_from_shapes(level0, lv.shape) for lv in levels]
    slide = Slide(levels, downsamples, name=name, path=path, format="tiff")
    slide._closers += [store.close, tif.close]
    return slide


def _multiscales_of(attrs: dict) -> tuple[list | None, str | None]:
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # NGFF 0.5
        ome = attrs["ome"]
        return ome.get("multiscales"), ome.get("version")
    ms = attrs.get("multiscales")
    return ms, (ms[0].get("version") if ms else None)


def _axes_letters(multiscale: dict, ndim: int) -> str:
    axes = multiscale.get("axes")
    if axes is None:
        return "TCZYX"[-ndim:] if ndim <= 5 else "Q" * (ndim - 2) + "YX"
    letters = []
    for axis in axes:
        label = (axis.get("name") if isinstance(axis, dict) else str(axis)).lower()
        kind = axis.get("type", "") if isinstance(axis, dict) else ""
        if label in ("y", "x"):
            letters.append(label.upper())
        elif label == "c" or kind == "channel":
            letters.append("C")
        elif label == "z":
            letters.append("Z")
        else:
            letters.append("T")
    return "".join(letters)


def _scale_of(dataset: dict, axes: str) -> tuple[float, float] | None:
    for transform in dataset.get("coordinateTransformations") or []:
        if transform.get("type") == "scale" and "scale" in transform:
            scale = transform["scale"]
            if len(scale) == len(axes):
                return float(scale[axes.index("Y")]), float(scale[axes.index("X")])
    return None


def _open_zarr(path: Path, name: str, store_wrapper) -> Slide:
    import zarr
    from zarr.storage import LocalStore

    if not path.is_dir():
        raise HistRegInputError(f"{path}: a zarr store must be a folder")
    if path.name.endswith(".partial"):
        raise HistRegInputError(f"{path}: an unfinished output (interrupted run); it is not a slide")
    store = LocalStore(path, read_only=True)
    try:
        opened = zarr.open(store_wrapper(store) if store_wrapper else store, mode="r")
    except Exception as err:
        raise HistRegInputError(f"{path}: not a zarr store ({type(err).__name__}: {err})") from None
    if isinstance(opened, zarr.Array):
        array = _dask_level(opened, f"zarr-{path.name}")
        slide = _from_array(array, name, path, "zarr")
        return slide
    multiscales, version = _multiscales_of(opened.attrs.asdict())
    if not multiscales:
        arrays = [k for k, v in opened.arrays()]
        raise HistRegInputError(
            f"{path}: zarr group without OME-Zarr 'multiscales' metadata (an unfinished or foreign store); "
            f"arrays in it: {arrays[:5]}"
        )
    multiscale = multiscales[0]
    arrays = [opened[d["path"]] for d in multiscale["datasets"]]
    axes = _axes_letters(multiscale, arrays[0].ndim)
    levels = [_to_yxc(_dask_level(a, f"zarr-{path.name}-{k}"), axes, str(path)) for k, a in enumerate(arrays)]
    scales = [_scale_of(d, axes) for d in multiscale["datasets"]]
    if all(s is not None for s in scales) and all(s[0] > 0 and s[1] > 0 for s in scales):
        downsamples = [(s[0] / scales[0][0], s[1] / scales[0][1]) for s in scales]
    else:
        downsamples = [_downsample_from_shapes(levels[0].shape, lv.shape) for lv in levels]
    return Slide(levels, downsamples, name=name, path=path, format=f"ome-zarr {version or '?'}")


# --------------------------------------------------------------------------- parallel blocks
@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up on first use (``find_library`` may run ``ldconfig``)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Each thread's malloc arena otherwise keeps the freed pages of the tile-sized temporaries,
    so the resident memory would grow with the number of worker threads."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def run_blocks(items: Iterable, fn: Callable, workers: int = 1, on_done: Callable | None = None) -> None:
    """Call ``fn(item)`` for every item on ``workers`` threads (at most ``2 * workers`` in
    flight, so memory stays bounded) and ``on_done(item, result)`` in the calling thread as each
    finishes. An exception (a cancelling progress callback, ``KeyboardInterrupt``) cancels the
    blocks not started, waits for the running ones and propagates."""
    callback = on_done or (lambda item, result: None)

    def on_done(item, result):
        callback(item, result)
        release_memory()

    if workers <= 1:
        for item in items:
            on_done(item, fn(item))
        return
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histreg-block")
    pending: dict = {}
    try:
        for item in items:
            while len(pending) >= 2 * workers:
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    on_done(pending.pop(future), future.result())
            pending[executor.submit(fn, item)] = item
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                on_done(pending.pop(future), future.result())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- partial outputs
def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


class PartialOutput:
    """An output folder built in ``OUT.partial`` and renamed to ``OUT`` only by :meth:`finish`.

    ``job`` (a JSON-able dict) describes what is built; it is stored in ``OUT.partial/JOB_FILE``
    so that ``resume=True`` continues only the same job. Finished steps are appended to
    ``OUT.partial/PROGRESS_FILE`` one line each (``mark``), after their data was written, so a
    step is either recorded and complete or redone. ``OUT`` existing already raises unless
    ``overwrite`` (it is replaced at :meth:`finish`) or ``resume`` with the same job (then
    :attr:`complete` is True and nothing needs doing).
    """

    def __init__(self, out: str | os.PathLike, job: dict, *, resume: bool = False, overwrite: bool = False,
                 inputs: Iterable = ()):
        from .outputs import check_not_inputs, is_zarr_output

        self.out = Path(os.path.abspath(out))  # "." has no name to put ".partial" after
        self.partial = partial_path(self.out)
        self.job = json.loads(json.dumps(job))
        self.complete = False
        self.done: set[str] = set()
        self._lock = threading.Lock()
        self._log = None
        check_not_inputs([self.out, self.partial], inputs)
        if self.out.exists() and not (self.out.is_dir() and not any(self.out.iterdir())):
            # the one output rule (napari_histreg.outputs): only an earlier output of this package is replaced
            if not is_zarr_output(self.out):
                raise HistRegInputError(
                    f"{self.out}: exists and is not an OME-Zarr written by histreg (no {JOB_FILE}); nothing was written: "
                    "give a new path" + (" (--overwrite only replaces an earlier histreg output)" if overwrite else "")
                )
            if resume and self._job_in(self.out) == self.job:
                self.complete = True
                return
            if not overwrite:
                raise HistRegInputError(f"{self.out}: output exists; pass overwrite (--overwrite) to replace it")
        if self.partial.exists():
            if not is_zarr_output(self.partial):
                raise HistRegInputError(
                    f"{self.partial}: exists and is not an unfinished histreg output (no {JOB_FILE}); it was left as it is: "
                    "move it away or give another output path"
                )
            if resume and self._job_in(self.partial) == self.job:
                log = self.partial / PROGRESS_FILE
                if log.exists():
                    lines = log.read_text().split("\n")
                    self.done = {line for line in lines[:-1] if line}  # the last piece may be torn
            elif resume or overwrite:
                if resume and not overwrite:
                    raise HistRegInputError(
                        f"{self.partial}: an interrupted run of a different job; pass overwrite (--overwrite) to start again"
                    )
                shutil.rmtree(self.partial)
            else:
                raise HistRegInputError(
                    f"{self.partial}: left by an interrupted run; pass resume (--resume) to continue it "
                    "or overwrite (--overwrite) to start again"
                )
        self.partial.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.partial / JOB_FILE, self.job)

    def discard_if_empty(self) -> None:
        """Remove ``OUT.partial`` when no step was finished in it (a run that failed before
        doing any work leaves nothing for --resume to continue)."""
        self.close()
        if not self.complete and not self.done and self.partial.exists():
            log = self.partial / PROGRESS_FILE
            if not log.exists() or not log.read_text().strip():
                shutil.rmtree(self.partial, ignore_errors=True)

    @staticmethod
    def _job_in(folder: Path):
        with contextlib.suppress(OSError, ValueError):
            return json.loads((folder / JOB_FILE).read_text())
        return None

    def is_done(self, key: str) -> bool:
        return key in self.done

    def mark(self, key: str) -> None:
        with self._lock:
            if self._log is None:
                self._log = open(self.partial / PROGRESS_FILE, "a")
            self._log.write(key + "\n")
            self._log.flush()
            self.done.add(key)

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def finish(self) -> Path:
        """Rename ``OUT.partial`` to ``OUT`` (replacing an old ``OUT`` when overwriting)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            (self.partial / PROGRESS_FILE).unlink()
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.complete = True
        return self.out


# --------------------------------------------------------------------------- OME-Zarr writing
def pyramid_shapes(shape: Sequence[int], min_size: int = DEFAULT_MIN_SIZE) -> list[tuple[int, int]]:
    """Level shapes of a 2x2-mean pyramid: ``floor`` halving until the longer side is at most
    ``min_size``."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > min_size and min(shapes[-1]) >= 4:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return shapes


def _mean2(block: np.ndarray, dtype) -> np.ndarray:
    """2x2 mean over the last two axes of ``(C, h, w)``."""
    c, h, w = block.shape
    h2, w2 = h // 2, w // 2
    mean = block[:, : 2 * h2, : 2 * w2].reshape(c, h2, 2, w2, 2).astype(np.float32).mean(axis=(2, 4))
    return _to_dtype(mean, dtype)


class OmeZarrWriter:
    """Writes an OME-NGFF 0.4 multiscale image (zarr v2 format) into ``path``.

    ``shape`` is level 0's ``(H, W)``; ``channels`` ``None`` for grey or the channel count
    (stored ``(c, y, x)``). ``chunk``: the ``(y, x)`` chunk size, also the unit of writing.
    Level 0 is written with :meth:`write`; :meth:`build_pyramid` then fills the lower levels
    from it, and :meth:`finalise` writes the ``multiscales`` metadata (last). Reopening an
    existing folder (a resumed run) keeps the arrays if they match.
    """

    def __init__(self, path, shape, channels: int | None, dtype, *, chunk: int = DEFAULT_CHUNK,
                 min_size: int = DEFAULT_MIN_SIZE, fill_value=0, name: str = "image", compressor: Any = "default"):
        import zarr

        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.chunk = int(chunk)
        self.name = name
        self.shapes = pyramid_shapes(self.shape, min_size)
        self.fill_value = np.array(fill_value).astype(self.dtype).item()
        self.group = zarr.open_group(str(self.path), mode="a", zarr_format=2)
        self.arrays = []
        for k, (h, w) in enumerate(self.shapes):
            full = ((channels,) if channels else ()) + (h, w)
            chunks = ((channels,) if channels else ()) + (min(self.chunk, h), min(self.chunk, w))
            key = str(k)
            if key in self.group:
                array = self.group[key]
                if tuple(array.shape) != full or tuple(array.chunks) != chunks or array.dtype != self.dtype:
                    raise HistRegInputError(f"{self.path}/{key}: existing array does not match this job")
            else:
                kwargs = {} if compressor == "default" else {"compressors": compressor}
                array = self.group.create_array(
                    key, shape=full, chunks=chunks, dtype=self.dtype, fill_value=self.fill_value,
                    chunk_key_encoding={"name": "v2", "separator": "/"}, **kwargs,
                )
            self.arrays.append(array)

    # ------------------------------------------------------------------ writing
    def write(self, level: int, rows: slice, cols: slice, block: np.ndarray) -> None:
        """Store ``block`` (``(h, w)`` or ``(h, w, C)``) at ``[rows, cols]`` of ``level``."""
        if self.channels:
            self.arrays[level][:, rows, cols] = np.moveaxis(block, -1, 0)
        else:
            self.arrays[level][rows, cols] = block

    def blocks(self, level: int, size: int | None = None) -> list[tuple[slice, slice]]:
        """The ``(rows, cols)`` blocks of ``level`` on a grid of ``size`` (a multiple of the chunk)."""
        size = size or self.chunk
        h, w = self.shapes[level]
        return [(slice(r, min(r + size, h)), slice(c, min(c + size, w))) for r in range(0, h, size) for c in range(0, w, size)]

    def build_pyramid(self, workers: int = 1, progress: ProgressCallback = None, partial: PartialOutput | None = None) -> None:
        """Fill levels 1.. from level 0, chunk by chunk (2x2 means)."""
        total = sum(len(self.blocks(k)) for k in range(1, len(self.shapes)))
        done = 0
        report(progress, "pyramid", 0, total, f"{len(self.shapes) - 1} levels")
        for k in range(1, len(self.shapes)):
            blocks = self.blocks(k)
            if partial is not None and partial.is_done(f"pyramid {k}"):
                done += len(blocks)
                continue
            source, target = self.arrays[k - 1], self.arrays[k]

            def one(block, source=source, target=target):
                rows, cols = block
                src_rows = slice(2 * rows.start, 2 * rows.stop)
                src_cols = slice(2 * cols.start, 2 * cols.stop)
                data = source[(slice(None),) * bool(self.channels) + (src_rows, src_cols)]
                data = data if self.channels else data[None]
                mean = _mean2(data, self.dtype)
                target[(slice(None),) * bool(self.channels) + (rows, cols)] = mean if self.channels else mean[0]

            def finished(block, _):
                nonlocal done
                done += 1
                report(progress, "pyramid", done, total, f"level {k}")

            run_blocks(blocks, one, workers, finished)
            if partial is not None:
                partial.mark(f"pyramid {k}")
        report(progress, "pyramid", total, total, "done")

    # ------------------------------------------------------------------ metadata
    def metadata(self, extra: dict | None = None) -> dict:
        axes = ([{"name": "c", "type": "channel"}] if self.channels else []) + [
            {"name": "y", "type": "space"}, {"name": "x", "type": "space"},
        ]
        datasets = []
        for k in range(len(self.shapes)):
            f = float(2**k)
            scale = ([1.0] if self.channels else []) + [f, f]
            datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
        from . import __version__

        attrs: dict = {
            "multiscales": [
                {
                    "version": NGFF_VERSION,
                    "name": self.name,
                    "axes": axes,
                    "datasets": datasets,
                    "type": "mean",
                    "metadata": {
                        "description": "2x2 block mean per level, floor sizes; level k pixel j covers level-0 pixels "
                        "[2^k j, 2^k (j + 1))",
                        "software": f"napari-histreg {__version__}",
                        **(extra or {}),
                    },
                }
            ]
        }
        if self.channels:
            attrs["omero"] = _omero(self.channels, self.dtype, self.name)
        return attrs

    def finalise(self, extra: dict | None = None) -> None:
        """Write the ``multiscales`` (and ``omero``) attributes: the image is now readable."""
        self.group.attrs.update(self.metadata(extra))


def _omero(channels: int, dtype, name: str) -> dict:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        window = {"min": float(info.min), "max": float(info.max), "start": float(info.min), "end": float(info.max)}
    else:
        window = {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}
    colours = ["FF0000", "00FF00", "0000FF", "FFFFFF"] if channels in (3, 4) else ["FFFFFF"] * channels
    labels = ["red", "green", "blue", "alpha"] if channels in (3, 4) else [f"channel {k}" for k in range(channels)]
    return {
        "name": name,
        "version": NGFF_VERSION,
        "channels": [
            {"label": labels[k], "color": colours[k], "active": k < 3, "window": dict(window),
             "coefficient": 1.0, "family": "linear", "inverted": False}
            for k in range(channels)
        ],
        "rdefs": {"model": "color" if channels in (3, 4) else "greyscale", "defaultT": 0, "defaultZ": 0},
    }


# --------------------------------------------------------------------------- conversion
def to_zarr_pyramid(
    source,
    out: str | os.PathLike,
    *,
    chunk: int = DEFAULT_CHUNK,
    min_size: int = DEFAULT_MIN_SIZE,
    workers: int = 2,
    progress: ProgressCallback = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert level 0 of ``source`` (anything :func:`open_slide` opens, e.g. a large flat TIFF)
    into an OME-Zarr pyramid at ``out``, chunk by chunk (built in ``out.partial``, renamed when
    complete). Returns ``out``."""
    slide = open_slide(source, virtual_pyramid=False)
    out = Path(out)
    job = {"kind": "zarr pyramid", "source": str(slide.path or slide.name), "shape": list(slide.shape),
           "channels": slide.channels, "dtype": str(slide.dtype), "chunk": chunk, "min_size": min_size}
    partial = PartialOutput(out, job, resume=resume, overwrite=overwrite, inputs=[slide.path])
    if partial.complete:
        return out
    try:
        writer = OmeZarrWriter(partial.partial, slide.shape, slide.channels, slide.dtype, chunk=chunk,
                               min_size=min_size, name=slide.name)
        def one(block):
            rows, cols = block
            writer.write(0, rows, cols, slide.read_region(0, rows, cols))

        write_level0_and_pyramid(writer, partial, writer.blocks(0), one, workers, progress, "convert", slide.name)
        writer.finalise({"converted_from": str(slide.path or slide.name)})
        return partial.finish()
    except BaseException:
        partial.discard_if_empty()
        raise
    finally:
        partial.close()


def write_level0_and_pyramid(writer, partial, blocks, write_block: Callable, workers: int, progress: ProgressCallback,
                             stage: str, message: str = "") -> None:
    """Resumably fill level 0 of ``writer`` block by block (``write_block(block)``, on
    ``workers`` threads; blocks ``partial`` already has are skipped, each finished one is marked
    there and reported as ``stage``), then build the rest of the pyramid."""
    todo = [b for b in blocks if not partial.is_done(_block_key(0, b))]
    count = len(blocks) - len(todo)
    report(progress, stage, count, len(blocks), message)

    def finished(block, _):
        nonlocal count
        partial.mark(_block_key(0, block))
        count += 1
        report(progress, stage, count, len(blocks))

    run_blocks(todo, write_block, workers, finished)
    writer.build_pyramid(workers, progress, partial)


def _block_key(level: int, block) -> str:
    rows, cols = block
    return f"L{level} {rows.start} {cols.start}"


# --------------------------------------------------------------------------- OME-TIFF writing
def write_ome_tiff(
    source,
    path: str | os.PathLike,
    *,
    tile: int = 512,
    compression: str | None = "zlib",
    max_read_bytes: int = 32 * 2**20,
    progress: ProgressCallback = None,
) -> Path:
    """Write every level of ``source`` (a :class:`Slide` or anything :func:`open_slide` opens)
    as a tiled pyramidal OME-TIFF (BigTIFF, lower levels as SubIFDs). Tiles are read row of
    tiles by row of tiles, in pieces of at most ``max_read_bytes``, so memory stays small for
    any slide width; the file appears at ``path`` only when complete (atomic rename).
    ``compression``: any tifffile codec (``"zlib"``, ``"zstd"``, ``"jpeg"``, ``None``)."""
    import tifffile

    from . import __version__

    slide = open_slide(source)
    levels = list(range(len(slide.levels)))
    total = sum(math.ceil(slide.level_shape(k)[0] / tile) for k in levels)
    done = 0
    path = Path(path)
    colour = slide.channels in (3, 4)
    photometric = "rgb" if colour else "minisblack"
    axes = "YXS" if colour else ("YXC" if slide.channels else "YX")
    pixel_bytes = np.dtype(slide.dtype).itemsize * (slide.channels or 1)
    group = max(tile, (max_read_bytes // (tile * pixel_bytes)) // tile * tile)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for k in levels:
                level = slide.levels[k]
                h, w = slide.level_shape(k)

                def tiles(level=level, h=h, w=w, k=k, first=done):
                    # tifffile stops pulling after the last tile: report at the start of each row
                    for row, r0 in enumerate(range(0, h, tile)):
                        report(progress, "tiff", first + row, total, f"level {k}")
                        rows = slice(r0, min(r0 + tile, h))
                        for g0 in range(0, w, group):
                            data = np.asarray(level[rows, g0 : min(g0 + group, w)].compute(scheduler="synchronous"))
                            for c0 in range(0, data.shape[1], tile):
                                yield data[:, c0 : c0 + tile]

                kwargs = dict(shape=level.shape, dtype=slide.dtype, tile=(tile, tile), photometric=photometric,
                              compression=compression, software=f"napari-histreg {__version__}")
                if k == 0:
                    kwargs.update(subifds=len(levels) - 1, metadata={"axes": axes, "Name": slide.name})
                else:
                    kwargs.update(subfiletype=1, metadata=None)
                tif.write(tiles(), **kwargs)
                done += math.ceil(h / tile)
                report(progress, "tiff", done, total, f"level {k}")
    return path


# --------------------------------------------------------------------------- registration
def _resample_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased resampling of ``(H, W[, C])`` to ``shape``, dtype kept."""
    import torch

    from .stages.preprocess import resample

    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    tensor = torch.as_tensor(np.ascontiguousarray(chw), dtype=torch.float32)[None]
    out = _to_dtype(resample(tensor, shape)[0].numpy(), image.dtype)
    return out[0] if image.ndim == 2 else np.moveaxis(out, 0, -1)


def register_slides(
    source,
    target,
    config=None,
    *,
    device=None,
    seed: int | None = 0,
    progress: ProgressCallback = None,
    pipeline=None,
    levels: tuple[int, int] | None = None,
    threads=None,
):
    """Register two slides at the working resolution, reading only one small level of each
    (a flat image's level is computed from level 0 band by band: memory stays bounded).

    ``source`` / ``target``: :class:`Slide` s or anything :func:`open_slide` opens. The level of
    each is the coarsest one still at least the working size (``config.preprocess.working_size``)
    along the longer side of the larger slide, so both are at the same pixel size (if their
    downsamples differ, the finer level is resampled to the coarser one's in memory); or give
    ``levels=(source_level, target_level)``. Returns a
    :class:`~napari_histreg.RegistrationResult` whose frames, fields and landmarks are in
    **level-0 pixels** of each slide; ``info["slide"]`` records the levels used.
    """
    from .pipeline import RegistrationConfig, register

    source = open_slide(source)
    target = open_slide(target)
    if config is None:
        config = pipeline.config if pipeline is not None else RegistrationConfig()
    working_size = config.preprocess.working_size
    if levels is None:
        factor = max(max(source.shape), max(target.shape)) / float(working_size)
        levels = (source.level_for_downsample(factor), target.level_for_downsample(factor))
    ls, lt = (int(k) for k in levels)
    arrays = [source.read(ls), target.read(lt)]
    downs = [tuple(source.downsamples[ls]), tuple(target.downsamples[lt])]
    if max(downs[0]) != max(downs[1]):  # bring the finer image to the coarser pixel size
        fine = 0 if max(downs[0]) < max(downs[1]) else 1
        slide = (source, target)[fine]
        coarse = max(downs[1 - fine])
        shape = (max(1, round(slide.shape[0] / coarse)), max(1, round(slide.shape[1] / coarse)))
        arrays[fine] = _resample_to(arrays[fine], shape)
        downs[fine] = (slide.shape[0] / shape[0], slide.shape[1] / shape[1])
    src_arr = check_image(arrays[0], f"{source.name} (level {ls})")
    tgt_arr = check_image(arrays[1], f"{target.name} (level {lt})")
    result = register(src_arr, tgt_arr, config, device=device, seed=seed, progress=progress, pipeline=pipeline,
                      threads=threads)
    result.source_frame = frame_to_level0(result.source_frame, source.shape, downs[0])
    result.target_frame = frame_to_level0(result.target_frame, target.shape, downs[1])
    result.info["slide"] = {
        "source": str(source.path or source.name),
        "target": str(target.path or target.name),
        "source_level": ls,
        "target_level": lt,
        "source_downsample": list(downs[0]),
        "target_downsample": list(downs[1]),
        "source_level0_shape": list(source.shape),
        "target_level0_shape": list(target.shape),
        "registered_shapes": [list(src_arr.shape[:2]), list(tgt_arr.shape[:2])],
    }
    return result


def transform_digest(result) -> str:
    """A short hash of a registration result's geometry (field and frames), for job files."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(result.working_field, dtype=np.float32).tobytes())
    digest.update(json.dumps([result.source_frame.to_dict(), result.target_frame.to_dict()], sort_keys=True).encode())
    return digest.hexdigest()[:16]
