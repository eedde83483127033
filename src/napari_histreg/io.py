"""Reading and writing images, landmarks and transforms, with errors that name the file.

Every writer is atomic (a temporary file in the same folder, then ``os.replace``) so an
interrupted run never leaves a half-written output that looks finished.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".mha", ".mhd", ".bmp")
MIN_SIZE = 64


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class HistRegInputError(ValueError):
    """Bad input: the message names the file or array and the problem."""


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- memory
#: An image read whole (``read_image``: ``histreg register``, ``register(path, ...)``, the
#: napari layers) may decode to at most this share of the memory available: the in-memory
#: pipeline holds the two decoded images plus about five times their size in working copies
#: (grey planes, blurring, the full-resolution warp and overlay; measured 1.2 GB for two
#: 6000 x 6000 RGB images of 103 MB each), so two images at this share stay within memory.
MEMORY_SHARE = 1 / 16
LAZY_PATH_HINT = (
    "register it as a whole slide instead, read lazily at the working resolution: `histreg register-batch PAIRS.csv` "
    "or napari_histreg.slides.register_slides, then `histreg warp` for the full resolution"
)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), or None if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_decoded_size(name: str, shape, dtype, share: float = MEMORY_SHARE, lazy: bool = True) -> None:
    """Raise :class:`HistRegInputError` when an image of ``shape`` / ``dtype`` would decode to
    more than ``share`` of the available memory, naming the lazy slide path (``lazy``) or, for
    formats that cannot be read in parts, a conversion."""
    available = available_memory()
    if available is None:
        return
    nbytes = int(np.prod([int(n) for n in shape])) * np.dtype(dtype).itemsize
    if nbytes <= share * available:
        return
    dims = "x".join(str(int(n)) for n in shape)
    fraction = f"1/{round(1 / share)}" if share < 1 else f"{share:g}x"
    text = (f"{name}: decodes to {dims} {np.dtype(dtype)} = {_gib(nbytes)}, more than {fraction} of the available "
            f"memory ({_gib(available)}) that a whole-image read may take")
    if lazy:
        text += f"; {LAZY_PATH_HINT}"
    suffix = Path(name).suffix.lower()
    if suffix in (".jpg", ".jpeg", ".png", ".bmp"):
        text += (f" ({suffix[1:].upper()} cannot be read in parts: convert it once to a tiled pyramidal TIFF or an "
                 "OME-Zarr, e.g. napari_histreg.slides.to_zarr_pyramid or `vips tiffsave IN OUT.tif --tile --pyramid`)")
    raise HistRegInputError(text)


def image_header(path) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of an image file's full-resolution data, read from its header only
    (nothing is decoded); None when the header cannot be read that way."""
    path = Path(path)
    suffix = path.suffix.lower()
    with contextlib.suppress(Exception):
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return tuple(series.levels[0].shape), np.dtype(series.dtype)
        if suffix in (".mha", ".mhd"):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
            dtype = sitk.GetArrayViewFromImage(probe).dtype
            return tuple(reversed(reader.GetSize())) + (reader.GetNumberOfComponents(),), np.dtype(dtype)
        from PIL import Image

        with _pil_unlimited(), Image.open(path) as im:
            bands = len(im.getbands())
            depth = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}.get(im.mode, 1)
            return (im.size[1], im.size[0], bands), np.dtype({1: np.uint8, 2: np.uint16, 4: np.float32}[depth])
    return None


@contextlib.contextmanager
def _pil_unlimited():
    """Pillow's decompression-bomb limit off: :func:`check_decoded_size` is the guard instead
    (a true limit of memory, with a message that says what to do)."""
    import warnings

    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# --------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike, memory_share: float | None = MEMORY_SHARE, lazy_hint: bool = True) -> np.ndarray:
    """An image file as ``(H, W)`` or ``(H, W, C)`` numpy array, dtype as stored.

    jpg/png/bmp/tif/tiff through tifffile or scikit-image, .mha/.mhd through SimpleITK. An
    image that would decode to more than ``memory_share`` of the available memory is refused
    before decoding (:func:`check_decoded_size`; ``None``: no check).
    """
    path = Path(path)
    if not path.exists():
        raise HistRegInputError(f"{path}: file not found")
    if path.is_dir():
        raise HistRegInputError(f"{path}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise HistRegInputError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if memory_share is not None:
        header = image_header(path)
        if header is not None:
            check_decoded_size(str(path), *header, share=memory_share, lazy=lazy_hint)
    try:
        if suffix in (".mha", ".mhd") or (suffix == ".png" and _is_16bit_colour_png(path)):
            image = read_mha(path)  # Pillow reduces 16-bit colour PNGs to 8 bits; SimpleITK keeps them
        elif suffix in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path, level=0) if _is_pyramid(path) else tifffile.imread(path)
        else:
            from skimage.io import imread

            with _pil_unlimited():
                image = imread(path)
    except HistRegInputError:
        raise
    except Exception as err:  # the readers raise many types for a non-image
        raise HistRegInputError(f"{path}: cannot be read as an image ({type(err).__name__}: {_last_line(err)})") from None
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[-1] not in (3, 4):
        image = np.moveaxis(image, 0, -1)  # channel-first TIFF
    return check_image(image, str(path))


