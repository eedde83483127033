"""Sample data contribution: the bundled pair of consecutive sections with landmarks."""

from __future__ import annotations


def sample_pair() -> list[tuple]:
    """Target image, source image, target landmarks, source landmarks (``LayerDataTuple``s)."""
    from ..sample import sample_layer_data

    return list(sample_layer_data())
