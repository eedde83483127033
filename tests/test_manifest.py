"""The npe2 manifest: valid, importable, shipped inside the package, and loadable by npe2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT_MANIFEST = REPO / "napari.yaml"
PACKAGE_MANIFEST = REPO / "src" / "napari_histreg" / "napari.yaml"


def test_package_manifest_is_a_relative_symlink_to_the_root_one():
    assert PACKAGE_MANIFEST.is_symlink(), "src/napari_histreg/napari.yaml must be a symlink to ../../napari.yaml"
    assert os.readlink(PACKAGE_MANIFEST) == "../../napari.yaml"
    assert PACKAGE_MANIFEST.read_bytes() == ROOT_MANIFEST.read_bytes()


def test_manifest_validates_and_imports():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT_MANIFEST)
    assert manifest.name == "napari-histreg"
    manifest.validate_imports()  # every python_name resolves
    contrib = manifest.contributions
    assert {w.display_name for w in contrib.widgets} >= {
        "Register", "1. Preprocess", "2. Initial alignment", "3. Affine", "4. Non-rigid", "Landmark QC", "Transforms",
        "Warp whole slide", "Refine with landmarks",
    }
    patterns = {tuple(r.filename_patterns) for r in contrib.readers}
    assert {("*.csv",), ("*.json",)} <= patterns
    assert any("*.zarr" in p and "*.tif" in p for p in patterns)  # lazy slide reader
    assert {tuple(w.layer_types) for w in contrib.writers} == {("points",), ("image",), ("shapes*", "points*")}
    assert [s.key for s in contrib.sample_data] == ["sections"]


def test_npe2_validate_cli():
    npe2 = shutil.which("npe2") or str(Path(sys.executable).with_name("npe2"))
    run = subprocess.run([npe2, "validate", str(ROOT_MANIFEST), "--imports"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid" in run.stdout


def test_menus_are_contributable_in_napari():
    from napari._app_model.constants._menus import is_menu_contributable
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT_MANIFEST)
    own = {s.id for s in manifest.contributions.submenus}
    for menu_id in manifest.contributions.menus:
        assert is_menu_contributable(menu_id) or menu_id in own, menu_id
    assert "napari/layers/register" in manifest.contributions.menus


def test_installed_distribution_carries_the_manifest():
    """The package (editable or wheel install) exposes the manifest through its entry point."""
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-histreg")
    assert manifest.name == "napari-histreg"
    from_file = PluginManifest.from_file(ROOT_MANIFEST)
    assert manifest.contributions == from_file.contributions


def test_tmp_plugin_reads_landmarks(npe2pm, tmp_path):
    """Through npe2 itself (a test plugin manager, no discovery): the CSV reader and the
    points writer are found and work."""
    import npe2
    import numpy as np

    from napari_histreg.io import read_landmarks, write_landmarks

    path = write_landmarks(tmp_path / "lm.csv", ["a", "b"], np.array([[1.0, 2.0], [3.0, 4.0]]))
    with npe2pm.tmp_plugin(manifest=str(ROOT_MANIFEST)):
        layer_data = npe2.read([str(path)], stack=False, plugin_name="napari-histreg")
        (data, kwargs, kind), = layer_data
        assert kind == "points" and list(kwargs["features"]["id"]) == ["a", "b"]
        writers = list(npe2pm.iter_compatible_writers(["points"]))
        assert any(w.command == "napari-histreg.write_landmarks" for w in writers)
        out = npe2.write(str(tmp_path / "out.csv"), [(data, kwargs, kind)], plugin_name="napari-histreg")
        assert out == [str(tmp_path / "out.csv")]
        assert list(read_landmarks(tmp_path / "out.csv")[0]) == ["a", "b"]


def _ignore_for_build(folder, names):
    top = {".venv", ".git", "build", "dist", "out", "bench-out", ".pytest_cache"} if Path(folder) == REPO else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


def test_built_wheel_contains_the_manifest(tmp_path):
    """A wheel built from (a copy of) the repository carries napari_histreg/napari.yaml (the
    symlink's content) and declares the napari.manifest entry point. Offline: no isolation."""
    build = tmp_path / "src"
    shutil.copytree(REPO, build, symlinks=True, ignore=_ignore_for_build)
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "whl"), str(build)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = (tmp_path / "whl").glob("napari_histreg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_histreg/napari.yaml") == ROOT_MANIFEST.read_bytes()
        (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
        assert "[napari.manifest]" in text and "napari_histreg:napari.yaml" in text
        assert any(n.startswith("napari_histreg/_napari/widgets/") for n in zf.namelist())
        for kind in ("segmentation", "affine", "nonrigid"):  # the shipped network weights
            assert zf.read(f"napari_histreg/weights/{kind}.pt") == (REPO / "src/napari_histreg/weights" / f"{kind}.pt").read_bytes()
