"""``histreg transform-annotations``: GeoJSON annotations (QuPath) through a transform."""

from __future__ import annotations

import warnings

from .common import EXIT_OK, _add_overwrite_option, _say, add_pixel_size_options, pixel_size_option


def _add_annotations_command(sub) -> None:
    p = sub.add_parser(
        "transform-annotations",
        help="map GeoJSON annotations (QuPath) through a transform",
        description="Map the annotations of IN.geojson (QuPath's GeoJSON export: FeatureCollection of Polygon, "
        "MultiPolygon, LineString, Point, MultiPoint features; cell nuclei included) from the source into the "
        "target frame of TRANSFORM.json (a histreg transform), or with --inverse from the target into the source "
        "frame, and write OUT.geojson with every property kept. Coordinates are x = column, y = row from the top-left "
        "corner, in pixels of the registered images (level 0 of a whole slide), or with --units um in micrometres "
        "(pixel sizes from --pixel-size / --target-pixel-size or read from the slides' metadata). Long edges are "
        "densified first so they follow the deformation; polygons that are not valid after mapping are reported.",
        epilog="example: histreg transform-annotations ihc.geojson out/transform.json -o ihc_on_he.geojson",
    )
    p.add_argument("input", metavar="IN.geojson", help="annotations (GeoJSON; QuPath export)")
    p.add_argument("transform", metavar="TRANSFORM.json", help="a transform written by histreg (.json beside its .mha)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.geojson", help="the mapped annotations")
    p.add_argument("--inverse", action="store_true",
                   help="IN is in the target frame: map it into the source frame (the transform's exact direction)")
    p.add_argument("--units", choices=("px", "um"), default=None,
                   help="coordinates in pixels or micrometres (default: um when a pixel size is given, else px)")
    add_pixel_size_options(p, "pixel-size", "source", "the source slide's pixel size in µm (one number, or row,col)")
    add_pixel_size_options(p, "target-pixel-size", "target", "the target slide's pixel size in µm (default: --pixel-size)")
    _add_overwrite_option(p, "GeoJSON output")
    p.set_defaults(func=cmd_transform_annotations)


def cmd_transform_annotations(args) -> int:
    from ..annotations import transform_geojson_file

    pixel_size = pixel_size_option(args.pixel_size, args.pixel_size_from, "--pixel-size")
    target = pixel_size_option(args.target_pixel_size, args.target_pixel_size_from, "--target-pixel-size")
    units = args.units or ("um" if (pixel_size or target) else "px")
    if units == "px" and (pixel_size or target):
        warnings.warn("pixel sizes are ignored with --units px", stacklevel=1)
    written, report = transform_geojson_file(
        args.input, args.transform, args.output, inverse=args.inverse, pixel_size=pixel_size,
        target_pixel_size=target, units=units, overwrite=args.overwrite,
    )
    for line in report.messages():
        warnings.warn(f"{args.input}: {line}", stacklevel=1)
    direction = "target -> source" if args.inverse else "source -> target"
    _say(f"mapped {report.features} features ({report.points} positions, {direction}, {units}); "
         f"{len(report.invalid)} not valid after mapping; written {written}")
    return EXIT_OK
