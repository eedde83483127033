"""Training of the learned stages (``histreg train segmentation|affine|nonrigid``).

Networks learn without landmarks: from the images of a folder or cover table (any pairing
within one tissue block), scikit-image's immunohistochemistry image split into two stains, and
synthetic pairs made by random affine + smooth elastic warps with stain and intensity jitter.
:mod:`.data` builds the samples, :mod:`.loop` runs a seeded, resumable optimisation.
"""