def _last_line(err: BaseException) -> str:
    """The last non-empty line of an exception's message (SimpleITK's span several lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _is_16bit_colour_png(path) -> bool:
    with open(path, "rb") as handle:
        header = handle.read(26)
    # signature (8) + IHDR length/type (8) + width, height (8) + bit depth (1) + colour type (1)
    return header[:8] == b"\x89PNG\r\n\x1a\n" and len(header) == 26 and header[24] == 16 and header[25] in (2, 6)


def _is_pyramid(path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return len(tif.series[0].levels) > 1 if tif.series else False


def check_image(image, name: str = "image") -> np.ndarray:
    """Validate an image array; raise :class:`HistRegInputError` naming ``name`` and the problem."""
    image = np.asarray(image)
    if image.dtype == object or np.iscomplexobj(image) or not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise HistRegInputError(f"{name}: not a numeric image (dtype {image.dtype})")
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 2:  # grey + alpha
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise HistRegInputError(f"{name}: expected a grey (H, W) or colour (H, W, 3|4) image, got shape {image.shape}")
    if min(image.shape[:2]) < MIN_SIZE:
        raise HistRegInputError(
            f"{name}: image is {image.shape[0]}x{image.shape[1]} pixels; at least {MIN_SIZE} px a side is needed"
        )
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise HistRegInputError(f"{name}: image contains NaN or infinite values")
    return image


def read_mha(path) -> np.ndarray:
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise HistRegInputError(f"{path}: file not found")
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as err:
        raise HistRegInputError(f"{path}: cannot be read by SimpleITK ({_last_line(err)})") from None


def write_mha(path, array: np.ndarray, vector: bool | None = None) -> Path:
    """Write ``array`` (``(H, W)``, ``(H, W, C)``) as .mha/.mhd atomically; ``vector`` marks the
    last axis as components (colour or field) rather than a third dimension."""
    import SimpleITK as sitk

    array = np.asarray(array)
    if vector is None:
        vector = array.ndim == 3 and array.shape[-1] in (2, 3, 4)
    image = sitk.GetImageFromArray(array, isVector=vector)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(path)


def write_image(path, image: np.ndarray) -> Path:
    """Write an image atomically; the format follows the suffix (.mha/.mhd, .tif, else scikit-image)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".mha", ".mhd"):
        return write_mha(path, image)
    with atomic_path(path) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, image, photometric="rgb" if image.ndim == 3 and image.shape[-1] in (3, 4) else None)
        else:
            from skimage.io import imsave

            imsave(tmp, image, check_contrast=False)
    return path


# --------------------------------------------------------------------------- landmarks
def read_landmarks(path) -> tuple[np.ndarray, np.ndarray]:
    """An ANHIR landmark CSV (header ``,X,Y``; first column the id) as ``(ids, points_rc)``.

    ``points_rc`` is ``(N, 2)`` float ``(row, col)``. A file without an id column (``X,Y``) gets
    ids ``0..N-1``.
    """
    from .conventions import xy_to_rc

    path = Path(path)
    if not path.exists():
        raise HistRegInputError(f"{path}: landmark file not found")
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        raise HistRegInputError(f"{path}: not a landmark CSV ({err})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise HistRegInputError(f"{path}: landmark file is empty")
    header = [cell.strip() for cell in rows[0]]
    try:
        x_col, y_col = header.index("X"), header.index("Y")
    except ValueError:
        raise HistRegInputError(f"{path}: landmark CSV needs 'X' and 'Y' columns, header is {header}") from None
    id_col = 0 if x_col != 0 and y_col != 0 else None
    ids, points = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        try:
            x, y = float(row[x_col]), float(row[y_col])
        except (IndexError, ValueError):
            raise HistRegInputError(f"{path}: line {line_no} is not a landmark ({','.join(row)!r})") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise HistRegInputError(f"{path}: line {line_no} has a non-finite coordinate")
        ids.append(row[id_col].strip() if id_col is not None else str(line_no - 2))
        points.append((x, y))
    if not points:
        raise HistRegInputError(f"{path}: no landmarks in file")
    if len(set(ids)) != len(ids):
        raise HistRegInputError(f"{path}: landmark ids are not unique")
    return np.asarray(ids, dtype=object), xy_to_rc(points)


def write_landmarks(path, ids, points_rc) -> Path:
    """Write ``(row, col)`` points as an ANHIR CSV (``,X,Y``) atomically."""
    from .conventions import rc_to_xy

    xy = rc_to_xy(points_rc)
    lines = [",X,Y"] + [f"{i},{x:.3f},{y:.3f}" for i, (x, y) in zip(ids, xy)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def pair_landmarks(source_ids, source_points, target_ids, target_points, source_name="source", target_name="target"):
    """Keep the landmarks whose id is in both sets, in the target's order.

    Raises when no id is shared: the files do not describe the same tissue.
    """
    index = {str(i): k for k, i in enumerate(source_ids)}
    keep_t = [k for k, i in enumerate(target_ids) if str(i) in index]
    if not keep_t:
        raise HistRegInputError(f"{source_name} and {target_name}: no landmark id is shared between the two files")
    keep_s = [index[str(target_ids[k])] for k in keep_t]
    ids = np.asarray([target_ids[k] for k in keep_t], dtype=object)
    return ids, np.asarray(source_points)[keep_s], np.asarray(target_points)[keep_t]
