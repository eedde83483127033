"""The one way every front end builds a RegistrationConfig (napari_histreg.config)."""

import json

import pytest

from napari_histreg.config import RegistrationConfig, build_config, scaled_iterations
from napari_histreg.io import HistRegInputError


def test_from_dict_applies_nested_settings_and_turns_lists_into_tuples():
    config = RegistrationConfig.from_dict({"mode": "optimise", "dense": {"iterations": [5, 4, 3], "regularisation": 2}})
    assert config.mode == "optimise"
    assert config.dense.iterations == (5, 4, 3)
    assert config.dense.regularisation == 2.0 and isinstance(config.dense.regularisation, float)
    assert RegistrationConfig().dense.iterations == (60, 40, 20)  # the defaults are untouched


def test_with_overrides_returns_a_copy_and_leaves_the_original():
    base = RegistrationConfig()
    changed = base.with_overrides({"affine": {"iterations": [1, 1, 1]}})
    assert changed.affine.iterations == (1, 1, 1)
    assert base.affine.iterations != (1, 1, 1)
    assert changed.affine is not base.affine


@pytest.mark.parametrize("settings, named", [
    ({"no_such_stage": 1}, "'no_such_stage'"),
    ({"affine": {"iterations": "many"}}, "'iterations'"),
    ({"dense": 3}, "dense"),
])
def test_a_wrong_setting_is_an_input_error_that_names_it(settings, named):
    with pytest.raises(HistRegInputError, match=named):
        RegistrationConfig.from_dict(settings, "my.json")


def test_build_config_applies_file_then_overrides_then_knobs(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"mode": "learned", "preprocess": {"working_size": 512}}))
    config = build_config(config_file=path, overrides={"mode": "optimise"}, working_size=640, mask="unet",
                          nonrigid_method="patches", iterations_factor=0.5, regularisation=3.0)
    assert config.mode == "optimise"  # the overrides win over the file
    assert config.preprocess.working_size == 640  # and the knobs over both
    assert config.use_mask and config.mask_method == "unet"
    assert config.nonrigid_method == "patches"
    defaults = RegistrationConfig()
    assert config.dense.iterations == scaled_iterations(defaults.dense.iterations, 0.5)
    assert config.hybrid_affine.iterations == scaled_iterations(defaults.hybrid_affine.iterations, 0.5)
    assert config.dense.regularisation == config.hybrid_dense.regularisation == 3.0
    assert not build_config(mask="none").use_mask


def test_build_config_refuses_unknown_choices_and_missing_files(tmp_path):
    with pytest.raises(HistRegInputError, match="unknown mode 'fastest'"):
        build_config(mode="fastest")
    with pytest.raises(HistRegInputError, match="configuration file not found"):
        build_config(config_file=tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HistRegInputError, match="not a JSON configuration"):
        build_config(config_file=tmp_path / "bad.json")


def test_scaled_iterations_keeps_at_least_one_per_level():
    assert scaled_iterations((60, 40, 1), 0.01) == (1, 1, 1)
    assert scaled_iterations((60, 40, 20), 1.5) == (90, 60, 30)
