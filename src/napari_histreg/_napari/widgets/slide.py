"""Whole slides in napari: open pyramids as lazy multiscale layers, and warp a slide at full
resolution (tile by tile, :func:`napari_histreg.tiled.warp_slide`) with the result opening as
a lazy multiscale layer.

* :func:`get_slide_reader` / :func:`read_slide`: an npe2 reader for OME-Zarr folders and
  pyramidal TIFFs (``*.ome.tif``, ``*.svs``, ...): one multiscale image layer whose levels are
  the slide's dask arrays, so napari reads only the tiles on screen.
* :class:`SlideWarpWidget`: slide + transform (a file, or the current transform of the
  session) -> ``OUT.zarr`` (+ optional OME-TIFF), progress bar and Cancel (the unfinished
  ``OUT.zarr.partial`` is kept; tick *resume* to continue it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, FileEdit, SpinBox

from ...slides import TIFF_SUFFIXES, open_slide, partial_path
from ..readers import reader_if_all
from ._base import RunWidget, threads_box

if TYPE_CHECKING:
    import napari

__all__ = ["SlideWarpWidget", "get_slide_reader", "read_slide", "slide_layer_data"]


# --------------------------------------------------------------------------- reading
def slide_layer_data(source, name: str | None = None, **kwargs) -> tuple:
    """A ``LayerDataTuple`` of a lazy multiscale image layer for ``source`` (a path, a
    :class:`~napari_histreg.slides.Slide` or an array). ``kwargs`` go to the layer."""
    if isinstance(source, (str, Path)):
        from ...slides.read import zarr_stack_levels

        stack = zarr_stack_levels(source)
        if stack is not None:  # a stack of sections (histreg register-stack --warp): z = section
            rgb = stack[0].ndim == 4 and stack[0].shape[-1] in (3, 4)
            meta = {"name": name or Path(source).name, "multiscale": len(stack) > 1, "rgb": rgb,
                    "metadata": {"napari_histreg_slide": str(source)}, **kwargs}
            return (stack if len(stack) > 1 else stack[0], meta, "image")
    slide = open_slide(source)
    meta = {
        "name": name or (Path(slide.path).name if slide.path else slide.name),
        "multiscale": len(slide.levels) > 1,
        "rgb": bool(slide.rgb),
        "metadata": {"napari_histreg_slide": str(slide.path or slide.name), "downsamples": slide.downsamples},
    }
    if slide.dtype.kind in "ui" and not slide.rgb:
        import numpy as np

        info = np.iinfo(slide.dtype)
        meta["contrast_limits"] = (float(info.min), float(info.max))
    meta.update(kwargs)
    data = list(slide.levels) if len(slide.levels) > 1 else slide.levels[0]
    return (data, meta, "image")


def _is_slide(path: Path) -> bool:
    if path.is_dir():
        return (path / ".zattrs").is_file() or (path / "zarr.json").is_file()
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return bool(tif.series) and len(tif.series[0].levels) > 1  # flat TIFFs: napari's own reader
    except Exception:
        return False


def get_slide_reader(path):
    """npe2 reader hook: :func:`read_slide` for OME-Zarr folders and pyramidal TIFFs, else None."""
    return reader_if_all(path, _is_slide, read_slide)


def read_slide(path) -> list[tuple]:
    """One lazy multiscale image layer per path."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [slide_layer_data(p) for p in paths]


# --------------------------------------------------------------------------- warping
class SlideWarpWidget(RunWidget):
    """Warp a whole slide at full resolution with a transform and open the result lazily."""

    run_text = "Warp slide"
    stages = None
    owner = "slide"

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        self.slide_path = FileEdit(mode="r", label="slide (source)")
        self.transform_path = FileEdit(mode="r", filter="*.json", label="transform (.json; empty: current)")
        self.output_path = FileEdit(mode="w", filter="*.zarr", label="output (.zarr)")
        self.tiff_path = FileEdit(mode="w", filter="*.ome.tif", label="also OME-TIFF (optional)")
        self.tile = SpinBox(value=2048, min=256, max=16384, step=1024, label="tile (px)")
        self.workers = SpinBox(value=0, min=0, max=32, label="parallel tiles (0: one per thread)")
        self.resume = CheckBox(value=False, text="resume an interrupted run")
        self.overwrite = CheckBox(value=False, text="overwrite an earlier histreg output")
        self.force = CheckBox(value=False, text="warp even if the slide does not match the transform")
        self.threads = threads_box("threads in all (0: auto)")
        super().__init__(napari_viewer, [self.slide_path, self.transform_path, self.output_path, self.tiff_path,
                                         self.tile, self.workers, self.threads, self.resume, self.overwrite, self.force])

    @staticmethod
    def _given(value) -> Path | None:
        text = str(value or "").strip()
        return Path(text) if text and text != "." else None

    def prepare(self):
        from ...result import RegistrationResult
        from ...tiled import warp_slide

        slide = self._given(self.slide_path.value)
        out = self._given(self.output_path.value)
        if slide is None or out is None:
            raise ValueError("choose the slide and the output folder")
        transform_file = self._given(self.transform_path.value)
        if transform_file:
            RegistrationResult.load(transform_file)  # a bad sidecar is refused here, before any worker starts
        transform = transform_file or self.session.result
        if transform is None:
            raise ValueError("choose a transform file (no transform in this session yet)")
        tiff = self._given(self.tiff_path.value)
        tile = int(self.tile.value)
        options = dict(tiff=tiff, tile=tile if tile <= 1024 or tile % 1024 == 0 else tile // 1024 * 1024,
                       workers=int(self.workers.value) or None, threads=int(self.threads.value) or None,
                       resume=bool(self.resume.value), overwrite=bool(self.overwrite.value), force=bool(self.force.value))

        def job(progress):
            return warp_slide(transform, slide, out, progress=progress, **options)

        self._last_output = out
        return job

    def apply(self, payload) -> str:
        out = Path(payload)
        data, meta, kind = slide_layer_data(out, name=out.name)
        self.viewer.add_image(data, **meta)
        return f"warped into {out} (opened as a lazy multiscale layer)"

    def _on_cancelled(self) -> None:
        super()._on_cancelled()
        out = getattr(self, "_last_output", None)
        if out is not None and partial_path(out).exists():
            self._set_status(f"cancelled: {partial_path(out).name} kept; tick 'resume' and run again to continue")
