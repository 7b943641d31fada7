"""F(4, 3) along the first spatial axis computes what ``F.conv2d``/``F.conv3d`` compute.

In float64 the algebra is checked tightly (1e-10): the transforms are exact there. In float32
the bound is the F(4x4, 3x3) one of ``test_winograd`` (5e-5 of the largest value; measured
a few 1e-6).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_winograd import (
    assert_float32_within_bound,
    assert_unet_agrees_with_and_without_winograd,
    assert_within_bound,
    saved_for_backward,
    values_and_grads,
)

import ddpm.convolutions as convolutions
import ddpm.winograd_axis as winograd_axis
from ddpm.convolutions import Conv2d, Conv3d
from ddpm.winograd import winograd_enabled
from ddpm.winograd_axis import axis_winograd_conv, axis_winograd_pays_off

CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def inputs(shape, c_out, dtype=torch.float64, bias=True):
    dims = len(shape) - 2
    g = torch.Generator().manual_seed(sum(shape) * 10 + c_out)
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(
        memory_format=CHANNELS_LAST[dims])
    weight = torch.randn(c_out, shape[1], *(3,) * dims, generator=g, dtype=dtype)
    weight /= math.sqrt(3**dims * shape[1])
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, weight, b)]


def direct(x, weight, bias):
    return (F.conv2d if x.ndim == 4 else F.conv3d)(x, weight, bias, padding=1)


SHAPES = [(1, 3, 9, 5, 6), (2, 4, 8, 4, 5), (1, 2, 13, 3, 3), (1, 2, 1, 4, 4),
          (3, 3, 7, 6), (2, 5, 16, 9), (1, 2, 2, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_limit", [2**23, 150, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_axis_winograd_is_the_convolution_and_its_gradients_in_float64(
        shape, chunk_limit, bias, monkeypatch):
    """Lengths that are and are not multiples of 4, one tile, batches; the rows in one chunk,
    in several, and a tile at a time (where neighbouring chunks' overlaps meet)."""
    monkeypatch.setattr(winograd_axis, "MAX_CHUNK_ELEMENTS", chunk_limit)
    args = inputs(shape, 4, bias=bias)
    actual = values_and_grads(axis_winograd_conv, *args)
    expected = values_and_grads(direct, *args)
    assert actual[0].is_contiguous(memory_format=CHANNELS_LAST[len(shape) - 2])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True),
                                   (False, True, False)])
def test_axis_winograd_computes_only_the_gradients_asked_for(needs, monkeypatch):
    monkeypatch.setattr(winograd_axis, "MAX_CHUNK_ELEMENTS", 200)
    x, weight, bias = inputs((1, 3, 10, 5, 6), 4)
    for t, need in zip((x, weight, bias), needs):
        t.requires_grad_(need)
    grad = torch.randn(1, 4, 10, 5, 6, dtype=torch.float64)  # contiguous, not channels-last
    wrt = [t for t in (x, weight, bias) if t.requires_grad]
    actual = torch.autograd.grad(axis_winograd_conv(x, weight, bias), wrt, grad)
    expected = torch.autograd.grad(direct(x, weight, bias), wrt, grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 32, 12, 10, 9), (4, 64, 16, 16)])
def test_axis_winograd_float32_error_is_within_the_stated_bound(shape):
    assert_float32_within_bound(axis_winograd_conv, direct,
                                *inputs(shape, 32, dtype=torch.float32))


def test_axis_winograd_output_is_its_own_tensor_that_may_be_changed_in_place():
    """The UNet adds the skip connection into a convolution's output in place."""
    x, weight, bias = inputs((1, 2, 8, 4, 4), 3)
    y = axis_winograd_conv(x, weight, bias)
    assert y._base is None
    y.add_(1).sum().backward()
    torch.testing.assert_close(weight.grad, torch.autograd.grad(
        direct(x, weight, bias).sum(), weight)[0], rtol=1e-10, atol=1e-10)


def test_axis_winograd_keeps_no_more_for_backward_than_the_direct_convolution():
    x, weight, bias = inputs((1, 4, 8, 6, 6), 4, dtype=torch.float32)
    assert saved_for_backward(axis_winograd_conv, x, weight, bias) <= saved_for_backward(
        direct, x, weight, bias)


