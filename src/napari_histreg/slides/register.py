"""Registering two slides on the pyramid level nearest the working size, in level-0 pixels."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..conventions import cast_to_dtype
from ..io import check_image
from ..progress import ProgressCallback
from .read import frame_to_level0, open_slide


# --------------------------------------------------------------------------- registration
def _resample_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased resampling of ``(H, W[, C])`` to ``shape``, dtype kept."""
    import torch

    from ..stages.preprocess import resample

    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    tensor = torch.as_tensor(np.ascontiguousarray(chw), dtype=torch.float32)[None]
    out = cast_to_dtype(resample(tensor, shape)[0].numpy(), image.dtype)
    return out[0] if image.ndim == 2 else np.moveaxis(out, 0, -1)


def register_slides(
    source,
    target,
    config=None,
    *,
    device=None,
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
    from ..pipeline import RegistrationConfig, register

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
    result = register(src_arr, tgt_arr, config, device=device, progress=progress, pipeline=pipeline,
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
