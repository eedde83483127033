"""The installed ``histreg`` command, found the way the shell finds it.

Tests drive the command line as a user does, through the console-script entry point that pip
wrote from ``[project.scripts]`` in ``pyproject.toml`` (so a broken entry point fails them too),
and in-process so that torch is imported once. No test imports a name from
``napari_histreg.cli``: the CLI only parses and prints, and the library is tested directly.
"""

from __future__ import annotations

from importlib.metadata import entry_points


def _console_script(name: str):
    found = [point for point in entry_points(group="console_scripts") if point.name == name]
    if not found:
        raise RuntimeError(f"the {name!r} console script is not installed: run `pip install -e .` first")
    return found[0].load()


histreg = _console_script("histreg")
