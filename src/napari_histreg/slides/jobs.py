"""Resumable, atomic outputs: a pyramid is built in ``OUT.partial`` and renamed when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Iterable

from ..io import HistRegInputError, atomic_write_json
from .read import JOB_FILE, PROGRESS_FILE


# --------------------------------------------------------------------------- partial outputs
def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


class PartialOutput:
    """An output folder built in ``OUT.partial`` and renamed to ``OUT`` only by :meth:`finish`.

    ``job`` (a JSON-able dict) describes what is built; it is stored in ``OUT.partial/JOB_FILE``
    so that ``resume=True`` continues only the same job. Finished steps are appended to
    ``OUT.partial/PROGRESS_FILE`` one line each (``mark``), after their data was written, so a
    step is either recorded and complete or redone. ``OUT`` existing already raises unless
    ``overwrite`` (it is replaced at :meth:`finish`) or ``resume`` with the same job (then
    :attr:`complete` is True and nothing needs doing).
    """

    def __init__(self, out: str | os.PathLike, job: dict, *, resume: bool = False, overwrite: bool = False,
                 inputs: Iterable = ()):
        from ..outputs import check_not_inputs, is_zarr_output

        self.out = Path(os.path.abspath(out))  # "." has no name to put ".partial" after
        self.partial = partial_path(self.out)
        self.job = json.loads(json.dumps(job))
        self.complete = False
        self.done: set[str] = set()
        self._lock = threading.Lock()
        self._log = None
        check_not_inputs([self.out, self.partial], inputs)
        if self.out.exists() and not (self.out.is_dir() and not any(self.out.iterdir())):
            # the one output rule (napari_histreg.outputs): only an earlier output of this package is replaced
            if not is_zarr_output(self.out):
                raise HistRegInputError(
                    f"{self.out}: exists and is not an OME-Zarr written by histreg (no {JOB_FILE}); nothing was written: "
                    "give a new path" + (" (--overwrite only replaces an earlier histreg output)" if overwrite else "")
                )
            if resume and self._job_in(self.out) == self.job:
                self.complete = True
                return
            if not overwrite:
                raise HistRegInputError(f"{self.out}: output exists; pass overwrite (--overwrite) to replace it")
        if self.partial.exists():
            if not is_zarr_output(self.partial):
                raise HistRegInputError(
                    f"{self.partial}: exists and is not an unfinished histreg output (no {JOB_FILE}); it was left as it is: "
                    "move it away or give another output path"
                )
            if resume and self._job_in(self.partial) == self.job:
                log = self.partial / PROGRESS_FILE
                if log.exists():
                    lines = log.read_text().split("\n")
                    self.done = {line for line in lines[:-1] if line}  # the last piece may be torn
            elif resume or overwrite:
                if resume and not overwrite:
                    raise HistRegInputError(
                        f"{self.partial}: an interrupted run of a different job; pass overwrite (--overwrite) to start again"
                    )
                shutil.rmtree(self.partial)
            else:
                raise HistRegInputError(
                    f"{self.partial}: left by an interrupted run; pass resume (--resume) to continue it "
                    "or overwrite (--overwrite) to start again"
                )
        self.partial.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.partial / JOB_FILE, self.job)

    def discard_if_empty(self) -> None:
        """Remove ``OUT.partial`` when no step was finished in it (a run that failed before
        doing any work leaves nothing for --resume to continue)."""
        self.close()
        if not self.complete and not self.done and self.partial.exists():
            log = self.partial / PROGRESS_FILE
            if not log.exists() or not log.read_text().strip():
                shutil.rmtree(self.partial, ignore_errors=True)

    @staticmethod
    def _job_in(folder: Path):
        with contextlib.suppress(OSError, ValueError):
            return json.loads((folder / JOB_FILE).read_text())
        return None

    def is_done(self, key: str) -> bool:
        return key in self.done

    def mark(self, key: str) -> None:
        with self._lock:
            if self._log is None:
                self._log = open(self.partial / PROGRESS_FILE, "a")
            self._log.write(key + "\n")
            self._log.flush()
            self.done.add(key)

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def finish(self) -> Path:
        """Rename ``OUT.partial`` to ``OUT`` (replacing an old ``OUT`` when overwriting)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            (self.partial / PROGRESS_FILE).unlink()
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.complete = True
        return self.out


