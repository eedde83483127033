"""Lazy whole-slide reading (napari_histreg.slides): pyramidal TIFF, OME-Zarr 0.4 / 0.5, flat
images with virtual levels and their conversion, and registration at the working level."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile
import zarr
from zarr.storage import WrapperStore

from napari_histreg import RegistrationConfig, register
from napari_histreg.conventions import Frame
from napari_histreg.io import HistRegInputError
from napari_histreg.progress import RegistrationCancelled
from napari_histreg.slides import (
    OmeZarrWriter,
    frame_to_level0,
    halve,
    open_slide,
    register_slides,
    to_zarr_pyramid,
    write_ome_tiff,
)


FAST = RegistrationConfig()
FAST.preprocess.working_size = 192
FAST.initial.angle_step = 10.0
FAST.initial.refine_step = 0.0
FAST.affine.levels = (64, 128)
FAST.affine.iterations = (20, 10)
FAST.dense.levels = (96, 192)
FAST.dense.iterations = (10, 5)


class CountingStore(WrapperStore):
    """Records every key read through it (metadata and chunks)."""

    def __init__(self, store):
        super().__init__(store)
        self.keys: list[str] = []

    def _with_store(self, store):
        return type(self)(store)

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    def chunks(self, level: int) -> set[tuple[int, ...]]:
        """Chunk indices of ``level`` read so far (tifffile '0/1.2.0' or NGFF '0/0/1/2' keys)."""
        found = set()
        for key in self.keys:
            parts = re.split(r"[/.]", key)
            if parts[0] == str(level) and all(p.isdigit() for p in parts[1:]) and len(parts) > 1:
                found.add(tuple(int(p) for p in parts[1:]))
        return found


def wrapper(stores: list):
    def wrap(store):
        counting = CountingStore(store)
        stores.append(counting)
        return counting

    return wrap


def smooth_rgb(shape, seed=0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    small = gaussian_filter(rng.random((shape[0] // 8 + 2, shape[1] // 8 + 2, 3)), (2, 2, 0))
    big = np.repeat(np.repeat(small, 8, 0), 8, 1)[: shape[0], : shape[1]]
    big = (big - big.min()) / (big.max() - big.min())
    return (big * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rgb_image():
    return smooth_rgb((1500, 2000))


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory, rgb_image):
    path = tmp_path_factory.mktemp("tiff") / "slide.ome.tif"
    write_ome_tiff(rgb_image, path, tile=256, compression="zlib")
    return path


# --------------------------------------------------------------------------- TIFF
def test_pyramidal_tiff_levels_downsamples_and_level_for(pyramid_tiff, rgb_image):
    with open_slide(pyramid_tiff) as slide:
        assert slide.format == "tiff" and slide.rgb and slide.dtype == np.uint8
        assert slide.shape == (1500, 2000)
        assert [slide.level_shape(k) for k in range(len(slide.levels))] == [(1500, 2000), (750, 1000), (375, 500), (187, 250)]
        assert slide.downsamples == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0), (8.0, 8.0)]
        assert slide.virtual == [False] * 4
        # closest to, not below, the working size (longer side)
        assert slide.level_for(400) == 2
        assert slide.level_for(500) == 2
        assert slide.level_for(501) == 1
        assert slide.level_for(100) == 3
        assert slide.level_for(10_000) == 0
        np.testing.assert_array_equal(slide.read_region(0, slice(100, 300), slice(1800, 2000)), rgb_image[100:300, 1800:2000])
        # the stored level 1 is the 2x2 mean of level 0
        expected = rgb_image.reshape(750, 2, 1000, 2, 3).astype(np.float32).mean((1, 3))
        assert np.abs(slide.read(1).astype(np.float32) - expected).max() <= 0.5 + 1e-3


def test_tiff_is_read_lazily_chunk_by_chunk(pyramid_tiff):
    stores: list[CountingStore] = []
    with open_slide(pyramid_tiff, store_wrapper=wrapper(stores)) as slide:
        store = stores[0]
        assert not store.chunks(0) and not store.chunks(1)  # opening reads metadata only
        slide.read(3)
        assert store.chunks(3) and not store.chunks(0) and not store.chunks(1) and not store.chunks(2)
        store.keys.clear()
        slide.read_region(0, slice(300, 600), slice(0, 100))  # rows 300..599 -> tiles 1, 2; cols -> tile 0
        assert store.chunks(0) == {(1, 0, 0), (2, 0, 0)}
        assert not store.chunks(1)


def test_planar_and_grey_tiffs(tmp_path, rgb_image):
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb_image, -1, 0), photometric="rgb", planarconfig="separate", tile=(256, 256))
    with open_slide(planar) as slide:
        assert slide.channels == 3
        np.testing.assert_array_equal(slide.read_region(0, slice(0, 50), slice(0, 60)), rgb_image[:50, :60])
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, rgb_image[..., 1], tile=(256, 256))
    with open_slide(grey) as slide:
        assert slide.channels is None and slide.levels[0].ndim == 2
        # flat image: lazy 2x2-mean levels down to <= 256 px
        assert slide.virtual[1:] and all(slide.virtual[1:])
        assert max(slide.level_shape(len(slide.levels) - 1)) <= 256
        expected = rgb_image[..., 1].reshape(750, 2, 1000, 2).astype(np.float32).mean((1, 3))
        assert np.abs(slide.read(1).astype(np.float32) - expected).max() <= 0.5 + 1e-3


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(HistRegInputError, match="not found"):
        open_slide(tmp_path / "missing.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(HistRegInputError, match="bad.tif"):
        open_slide(bad)
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    group.create_array("x", shape=(10, 10), dtype="u1")
    with pytest.raises(HistRegInputError, match="multiscales"):
        open_slide(tmp_path / "plain.zarr")


# --------------------------------------------------------------------------- OME-Zarr
def test_ome_zarr_04_written_and_read_back_lazily(tmp_path, rgb_image):
    path = tmp_path / "image.ome.zarr"
    writer = OmeZarrWriter(path, rgb_image.shape[:2], 3, np.uint8, chunk=256, min_size=200)
    for rows, cols in writer.blocks(0, 512):
        writer.write(0, rows, cols, rgb_image[rows, cols])
    writer.build_pyramid(workers=2)
    writer.finalise()
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]][:2] == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    assert [c["color"] for c in attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    assert json.loads((path / "0" / ".zarray").read_text())["dimension_separator"] == "/"
    stores: list[CountingStore] = []
    with open_slide(path, store_wrapper=wrapper(stores)) as slide:
        assert slide.format == "ome-zarr 0.4" and slide.shape == (1500, 2000) and slide.channels == 3
        assert [slide.level_shape(k) for k in range(len(slide.levels))] == [(1500, 2000), (750, 1000), (375, 500), (187, 250), (93, 125)]
        assert slide.downsamples[3] == (8.0, 8.0)
        np.testing.assert_array_equal(slide.read_region(0, slice(700, 800), slice(10, 20)), rgb_image[700:800, 10:20])
        assert stores[0].chunks(0) == {(0, 2, 0), (0, 3, 0)}  # (c, y, x) chunks of 256
        assert not stores[0].chunks(1)


def test_ome_zarr_05_zarr_v3(tmp_path, rgb_image):
    path = tmp_path / "v3.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    data = [np.moveaxis(rgb_image, -1, 0)[None], np.moveaxis(rgb_image[::2, ::2], -1, 0)[None]]  # (t, c, y, x)
    for k, array in enumerate(data):
        group.create_array(str(k), shape=array.shape, chunks=(1, 3, 256, 256), dtype=array.dtype)[...] = array
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                     {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 0.5 * 2**k, 0.5 * 2**k]}]}
                         for k in range(2)],
        }],
    }
    with open_slide(path) as slide:
        assert slide.format == "ome-zarr 0.5" and slide.shape == (1500, 2000) and slide.channels == 3
        assert slide.downsamples == [(1.0, 1.0), (2.0, 2.0)]
        np.testing.assert_array_equal(slide.read(1), rgb_image[::2, ::2])


def test_unfinished_zarr_is_not_a_slide(tmp_path, rgb_image):
    path = tmp_path / "x.ome.zarr.partial"
    writer = OmeZarrWriter(path, rgb_image.shape[:2], 3, np.uint8, chunk=256)
    writer.write(0, slice(0, 256), slice(0, 256), rgb_image[:256, :256])
    with pytest.raises(HistRegInputError, match="unfinished"):
        open_slide(path)
    renamed = tmp_path / "y.ome.zarr"
    path.rename(renamed)  # even renamed: without the multiscales metadata it is no image
    with pytest.raises(HistRegInputError, match="multiscales"):
        open_slide(renamed)


# --------------------------------------------------------------------------- flat images
def test_in_memory_array_has_virtual_levels(rgb_image):
    slide = open_slide(rgb_image, chunk=256)
    assert slide.format == "array" and slide.virtual == [False, True, True, True]
    np.testing.assert_array_equal(slide.read(0), rgb_image)
    level2 = slide.read(2)
    assert level2.shape == (375, 500, 3) and level2.dtype == np.uint8
    expected = rgb_image.reshape(375, 4, 500, 4, 3).astype(np.float32).mean((1, 3))
    assert np.abs(level2.astype(np.float32) - expected).max() <= 1.0 + 1e-3  # two rounding steps
    odd = halve(slide.levels[0][:1499, :1999])
    assert odd.shape[:2] == (749, 999) and odd.compute().dtype == np.uint8


def test_flat_tiff_to_zarr_pyramid_interrupt_and_resume(tmp_path, rgb_image):
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, rgb_image, photometric="rgb", rowsperstrip=64)
    out = tmp_path / "flat.ome.zarr"
    calls = []

    def stop_after_two(event):
        calls.append(event)
        if event.stage == "convert" and event.step == 2:
            raise RegistrationCancelled

    with pytest.raises(RegistrationCancelled):
        to_zarr_pyramid(flat, out, chunk=512, progress=stop_after_two, workers=1)
    assert not out.exists() and (tmp_path / "flat.ome.zarr.partial").exists()
    with pytest.raises(HistRegInputError, match="resume"):
        to_zarr_pyramid(flat, out, chunk=512)
    events = []
    to_zarr_pyramid(flat, out, chunk=512, resume=True, progress=events.append)
    assert not (tmp_path / "flat.ome.zarr.partial").exists()
    first = [e for e in events if e.stage == "convert"][0]
    assert first.step == 2 and first.total == 12  # the two finished blocks were skipped
    with open_slide(out) as slide:
        assert not any(slide.virtual)
        np.testing.assert_array_equal(slide.read(0), rgb_image)
        assert slide.level_shape(2) == (375, 500)


# --------------------------------------------------------------------------- registration
def test_frame_to_level0_matches_at_shape():
    frame = Frame((375, 500), (256, 256), (0.5, 0.5), (34.0, 3.0))
    assert frame_to_level0(frame, (1500, 2000), (4.0, 4.0)) == frame.at_shape((1500, 2000))
    exact = frame_to_level0(Frame((187, 250), (128, 128), (0.5, 0.5), (0.0, 0.0)), (1500, 2000), (8.0, 8.0))
    assert exact.scale == (0.0625, 0.0625)  # the true factor, not 187/1500


@pytest.fixture(scope="module")
def slide_pair(tmp_path_factory):
    """The bundled sample pair at 4x (2048 px), source as a pyramidal TIFF, target as OME-Zarr."""
    from napari_histreg.sample import make_sample_pair

    pair = make_sample_pair()
    folder = tmp_path_factory.mktemp("pair")
    up = lambda image: np.repeat(np.repeat(image, 4, 0), 4, 1)  # noqa: E731
    write_ome_tiff(up(pair.source), folder / "source.ome.tif", tile=256)
    target = up(pair.target)
    writer = OmeZarrWriter(folder / "target.ome.zarr", target.shape[:2], 3, np.uint8, chunk=256)
    for rows, cols in writer.blocks(0, 1024):
        writer.write(0, rows, cols, target[rows, cols])
    writer.build_pyramid()
    writer.finalise()
    return pair, folder / "source.ome.tif", folder / "target.ome.zarr"


def test_register_slides_reads_one_small_level_and_works_in_level0_pixels(slide_pair):
    pair, source_path, target_path = slide_pair
    stores: list[CountingStore] = []
    with open_slide(source_path, store_wrapper=wrapper(stores)) as source, \
            open_slide(target_path, store_wrapper=wrapper(stores)) as target:
        result = register_slides(source, target, FAST, device="cpu")
        level = result.info["slide"]["source_level"]
        assert (level, result.info["slide"]["target_level"]) == (3, 3)  # 2048 / 8 = 256 >= 192
        for store in stores:  # nothing but that level was read
            assert store.chunks(3) and not any(store.chunks(k) for k in range(3))
        assert result.source_frame.original_shape == (2048, 2048) == result.target_frame.original_shape
        # the same registration on the level-3 arrays, in memory: identical up to the frames
        small = register(source.read(3), target.read(3), FAST, device="cpu")
    np.testing.assert_allclose(result.working_field, small.working_field)
    assert result.source_frame == small.source_frame.at_shape((2048, 2048))
    points0 = pair.source_landmarks * 4 + 1.5  # centres of the 4x4 pixel blocks
    mapped0 = result.map_source_points(points0)
    mapped3 = small.map_source_points((points0 + 0.5) / 8 - 0.5)
    np.testing.assert_allclose(mapped0, (mapped3 + 0.5) * 8 - 0.5, atol=1e-3)
    # and it registers: the landmark error in level-0 pixels goes well down
    truth = pair.target_landmarks * 4 + 1.5
    before = np.median(np.linalg.norm(points0 - truth, axis=1))
    after = np.median(np.linalg.norm(mapped0 - truth, axis=1))
    assert after < 0.5 * before


def test_register_slides_brings_levels_to_one_pixel_size(slide_pair):
    """A factor-4 pyramid (as in SVS files) against a factor-2 one: the finer level is resampled
    to the coarser one's pixel size before registering."""
    import dask.array as da

    from napari_histreg.slides import Slide

    pair, source_path, _ = slide_pair
    target0 = np.repeat(np.repeat(pair.target, 4, 0), 4, 1)
    levels = [da.from_array(target0, chunks=(512, 512, 3))]
    levels.append(levels[0].reshape(512, 4, 512, 4, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    target = Slide(levels, [(1.0, 1.0), (4.0, 4.0)], name="factor-4 pyramid")
    result = register_slides(source_path, target, FAST, device="cpu")
    info = result.info["slide"]
    assert (info["source_level"], info["target_level"]) == (3, 1)  # downsample 8 (256 px) and 4 (512 px)
    assert info["source_downsample"] == info["target_downsample"] == [8.0, 8.0]
    assert info["registered_shapes"] == [[256, 256], [256, 256]]
    assert result.target_frame.original_shape == (2048, 2048)
    truth = pair.target_landmarks * 4 + 1.5
    points0 = pair.source_landmarks * 4 + 1.5
    before = np.median(np.linalg.norm(points0 - truth, axis=1))
    assert np.median(np.linalg.norm(result.map_source_points(points0) - truth, axis=1)) < 0.5 * before


# --------------------------------------------------------------------------- flat TIFFs
def test_a_one_strip_tiff_is_read_by_rows(tmp_path, monkeypatch):
    """tifffile.imwrite's default (uncompressed, one strip for the whole image) is one zarr chunk:
    the slide reads its rows from the file instead, so a region costs its rows only."""
    import os as os_module

    import napari_histreg.slides.read as slide_module

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1500, 700, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, image)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages[0].dataoffsets) == 1  # really one strip
    read = []
    real_pread = os_module.pread

    def counting_pread(fd, n, offset):
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(slide_module.os, "pread", counting_pread)
    with open_slide(path) as slide:
        assert slide.levels[0].chunks[0][0] == 512 and slide.virtual[1]
        np.testing.assert_array_equal(slide.read_region(0, slice(600, 610), slice(100, 300)), image[600:610, 100:300])
        assert sum(read) <= 512 * 700 * 3  # one chunk of rows, not the 3 MB image
        np.testing.assert_array_equal(slide.read(0), image)
        # a virtual level, computed band by band, equals the 2x2-mean chain to within rounding
        level2 = slide.read(2)
        chained = np.asarray(halve(halve(slide.levels[0])).compute(scheduler="synchronous"))
        assert level2.shape == chained.shape == (375, 175, 3)
        assert np.abs(level2.astype(int) - chained.astype(int)).max() <= 1


