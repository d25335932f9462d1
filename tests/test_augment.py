"""Stage 1 batch augmentation: each image comes out under one of the 8 symmetries of a square."""
import pytest
import torch

from vlmkit.data.augment import dihedral


def _symmetries(x):
    out = []
    for t in (x, x.transpose(-1, -2)):
        for y in (t, t.flip(-1)):
            out += [y, y.flip(-2)]
    return out


def test_dihedral_gives_every_symmetry_and_nothing_else():
    x = torch.arange(2 * 4 * 4, dtype=torch.float).reshape(1, 2, 4, 4)
    batch = x.repeat(256, 1, 1, 1)
    out = dihedral(batch, torch.Generator().manual_seed(0))
    options = _symmetries(x[0])
    assert len({tuple(o.flatten().tolist()) for o in options}) == 8
    seen = set()
    for image in out:
        match = [k for k, o in enumerate(options) if torch.equal(image, o)]
        assert len(match) == 1  # always exactly one symmetry of the input
        seen.add(match[0])
    assert seen == set(range(8))


def test_dihedral_is_reproducible_from_the_generator():
    batch = torch.randn(16, 3, 8, 8)
    a = dihedral(batch, torch.Generator().manual_seed(5))
    b = dihedral(batch, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, dihedral(batch, torch.Generator().manual_seed(6)))


def test_dihedral_refuses_non_square_images():
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.randn(2, 3, 8, 6), torch.Generator())
