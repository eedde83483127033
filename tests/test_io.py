"""Reading and writing images, landmarks and JSON: formats, conventions, atomicity."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import skimage.io
import tifffile
from skimage.io import imsave

from napari_histreg.io import (
    HistRegInputError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_image,
    read_landmarks,
    write_image,
    write_landmarks,
    write_mha,
)


def _image(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _write_png16(path, image):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour PNGs)."""
    import struct
    import zlib

    image = image if image.ndim == 3 else image[..., None]
    h, w, c = image.shape
    raw = b"".join(b"\x00" + image[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour_type = {1: 0, 3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _only(folder, *names):
    """The folder holds exactly ``names``: no temporary file left behind."""
    assert sorted(os.listdir(folder)) == sorted(names)


# --------------------------------------------------------------------------- reading images
@pytest.mark.parametrize(
    "shape, dtype, suffix",
    [
        ((70, 90), np.uint8, ".png"),
        ((70, 90, 3), np.uint8, ".png"),
        ((70, 90, 4), np.uint8, ".png"),
        ((70, 90), np.uint16, ".png"),
        ((70, 90, 3), np.uint16, ".png"),
        ((70, 90, 4), np.uint16, ".png"),
        ((70, 90), np.uint8, ".tif"),
        ((70, 90, 3), np.uint8, ".tif"),
        ((70, 90), np.uint16, ".tif"),
        ((70, 90, 3), np.uint16, ".tif"),
        ((70, 90, 4), np.uint16, ".tif"),
    ],
)
def test_read_image_formats(tmp_path, shape, dtype, suffix):
    image = _image(shape, dtype)
    path = tmp_path / f"image{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, image, photometric="rgb" if len(shape) == 3 else "minisblack")
    elif dtype == np.uint16:
        _write_png16(path, image)
    else:
        imsave(path, image, check_contrast=False)
    out = read_image(path)
    assert out.dtype == dtype
    assert out.shape == shape
    np.testing.assert_array_equal(out, image)


def test_read_image_float_tif(tmp_path):
    image = np.random.default_rng(1).random((80, 66)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", image)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), image)


def test_read_image_channel_first_tif(tmp_path):
    image = _image((3, 70, 90))
    tifffile.imwrite(tmp_path / "cf.tif", image, photometric="minisblack", planarconfig="separate")
    out = read_image(tmp_path / "cf.tif")
    assert out.shape == (70, 90, 3)
    np.testing.assert_array_equal(out, np.moveaxis(image, 0, -1))


@pytest.mark.parametrize("shape", [(70, 90), (70, 90, 3)])
def test_read_image_mha(tmp_path, shape):
    image = _image(shape)
    sitk.WriteImage(sitk.GetImageFromArray(image, isVector=len(shape) == 3), str(tmp_path / "m.mha"))
    out = read_image(tmp_path / "m.mha")
    assert out.shape == shape
    np.testing.assert_array_equal(out, image)


def test_read_image_grey_alpha_and_single_channel(tmp_path):
    grey_alpha = _image((70, 90, 2))
    imsave(tmp_path / "la.png", grey_alpha, check_contrast=False)
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), grey_alpha[..., 0])


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(HistRegInputError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(HistRegInputError, match="is a folder"):
        read_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(HistRegInputError, match="empty.png: file is empty"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not an image at all\n")
    with pytest.raises(HistRegInputError, match="text.png: cannot be read as an image") as info:
        read_image(tmp_path / "text.png")
    assert "\n" not in str(info.value)
    (tmp_path / "junk.mha").write_text("junk\n")
    with pytest.raises(HistRegInputError, match="junk.mha") as info:
        read_image(tmp_path / "junk.mha")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- writing images
@pytest.mark.parametrize(
    "name, shape, dtype",
    [
        ("a.png", (70, 90, 3), np.uint8),
        ("a.png", (70, 90), np.uint8),
        ("a.tif", (70, 90, 3), np.uint16),
        ("a.tif", (70, 90), np.float32),
        ("a.mha", (70, 90, 3), np.uint8),
        ("a.mha", (70, 90), np.uint16),
    ],
)
def test_write_image_round_trip_leaves_no_temp_files(tmp_path, name, shape, dtype):
    image = _image(shape, dtype) if np.issubdtype(dtype, np.integer) else np.random.default_rng(0).random(shape).astype(dtype)
    write_image(tmp_path / name, image)
    _only(tmp_path, name)
    out = read_image(tmp_path / name)
    assert out.dtype == image.dtype
    np.testing.assert_array_equal(out, image)
    # usual permissions (mkstemp alone would give 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_mha_vector_pixels(tmp_path):
    image = _image((70, 90, 3))
    write_mha(tmp_path / "v.mha", image)
    itk = sitk.ReadImage(str(tmp_path / "v.mha"))
    assert itk.GetNumberOfComponentsPerPixel() == 3
    assert itk.GetSize() == (90, 70)


def test_failed_write_leaves_no_temp_file_and_keeps_old_output(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    _only(tmp_path, "out.json")
    assert json.loads(path.read_text()) == {"old": 1}

    def half_write_then_fail(target, image, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(skimage.io, "imsave", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / "bad.png", _image((70, 90, 3)))
    _only(tmp_path, "out.json")


def test_atomic_write_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "sub" / "t.txt", "hello\n")
    assert (tmp_path / "sub" / "t.txt").read_text() == "hello\n"
    atomic_write_json(tmp_path / "sub" / "d.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "sub" / "d.json").read_text()) == {"a": [1, 2]}
    _only(tmp_path / "sub", "t.txt", "d.json")


# --------------------------------------------------------------------------- landmarks
HAND_MADE = ",X,Y\n1,10.5,20.25\n2,300,4\nseven,0,99.5\n"


def test_read_landmarks_hand_made_file(tmp_path):
    path = tmp_path / "lm.csv"
    path.write_text(HAND_MADE)
    ids, points = read_landmarks(path)
    assert list(ids) == ["1", "2", "seven"]
    # ANHIR X is the column, Y the row; the core uses (row, col)
    np.testing.assert_array_equal(points, [[20.25, 10.5], [4.0, 300.0], [99.5, 0.0]])


def test_read_landmarks_without_id_column_and_extra_columns(tmp_path):
    (tmp_path / "xy.csv").write_text("X,Y\n1,2\n3,4\n")
    ids, points = read_landmarks(tmp_path / "xy.csv")
    assert list(ids) == ["0", "1"]
    np.testing.assert_array_equal(points, [[2, 1], [4, 3]])
    (tmp_path / "yx.csv").write_text(",Y,X,label\na,5,6,foo\n")
    ids, points = read_landmarks(tmp_path / "yx.csv")
    assert list(ids) == ["a"]
    np.testing.assert_array_equal(points, [[5, 6]])


def test_landmark_round_trip_keeps_ids_and_convention(tmp_path):
    ids = ["3", "1", "b12"]
    points_rc = np.array([[20.25, 10.5], [4.0, 300.0], [99.125, 0.0]])
    write_landmarks(tmp_path / "lm.csv", ids, points_rc)
    _only(tmp_path, "lm.csv")
    text = (tmp_path / "lm.csv").read_text().splitlines()
    assert text[0] == ",X,Y"
    assert text[1] == "3,10.500,20.250"  # X = column first
    read_ids, read_points = read_landmarks(tmp_path / "lm.csv")
    assert list(read_ids) == ids
    np.testing.assert_allclose(read_points, points_rc, atol=1e-3)


def test_landmark_round_trip_real_file(shared_data, tmp_path):
    source = shared_data / "rat-kidney" / "Rat-Kidney_HE.csv"
    ids, points = read_landmarks(source)
    assert len(ids) == 71
    first = source.read_text().splitlines()[1].split(",")  # "1,63,309": X=63 is the column
    assert points[0].tolist() == [float(first[2]), float(first[1])]
    write_landmarks(tmp_path / "copy.csv", ids, points)
    ids2, points2 = read_landmarks(tmp_path / "copy.csv")
    assert list(ids2) == list(ids)
    np.testing.assert_allclose(points2, points, atol=1e-3)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        ("a,b\n1,2\n", "needs 'X' and 'Y'"),
        (",X,Y\n1,2\n", "line 2 is not a landmark"),
        (",X,Y\n1,abc,3\n", "line 2 is not a landmark"),
        (",X,Y\n1,nan,3\n", "non-finite"),
        (",X,Y\n", "no landmarks"),
        (",X,Y\n1,2,3\n1,4,5\n", "not unique"),
    ],
)
def test_malformed_landmarks(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(HistRegInputError, match=problem) as info:
        read_landmarks(path)
    assert str(info.value).startswith(str(path))


def test_binary_landmark_file(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\x00\xff\xfe\x89PNG")
    with pytest.raises(HistRegInputError, match="bin.csv"):
        read_landmarks(path)


# --------------------------------------------------------------------------- the size guard
def test_size_guard_refuses_before_decoding_and_names_the_lazy_path(tmp_path, monkeypatch, capsys):
    import napari_histreg.io as io_module
    from console import histreg

    png = tmp_path / "big.png"
    imsave(png, _image((300, 400, 3)), check_contrast=False)
    tif = tmp_path / "big.tif"
    tifffile.imwrite(tif, _image((300, 400, 3)))
    # pretend this machine has 1 MiB free: 300 x 400 x 3 bytes is more than 1/16 of it
    monkeypatch.setattr(io_module, "available_memory", lambda: 2**20)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the guard must refuse before decoding")

    monkeypatch.setattr(skimage.io, "imread", no_decoding)
    monkeypatch.setattr(tifffile, "imread", no_decoding)
    for path in (png, tif):
        with pytest.raises(HistRegInputError) as info:
            read_image(path)
        text = str(info.value)
        assert str(path) in text and "300x400x3 uint8" in text and "1/16 of the available memory" in text
        assert "histreg register-batch" in text and "register_slides" in text
    assert "PNG cannot be read in parts" in str(pytest.raises(HistRegInputError, read_image, png).value)
    code = histreg(["register", str(tif), str(png), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("histreg: error:") == 1 and "register-batch" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_size_guard_replaces_pillows_decompression_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image

    jpg = tmp_path / "scan.jpg"
    imsave(jpg, _image((200, 300, 3)), check_contrast=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # far below the image: Pillow alone would refuse it
    assert read_image(jpg).shape == (200, 300, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_image_header_reads_shapes_without_decoding(tmp_path):
    from napari_histreg.io import image_header

    imsave(tmp_path / "a.png", _image((70, 90, 3)), check_contrast=False)
    tifffile.imwrite(tmp_path / "b.tif", _image((60, 50), np.uint16))
    write_mha(tmp_path / "c.mha", _image((40, 30, 3)))
    assert image_header(tmp_path / "a.png") == ((70, 90, 3), np.dtype(np.uint8))
    assert image_header(tmp_path / "b.tif") == ((60, 50), np.dtype(np.uint16))
    shape, dtype = image_header(tmp_path / "c.mha")
    assert int(np.prod(shape)) == 40 * 30 * 3 and dtype == np.uint8
