"""``histreg export-transform``: a saved transform as an ITK transform file and an affine CSV."""

from __future__ import annotations

from pathlib import Path

from .common import EXIT_OK, _add_overwrite_option, _say, add_pixel_size_options, pixel_size_arg, pixel_size_option


def _add_export_command(sub) -> None:
    p = sub.add_parser(
        "export-transform",
        help="write a saved transform as an ITK transform (SimpleITK, elastix tools) and an affine CSV",
        description="Write TRANSFORM.json (with its .mha, as `histreg register` saves it) as an ITK transform file "
        "(--itk OUT.h5: a composite of an affine and a displacement field that SimpleITK / ITK apply, in physical "
        "units; ITK's resampling direction: target points to source points) and/or its affine part as a 3x3 "
        "matrix CSV (--affine-csv OUT.csv: (row, col) pixels, source to target, the napari layer affine that "
        "affinder writes). Physical units are pixels unless --pixel-size (or the per-image options) is given.",
        epilog="example: histreg export-transform out/transform.json --itk out/transform.h5 --affine-csv out/affine.csv "
        "--pixel-size 0.5",
    )
    p.add_argument("transform", metavar="TRANSFORM.json", help="a transform saved by histreg (the .json sidecar)")
    p.add_argument("--itk", metavar="OUT.h5", help="ITK transform file to write (.h5; .tfm / .txt: text, much larger)")
    p.add_argument("--affine-csv", metavar="OUT.csv", help="affine part as a 3x3 matrix CSV to write")
    p.add_argument("--pixel-size", type=pixel_size_arg, default=None, metavar="UM[,UM]",
                   help="pixel size of both images in physical units, one number or row,col (ITK spacing; default: 1, "
                   "i.e. pixels)")
    for whose in ("source", "target"):
        add_pixel_size_options(p, f"{whose}-pixel-size", whose, f"pixel size of the {whose} image (overrides --pixel-size)")
    p.add_argument("--displacement-only", action="store_true",
                   help="write one displacement field holding the whole map instead of affine + displacement")
    p.add_argument("--affine-direction", choices=("forward", "backward"), default="forward",
                   help="forward: source pixels to target pixels (napari layer affine, affinder; the default); "
                   "backward: target to source")
    _add_overwrite_option(p, "export")
    p.set_defaults(func=cmd_export_transform)


def cmd_export_transform(args) -> int:
    from ..export import (
        AFFINE_TOL_PX,
        affine_residual_px,
        check_export_outputs,
        write_affine_csv,
        write_itk_transform,
    )
    from ..io import HistRegInputError
    from ..result import RegistrationResult

    if not args.itk and not args.affine_csv:
        raise HistRegInputError(f"{args.transform}: nothing to export: give --itk OUT.h5 and/or --affine-csv OUT.csv")
    result = RegistrationResult.load(args.transform)
    sidecar = Path(args.transform)
    inputs = [sidecar, sidecar.with_suffix(".mha")]
    check_export_outputs(args.itk, args.affine_csv, overwrite=args.overwrite, inputs=inputs)  # before writing either
    default = args.pixel_size or (1.0, 1.0)
    source_size = pixel_size_option(args.source_pixel_size, args.source_pixel_size_from, "--source-pixel-size", default)
    target_size = pixel_size_option(args.target_pixel_size, args.target_pixel_size_from, "--target-pixel-size", default)
    # (row, col) on the command line, ITK's (x, y) = (col, row) for the transform
    source_xy, target_xy = source_size[::-1], target_size[::-1]
    residual = affine_residual_px(result)
    kind = "affine only" if residual <= AFFINE_TOL_PX else f"non-rigid (up to {residual:.1f} px beyond its affine part)"
    _say(f"{sidecar.name}: source {result.source_shape[0]}x{result.source_shape[1]} -> target "
         f"{result.target_shape[0]}x{result.target_shape[1]}, {kind}")
    if args.itk:
        write_itk_transform(result, args.itk, source_spacing=source_xy, target_spacing=target_xy,
                            composite=not args.displacement_only, overwrite=args.overwrite, inputs=inputs)
        what = "displacement field" if args.displacement_only else "affine + displacement field"
        _say(f"written {args.itk} (ITK {what}; target -> source, pixel size (row, col) source {_size(source_size)}, target {_size(target_size)})")
    if args.affine_csv:
        write_affine_csv(result, args.affine_csv, args.affine_direction, overwrite=args.overwrite, inputs=inputs)
        note = "" if residual <= AFFINE_TOL_PX else "; the non-rigid part is only in the ITK file"
        _say(f"written {args.affine_csv} (3x3, (row, col) pixels, {args.affine_direction}{note})")
    return EXIT_OK


def _size(row_col) -> str:
    return f"{row_col[0]:g}" if row_col[0] == row_col[1] else f"{row_col[0]:g},{row_col[1]:g}"
