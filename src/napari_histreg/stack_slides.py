"""A whole-slide stack at full resolution: every section warped, tile by tile, into one OME-Zarr.

:func:`warp_stack` writes an OME-NGFF 0.4 image with a z axis (``([c,] z, y, x)``, z = section
in stack order) on the reference section's level-0 grid: each section through its transform onto
the reference (:class:`~napari_histreg.stack.StackResult`, frames in level-0 pixels as
:func:`~napari_histreg.stack.register_stack` makes them from slides), with the very tile warp of
:func:`napari_histreg.tiled.warp_slide` (:func:`~napari_histreg.tiled.warp_block`: only the
source region a tile needs is read). Memory is that of a few tiles, whatever the number of
sections. The output is built in ``OUT.partial`` and renamed when complete; an interrupted run
continues with ``resume=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .io import HistRegInputError
from .progress import ProgressCallback

__all__ = ["warp_stack"]


def warp_stack(
    stack,
    slides: Sequence,
    output: str | os.PathLike,
    *,
    level: int = 0,
    tile: int = 2048,
    chunk: int | None = None,
    order: int = 1,
    cval: float | None = None,
    workers: int | None = None,
    threads=None,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback = None,
    device=None,
) -> Path:
    """Warp every section of ``stack`` (``slides``: one per section, in stack order: Slides,
    paths or arrays, any resolution of the registered sections) onto the reference grid at the
    resolution of the reference's ``level`` and write them as the z planes of one OME-Zarr at
    ``output``. A section without a transform (skipped, failed) is a plane of the fill value.

    ``cval``: the value outside each section (default: the reference slide's background, the
    median of the border of its smallest level). ``tile``, ``chunk``, ``order``, ``workers``,
    ``threads``, ``resume``, ``overwrite``: as :func:`napari_histreg.tiled.warp_slide`.
    ``progress`` gets ``"warp"`` and ``"pyramid"`` events. Returns ``output``."""
    from .conventions import default_device, to_tensor
    from .result import background_value
    from .slides import OmeZarrWriter, PartialOutput, open_slide, transform_digest, write_level0_and_pyramid
    from .slides.read import DEFAULT_MIN_SIZE
    from .threads import choose_threads, torch_threads
    from .tiled import _tile_and_chunk, target_frames, warp_block

    if len(slides) != len(stack.sections):
        raise ValueError(f"expected {len(stack.sections)} slides (one per section), got {len(slides)}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), not {order}")
    tile, chunk = _tile_and_chunk(int(tile), chunk)
    device = default_device(device if device is not None else "cpu")
    opened = [open_slide(s) for s in slides]
    reference = opened[stack.reference]
    if not 0 <= level < len(reference.levels):
        raise HistRegInputError(f"{reference.name}: has no level {level} (levels 0..{len(reference.levels) - 1})")
    out_shape = tuple(int(n) for n in reference.level_shape(level))
    channels = {s.channels for s in opened}
    dtypes = {np.dtype(s.dtype) for s in opened}
    if len(channels) > 1 or len(dtypes) > 1:
        raise HistRegInputError("the sections differ in channels or dtype "
                                f"({', '.join(f'{s.name}: {s.channels or 1} x {s.dtype}' for s in opened)}); "
                                "one OME-Zarr holds one kind: convert them first")
    channels, dtype = channels.pop(), dtypes.pop()
    if cval is None:
        cval = background_value(reference.read(len(reference.levels) - 1))
    # each section's level whose resolution ratio to its level 0 matches the reference level's
    ratio = reference.downsamples[level]
    levels = [s.level_for_downsample(float(ratio[0])) for s in opened]
    threads = choose_threads(threads)
    workers = max(1, int(workers or threads))
    job = {"kind": "warp stack", "sections": [str(s.path or s.name) for s in opened], "levels": levels,
           "reference": stack.reference, "shape": list(out_shape), "channels": channels, "dtype": str(dtype),
           "transforms": [None if sec.transform is None else transform_digest(sec.transform) for sec in stack.sections],
           "tile": tile, "chunk": chunk, "order": order, "cval": cval}
    inputs = [s.path for s in opened if s.path is not None]
    partial = PartialOutput(output, job, resume=resume, overwrite=overwrite, inputs=inputs)
    try:
        if not partial.complete:
            writer = OmeZarrWriter(partial.partial, out_shape, channels, dtype, chunk=chunk, min_size=DEFAULT_MIN_SIZE,
                                   fill_value=cval, name="registered stack", planes=len(opened))
            plan = []
            fields = {}
            for z, (section, slide, lev) in enumerate(zip(stack.sections, opened, levels)):
                if section.transform is None:
                    continue  # the fill value
                source_shape = slide.level_shape(lev)
                fields[z] = (to_tensor(section.transform.working_field, device=device),
                             *target_frames(section.transform, source_shape, out_shape), source_shape)
                plan += [(z, rows, cols) for rows, cols in writer.blocks(0, tile)]

            def one(block):
                z, rows, cols = block
                field, source_frame, target_frame, source_shape = fields[z]
                slide, lev = opened[z], levels[z]
                with torch.no_grad():
                    out = warp_block(field, source_frame, target_frame,
                                     lambda r, c: slide.read_region(lev, r, c), source_shape, rows, cols,
                                     channels, dtype, order=order, cval=cval)
                if out is not None:
                    writer.write(0, rows, cols, out, plane=z)
                return out is not None

            # torch's own threads share the budget with the tile threads (napari_histreg.threads)
            with torch_threads(max(1, threads // workers)):
                write_level0_and_pyramid(writer, partial, plan, one, workers, progress, "warp",
                                         f"{len(fields)} sections, {len(plan)} tiles of {tile} px")
            writer.finalise({"sections": [sec.name for sec in stack.sections], "reference": stack.reference,
                             "flags": [sec.flag for sec in stack.sections]})
            partial.finish()
    except BaseException:
        partial.discard_if_empty()
        raise
    finally:
        partial.close()
        for slide in opened:
            slide.close()
    return Path(output)

