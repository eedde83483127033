"""The similarity measures (similarity.py)."""

from __future__ import annotations

import torch


def test_ncc_without_a_mask_is_the_all_ones_mask_exactly():
    """The mask-free fast path of ``ncc`` (the rotation search scores 360 angles with it) must
    give the very numbers of an all-ones mask, and the known values at the extremes."""
    from napari_histreg.similarity import ncc

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5, 1, 37, 29, generator=gen)
    b = 0.3 * a + torch.rand(5, 1, 37, 29, generator=gen)
    assert torch.equal(ncc(a, b), ncc(a, b, torch.ones_like(a)))
    torch.testing.assert_close(ncc(a, a), torch.ones(5))
    torch.testing.assert_close(ncc(a, 1 - a), -torch.ones(5))
    half = torch.zeros_like(a)
    half[..., :15] = 1
    assert not torch.allclose(ncc(a, b, half), ncc(a, b))  # a real mask still counts
