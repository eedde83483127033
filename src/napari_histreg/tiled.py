"""Apply a registration to a whole slide at full resolution, tile by tile.

:func:`warp_slide` never holds more than a few tiles of the slide in memory. For each output
tile (``tile x tile`` pixels of the target grid at the source's resolution) it

1. computes the backward field of that tile only, from the small working-grid field
   (:func:`~napari_histreg.conventions.field_between_frames` with ``rows`` / ``cols``): the field is
   upsampled per tile, never for the whole slide;
2. takes the bounding box of the source coordinates the tile samples, widened by the
   interpolation kernel's support (the **halo**: 1 pixel for bilinear, 0 for nearest) plus one
   pixel against rounding, clipped to the slide; a tile whose coordinates all fall outside the
   source is left unwritten (it reads as the fill value);
3. reads only that region of the lazy source level (only the chunks it overlaps), and samples
   it with ``grid_sample`` (``align_corners=True``, zero padding around ``cval``), exactly as
   :meth:`RegistrationResult.warp` does on a whole image;
4. writes the tile into level 0 of an OME-Zarr (NGFF 0.4, see :mod:`napari_histreg.slides`);
   tiles are aligned to the zarr chunks so that parallel writers never share a chunk.

A tile whose source region would exceed ``max_region`` times the tile's area (a strong
zoom-out) is split into quarters, so memory stays bounded for any transform. Then the lower
levels are built from the warped level 0 (2x2 means), the metadata is written, and
``OUT.zarr.partial`` is renamed to ``OUT.zarr``; optionally a pyramidal OME-TIFF is written
from it. Finished tiles are logged in ``OUT.zarr.partial/.histreg-progress`` so an interrupted
run continues with ``resume=True`` (same source, transform and settings) where it stopped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .conventions import cast_to_dtype, field_between_frames, pixels_to_normalised, sample, to_tensor
from .io import HistRegInputError
from .progress import ProgressCallback
from .result import RegistrationResult
from .slides import (
    DEFAULT_CHUNK,
    DEFAULT_MIN_SIZE,
    OmeZarrWriter,
    PartialOutput,
    Slide,
    open_slide,
    transform_digest,
    write_level0_and_pyramid,
    write_ome_tiff,
)

__all__ = ["HALO", "target_frames", "warp_block", "warp_slide"]

#: Source pixels needed beyond the sampled coordinates, per interpolation order.
HALO = {0: 0, 1: 1}
SAFETY = 1  # pixel, against float rounding of the coordinates


def _as_result(transform) -> RegistrationResult:
    if isinstance(transform, RegistrationResult):
        return transform
    return RegistrationResult.load(transform)


def target_frames(result: RegistrationResult, source_shape, target_shape=None):
    """``(source_frame, target_frame)`` for a source image of ``source_shape`` (any resolution
    of the registered source) and the target grid at the same resolution ratio (or of
    ``target_shape``)."""
    return result._frames_for(source_shape, target_shape)


def _source_coords(working_field, target_frame, source_frame, rows: slice, cols: slice) -> torch.Tensor:
    """``(2, h, w)`` absolute source ``(row, col)`` sampled by the target pixels ``[rows, cols]``."""
    coords = field_between_frames(working_field, target_frame, source_frame, rows=rows, cols=cols)
    coords[0] += torch.arange(rows.start, rows.stop, dtype=coords.dtype, device=coords.device)[:, None]
    coords[1] += torch.arange(cols.start, cols.stop, dtype=coords.dtype, device=coords.device)[None, :]
    if not torch.isfinite(coords).all():
        raise ValueError("the transform maps some pixels to non-finite coordinates")
    return coords


def _bbox(coords: torch.Tensor, halo: int, shape) -> tuple[int, int, int, int] | None:
    """Source rows ``[r0, r1)`` and columns ``[c0, c1)`` that interpolating at ``coords`` reads
    (the bounding box of the coordinates, widened by ``halo``), clipped to ``shape``; ``None``
    when that is empty (every coordinate lies outside the source)."""
    r0 = max(math.floor(float(coords[0].min())) - halo, 0)
    r1 = min(math.floor(float(coords[0].max())) + 2 + halo, int(shape[0]))
    c0 = max(math.floor(float(coords[1].min())) - halo, 0)
    c1 = min(math.floor(float(coords[1].max())) + 2 + halo, int(shape[1]))
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def warp_block(
    working_field: torch.Tensor,
    source_frame,
    target_frame,
    read_region,
    source_shape,
    rows: slice,
    cols: slice,
    channels: int | None,
    dtype,
    *,
    order: int = 1,
    cval: float = 0.0,
    max_region: float = 4.0,
    strip_pixels: int = 1 << 19,
) -> np.ndarray | None:
    """Warp one output block ``[rows, cols]`` of the target grid.

    ``read_region(rows, cols) -> (h, w[, C])`` reads a region of the source level of
    ``source_shape``; it is called once, for the bounding box of the coordinates the block
    samples plus the halo. The field and the sampling are computed in row strips of about
    ``strip_pixels`` pixels, so the float temporaries stay small whatever the block size.
    Returns the block ``(h, w[, C])`` of ``dtype``, or ``None`` when every coordinate falls
    outside the source (the block is all ``cval``).
    """
    h, w = rows.stop - rows.start, cols.stop - cols.start
    halo = HALO.get(order, 2) + SAFETY
    step = max(1, strip_pixels // max(w, 1))
    strips = []
    for s0 in range(rows.start, rows.stop, step):
        sub = slice(s0, min(s0 + step, rows.stop))
        coords = _source_coords(working_field, target_frame, source_frame, sub, cols)
        strips.append((sub, coords, _bbox(coords, halo, source_shape)))
    boxes = [b for _, _, b in strips if b is not None]
    if not boxes:
        return None
    r0, r1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
    c0, c1 = min(b[2] for b in boxes), max(b[3] for b in boxes)
    if (r1 - r0) * (c1 - c0) > max_region * max(h * w, 64 * 64) and min(h, w) > 64:
        # a zoom-out: the source region is much larger than the block; split to bound memory
        del strips
        out = np.empty((h, w) + ((channels,) if channels else ()), dtype=dtype)
        hr, hc = rows.start + h // 2, cols.start + w // 2
        any_data = False
        for sub_r in (slice(rows.start, hr), slice(hr, rows.stop)):
            for sub_c in (slice(cols.start, hc), slice(hc, cols.stop)):
                block = warp_block(working_field, source_frame, target_frame, read_region, source_shape, sub_r, sub_c,
                                   channels, dtype, order=order, cval=cval, max_region=max_region, strip_pixels=strip_pixels)
                view = out[sub_r.start - rows.start : sub_r.stop - rows.start, sub_c.start - cols.start : sub_c.stop - cols.start]
                view[...] = cval if block is None else block
                any_data = any_data or block is not None
        return out if any_data else None
    region = np.asarray(read_region(slice(r0, r1), slice(c0, c1)))
    if region.ndim == 2:
        region = region[..., None]
    out = np.empty((h, w, region.shape[-1]), dtype=dtype)
    mode = "nearest" if order == 0 else "bilinear"
    for sub, coords, box in strips:
        target = out[sub.start - rows.start : sub.stop - rows.start]
        if box is None:
            target[...] = cval
            continue
        br0, br1, bc0, bc1 = box
        part = region[br0 - r0 : br1 - r0, bc0 - c0 : bc1 - c0]
        tensor = torch.as_tensor(np.ascontiguousarray(np.moveaxis(part, -1, 0)), dtype=torch.float32)[None]
        if cval:
            tensor = tensor - cval  # not in place: the tensor may share memory with the caller's image
        coords[0] -= br0
        coords[1] -= bc0
        grid = pixels_to_normalised(coords.permute(1, 2, 0), (br1 - br0, bc1 - bc0))[None]
        sampled = sample(tensor, grid, mode=mode)[0]
        if cval:
            sampled += cval
        target[...] = cast_to_dtype(sampled.permute(1, 2, 0).numpy(), dtype, in_place=True)
    return out if channels else out[..., 0]


def _tile_and_chunk(tile: int, chunk: int | None) -> tuple[int, int]:
    if tile < 16:
        raise ValueError(f"tile must be at least 16 pixels, not {tile}")
    if chunk is None:
        chunk = DEFAULT_CHUNK if tile % DEFAULT_CHUNK == 0 else tile
    if tile % chunk:
        raise ValueError(f"tile ({tile}) must be a multiple of the zarr chunk ({chunk})")
    return tile, chunk


def warp_slide(
    transform,
    source,
    output: str | os.PathLike,
    *,
    tiff: str | os.PathLike | None = None,
    level: int = 0,
    tile: int = 2048,
    chunk: int | None = None,
    order: int = 1,
    cval: float = 0.0,
    workers: int | None = None,
    threads=None,
    min_size: int = DEFAULT_MIN_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    progress: ProgressCallback = None,
    tiff_compression: str | None = "zlib",
    max_region: float = 4.0,
    device=None,
) -> Path:
    """Warp ``source`` (a :class:`~napari_histreg.slides.Slide`, path or array) onto the target
    grid with ``transform`` (a :class:`RegistrationResult` or the path of a saved one) and
    write an OME-Zarr multiscale at ``output`` (and a pyramidal OME-TIFF at ``tiff``).

    ``level``: the source pyramid level to warp (0: full resolution); the output is the target
    grid at the same resolution ratio. ``tile``: output tile size in pixels (a multiple of the
    zarr ``chunk``, which defaults to 1024 or the tile); ``order``: 0 nearest, 1 bilinear;
    ``cval``: value outside the source; ``workers``: tiles warped in parallel threads (default:
    the thread choice of :func:`napari_histreg.threads.choose_threads` for ``threads``).
    ``progress`` gets ``"warp"``, ``"pyramid"`` and ``"tiff"`` events; raising
    :class:`~napari_histreg.RegistrationCancelled` from it stops the run, leaving
    ``OUTPUT.partial`` (never ``OUTPUT``) to continue with ``resume=True``.

    Before anything is written the inputs are checked, each failure a
    :class:`~napari_histreg.io.HistRegInputError` (or ``ValueError``) naming the problem: the
    device, the transform sidecar, and whether ``source`` is the slide the transform was
    computed for (its shape must be proportional to the registered source's, and its
    thumbnail must match the fingerprint kept in the transform; ``force`` warns instead).
    ``overwrite`` replaces an earlier output of histreg only (see :mod:`napari_histreg.outputs`).
    Returns ``output``.
    """
    from .conventions import default_device
    from .outputs import check_output_file, is_tool_tiff
    from .threads import choose_threads

    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), not {order}")
    tile, chunk = _tile_and_chunk(int(tile), chunk)
    device = default_device(device if device is not None else "cpu")  # an unavailable device fails here, once
    transform_files = _transform_files(transform)
    result = _as_result(transform)
    slide: Slide = open_slide(source)
    output = Path(output)
    if not 0 <= level < len(slide.levels):
        raise HistRegInputError(f"{slide.name}: has no level {level} (levels 0..{len(slide.levels) - 1})")
    source_shape = slide.level_shape(level)
    check_slide_matches(result, slide, level, force=force)
    source_frame, target_frame = target_frames(result, source_shape)
    target_shape = tuple(int(n) for n in target_frame.original_shape)
    channels, dtype = slide.channels, np.dtype(slide.dtype)
    inputs = [slide.path, *transform_files]
    if tiff is not None:
        tiff = Path(tiff)
        if tiff.resolve() == output.resolve():
            raise HistRegInputError(f"{tiff}: the OME-TIFF and the OME-Zarr outputs must differ")
        if not (resume and tiff.exists() and is_tool_tiff(tiff)):
            check_output_file(tiff, inputs=inputs, overwrite=overwrite, is_ours=is_tool_tiff, what="OME-TIFF")
    threads = choose_threads(threads)
    workers = max(1, int(workers or threads))

    job = {
        "kind": "warp",
        "source": str(slide.path or slide.name),
        "source_level": level,
        "source_shape": list(source_shape),
        "target_shape": list(target_shape),
        "channels": channels,
        "dtype": str(dtype),
        "transform": transform_digest(result),
        "tile": tile,
        "chunk": chunk,
        "order": order,
        "cval": cval,
        "min_size": min_size,
    }
    partial = PartialOutput(output, job, resume=resume, overwrite=overwrite, inputs=inputs)
    try:
        if not partial.complete:
            # torch's own threads share the budget with the tile threads (oversubscribed OpenMP
            # threads spin against each other: napari_histreg.threads)
            previous = torch.get_num_threads()
            torch.set_num_threads(max(1, threads // workers))
            try:
                _warp_into(partial, result, slide, level, source_frame, target_frame, target_shape, channels, dtype,
                           tile=tile, chunk=chunk, order=order, cval=cval, workers=workers, min_size=min_size,
                           progress=progress, max_region=max_region, device=device)
            finally:
                torch.set_num_threads(previous)
    except BaseException:
        partial.discard_if_empty()  # nothing done: nothing for --resume to continue
        raise
    finally:
        partial.close()
    if tiff is not None:
        write_ome_tiff(open_slide(output), tiff, tile=min(512, tile), compression=tiff_compression, progress=progress)
    return output


def _transform_files(transform) -> list[Path]:
    """The sidecar and field files of a transform given as a path (inputs: never outputs)."""
    if isinstance(transform, RegistrationResult):
        return []
    base = Path(transform)
    json_path = base.with_suffix(".json") if base.suffix != ".json" else base
    return [json_path, json_path.with_suffix(".mha")]


def check_slide_matches(result: RegistrationResult, slide: Slide, level: int = 0, force: bool = False) -> float | None:
    """Raise :class:`HistRegInputError` unless ``slide`` is the source the transform was computed
    for: the level's shape must be proportional to the registered source's (any resolution of
    it is fine), and the slide's thumbnail must correlate with the transform's fingerprint above
    :data:`~napari_histreg.result.FINGERPRINT_MATCH`. ``force``: warn instead of raising.
    Returns the thumbnail correlation (None where the transform carries no fingerprint)."""
    import warnings

    from .result import FINGERPRINT_MATCH, FINGERPRINT_SIZE, fingerprint, fingerprint_similarity
    from .stages.preprocess import to_grey

    problems = []
    h, w = slide.level_shape(level)
    hs, ws = result.source_shape
    expected_w = ws * h / hs
    if abs(w - expected_w) > max(2.0, 0.002 * w):
        problems.append(
            f"it is {w}x{h} (w x h) at level {level}, not in the proportions of the transform's source ({ws}x{hs})"
        )
    similarity = None
    reference = result.source_fingerprint()
    if reference is not None and not problems:
        small = slide.level_for(FINGERPRINT_SIZE * 8)
        similarity = fingerprint_similarity(reference, fingerprint(to_grey(slide.read(small))))
        if similarity < FINGERPRINT_MATCH:
            problems.append(
                f"its thumbnail does not match the transform's source (correlation {similarity:.2f}, below {FINGERPRINT_MATCH})"
            )
    if problems:
        text = f"{slide.path or slide.name}: not the slide this transform was computed for: {'; '.join(problems)}"
        if not force:
            raise HistRegInputError(text + "; pass --force (force=True) to warp it anyway")
        warnings.warn(text + " (warped anyway: --force)", stacklevel=3)
    return similarity


def _warp_into(partial, result, slide, level, source_frame, target_frame, target_shape, channels, dtype, *, tile, chunk,
               order, cval, workers, min_size, progress, max_region, device):
    name = f"{slide.name} warped"
    writer = OmeZarrWriter(partial.partial, target_shape, channels, dtype, chunk=chunk, min_size=min_size,
                           fill_value=cval, name=name)
    working_field = to_tensor(result.working_field, device=device)
    source_shape = slide.level_shape(level)

    def read_region(rows, cols):
        return slide.read_region(level, rows, cols)

    def one(block):
        rows, cols = block
        with torch.no_grad():
            out = warp_block(working_field, source_frame, target_frame, read_region, source_shape, rows, cols,
                             channels, dtype, order=order, cval=cval, max_region=max_region)
        if out is not None:
            writer.write(0, rows, cols, out)
        return out is not None

    blocks = writer.blocks(0, tile)
    write_level0_and_pyramid(writer, partial, blocks, one, workers, progress, "warp", f"{len(blocks)} tiles of {tile} px")
    writer.finalise(
        {
            "warped_from": partial.job["source"],
            "source_level": level,
            "transform": partial.job["transform"],
            "order": order,
            "cval": cval,
        }
    )
    partial.finish()
