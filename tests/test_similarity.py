"""The similarity measures (similarity.py)."""

from __future__ import annotations

import pytest
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


def _autograd_diffusion(field):
    d_row = field[:, :, 1:, :] - field[:, :, :-1, :]
    d_col = field[:, :, :, 1:] - field[:, :, :, :-1]
    return d_row.pow(2).mean(dim=(1, 2, 3)) + d_col.pow(2).mean(dim=(1, 2, 3))


def _autograd_folding(field, orientation=1.0, floor=0.2):
    from napari_histreg.similarity import jacobian_determinant

    det = jacobian_determinant(field) * (1.0 if orientation >= 0 else -1.0)
    return torch.relu(floor - det).pow(2).mean(dim=(1, 2))


@pytest.mark.parametrize("orientation", [1.0, -1.0])
def test_written_out_gradients_of_diffusion_and_folding_equal_autograd(orientation):
    from napari_histreg.similarity import diffusion, folding

    torch.manual_seed(0)
    # strong enough that part of the grid folds (the fold term's gradient is not all zero)
    field = (torch.randn(2, 2, 17, 23, dtype=torch.float64) * 0.6).requires_grad_(True)
    weights = torch.tensor([0.7, 1.3], dtype=torch.float64)
    for written, reference in ((diffusion, _autograd_diffusion),
                               (lambda f: folding(f, orientation), lambda f: _autograd_folding(f, orientation))):
        ours, = torch.autograd.grad((written(field) * weights).sum(), field)
        theirs, = torch.autograd.grad((reference(field) * weights).sum(), field)
        assert theirs.abs().max() > 1e-3
        torch.testing.assert_close(written(field), reference(field))
        torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda f: folding(f, orientation), (field[:1, :, :6, :7].detach().clone().requires_grad_(True),))
    assert torch.autograd.gradcheck(diffusion, (field[:1, :, :6, :7].detach().clone().requires_grad_(True),))
