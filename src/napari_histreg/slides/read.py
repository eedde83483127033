"""Reading whole slides lazily: :class:`Slide`, :func:`open_slide` (pyramidal TIFF, OME-Zarr
0.1-0.5, flat images with virtual levels) and the level/frame arithmetic (see the package doc)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..conventions import Frame, cast_to_dtype
from ..io import HistRegInputError

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
    level 0, given the level's ``downsample`` (level-0 pixels per level pixel, ``(row, col)``):
    :meth:`Frame.at_shape` with the pyramid's exact factor, which stays exact when the level's
    size was rounded."""
    return frame.at_shape(level0_shape, downsample)


def _downsample_from_shapes(level0_shape, shape) -> tuple[float, float]:
    out = []
    for n0, n in zip(level0_shape[:2], shape[:2]):
        ratio = n0 / max(int(n), 1)
        factor = max(1, round(ratio))
        exact = int(n) in (n0 // factor, -(-n0 // factor))
        out.append(float(factor) if exact else float(ratio))
    return tuple(out)


# --------------------------------------------------------------------------- lazy 2x means
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
        return cast_to_dtype(shaped.astype(np.float32).mean(axis=(1, 3)), dtype)

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
        out[o0:o1] = cast_to_dtype(shaped.mean(axis=(1, 3)), level0.dtype)
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
            from ..io import read_image

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
    multiscale, version, arrays, axes = _multiscale_arrays(opened, path)
    if "Z" in axes and arrays[0].shape[axes.index("Z")] > 1:
        raise HistRegInputError(
            f"{path}: a stack of {arrays[0].shape[axes.index('Z')]} planes (z axis), not one slide; open it in napari "
            "(one layer, z = section) or read it with napari_histreg.slides.read.zarr_stack_levels"
        )
    levels = [_to_yxc(_dask_level(a, f"zarr-{path.name}-{k}"), axes, str(path)) for k, a in enumerate(arrays)]
    scales = [_scale_of(d, axes) for d in multiscale["datasets"]]
    if all(s is not None for s in scales) and all(s[0] > 0 and s[1] > 0 for s in scales):
        downsamples = [(s[0] / scales[0][0], s[1] / scales[0][1]) for s in scales]
    else:
        downsamples = [_downsample_from_shapes(levels[0].shape, lv.shape) for lv in levels]
    return Slide(levels, downsamples, name=name, path=path, format=f"ome-zarr {version or '?'}")

def _multiscale_arrays(group, path: Path) -> tuple[dict, str | None, list, str]:
    """An OME-Zarr group's first multiscale: its metadata, NGFF version, level arrays and axis
    letters; an input error naming ``path`` when it has none."""
    multiscales, version = _multiscales_of(group.attrs.asdict())
    if not multiscales:
        arrays = [k for k, v in group.arrays()]
        raise HistRegInputError(
            f"{path}: zarr group without OME-Zarr 'multiscales' metadata (an unfinished or foreign store); "
            f"arrays in it: {arrays[:5]}"
        )
    arrays = [group[d["path"]] for d in multiscales[0]["datasets"]]
    return multiscales[0], version, arrays, _axes_letters(multiscales[0], arrays[0].ndim)


def zarr_stack_levels(path) -> list | None:
    """The levels ``(Z, Y, X[, C])`` (dask) of an OME-Zarr with a z axis (a stack of sections, as
    :func:`napari_histreg.stack_slides.warp_stack` writes), or None for any other image."""
    import zarr

    path = Path(path)
    if not path.is_dir():
        return None
    try:
        opened = zarr.open(str(path), mode="r")
    except Exception:
        return None
    if isinstance(opened, zarr.Array):
        return None
    try:
        _, _, arrays, axes = _multiscale_arrays(opened, path)
    except HistRegInputError:
        return None
    if "Z" not in axes or not set(axes) <= set("CZYX"):
        return None
    order = [axes.index(a) for a in "ZYX"] + ([axes.index("C")] if "C" in axes else [])
    return [_dask_level(a, f"zarr-{path.name}-{k}").transpose(order) for k, a in enumerate(arrays)]
