"""elastix (through ``itk-elastix``) as a benchmark peer, returning a napari-histreg result.

The peer sees exactly the images our pipeline sees: both RGB images go through
:func:`napari_histreg.stages.preprocess.preprocess_pair` with the same
:class:`~napari_histreg.stages.preprocess.PreprocessConfig` (luminance grey, inverted so tissue
is bright and background near 0, anti-aliased resampling to the same working size, entropy
histogram matching, centred padding to a common grid). elastix then registers them with its
default parameter maps, ``affine`` followed by ``bspline`` (``itk.ParameterObject.New()``,
``GetDefaultParameterMap``); only ``RandomSeed`` (reproducibility) and ``WriteResultImage``
(off: the warped image comes from the field) are set. ``initialisation="CenterOfGravity"``
adds elastix's automatic centre-of-gravity initialisation to the affine map (the default maps
start from the identity and miss large shifts). Pass ``working_size=None`` to run it on the
full-resolution images instead.

Direction. elastix registers a *moving* image onto a *fixed* one and its transform ``T`` maps
fixed points to moving points: ``result(x) = moving(T(x))``. With fixed = target and
moving = source, ``T(p) - p`` is exactly our backward field (``warped(p) = source(p + u(p))``),
so the deformation field that transformix computes on the fixed (target) grid, reordered from
``(dx, dy)`` to ``(d-row, d-col)``, is a :class:`~napari_histreg.RegistrationResult`
``working_field``. Source landmarks are then brought into the target frame by the same
fixed-point inversion our pipeline uses (:meth:`RegistrationResult.map_source_points`); feeding
the source landmarks to transformix directly would apply ``T`` the wrong way round
(:func:`wrong_direction_points` does that, for the check in ``tests/test_benchmarks.py``).

``itk`` is imported lazily; :func:`available` says whether it can be.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_histreg.conventions import map_target_to_source
from napari_histreg.result import RegistrationResult
from napari_histreg.stages.preprocess import PreprocessConfig, preprocess_pair

NAME = "elastix"


def available() -> bool:
    """True when ``itk`` with the elastix module (``pip install itk-elastix``) is importable."""
    if importlib.util.find_spec("itk") is None:
        return False
    try:
        import itk

        return hasattr(itk, "ParameterObject") and hasattr(itk, "elastix_registration_method")
    except Exception:  # a broken install counts as absent
        return False


def version() -> str:
    try:
        from importlib.metadata import version as _version

        return _version("itk-elastix")
    except Exception:
        return "unknown"


@dataclasses.dataclass
class ElastixConfig:
    """``preprocess``: the preprocessing our pipeline uses (pass the same object as the
    :class:`~napari_histreg.RegistrationConfig` being compared); ``working_size``: longer side
    of the grid elastix runs on (``"same"``: ``preprocess.working_size``; ``None``: full
    resolution). ``max_iterations``: override elastix's ``MaximumNumberOfIterations`` (default
    maps: 256 per resolution), for fast tests only. ``initialisation``: ``None`` (the default
    maps: no initial transform) or an elastix ``AutomaticTransformInitializationMethod``
    (``"CenterOfGravity"``, ``"GeometricalCenter"``) added to the first map. ``threads``: ITK
    threads (``None``: ITK's default, all cores). ``seed``: elastix ``RandomSeed`` (its random
    sampler)."""

    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    working_size: int | str | None = "same"
    max_iterations: int | None = None
    initialisation: str | None = None
    threads: int | None = None
    seed: int = 0
    transforms: tuple[str, ...] = ("affine", "bspline")


def parameter_object(config: ElastixConfig):
    """elastix's default parameter maps for ``config.transforms``, in order."""
    import itk

    params = itk.ParameterObject.New()
    for name in config.transforms:
        pmap = params.GetDefaultParameterMap(name)
        pmap["RandomSeed"] = [str(int(config.seed))]
        if config.initialisation and params.GetNumberOfParameterMaps() == 0:
            pmap["AutomaticTransformInitialization"] = ["true"]
            pmap["AutomaticTransformInitializationMethod"] = [config.initialisation]
        pmap["WriteResultImage"] = ["false"]  # the warped image comes from the field, like ours
        if config.max_iterations is not None:
            pmap["MaximumNumberOfIterations"] = [str(int(config.max_iterations))]
        params.AddParameterMap(pmap)
    return params


def _itk_image(array: np.ndarray):
    import itk

    return itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))  # a copy: a view would dangle


