"""Writing pyramids: OME-Zarr (NGFF 0.4) and OME-TIFF, level 0 then 2x2 means (see the package doc)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..conventions import cast_to_dtype
from ..io import HistRegInputError, atomic_path
from ..progress import ProgressCallback, report
from .blocks import run_blocks
from .jobs import PartialOutput
from .read import DEFAULT_CHUNK, DEFAULT_MIN_SIZE, NGFF_VERSION, open_slide


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
    return cast_to_dtype(mean, dtype)


class OmeZarrWriter:
    """Writes an OME-NGFF 0.4 multiscale image (zarr v2 format) into ``path``.

    ``shape`` is level 0's ``(H, W)``; ``channels`` ``None`` for grey or the channel count
    (stored ``(c, y, x)``). ``chunk``: the ``(y, x)`` chunk size, also the unit of writing.
    Level 0 is written with :meth:`write`; :meth:`build_pyramid` then fills the lower levels
    from it, and :meth:`finalise` writes the ``multiscales`` metadata (last). Reopening an
    existing folder (a resumed run) keeps the arrays if they match.
    """

    def __init__(self, path, shape, channels: int | None, dtype, *, chunk: int = DEFAULT_CHUNK,
                 min_size: int = DEFAULT_MIN_SIZE, fill_value=0, name: str = "image", compressor: Any = "default",
                 planes: int | None = None):
        import zarr

        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = channels
        #: a z axis of this many planes (a stack of sections), stored ``([c,] z, y, x)``; None: 2D
        self.planes = int(planes) if planes else None
        self.dtype = np.dtype(dtype)
        self.chunk = int(chunk)
        self.name = name
        self.shapes = pyramid_shapes(self.shape, min_size)
        self.fill_value = np.array(fill_value).astype(self.dtype).item()
        self.group = zarr.open_group(str(self.path), mode="a", zarr_format=2)
        self.arrays = []
        z = (self.planes,) if self.planes else ()
        for k, (h, w) in enumerate(self.shapes):
            full = ((channels,) if channels else ()) + z + (h, w)
            chunks = ((channels,) if channels else ()) + ((1,) if self.planes else ()) + (min(self.chunk, h), min(self.chunk, w))
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
    def _index(self, plane: int | None, rows: slice, cols: slice) -> tuple:
        if (plane is None) != (self.planes is None):
            raise ValueError("give a plane exactly when the image has a z axis")
        return ((slice(None),) if self.channels else ()) + ((plane,) if self.planes else ()) + (rows, cols)

    def write(self, level: int, rows: slice, cols: slice, block: np.ndarray, plane: int | None = None) -> None:
        """Store ``block`` (``(h, w)`` or ``(h, w, C)``) at ``[rows, cols]`` of ``level`` (of z
        ``plane`` for an image with a z axis)."""
        index = self._index(plane, rows, cols)
        self.arrays[level][index] = np.moveaxis(block, -1, 0) if self.channels else block

    def blocks(self, level: int, size: int | None = None) -> list[tuple[slice, slice]]:
        """The ``(rows, cols)`` blocks of ``level`` on a grid of ``size`` (a multiple of the chunk)."""
        size = size or self.chunk
        h, w = self.shapes[level]
        return [(slice(r, min(r + size, h)), slice(c, min(c + size, w))) for r in range(0, h, size) for c in range(0, w, size)]

    def build_pyramid(self, workers: int = 1, progress: ProgressCallback = None, partial: PartialOutput | None = None) -> None:
        """Fill levels 1.. from level 0, chunk by chunk (2x2 means)."""
        total = sum(len(self.blocks(k)) for k in range(1, len(self.shapes))) * (self.planes or 1)
        done = 0
        report(progress, "pyramid", 0, total, f"{len(self.shapes) - 1} levels")
        for k in range(1, len(self.shapes)):
            blocks = self.blocks(k)
            if self.planes:  # every plane's blocks
                blocks = [(z, rows, cols) for z in range(self.planes) for rows, cols in blocks]
            if partial is not None and partial.is_done(f"pyramid {k}"):
                done += len(blocks)
                continue
            source, target = self.arrays[k - 1], self.arrays[k]

            def one(block, source=source, target=target):
                plane, rows, cols = block if self.planes else (None, *block)
                src_rows = slice(2 * rows.start, 2 * rows.stop)
                src_cols = slice(2 * cols.start, 2 * cols.stop)
                data = source[self._index(plane, src_rows, src_cols)]
                data = data if self.channels else data[None]
                mean = _mean2(data, self.dtype)
                target[self._index(plane, rows, cols)] = mean if self.channels else mean[0]

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
        axes = ([{"name": "c", "type": "channel"}] if self.channels else []) + (
            [{"name": "z", "type": "space"}] if self.planes else []) + [
            {"name": "y", "type": "space"}, {"name": "x", "type": "space"},
        ]
        datasets = []
        for k in range(len(self.shapes)):
            f = float(2**k)
            scale = ([1.0] if self.channels else []) + ([1.0] if self.planes else []) + [f, f]
            datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
        from .. import __version__

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
    """The progress key of a ``(rows, cols)`` block, or ``(plane, rows, cols)`` of an image with a z axis."""
    *plane, rows, cols = block
    return f"L{level} " + (f"z{plane[0]} " if plane else "") + f"{rows.start} {cols.start}"


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

    from .. import __version__

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


