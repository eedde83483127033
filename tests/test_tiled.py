"""Tile-wise full-resolution warping (napari_histreg.tiled): equal to the in-memory warp, reads
only the source chunks it needs, writes a valid OME-Zarr (and OME-TIFF) only when complete,
resumes after an interruption; and the `histreg warp` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import zarr
from scipy.ndimage import gaussian_filter
from napari_conftest import display, qapp_cls, run_widget, viewer  # noqa: F401  (GUI fixtures)
from test_slide import CountingStore, smooth_rgb, wrapper

from console import histreg
from napari_histreg.conventions import Frame, affine_to_field, rotation_about
from napari_histreg.io import HistRegInputError
from napari_histreg.progress import RegistrationCancelled
from napari_histreg.result import RegistrationResult
from napari_histreg.slides import open_slide, write_ome_tiff
from napari_histreg.tiled import warp_slide


SHAPE = (1500, 2000)


def make_result(source_shape=SHAPE, target_shape=(1400, 2100), seed=1) -> RegistrationResult:
    """A rotation + translation + smooth elastic field on a 192 x 256 working grid, with
    different frames for source and target (scales, offsets)."""
    working = (192, 256)
    source_frame = Frame(tuple(source_shape), working, (0.125, 0.125), (2.0, 3.0))
    target_frame = Frame(tuple(target_shape), working, (0.12, 0.12), (5.0, 2.0))
    matrix = rotation_about((96, 128), 7.0, (3.0, -2.0))
    field = affine_to_field(matrix, working)[0].numpy()
    rng = np.random.default_rng(seed)
    field += np.stack([gaussian_filter(rng.normal(size=working), 10) * 60 for _ in range(2)])
    return RegistrationResult(field.astype(np.float32), source_frame, target_frame, matrix)


@pytest.fixture(scope="module")
def rgb_image():
    return smooth_rgb(SHAPE, seed=3)


@pytest.fixture(scope="module")
def source_tiff(tmp_path_factory, rgb_image):
    path = tmp_path_factory.mktemp("src") / "source.ome.tif"
    write_ome_tiff(rgb_image, path, tile=256, compression="zlib")
    return path


def assert_close_to(warped: np.ndarray, expected: np.ndarray, source: np.ndarray | None = None) -> None:
    """Equal up to float rounding of the sampling coordinates (about 1e-4 px at 2000 px, from
    normalising them against another grid): a grey level, or 0.01 px times the steepest
    gradient of the ``source`` where that is more (16-bit images); and only rarely different."""
    assert warped.shape == expected.shape and warped.dtype == expected.dtype
    diff = np.abs(warped.astype(np.float64) - expected.astype(np.float64))
    tolerance = 1.0
    if source is not None:
        source = source.astype(np.float64)
        steepest = max(np.abs(np.diff(source, axis=0)).max(), np.abs(np.diff(source, axis=1)).max())
        tolerance = max(tolerance, 0.01 * steepest)
    assert diff.max() <= tolerance
    assert (diff > 0).mean() < (1e-3 if source is None else 1e-2)


# --------------------------------------------------------------------------- equality
def test_tiled_equals_in_memory_warp_rgb(tmp_path, rgb_image, source_tiff):
    result = make_result()
    expected = result.warp(rgb_image)
    out = warp_slide(result, source_tiff, tmp_path / "warped.ome.zarr", tile=256, workers=2,
                     tiff=tmp_path / "warped.ome.tif")
    assert out == tmp_path / "warped.ome.zarr" and not (tmp_path / "warped.ome.zarr.partial").exists()
    with open_slide(out) as warped:
        assert warped.shape == (1400, 2100) and warped.channels == 3 and warped.dtype == np.uint8
        level0 = warped.read(0)
        assert_close_to(level0, expected)
        # the pyramid is built from the warped level 0 by 2x2 means
        mean = level0.reshape(700, 2, 1050, 2, 3).astype(np.float32).mean((1, 3))
        assert np.abs(warped.read(1).astype(np.float32) - mean).max() <= 0.5 + 1e-3
        levels = len(warped.levels)
    attrs = json.loads((out / ".zattrs").read_text())["multiscales"][0]
    assert attrs["version"] == "0.4" and attrs["metadata"]["transform"]
    with tifffile.TiffFile(tmp_path / "warped.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) == levels
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), level0)


@pytest.mark.parametrize("order", [0, 1])
def test_tiled_equals_in_memory_warp_grey_uint16_fill_and_lower_level(tmp_path, rgb_image, order):
    result = make_result()
    grey = (rgb_image[..., 0].astype(np.uint16) * 257)[:, :]
    expected = result.warp(grey, order=order, cval=1000)
    out = warp_slide(result, grey, tmp_path / "grey.zarr", tile=512, chunk=256, order=order, cval=1000, workers=1)
    with open_slide(out) as warped:
        assert warped.channels is None and warped.dtype == np.uint16
        got = warped.read(0)
        assert (got == 1000).any()  # the target corners are outside the source: fill value
        if order == 1:
            assert_close_to(got, expected, grey)
        else:  # nearest: a coordinate within float rounding of a pixel edge may pick the neighbour
            assert (got != expected).mean() < 1e-3
    # a lower source level gives the target grid at the same ratio
    small = warp_slide(result, open_slide(grey), tmp_path / "grey_l1.zarr", level=1, tile=256, order=order, cval=1000)
    with open_slide(small) as warped:
        assert warped.shape == (700, 1050)


def test_strong_zoom_out_splits_tiles_and_still_matches(tmp_path, rgb_image):
    """A target grid that samples a source region 4x larger than itself (split into sub-blocks)."""
    working = (192, 256)
    frame = Frame(SHAPE, working, (0.125, 0.125), (2.0, 3.0))
    target_frame = Frame((375, 500), working, (0.5, 0.5), (2.0, 3.0))  # 4x coarser target pixels
    field = affine_to_field(rotation_about((96, 128), 3.0), working)[0].numpy()
    result = RegistrationResult(field, frame, target_frame)
    expected = result.warp(rgb_image)
    out = warp_slide(result, rgb_image, tmp_path / "zoom.zarr", tile=256, max_region=2.0, workers=1)
    with open_slide(out) as warped:
        assert_close_to(warped.read(0), expected)


# --------------------------------------------------------------------------- laziness
def test_warp_reads_only_the_needed_source_chunks(tmp_path, rgb_image, source_tiff):
    """An affine that samples only the top-left quarter of the source: no other chunk of level 0
    (256 px TIFF tiles) and no chunk of a lower level is read."""
    working = (192, 256)
    frame = Frame(SHAPE, working, (0.125, 0.125), (0.0, 0.0))
    matrix = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])  # s = p / 2 on the working grid
    result = RegistrationResult(affine_to_field(matrix, working)[0].numpy(), frame, frame, matrix)
    stores: list[CountingStore] = []
    source = open_slide(source_tiff, store_wrapper=wrapper(stores))
    warp_slide(result, source, tmp_path / "quarter.zarr", tile=512, workers=2)
    read = stores[0].chunks(0)
    # source rows 0..~752, cols 0..~1002 (+ halo): tile rows 0..2 (3 if the halo crosses), cols 0..3
    assert read and max(r for r, _, _ in read) <= 3 and max(c for _, c, _ in read) <= 3
    assert len(read) < 0.5 * 6 * 8  # well under half of the 48 level-0 tiles
    assert all(not stores[0].chunks(k) for k in range(1, len(source.levels)))
    source.close()


# --------------------------------------------------------------------------- interruption
def test_interrupted_warp_leaves_no_finished_output_and_resumes(tmp_path, rgb_image, source_tiff):
    result = make_result()
    out = tmp_path / "w.ome.zarr"
    partial = tmp_path / "w.ome.zarr.partial"

    def stop_after_three(event):
        if event.stage == "warp" and event.step == 3:
            raise RegistrationCancelled

    with pytest.raises(RegistrationCancelled):
        warp_slide(result, source_tiff, out, tile=256, workers=2, progress=stop_after_three)
    assert not out.exists() and partial.is_dir()
    assert "multiscales" not in zarr.open_group(str(partial), mode="r").attrs  # not an image even if renamed
    with pytest.raises(HistRegInputError, match="unfinished"):
        open_slide(partial)
    with pytest.raises(HistRegInputError, match="resume"):
        warp_slide(result, source_tiff, out, tile=256)
    with pytest.raises(HistRegInputError, match="different job"):
        warp_slide(make_result(seed=2), source_tiff, out, tile=256, resume=True)
    events = []
    warp_slide(result, source_tiff, out, tile=256, workers=2, resume=True, progress=events.append)
    first = [e for e in events if e.stage == "warp"][0]
    assert first.step >= 3  # the finished tiles were not redone
    assert not partial.exists()
    with open_slide(out) as warped:
        assert_close_to(warped.read(0), result.warp(rgb_image))
    with pytest.raises(HistRegInputError, match="exists"):
        warp_slide(result, source_tiff, out, tile=256)
    warp_slide(result, source_tiff, out, tile=256, resume=True)  # complete already: nothing to do


def test_cli_warp_sigint_leaves_only_a_partial_output(tmp_path):
    """A real Ctrl-C (SIGINT) on `histreg warp`: exit 130, OUT absent, OUT.partial kept,
    and --resume finishes it."""
    image = smooth_rgb((2000, 2000), seed=5)[..., 0]
    slide = tmp_path / "big.tif"
    tifffile.imwrite(slide, image, tile=(256, 256))
    result = make_result(source_shape=image.shape, target_shape=image.shape)
    result.save(tmp_path / "transform")
    out = tmp_path / "big.ome.zarr"
    partial = tmp_path / "big.ome.zarr.partial"
    cmd = [sys.executable, "-m", "napari_histreg.cli", "warp", str(slide), str(tmp_path / "transform.json"), "-o", str(out),
           "--tile", "128", "--workers", "1", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        log = partial / ".histreg-progress"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and log.stat().st_size > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the warp finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert not out.exists() and partial.is_dir()
    assert histreg(["warp", str(slide), str(tmp_path / "transform.json"), "-o", str(out), "--tile", "128", "-q"]) == 2
    assert histreg(["warp", str(slide), str(tmp_path / "transform.json"), "-o", str(out), "--tile", "128", "--resume", "-q",
                 "--tiff", str(tmp_path / "big.ome.tif")]) == 0
    assert out.is_dir() and not partial.exists() and (tmp_path / "big.ome.tif").is_file()
    with open_slide(out) as warped:
        expected = result.warp(image)
        assert_close_to(warped.read(0), expected)


def test_cli_warp_bad_inputs(tmp_path, capsys, source_tiff):
    result = make_result()
    result.save(tmp_path / "t")
    assert histreg(["warp", str(tmp_path / "missing.tif"), str(tmp_path / "t.json"), "-o", str(tmp_path / "o.zarr")]) == 2
    assert "missing.tif" in capsys.readouterr().err
    assert histreg(["warp", str(source_tiff), str(tmp_path / "nope.json"), "-o", str(tmp_path / "o.zarr")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert histreg(["warp", str(source_tiff), str(tmp_path / "t.json"), "-o", str(tmp_path / "o.zarr"), "--tile", "8"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o.zarr.partial").exists()


# --------------------------------------------------------------------------- napari
@pytest.mark.gui
def test_slide_widget_warps_and_opens_a_lazy_multiscale_layer(viewer, qtbot, tmp_path, source_tiff, rgb_image):
    """The widget warps a slide with a transform file; the result (and, through the reader, the
    source) opens as a lazy multiscale RGB layer. GUI: needs Xvfb, like tests/test_napari_*.py."""
    import dask.array as da

    from napari_histreg._napari.widgets.slide import SlideWarpWidget, get_slide_reader

    result = make_result()
    result.save(tmp_path / "t")
    widget = SlideWarpWidget(viewer)
    widget.slide_path.value = source_tiff
    widget.transform_path.value = tmp_path / "t.json"
    widget.output_path.value = tmp_path / "w.ome.zarr"
    widget.tile.value = 512
    assert run_widget(qtbot, widget) == "done", widget.status
    layer = viewer.layers[-1]
    assert layer.name == "w.ome.zarr" and layer.multiscale and layer.rgb
    assert isinstance(layer.data[0], da.Array) and layer.data[0].shape == (1400, 2100, 3)
    assert_close_to(np.asarray(layer.data[0]), result.warp(rgb_image))
    reader = get_slide_reader(str(source_tiff))
    assert reader is not None and get_slide_reader(str(tmp_path / "t.json")) is None
    for data, meta, kind in reader(str(source_tiff)):
        viewer.add_image(data, **meta)
    assert viewer.layers[-1].multiscale and viewer.layers[-1].data[0].shape == (1500, 2000, 3)


# --------------------------------------------------------------------------- is it the right slide?
@pytest.fixture(scope="module")
def sample_transform(tmp_path_factory):
    """A real registration of the bundled sample pair (it carries the source fingerprint)."""
    from napari_histreg import RegistrationConfig, register
    from napari_histreg.sample import make_sample_pair

    pair = make_sample_pair()
    config = RegistrationConfig()
    config.preprocess.working_size = 128
    config.nonrigid_method = "none"
    result = register(pair.source, pair.target, config, mode="optimise")
    folder = tmp_path_factory.mktemp("sample-tf")
    return pair, result, result.save(folder / "transform")


def test_warp_checks_that_the_slide_is_the_transforms_source(sample_transform, tmp_path, capsys):
    import json
    import warnings

    from skimage.transform import rescale

    from napari_histreg.slides import open_slide
    from napari_histreg.tiled import check_slide_matches

    pair, result, json_path = sample_transform
    assert len(json.dumps(json.loads(json_path.read_text())["info"]["source_fingerprint"])) < 8000  # small sidecar
    # the source itself, at half resolution, or as a pyramidal OME-TIFF: all the same slide
    half = rescale(pair.source, 0.5, channel_axis=-1, anti_aliasing=True, preserve_range=True).astype(np.uint8)
    write_ome_tiff(pair.source, tmp_path / "source.ome.tif", tile=256)
    for candidate in (pair.source, half, tmp_path / "source.ome.tif"):
        assert check_slide_matches(result, open_slide(candidate)) > 0.97
    # another section of the same size, or the source turned, is not
    for wrong in (pair.target, np.ascontiguousarray(np.rot90(pair.source))):
        with pytest.raises(HistRegInputError, match="not the slide this transform was computed for.*thumbnail"):
            check_slide_matches(result, open_slide(wrong))
    # other proportions: refused by size
    with pytest.raises(HistRegInputError, match="not in the proportions"):
        check_slide_matches(result, open_slide(pair.source[:, :400]))
    # the command line: one line, exit 2, nothing written; --force warns and warps
    tifffile.imwrite(tmp_path / "target.tif", pair.target)
    out = tmp_path / "w.zarr"
    args = ["warp", str(tmp_path / "target.tif"), str(json_path), "-o", str(out), "-q", "--tile", "256"]
    assert histreg(args) == 2
    err = capsys.readouterr().err
    assert err.count("histreg: error:") == 1 and "--force" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "w.zarr.partial").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert histreg([*args, "--force"]) == 0
    assert "warped anyway" in capsys.readouterr().err and out.exists()


def test_warp_names_a_damaged_sidecar(sample_transform, tmp_path, capsys):
    import json

    _, _, json_path = sample_transform
    sidecar = json.loads(json_path.read_text())
    source = tmp_path / "source.tif"
    tifffile.imwrite(source, sample_transform[0].source)
    cases = {
        "no_field.json": ({k: v for k, v in sidecar.items() if k != "field_file"}, "lacks 'field_file'"),
        "bad_frame.json": ({**sidecar, "source_frame": {"shape": [1]}}, "'source_frame' is not a valid frame"),
        "other.json": ({"format": "something else"}, "not a napari-histreg transform sidecar"),
        "missing_mha.json": ({**sidecar, "field_file": "nowhere.mha"}, "nowhere.mha"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        code = histreg(["warp", str(source), str(tmp_path / name), "-o", str(tmp_path / "o.zarr"), "-q"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("histreg: error:") == 1 and "Traceback" not in err, (name, err)
    # a field of another transform beside this sidecar
    other = make_result()
    other.save(tmp_path / "other")
    (tmp_path / "mixed.json").write_text(json.dumps({**sidecar, "field_file": "other.mha"}))
    assert histreg(["warp", str(source), str(tmp_path / "mixed.json"), "-o", str(tmp_path / "o.zarr"), "-q"]) == 2
    assert "do not belong together" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o.zarr.partial").exists()