def register(source: np.ndarray, target: np.ndarray, config: ElastixConfig | None = None) -> RegistrationResult:
    """Register ``source`` onto ``target`` (numpy arrays, grey or RGB) with elastix.

    Returns a :class:`RegistrationResult` whose ``working_field`` is elastix's deformation field
    on the common working grid; ``timings`` has ``preprocess``, ``registration`` (affine +
    B-spline) and ``field`` (transformix deformation field) seconds plus ``total``.
    """
    import itk

    config = config or ElastixConfig()
    timings: dict[str, float] = {}
    if config.threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(config.threads))

    start = time.perf_counter()
    size = config.working_size
    if size == "same":
        size = config.preprocess.working_size
    elif size is None:  # full resolution: the working grid is never upsampled
        size = max(*source.shape[:2], *target.shape[:2])
    preprocess = dataclasses.replace(config.preprocess, working_size=int(size))
    pair = preprocess_pair(source, target, preprocess, device="cpu")
    fixed, moving = _itk_image(pair.target), _itk_image(pair.source)
    timings["preprocess"] = round(time.perf_counter() - start, 4)

    start = time.perf_counter()
    params = parameter_object(config)
    # Threads go through ITK's global default (set above): the ``number_of_threads`` argument
    # crashes itk-elastix 0.25 with the B-spline map.
    _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False)
    timings["registration"] = round(time.perf_counter() - start, 4)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="histreg-transformix-") as folder:  # transformix writes a file
        field_image = itk.transformix_deformation_field(moving, transform, log_to_console=False,
                                                        output_directory=folder + os.sep)
        field_xy = np.array(itk.array_from_image(field_image), dtype=np.float32)  # (H, W, 2): (dx, dy)
    field = np.ascontiguousarray(np.stack([field_xy[..., 1], field_xy[..., 0]]))  # (2, H, W): (d-row, d-col)
    timings["field"] = round(time.perf_counter() - start, 4)
    timings["total"] = round(sum(timings.values()), 4)

    info = {"method": NAME, "itk_elastix": version(), "config": dataclasses.asdict(config), "device": "cpu",
            "parameter_maps": [dict(transform.GetParameterMap(i)) for i in range(transform.GetNumberOfParameterMaps())]}
    info["transform_parameters"] = transform
    return RegistrationResult(field, pair.source_frame, pair.target_frame, np.eye(2, 3), timings, info,
                              pair.source, pair.target)


def wrong_direction_points(result: RegistrationResult, source_rc) -> np.ndarray:
    """Source points pushed through elastix's transform ``T`` as if it mapped source to target
    (what running transformix on the source landmarks after fixed=target, moving=source does).
    This is the *wrong* direction; only the direction check uses it."""
    working = result.source_frame.to_working(source_rc)
    mapped = map_target_to_source(working, result.working_field)
    return result.target_frame.to_original(mapped)


def transformix_points(result: RegistrationResult, target_rc) -> np.ndarray:
    """Target points (original pixels) through elastix's own point transform (transformix with a
    fixed point set): gives source points (original pixels). Used to check that the field read
    from transformix has the layout :class:`RegistrationResult` expects."""
    import itk

    transform = result.info["transform_parameters"]
    working = result.target_frame.to_working(target_rc)
    with tempfile.TemporaryDirectory(prefix="histreg-transformix-") as folder:
        points_file = Path(folder) / "points.txt"
        lines = ["point", str(len(working))] + [f"{c:.6f} {r:.6f}" for r, c in working]  # physical (x, y)
        points_file.write_text("\n".join(lines) + "\n")
        moving = _itk_image(result.working_source)
        filt = itk.TransformixFilter.New(moving)
        filt.SetTransformParameterObject(transform)
        filt.SetFixedPointSetFileName(str(points_file))
        filt.SetOutputDirectory(folder + os.sep)
        filt.SetLogToConsole(False)
        filt.UpdateLargestPossibleRegion()
        text = (Path(folder) / "outputpoints.txt").read_text().splitlines()
    out = []
    for line in text:
        part = line.split("OutputPoint = [")[1].split("]")[0].split()
        out.append((float(part[1]), float(part[0])))  # (x, y) -> (row, col)
    return result.source_frame.to_original(np.asarray(out))


def strip_unpicklable(result: RegistrationResult) -> RegistrationResult:
    """A copy without the itk transform object in ``info`` (for saving or pickling)."""
    out = copy.copy(result)
    out.info = {k: v for k, v in result.info.items() if k != "transform_parameters"}
    return out
