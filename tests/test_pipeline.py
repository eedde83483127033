"""The pipeline's own promises: the same input gives the same result, and a registration touches
no global random state (there is no seed: nothing in the registration draws random numbers)."""

import random

import numpy as np
import torch

from napari_histreg import RegistrationConfig, register
from napari_histreg.sample import make_sample_pair


def fast_config() -> RegistrationConfig:
    return RegistrationConfig.from_dict({
        "preprocess": {"working_size": 192},
        "affine": {"levels": [96, 192], "iterations": [15, 10]},
        "hybrid_affine": {"levels": [96, 192], "iterations": [10, 5]},
        "dense": {"levels": [96, 192], "iterations": [10, 5]},
        "hybrid_dense": {"levels": [96, 192], "iterations": [10, 5]},
    })


def test_a_registration_is_repeatable_and_leaves_the_callers_random_state_alone():
    pair = make_sample_pair()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    first = register(pair.source, pair.target, fast_config(), device="cpu", threads=1)
    assert random.getstate() == states[0]
    np.testing.assert_array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)  # another global state must not change the result either
    second = register(pair.source, pair.target, fast_config(), device="cpu", threads=1)
    np.testing.assert_array_equal(first.working_field, second.working_field)
    np.testing.assert_array_equal(first.matrix, second.matrix)
    assert first.confidence == second.confidence
    assert "seed" not in first.info
    mapped = first.map_source_points(pair.source_landmarks)
    before = np.median(np.linalg.norm(pair.source_landmarks - pair.target_landmarks, axis=1))
    after = np.median(np.linalg.norm(mapped - pair.target_landmarks, axis=1))
    assert after < before / 3, (before, after)  # and it is a registration, not a no-op
