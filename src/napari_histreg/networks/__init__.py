"""The three networks of the learned pipeline, their building blocks and their checkpoints.

* :mod:`.segmentation`: tissue U-Net (grey working image -> tissue probability);
* :mod:`.affine`: ResNet-like affine regressor ((source, target) -> 2x3 matrix);
* :mod:`.nonrigid`: patch U-Net ((source, target) patches -> backward patch field).

Every network stores its constructor arguments in ``.config`` so that a checkpoint rebuilds
itself (:func:`~.checkpoint.load_network`); shipped weights live in ``napari_histreg/weights``.
"""

from .checkpoint import (
    NETWORK_KINDS,
    NetworkLoadError,
    load_network,
    save_network,
    shipped_weights_path,
)

__all__ = ["NETWORK_KINDS", "NetworkLoadError", "load_network", "save_network", "shipped_weights_path"]
