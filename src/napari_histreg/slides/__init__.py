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

from .blocks import release_memory, run_blocks
from .jobs import PartialOutput, partial_path
from .read import (
    DEFAULT_CHUNK,
    DEFAULT_MIN_SIZE,
    JOB_FILE,
    NGFF_VERSION,
    PROGRESS_FILE,
    TIFF_SUFFIXES,
    Slide,
    frame_to_level0,
    halve,
    open_slide,
)
from .register import register_slides, transform_digest
from .write import (
    OmeZarrWriter,
    to_zarr_pyramid,
    write_level0_and_pyramid,
    write_ome_tiff,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_MIN_SIZE",
    "JOB_FILE",
    "NGFF_VERSION",
    "PROGRESS_FILE",
    "OmeZarrWriter",
    "PartialOutput",
    "Slide",
    "TIFF_SUFFIXES",
    "frame_to_level0",
    "halve",
    "open_slide",
    "partial_path",
    "register_slides",
    "release_memory",
    "run_blocks",
    "to_zarr_pyramid",
    "transform_digest",
    "write_level0_and_pyramid",
    "write_ome_tiff",
]
