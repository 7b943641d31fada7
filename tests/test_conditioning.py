"""Local z-binning and class tokens."""

from collections import Counter

import pytest
import torch

from ddpm.conditioning import (
    PositionEmbedding,
    TokenEmbedding,
    class_token,
    quantize_z_local,
    quantize_z_local_tensor,
    sinusoidal_embedding,
    split_token,
)

RANGES = [(lo, lo + n - 1) for lo in (0, 3, 24) for n in (1, 2, 7, 30, 31, 70, 97, 128)]


@pytest.mark.parametrize("z_range", RANGES)
@pytest.mark.parametrize("n_bins", [1, 2, 3, 10, 30])
def test_local_bins_are_all_used_balanced_and_monotone(z_range, n_bins):
    lo, hi = z_range
    if hi - lo + 1 < n_bins:
        with pytest.raises(ValueError, match="fewer than n_bins"):
            quantize_z_local(lo, z_range, n_bins)
        return
    bins = [quantize_z_local(z, z_range, n_bins) for z in range(lo, hi + 1)]
    assert set(bins) == set(range(n_bins))
    sizes = Counter(bins).values()
    assert max(sizes) - min(sizes) <= 1
    assert all(a <= b for a, b in zip(bins, bins[1:]))


def test_seed_example_24_to_93_with_10_bins_uses_all_bins():
    bins = {quantize_z_local(z, (24, 93), 10) for z in range(24, 94)}
    assert bins == set(range(10))


@pytest.mark.parametrize("z", [23, 94, -1])
def test_z_outside_the_range_is_an_error(z):
    with pytest.raises(ValueError, match="outside"):
        quantize_z_local(z, (24, 93), 10)


def test_tensor_binning_agrees_with_scalar_binning():
    z = torch.arange(24, 94)
    expected = torch.tensor([quantize_z_local(int(v), (24, 93), 30) for v in z])
    assert torch.equal(quantize_z_local_tensor(z, (24, 93), 30), expected)
    with pytest.raises(ValueError):
        quantize_z_local_tensor(torch.tensor([10]), (24, 93), 30)


def test_class_token_and_its_inverse_cover_0_to_2n_minus_1():
    tokens = {class_token(b, p, 30) for b in range(30) for p in (0, 1)}
    assert tokens == set(range(60))
    for b in range(30):
        for p in (0, 1):
            assert split_token(class_token(b, p, 30), 30) == (b, p)
    t = class_token(torch.tensor([0, 29, 5]), torch.tensor([1, 0, 1]), 30)
    assert t.tolist() == [30, 29, 35]
    bins, path = split_token(t, 30)
    assert bins.tolist() == [0, 29, 5] and path.tolist() == [1, 0, 1]


@pytest.mark.parametrize("z_bin,pathology", [(30, 0), (-1, 0), (3, 2)])
def test_class_token_rejects_out_of_range_parts(z_bin, pathology):
    with pytest.raises(ValueError):
        class_token(z_bin, pathology, 30)


def test_sinusoidal_embedding_shape_and_distinct_rows():
    emb = sinusoidal_embedding(torch.tensor([0, 1, 500]), 33)
    assert emb.shape == (3, 33)
    assert not torch.allclose(emb[1], emb[2])


def test_null_token_embedding_is_shared_by_negative_and_last_index():
    emb = TokenEmbedding(4, 8)
    torch.testing.assert_close(emb(torch.tensor([-1])), emb(torch.tensor([4])))
    assert emb.null_token == 4


def test_nearby_positions_get_nearer_embeddings_than_far_ones():
    emb = PositionEmbedding(32)
    with torch.no_grad():
        e = sinusoidal_embedding(torch.tensor([0.50, 0.51, 0.9]) * emb.scale, 32)
    assert (e[0] - e[1]).norm() < (e[0] - e[2]).norm()
