"""Blocks of a slide in a thread pool, with the memory each block used handed back to the system."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
from typing import Callable, Iterable


# --------------------------------------------------------------------------- parallel blocks
@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up on first use (``find_library`` may run ``ldconfig``)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Each thread's malloc arena otherwise keeps the freed pages of the tile-sized temporaries,
    so the resident memory would grow with the number of worker threads."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def run_blocks(items: Iterable, fn: Callable, workers: int = 1, on_done: Callable | None = None) -> None:
    """Call ``fn(item)`` for every item on ``workers`` threads (at most ``2 * workers`` in
    flight, so memory stays bounded) and ``on_done(item, result)`` in the calling thread as each
    finishes. An exception (a cancelling progress callback, ``KeyboardInterrupt``) cancels the
    blocks not started, waits for the running ones and propagates."""
    callback = on_done or (lambda item, result: None)

    def on_done(item, result):
        callback(item, result)
        release_memory()

    if workers <= 1:
        for item in items:
            on_done(item, fn(item))
        return
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histreg-block")
    pending: dict = {}
    try:
        for item in items:
            while len(pending) >= 2 * workers:
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    on_done(pending.pop(future), future.result())
            pending[executor.submit(fn, item)] = item
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                on_done(pending.pop(future), future.result())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


