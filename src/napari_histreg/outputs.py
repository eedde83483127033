"""Where outputs may go: one rule for every command, so that no output destroys an input or a
user's data.

**The rule** (``histreg register``, ``evaluate``, ``warp``, ``register-batch``, ``convert`` and
``train``, and the functions behind them):

1. An output is never an input, never contains an input and never lies inside an input
   folder (an OME-Zarr store, a training folder), with or without ``--overwrite``.
2. An output that does not exist yet, or an empty folder, is written.
3. An existing output is replaced only with ``--overwrite``, and only when it is an earlier
   output of napari-histreg, recognised by what this package wrote into it:

   * an output folder holds the marker file :data:`MARKER` (``.histreg-output.json``), which
     lists the files written there;
   * an OME-Zarr of ``warp`` / ``convert`` holds the job file ``.histreg-job.json`` and nothing
     but zarr entries;
   * a file (``warp --tiff``'s OME-TIFF, ``train``'s weights) carries napari-histreg in its
     own metadata (the TIFF ``Software`` tag, the checkpoint's ``kind``).

   Anything else (a plain file, a folder of the user's) is refused, ``--overwrite`` or not.
4. Outputs appear only when complete: files are written into a hidden staging folder
   ``OUT/.histreg-staging-*`` and moved into ``OUT`` at the end; OME-Zarr pyramids are built in
   ``OUT.partial`` beside ``OUT`` and renamed at the end (``--resume`` continues one; an
   ``OUT.partial`` is discarded by ``--overwrite`` only when it holds the job file).
5. Replacing a marked folder replaces the files this package wrote there before and removes
   those of them the new run does not write again (no stale ``metrics.json``); any other file
   in the folder is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .io import HistRegInputError, atomic_write_json

MARKER = ".histreg-output.json"
STAGING_PREFIX = ".histreg-staging-"
#: names a zarr store written by this package may hold (besides the job and progress files)
_ZARR_ENTRIES = {".zattrs", ".zgroup", ".zarray", ".zmetadata", "zarr.json"}


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None]) -> None:
    """Rule 1: raise :class:`HistRegInputError` when an output is, contains or lies inside
    (a folder) input. Paths are compared after resolving links; hard links by ``samefile``."""
    resolved = {}
    for item in inputs:
        if item is None or str(item) == "":
            continue
        resolved[_resolved(item)] = Path(item)
    for out in outputs:
        out = Path(out)
        target = _resolved(out)
        for path, given in resolved.items():
            if target == path:
                raise HistRegInputError(f"{given}: is an input and would be overwritten by an output; choose another output")
            if _inside(path, target):
                raise HistRegInputError(f"{out}: holds the input {given}; choose another output")
            if path.is_dir() and _inside(target, path):
                raise HistRegInputError(f"{out}: lies inside the input {given}; choose an output outside it")
            with contextlib.suppress(OSError):
                if out.exists() and path.exists() and os.path.samefile(out, path):
                    raise HistRegInputError(f"{given}: is an input and would be overwritten by an output; choose another output")


# --------------------------------------------------------------------------- marked folders
def read_marker(folder) -> dict | None:
    """The marker of an output folder written by this package, or None."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((Path(folder) / MARKER).read_text())
        if isinstance(data, dict) and data.get("tool") == "napari-histreg":
            return data
    return None


def _meaningful_entries(folder: Path) -> list[Path]:
    """Entries of ``folder`` other than staging folders left by an interrupted run."""
    return [p for p in folder.iterdir() if not p.name.startswith(STAGING_PREFIX)]


