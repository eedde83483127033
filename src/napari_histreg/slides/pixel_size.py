"""A slide's pixel size in micrometres, from its metadata: what turns micrometre annotations
into pixels (:mod:`napari_histreg.annotations`).

Convention: ``(row_um, col_um)`` = (PhysicalSizeY, PhysicalSizeX), micrometres per level-0 pixel.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

#: micrometres per unit, for the unit names OME-XML, OME-Zarr and TIFF use
_UNITS_UM = {
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micrometer": 1.0, "micrometre": 1.0, "micron": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "å": 1e-4, "angstrom": 1e-4,
    "in": 25400.0, "inch": 25400.0,
}


def _um_per(unit) -> float | None:
    return _UNITS_UM.get(str(unit).strip().lower()) if unit is not None else None


def read_pixel_size(path: str | os.PathLike) -> tuple[float, float] | None:
    """``(row_um, col_um)`` of a slide or image file's level 0, or None when its metadata does
    not say. Read in this order: OME-XML ``PhysicalSizeY`` / ``PhysicalSizeX`` (with their
    units, default µm); Aperio's ``MPP``; the TIFF ``YResolution`` / ``XResolution`` tags with
    ``ResolutionUnit`` centimetre or inch; an OME-Zarr's ``coordinateTransformations`` scale of
    its first dataset when the y/x axes have a length unit."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".zarr":
        return _zarr_pixel_size(path)
    if path.suffix.lower() in (".tif", ".tiff", ".btf", ".svs", ".qptiff", ".ndpi", ".scn"):
        return _tiff_pixel_size(path)
    return None


def _positive(values) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col) else None


def _ome_pixel_size(xml: str) -> tuple[float, float] | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        sizes = []
        for axis in ("Y", "X"):
            value = element.get(f"PhysicalSize{axis}")
            factor = _um_per(element.get(f"PhysicalSize{axis}Unit", "µm"))
            if value is None or factor is None:
                return None
            sizes.append(float(value) * factor)
        return _positive(sizes)
    return None


def _tiff_pixel_size(path: Path) -> tuple[float, float] | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.ome_metadata:
                found = _ome_pixel_size(tif.ome_metadata)
                if found:
                    return found
            page = tif.pages[0]
            description = page.tags.get("ImageDescription")
            if description is not None and tif.is_svs:
                match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", str(description.value))
                if match:
                    return _positive((match.group(1), match.group(1)))
            x, y, unit = (page.tags.get(name) for name in ("XResolution", "YResolution", "ResolutionUnit"))
            if x is None or y is None or unit is None:
                return None
            per = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre; 1 = no unit
            if per is None:
                return None

            def size(value):
                num, den = value if isinstance(value, tuple) else (value, 1)
                return per * den / num if num else 0.0

            return _positive((size(y.value), size(x.value)))
    except (OSError, ValueError, tifffile.TiffFileError):
        return None


def _zarr_pixel_size(path: Path) -> tuple[float, float] | None:
    from .read import _multiscales_of

    for name in ("zarr.json", ".zattrs"):
        meta = path / name
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_text())
            except (OSError, ValueError):
                return None
            attrs = attrs.get("attributes", attrs) if name == "zarr.json" else attrs
            multiscales, _ = _multiscales_of(attrs)
            if multiscales:
                return _multiscale_pixel_size(multiscales[0])
    return None


def _multiscale_pixel_size(multiscale: dict) -> tuple[float, float] | None:
    """The OME-Zarr slide reader's own reading of axes and scales (``slides.read``), times the
    y / x axes' length units."""
    from .read import _axes_letters, _scale_of

    axes = multiscale.get("axes") or []
    letters = _axes_letters(multiscale, len(axes)) if axes else ""
    if "Y" not in letters or "X" not in letters:
        return None
    units = [_um_per(axes[letters.index(a)].get("unit")) if isinstance(axes[letters.index(a)], dict) else None
             for a in "YX"]
    datasets = multiscale.get("datasets") or []
    if None in units or not datasets:
        return None
    first = _scale_of(datasets[0], letters) or (1.0, 1.0)
    overall = _scale_of(multiscale, letters) or (1.0, 1.0)  # a multiscale-wide transformation, if any
    return _positive((first[0] * overall[0] * units[0], first[1] * overall[1] * units[1]))
