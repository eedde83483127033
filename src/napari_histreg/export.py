"""Transforms other software can apply: a :class:`~napari_histreg.result.RegistrationResult` as an
ITK / SimpleITK transform file and its affine part as a plain 3x3 matrix (napari's layer
``affine``, what affinder writes). No napari, no Qt.

Direction of each format (the README repeats these lines):

* **ITK transform** (``.h5``; ``.tfm`` / ``.txt`` also round-trip): ITK's resampling
  convention, the same direction as our backward field: it maps a point of the *target*
  (ITK's fixed / output image) in physical ``(x, y)`` to the point of the *source* (moving
  image) it samples, so ``sitk.Resample(source, target, transform)`` warps the source onto the
  target and ``transform.TransformPoint`` carries target points into the source. Physical
  point = ``origin + spacing * (col, row)``; spacing and origin are given in ITK's ``(x, y)``
  order. A composite holds an ``AffineTransform`` and a ``DisplacementFieldTransform``; ITK
  applies a composite's transforms in reverse order of addition, so a target point goes
  through the displacement field first and the affine second: ``s = A(p + r(p))``.
* **Affine CSV** (:func:`write_affine_csv`): a 3x3 homogeneous matrix on ``(row, col)``
  original pixels, comma-separated, ``#`` comment lines on top (``np.loadtxt(path,
  delimiter=",")`` reads it). ``forward`` (the default) maps *source* pixels to *target* pixels:
  the napari layer ``affine`` that lays the source image over the target (data -> world when
  the target sits at scale 1 and translate 0), and the direction affinder writes (the moving
  layer's data coordinates into the reference's). ``backward`` is its inverse, target to source
  (the direction of the field and of the ITK file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .conventions import (
    apply_homogeneous,
    frame_matrix,
    homogeneous,
    physical_matrix,
    physical_to_rc,
    rc_to_physical,
)

#: file suffixes SimpleITK writes a composite with a displacement field to and reads back
#: exactly (checked in tests/test_export.py)
ITK_SUFFIXES = (".h5", ".tfm", ".txt")
#: first line of an affine CSV written here (how a later ``--overwrite`` recognises it)
CSV_MARK = "napari-histreg affine"
DIRECTIONS = ("forward", "backward")
#: a result whose field departs from its affine part by at most this (original source pixels) is affine-only
AFFINE_TOL_PX = 0.05

__all__ = [
    "AFFINE_TOL_PX",
    "ITK_SUFFIXES",
    "affine_matrix_3x3",
    "affine_residual_px",
    "check_export_outputs",
    "is_affine_only",
    "physical_affine",
    "sitk_map_target_points",
    "to_sitk_transform",
    "write_affine_csv",
    "write_itk_transform",
]


# --------------------------------------------------------------------------- affine part
def _backward_original(result) -> np.ndarray:
    """3x3 backward affine on original ``(row, col)`` pixels: target pixel -> source pixel, of
    the affine stage's working matrix seen through the two frames."""
    return np.linalg.inv(frame_matrix(result.source_frame)) @ homogeneous(result.matrix) @ frame_matrix(result.target_frame)


