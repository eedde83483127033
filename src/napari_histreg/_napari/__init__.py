"""The napari plugin layer of napari-histreg (widgets, readers, writers, sample data).

It only converts layers to arrays, runs the napari-free core in a background worker and turns
results into layers. Scripting from the napari console::

    from napari_histreg import register
    from napari_histreg._napari import add_layers, result_to_layers

    src, tgt = viewer.layers["source"], viewer.layers["target"]
    result = register(src.data, tgt.data)
    add_layers(viewer, result_to_layers(result, src, target_layer=tgt))
"""

from .layers import add_layers, field_to_vectors, jacobian_determinant, result_to_layers
from .transform_layers import transform_layer

__all__ = ["add_layers", "field_to_vectors", "jacobian_determinant", "result_to_layers", "transform_layer"]