def check_output_folder(out, *, inputs: Iterable = (), overwrite: bool = False, kind: str = "output folder") -> None:
    """Rules 1-3 for a folder of outputs (see the module doc); raises :class:`HistRegInputError`."""
    out = Path(out)
    check_not_inputs([out], inputs)
    if not out.exists():
        return
    if not out.is_dir():
        raise HistRegInputError(f"{out}: exists and is not a folder; give a new or empty folder for the {kind}")
    if not _meaningful_entries(out):
        return
    if read_marker(out) is None:
        raise HistRegInputError(
            f"{out}: folder exists, is not empty and is not an output of histreg (it has no {MARKER}); "
            f"nothing was written: give a new or empty folder{' (--overwrite only replaces an earlier histreg output)' if overwrite else ''}"
        )
    if not overwrite:
        raise HistRegInputError(f"{out}: holds an earlier histreg output; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def staged_outputs(out_dir, *, inputs: Iterable = (), overwrite: bool = False, command: str = "", check: bool = True,
                   extra_files: Iterable[str] = (), marker: bool = True):
    """Yield a hidden staging folder inside ``out_dir``; when the block succeeds its files are
    moved into ``out_dir`` (``os.replace``, same file system) and the marker is written;
    on any exception (``KeyboardInterrupt`` included) nothing is moved and the staging folder
    is removed, as is ``out_dir`` itself if this call created it. So a run leaves either all
    its outputs or none. ``check``: apply :func:`check_output_folder` first (rules 1-3).
    ``extra_files``: outputs of this run already in ``out_dir`` (relative names, e.g. the pair
    folders of a batch), listed in the marker with the staged ones. ``marker=False``: write no
    marker (a folder of the repository, such as the published benchmark figures)."""
    out_dir = Path(out_dir)
    if check:
        check_output_folder(out_dir, inputs=inputs, overwrite=overwrite)
    elif out_dir.exists() and not out_dir.is_dir():
        raise HistRegInputError(f"{out_dir}: output path exists and is not a folder")
    previous = read_marker(out_dir) if out_dir.is_dir() else None
    created = [p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    ok = False
    try:
        yield stage
        written = sorted(p.name for p in stage.iterdir() if not p.name.startswith("."))
        for name in written:
            destination = out_dir / name
            if destination.is_dir() and not (stage / name).is_dir():
                raise HistRegInputError(f"{destination}: is a folder where an output file belongs")
            if (stage / name).is_dir() and destination.exists():
                remove_output(destination)
            os.replace(stage / name, destination)
        listed = written + [str(name) for name in extra_files]
        for name in (previous or {}).get("files", []):
            if name not in listed and (out_dir / name).exists():
                remove_output(out_dir / name)  # stale output of the earlier run (rule 5)
        if marker:
            write_marker(out_dir, listed, command)
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds when empty


def write_marker(folder, files: Iterable[str], command: str = "") -> Path:
    from . import __version__

    return atomic_write_json(
        Path(folder) / MARKER,
        {"tool": "napari-histreg", "version": __version__, "command": command, "files": sorted(set(files))},
    )


def is_zarr_output(path) -> bool:
    """An OME-Zarr (or its ``.partial``) built by this package: it holds the job file and only
    zarr entries (metadata files and numbered level folders)."""
    from .slides import JOB_FILE, PROGRESS_FILE

    path = Path(path)
    if not path.is_dir() or not (path / JOB_FILE).is_file():
        return False
    for entry in path.iterdir():
        name = entry.name
        if name in (JOB_FILE, PROGRESS_FILE) or name in _ZARR_ENTRIES or name.isdigit():
            continue
        if name.startswith(f".{JOB_FILE}") or name.startswith("."):  # temporary files of atomic writes
            continue
        return False
    return True


def is_tool_tiff(path) -> bool:
    """A TIFF written by this package (``Software`` tag)."""
    import tifffile

    with contextlib.suppress(Exception):
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get("Software")
            return tag is not None and str(tag.value).startswith("napari-histreg")
    return False


def check_output_file(path, *, inputs: Iterable = (), overwrite: bool = False, is_ours=None, what: str = "output") -> None:
    """Rules 1-3 for a single output file: ``is_ours(path) -> bool`` recognises an earlier output."""
    path = Path(path)
    check_not_inputs([path], inputs)
    if not path.exists():
        return
    if path.is_dir():
        raise HistRegInputError(f"{path}: is a folder; give a file name for the {what}")
    ours = bool(is_ours and is_ours(path))
    if not ours:
        raise HistRegInputError(
            f"{path}: exists and is not a histreg {what}; nothing was written: give a new file name"
            + (" (--overwrite only replaces an earlier histreg output)" if overwrite else "")
        )
    if not overwrite:
        raise HistRegInputError(f"{path}: an earlier histreg {what} exists; pass --overwrite (overwrite=True) to replace it")


def remove_output(path) -> None:
    """Remove an earlier output of this package (rule 5): a file; a marked folder's listed
    files (then the folder if it is empty); a zarr store of this package. Anything else stays."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.is_dir():
        return
    if is_zarr_output(path):
        shutil.rmtree(path)
        return
    marker = read_marker(path)
    if marker is None:
        raise HistRegInputError(f"{path}: not an output of histreg; it was left as it is")
    for name in marker.get("files", []):
        entry = path / name
        if entry.exists():
            remove_output(entry)
    (path / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()