def test_block_means_in_bands_match_the_whole_image():
    import dask.array as da

    from napari_histreg.slides.read import block_mean_bands

    rng = np.random.default_rng(1)
    image = rng.integers(0, 60000, (403, 250), dtype=np.uint16)
    whole = image[:400, :248].reshape(100, 4, 62, 4).astype(np.float32).mean(axis=(1, 3))
    banded = block_mean_bands(da.from_array(image, chunks=(64, 250)), 4, (100, 62), band_bytes=4 * 62 * 16 * 4 * 3)
    np.testing.assert_array_equal(banded, np.rint(whole).astype(np.uint16))


def test_register_slides_on_a_flat_tiff_reads_level_zero_in_bands(tmp_path, monkeypatch):
    """The lazy path on a flat TIFF: the working level comes from bands of rows, never a whole
    level-0 copy (tracemalloc counts numpy's buffers; bands of 1 MB here, 64 MB by default)."""
    import tracemalloc

    import napari_histreg.slides.read as slide_module
    from napari_histreg.sample import make_sample_pair

    monkeypatch.setattr(slide_module, "BAND_BYTES", 2**20)
    pair = make_sample_pair()
    big = np.repeat(np.repeat(pair.source, 4, axis=0), 4, axis=1)  # 2048 x 2048 RGB, 12 MB
    tifffile.imwrite(tmp_path / "source.tif", big)
    imsave_target = tmp_path / "target.tif"
    tifffile.imwrite(imsave_target, np.repeat(np.repeat(pair.target, 4, axis=0), 4, axis=1))
    config = RegistrationConfig()
    config.preprocess.working_size = 256
    config.nonrigid_method = "none"
    with open_slide(tmp_path / "source.tif") as source:
        tracemalloc.start()
        level = source.read(source.level_for(256))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert level.shape == (256, 256, 3)
        assert peak < big.nbytes / 2, peak  # less than half a level-0 copy
    result = register_slides(tmp_path / "source.tif", imsave_target, config, device="cpu")
    assert result.source_frame.original_shape == (2048, 2048)
    assert result.info["slide"]["source_level"] == 3