def affine_matrix_3x3(result, direction: str = "forward") -> np.ndarray:
    """The affine part of ``result`` (after the initial and affine stages) as a 3x3 homogeneous
    matrix on original ``(row, col)`` pixels.

    ``"forward"``: source pixel -> target pixel (napari's layer ``affine`` for the source laid
    over the target; affinder's CSV); ``"backward"``: target pixel -> source pixel (the
    direction of the field and of :meth:`~napari_histreg.result.RegistrationResult.map_target_points`).
    When the result is not affine-only (:func:`is_affine_only`) this is only its affine part.

    Convention: homogeneous column vectors ``(row, col, 1)`` in original pixels, pixel centres
    at integers."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    backward = _backward_original(result)
    return backward if direction == "backward" else np.linalg.inv(backward)


def affine_residual_px(result, points: int = 64) -> float:
    """Largest distance (original source pixels) between the result's map of target pixels and
    its affine part, over a grid of at most ``points`` x ``points`` target pixels spanning the
    target image where the working field has nodes (the rim of target pixels beyond the
    outermost nodes, less than half a working pixel wide, where every map of this package holds
    the field at its border value, is left out: there even a purely affine field is not affine).

    Convention: backward maps (target ``(row, col)`` -> source ``(row, col)``), original pixels."""
    h, w = result.target_shape
    nodes = np.asarray(result.working_field.shape[-2:], dtype=np.float64) - 1
    corners = result.target_frame.to_working(np.array([[0.0, 0.0], [h - 1.0, w - 1.0]]))
    low, high = np.clip(corners[0], 0, nodes), np.clip(corners[1], 0, nodes)
    rr, cc = np.meshgrid(np.linspace(low[0], high[0], min(h, points)), np.linspace(low[1], high[1], min(w, points)),
                         indexing="ij")
    target = result.target_frame.to_original(np.stack([rr.ravel(), cc.ravel()], axis=1))
    full = result.map_target_points(target)
    affine = apply_homogeneous(_backward_original(result), target)
    return float(np.linalg.norm(full - affine, axis=1).max())


def is_affine_only(result, tol_px: float = AFFINE_TOL_PX) -> bool:
    """Whether the result is its affine part: the field departs from the affine stage's matrix
    by at most ``tol_px`` original source pixels anywhere on the target (:func:`affine_residual_px`).
    Such a result can be shown in napari as a layer ``affine`` without resampling.

    Convention: distances in original source pixels."""
    return affine_residual_px(result) <= tol_px


# --------------------------------------------------------------------------- ITK
def physical_affine(result, source_spacing=(1.0, 1.0), target_spacing=(1.0, 1.0), source_origin=(0.0, 0.0),
                    target_origin=(0.0, 0.0)) -> np.ndarray:
    """The affine part as a 3x3 homogeneous matrix on ITK physical ``(x, y)``: a target point
    to the source point it samples (ITK's resampling direction).

    Convention: physical ``(x, y)`` = ``origin + spacing * (col, row)``, spacing and origin in
    ``(x, y)`` order (:func:`~napari_histreg.conventions.physical_matrix`)."""
    to_source = physical_matrix(source_spacing, source_origin)
    from_target = np.linalg.inv(physical_matrix(target_spacing, target_origin))
    return to_source @ _backward_original(result) @ from_target


def _field_image(result, source_spacing, target_spacing, source_origin, target_origin, affine=None):
    """The displacement field on the working grid in target physical space, as a SimpleITK
    ``sitkVectorFloat64`` image with the working grid's spacing and origin: at each node ``q``
    (target physical ``X_t``) the displacement ``X_s - X_t`` to the source point it samples, or,
    given the physical ``affine``, the residual ``A^-1 X_s - X_t`` (so ``A(X_t + r) = X_s``).
    Node values are exact; ITK's linear interpolation between them is ours, since every frame
    and the affine are affine maps. The grid is padded by one node on each side holding the
    border value (what this package's maps do beyond the outermost nodes), so ITK's map equals
    ours up to one working pixel beyond the working grid, which covers every target pixel."""
    import SimpleITK as sitk

    # one node more on each side, holding the border value: ITK's linear interpolation there is
    # this package's border rule (s = q + u(border) is bilinear on those cells)
    field = np.pad(np.asarray(result.working_field, dtype=np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = field.shape[-2:]
    rr, cc = np.meshgrid(np.arange(-1.0, h - 1.0), np.arange(-1.0, w - 1.0), indexing="ij")
    nodes = np.stack([rr.ravel(), cc.ravel()], axis=1)  # working (row, col), row-major like the field
    target_phys = physical_matrix(target_spacing, target_origin) @ np.linalg.inv(frame_matrix(result.target_frame))
    source_phys = physical_matrix(source_spacing, source_origin) @ np.linalg.inv(frame_matrix(result.source_frame))
    x_t = apply_homogeneous(target_phys, nodes)
    x_s = apply_homogeneous(source_phys, nodes + field.reshape(2, -1).T)
    if affine is not None:
        x_s = apply_homogeneous(np.linalg.inv(affine), x_s)
    displacement = (x_s - x_t).reshape(h, w, 2)  # (x, y) components: ITK's order
    image = sitk.GetImageFromArray(displacement, isVector=True)
    image = sitk.Cast(image, sitk.sitkVectorFloat64)
    # the padded working grid in target physical space: node (row, col) = (-1, -1) and one step along each axis
    corner = apply_homogeneous(target_phys, np.array([[-1.0, -1.0], [-1.0, 0.0], [0.0, -1.0]]))
    image.SetOrigin(tuple(float(v) for v in corner[0]))
    image.SetSpacing((float(corner[1, 0] - corner[0, 0]), float(corner[2, 1] - corner[0, 1])))
    return image


def to_sitk_transform(result, source_spacing=(1.0, 1.0), target_spacing=(1.0, 1.0), source_origin=(0.0, 0.0),
                      target_origin=(0.0, 0.0), composite: bool = True):
    """``result`` as a SimpleITK transform that maps target physical points to source physical
    points (ITK's resampling direction): ``sitk.Resample(source_image, target_image, transform)``
    warps the source onto the target and ``transform.TransformPoint(target_xy)`` equals
    :meth:`~napari_histreg.result.RegistrationResult.map_target_points` (in physical units).

    ``composite=True``: a ``CompositeTransform`` of the affine part (``AffineTransform``, added
    first) and the residual displacement field (``DisplacementFieldTransform``, added last and
    so applied first: ITK applies a composite's transforms in reverse order of addition);
    ``False``: one ``DisplacementFieldTransform`` holding the whole map. The field lies on the
    working grid (its nodes in target physical space) padded by one node, so it covers every
    target pixel; more than a working pixel beyond the grid ITK adds no displacement (the
    composite then continues affinely), where this package holds the border value.

    ``*_spacing`` / ``*_origin``: each image's pixel size and the physical position of its
    first pixel's centre, one number or ``(x, y)``; the defaults make physical units pixels.

    Convention: physical ``(x, y)`` = ``origin + spacing * (col, row)``, identity direction."""
    import SimpleITK as sitk

    spaces = {"source_spacing": source_spacing, "target_spacing": target_spacing, "source_origin": source_origin,
              "target_origin": target_origin}
    if not composite:
        return sitk.DisplacementFieldTransform(_field_image(result, **spaces))
    affine = physical_affine(result, **spaces)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:2, :2])) < 1e-12:
        raise ValueError("the result's affine part is singular; export it with composite=False")
    linear = sitk.AffineTransform(2)
    linear.SetMatrix(tuple(float(v) for v in affine[:2, :2].ravel()))
    linear.SetTranslation(tuple(float(v) for v in affine[:2, 2]))
    field = sitk.DisplacementFieldTransform(_field_image(result, **spaces, affine=affine))
    out = sitk.CompositeTransform(2)
    out.AddTransform(linear)
    out.AddTransform(field)  # added last: applied first
    return out


def sitk_map_target_points(transform, points_rc, source_spacing=(1.0, 1.0), target_spacing=(1.0, 1.0),
                           source_origin=(0.0, 0.0), target_origin=(0.0, 0.0)) -> np.ndarray:
    """Target ``(row, col)`` pixels through a SimpleITK transform (``TransformPoint``, target ->
    source), back in source ``(row, col)`` pixels: what another program applying an export does,
    to compare with :meth:`~napari_histreg.result.RegistrationResult.map_target_points`.

    Convention: as :func:`to_sitk_transform`."""
    xy = rc_to_physical(points_rc, target_spacing, target_origin)
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in xy]).reshape(-1, 2)
    return physical_to_rc(mapped, source_spacing, source_origin)


def _is_itk_export(path) -> bool:
    """An earlier export of ours: a transform file SimpleITK reads as what we write (a
    composite of an affine and a displacement field, or a displacement field alone)."""
    import SimpleITK as sitk

    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError:
        return False
    name = transform.GetName()
    if name == "DisplacementFieldTransform":
        return True
    if name != "CompositeTransform":
        return False
    composite = sitk.CompositeTransform(transform)
    names = [composite.GetNthTransform(i).GetName() for i in range(composite.GetNumberOfTransforms())]
    return names == ["AffineTransform", "DisplacementFieldTransform"]


def check_export_outputs(itk=None, csv=None, *, overwrite: bool = False, inputs=()) -> None:
    """Check the output paths of an export before anything is written (the output rule of
    :mod:`napari_histreg.outputs`: never an input, an existing file only with ``overwrite`` and
    only an earlier export; an ITK file needs one of :data:`ITK_SUFFIXES`). Raises
    :class:`~napari_histreg.io.HistRegInputError`."""
    from .io import HistRegInputError
    from .outputs import check_output_file

    if itk is not None:
        if Path(itk).suffix.lower() not in ITK_SUFFIXES:
            raise HistRegInputError(f"{itk}: an ITK transform file must end in {', '.join(ITK_SUFFIXES)}")
        check_output_file(itk, inputs=inputs, overwrite=overwrite, is_ours=_is_itk_export, what="ITK transform")
    if csv is not None:
        if itk is not None and Path(csv).resolve() == Path(itk).resolve():
            raise HistRegInputError(f"{csv}: given as both outputs; give the ITK file and the CSV different names")
        check_output_file(csv, inputs=inputs, overwrite=overwrite, is_ours=_is_affine_csv, what="affine CSV")


def write_itk_transform(result, path: str | os.PathLike, *, source_spacing=(1.0, 1.0), target_spacing=(1.0, 1.0),
                        source_origin=(0.0, 0.0), target_origin=(0.0, 0.0), composite: bool = True,
                        overwrite: bool = False, inputs=()) -> Path:
    """Write :func:`to_sitk_transform` to ``path`` (``.h5``, or the text formats ``.tfm`` /
    ``.txt``, much larger) atomically, under the output rule of :mod:`napari_histreg.outputs`
    (``inputs``: files it may never replace; an existing file is replaced only with
    ``overwrite`` and only when it is an earlier export). Returns the path.

    Convention: as :func:`to_sitk_transform` (target physical -> source physical)."""
    import SimpleITK as sitk

    from .io import atomic_path

    path = Path(path)
    check_export_outputs(itk=path, overwrite=overwrite, inputs=inputs)
    transform = to_sitk_transform(result, source_spacing, target_spacing, source_origin, target_origin, composite=composite)
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return path


def _is_affine_csv(path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().lstrip("# ").startswith(CSV_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def write_affine_csv(result, path: str | os.PathLike, direction: str = "forward", *, overwrite: bool = False,
                     inputs=()) -> Path:
    """Write :func:`affine_matrix_3x3` as a comma-separated 3x3 text file (``#`` comment lines
    first, then three rows; ``np.loadtxt(path, delimiter=",")`` reads it, as affinder's "load
    affine" does), atomically and under the output rule (see :func:`write_itk_transform`).

    Convention: ``forward`` = source ``(row, col)`` pixels -> target ``(row, col)`` pixels."""
    from .io import atomic_path

    path = Path(path)
    matrix = affine_matrix_3x3(result, direction)
    check_export_outputs(csv=path, overwrite=overwrite, inputs=inputs)
    arrow = "source (row, col) pixels -> target (row, col) pixels" if direction == "forward" else \
        "target (row, col) pixels -> source (row, col) pixels"
    header = [
        f"{CSV_MARK} ({direction}): 3x3 homogeneous matrix, {arrow}",
        "forward = napari layer affine of the source laid over the target, as affinder writes it",
    ]
    if not is_affine_only(result):
        header.append("the registration also has a non-rigid part that this matrix leaves out (export it as ITK)")
    with atomic_path(path) as tmp:
        np.savetxt(tmp, matrix, delimiter=",", header="\n".join(header))
    return path