def test_axis_winograd_rejects_a_kernel_it_does_not_compute():
    x = torch.randn(1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match=r"\(C_out, 4, 3, \.\.\.\) 3\^d weight"):
        axis_winograd_conv(x, torch.randn(2, 4, 3, 3))


def routed(conv, x, monkeypatch) -> bool:
    """Whether ``conv(x)`` took the axis path; asserts that it computed what conv computes."""
    calls = []
    monkeypatch.setattr(convolutions, "axis_winograd_conv",
                        lambda *a: calls.append(1) or axis_winograd_conv(*a))
    x.requires_grad_()
    actual = values_and_grads(lambda *a: conv(a[0]), x, conv.weight, conv.bias)
    expected = values_and_grads(direct, x, conv.weight, conv.bias)
    for name, a, e in zip(("output", "grad x", "grad weight", "grad bias"), actual, expected):
        assert_within_bound(a, e, name)
    return bool(calls)


@pytest.mark.parametrize("c, size, taken", [(32, 24, True), (16, 24, False), (32, 16, False)])
def test_conv3d_takes_the_depth_axis_path_by_the_real_rule(c, size, taken, monkeypatch):
    """32 channels at 24^3 (the 3D benchmark's level 1 has 64) take it; 16 channels, or too
    few voxels for the transforms' fixed cost, stay direct."""
    torch.manual_seed(0)
    conv = Conv3d(c, c, 3, padding=1)
    x = torch.randn(1, c, size, size, size).contiguous(memory_format=torch.channels_last_3d)
    assert routed(conv, x, monkeypatch) is taken


@pytest.mark.parametrize("c_in, size, taken", [(64, 64, True), (64, 32, False), (32, 64, False)])
def test_conv2d_takes_the_row_axis_path_by_the_real_rule(c_in, size, taken, monkeypatch):
    """The 2D benchmark's level 0 (64 channels at 64 x 64, batch 8) takes it; 32x32 images or
    32 channels stay direct."""
    torch.manual_seed(0)
    conv = Conv2d(c_in, 64, 3, padding=1)
    x = torch.randn(8, c_in, size, size).contiguous(memory_format=torch.channels_last)
    assert routed(conv, x, monkeypatch) is taken


def test_the_rule_turns_down_what_the_path_does_not_compute():
    x = torch.randn(1, 64, 48, 48, 48).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(64, 64, 3, 3, 3)
    assert axis_winograd_pays_off(x, weight, (1,) * 3, (1,) * 3, (1,) * 3, 1)
    assert not axis_winograd_pays_off(x, weight, (2,) * 3, (1,) * 3, (1,) * 3, 1)
    assert not axis_winograd_pays_off(x.contiguous(), weight, (1,) * 3, (1,) * 3, (1,) * 3, 1)
    assert not axis_winograd_pays_off(x.double(), weight.double(), (1,) * 3, (1,) * 3,
                                      (1,) * 3, 1)
    with winograd_enabled(False):
        assert not axis_winograd_pays_off(x, weight, (1,) * 3, (1,) * 3, (1,) * 3, 1)


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_with_the_axis_path_computes_what_it_computes_without(dims, monkeypatch):
    """Output and every parameter's gradient, through the recomputed convolution inputs (the
    axis path saves a view of the GroupNorm + SiLU output) and gradient checkpointing."""
    monkeypatch.setattr(winograd_axis, "MIN_CHANNELS", {2: 1, 3: 1})
    monkeypatch.setattr(winograd_axis, "MIN_WORK", {2: 1, 3: 1})
    monkeypatch.setattr(winograd_axis, "MAX_CHUNK_ELEMENTS", 500)  # several chunks
    kwargs = dict(dims=dims, in_channels=2, out_channels=2, base_channels=16,
                  channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                  norm_groups=8, num_classes=4)
    x = torch.randn(2, 2, *(8,) * dims, generator=torch.Generator().manual_seed(2))
    t, token = torch.tensor([7, 300]), torch.tensor([1, 3])
    assert_unet_agrees_with_and_without_winograd(kwargs, x, t, token)
