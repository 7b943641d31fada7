"""Winograd F(4x4, 3x3) convolutions compute what ``F.conv2d`` computes.

In float64 the algebra is checked tightly (1e-10): the transforms are exact there. In float32
the bound is the one the module states: errors relative to the largest output under 5e-5
(measured about 1e-5, against 1e-6 for the direct convolution; ``python -m bench.winograd``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise

import ddpm.winograd as winograd
from ddpm.convolutions import Conv2d, Conv3d, upsample_nearest_conv
from ddpm.unet import ResBlock, UNet
from ddpm.winograd import winograd_conv2d, winograd_enabled, winograd_pays_off

FP32_RELATIVE = 5e-5


def conv_inputs(n, c_in, c_out, h, w, dtype=torch.float64, channels_last=True, bias=True):
    g = torch.Generator().manual_seed(n * 1000 + c_in * 100 + h * 10 + w)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype) / math.sqrt(9 * c_in)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, weight, b)]


def values_and_grads(fn, x, weight, bias, grad_seed=0):
    y = fn(x, weight, bias)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed),
                       dtype=torch.float64).to(y.dtype)  # the same values in any dtype
    wrt = [t for t in (x, weight, bias) if t is not None]
    return [y.detach(), *torch.autograd.grad(y, wrt, grad)]


def assert_within_bound(actual, expected, name=""):
    """The float32 bound: the largest error under FP32_RELATIVE of the largest value."""
    error = ((actual.double() - expected.double()).abs().max()
             / expected.double().abs().max().clamp_min(1e-30)).item()
    assert error < FP32_RELATIVE, f"{name}: relative error {error:.1e}"


def direct(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=1)


@pytest.mark.parametrize("size", [(4, 4), (8, 12), (7, 5), (13, 13), (1, 2)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_is_the_convolution_and_its_gradients_in_float64(size, channels_last, bias):
    inputs = conv_inputs(2, 5, 3, *size, channels_last=channels_last, bias=bias)
    actual = values_and_grads(winograd_conv2d, *inputs)
    expected = values_and_grads(direct, *inputs)
    assert actual[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 16, 24, 16, 16), (3, 8, 8, 9, 11)])
def test_winograd_float32_error_is_within_the_stated_bound(shape):
    assert_float32_within_bound(winograd_conv2d, direct,
                                *conv_inputs(*shape, dtype=torch.float32))


def assert_float32_within_bound(fast, direct, x, weight, bias):
    """``fast``'s float32 output and gradients within the bound of the float64 ``direct``'s."""
    actual = values_and_grads(fast, x, weight, bias)
    exact = values_and_grads(direct, *(t.detach().double().requires_grad_()
                                       for t in (x, weight, bias)))
    for name, a, e in zip(("output", "grad x", "grad weight", "grad bias"), actual, exact):
        assert_within_bound(a, e, name)


def test_winograd_rejects_a_kernel_that_is_not_3x3():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\(C_out, 4, 3, 3\) weight"):
        winograd_conv2d(x, torch.randn(2, 4, 5, 5))


def upsample_then_conv(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


def winograd_upsample(x, weight, bias):
    return winograd_conv2d(x, weight, bias, upsample=True)


@pytest.mark.parametrize("size", [(2, 2), (4, 6), (5, 3), (7, 7), (1, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_upsampling_is_the_convolution_of_the_doubled_input_in_float64(
        size, channels_last, bias):
    """Odd sizes too: their doubled image ends inside a 4x4 output block."""
    inputs = conv_inputs(2, 5, 3, *size, channels_last=channels_last, bias=bias)
    actual = values_and_grads(winograd_upsample, *inputs)
    expected = values_and_grads(upsample_then_conv, *inputs)
    assert actual[0].shape[-2:] == (2 * size[0], 2 * size[1])
    assert actual[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_winograd_upsampling_float32_error_is_within_the_stated_bound():
    x, weight, bias = conv_inputs(3, 16, 24, 8, 7, dtype=torch.float32)
    actual = values_and_grads(winograd_upsample, x, weight, bias)
    exact = values_and_grads(upsample_then_conv, *(t.detach().double().requires_grad_()
                                                   for t in (x, weight, bias)))
    for name, a, e in zip(("output", "grad x", "grad weight", "grad bias"), actual, exact):
        assert_within_bound(a, e, name)


@pytest.mark.parametrize("n", [3, 5])
def test_chunks_of_the_batch_compute_the_whole_upsampling(monkeypatch, n):
    monkeypatch.setattr(winograd, "MAX_BLOCKS_TIMES_CHANNELS", 2 * 4 * 5)  # 2 images of 4
    inputs = conv_inputs(n, 5, 3, 4, 3)
    for a, e in zip(values_and_grads(winograd_upsample, *inputs),
                    values_and_grads(upsample_then_conv, *inputs)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


UPSAMPLED = dict(n=8, c_in=256, c_out=256, h=16, w=16)  # the 2D workload's lowest upsampling


def routed_upsampling(n, c_in, c_out, h, w, dtype=torch.float32, channels_last=True):
    x = torch.empty(n, c_in, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.empty(c_out, c_in, 3, 3, dtype=dtype)
    return winograd_pays_off(x, weight, (1, 1), (1, 1), (1, 1), 1, upsample=True)


@pytest.mark.parametrize("change", [
    dict(c_in=64, c_out=64),  # too narrow
    dict(c_in=128, c_out=128, h=32, w=32),  # 64^2 outputs: the direct form is faster
    dict(n=1, h=4, w=4),  # 4 output blocks: too few
    dict(dtype=torch.bfloat16), dict(channels_last=False),
])
def test_upsampling_takes_winograd_only_in_the_measured_range(change):
    assert routed_upsampling(**UPSAMPLED)
    assert not routed_upsampling(**{**UPSAMPLED, **change})


def test_upsample_nearest_conv_routes_through_winograd_and_back(winograd_everywhere,
                                                               monkeypatch):
    x, weight, bias = conv_inputs(2, 8, 8, 5, 6, dtype=torch.float32)
    calls = []
    original = winograd.winograd_conv2d
    monkeypatch.setattr("ddpm.convolutions.winograd_conv2d",
                        lambda *a, **k: calls.append(k) or original(*a, **k))
    actual = values_and_grads(upsample_nearest_conv, x, weight, bias)
    assert calls == [{"upsample": True}]
    with winograd_enabled(False):
        direct_form = values_and_grads(upsample_nearest_conv, x, weight, bias)
    assert calls == [{"upsample": True}]
    exact = values_and_grads(upsample_then_conv, *(t.detach().double().requires_grad_()
                                                   for t in (x, weight, bias)))
    for name, a, d, e in zip(("output", "grad x", "grad weight", "grad bias"), actual,
                             direct_form, exact):
        assert_within_bound(a, e, name)
        assert_within_bound(d, e, name)


ROUTED = dict(n=8, c_in=128, c_out=128, h=32, w=32)  # a layer measured to pay off


def routed(n, c_in, c_out, h, w, dtype=torch.float32, channels_last=True, stride=1):
    x = torch.empty(n, c_in, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.empty(c_out, c_in, 3, 3, dtype=dtype)
    return winograd_pays_off(x, weight, (stride, stride), (1, 1), (1, 1), 1)


def test_a_wide_float32_channels_last_layer_takes_winograd():
    assert routed(**ROUTED)


@pytest.mark.parametrize("change", [
    dict(c_in=64), dict(c_out=64),  # too narrow: the transforms dominate
    dict(n=1, h=16, w=16),  # 16 output blocks: too few
    dict(n=1, h=256, w=256),  # 4096 blocks x 128 channels in one image: beyond the caches
    dict(dtype=torch.bfloat16), dict(channels_last=False), dict(stride=2),
])
def test_layers_outside_the_measured_range_stay_direct(change):
    assert not routed(**{**ROUTED, **change})


def test_autocast_and_the_switch_keep_convolutions_direct():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not routed(**ROUTED)
    with winograd_enabled(False):
        assert not routed(**ROUTED)
    assert routed(**ROUTED)  # the switch restores the previous setting


def test_a_large_batch_takes_winograd_in_chunks_of_images():
    assert routed(**{**ROUTED, "n": 64, "h": 64, "w": 64})
    assert winograd._chunks(64, 256, 128) == [slice(s, s + 4) for s in range(0, 64, 4)]
    assert winograd._chunks(7, 256, 256) == [slice(0, 2), slice(2, 4), slice(4, 6),
                                             slice(6, 7)]


@pytest.mark.parametrize("n", [3, 5])
def test_chunks_of_the_batch_compute_the_whole_convolution(monkeypatch, n):
    """Uneven chunks (2 + 1 and 2 + 2 + 1 images), float64: same bound as unchunked."""
    monkeypatch.setattr(winograd, "MAX_BLOCKS_TIMES_CHANNELS", 2 * 6 * 5)  # 2 images of 6
    assert len(winograd._chunks(n, 6, 5)) == math.ceil(n / 2)
    inputs = conv_inputs(n, 5, 3, 7, 9)
    for a, e in zip(values_and_grads(winograd_conv2d, *inputs),
                    values_and_grads(direct, *inputs)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Route even the tiny test layers through Winograd."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_CHANNELS_UPSAMPLE", 1)
    monkeypatch.setattr(winograd, "MIN_BLOCKS", 1)


def test_conv2d_module_routes_through_winograd_and_back(winograd_everywhere, monkeypatch):
    torch.manual_seed(0)
    conv = Conv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    calls = []
    monkeypatch.setattr("ddpm.convolutions.winograd_conv2d",
                        lambda *a: calls.append(1) or winograd_conv2d(*a))
    assert_within_bound(conv(x), direct(x, conv.weight, conv.bias))
    assert calls == [1]
    with winograd_enabled(False):
        assert torch.equal(conv(x), direct(x, conv.weight, conv.bias))
    assert calls == [1]


def winograd_calls_of_conv3d(conv, x, monkeypatch) -> int:
    """How many Winograd convolutions ``conv(x)`` ran; asserts that its output and every
    gradient agree with ``F.conv3d`` within the float32 bound."""
    x.requires_grad_()
    calls = []
    original = winograd.winograd_conv2d
    monkeypatch.setattr("ddpm.winograd.winograd_conv2d",
                        lambda *a: calls.append(1) or original(*a))
    actual = values_and_grads(lambda *a: conv(a[0]), x, conv.weight, conv.bias)
    expected = values_and_grads(lambda *a: F.conv3d(a[0], conv.weight, conv.bias, padding=1),
                                x, conv.weight, conv.bias)
    for name, a, e in zip(("output", "grad x", "grad weight", "grad bias"), actual, expected):
        assert_within_bound(a, e, name)
    return len(calls)


def test_batch1_conv3d_takes_winograd_through_its_2d_route(winograd_everywhere, monkeypatch):
    torch.manual_seed(1)
    conv = Conv3d(8, 4, 3, padding=1)
    x = torch.randn(1, 8, 6, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    assert winograd_calls_of_conv3d(conv, x, monkeypatch) == 1


@pytest.mark.parametrize("c_in, routed", [(128, True), (96, False)])
def test_a_wide_batch1_conv3d_takes_winograd_through_its_2d_route(monkeypatch, c_in, routed):
    """Above PyTorch's oneDNN threshold, with the real routing thresholds: the 2D route is
    taken where its 2D convolution takes Winograd (C_in and 3 C_out at least 128), and then
    computes what conv3d computes."""
    torch.manual_seed(4)
    conv = Conv3d(c_in, 48, 3, padding=1)
    x = torch.randn(1, c_in, 16, 16, 8).contiguous(memory_format=torch.channels_last_3d)
    assert winograd_calls_of_conv3d(conv, x, monkeypatch) == int(routed)


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_with_winograd_computes_what_it_computes_without(winograd_everywhere, dims):
    """Output and every parameter's gradient, through the recomputed convolution inputs and
    gradient checkpointing alike."""
    kwargs = dict(dims=dims, in_channels=2, out_channels=2, base_channels=16,
                  channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                  norm_groups=8, num_classes=4)
    x = torch.randn(1, 2, *(8,) * dims, generator=torch.Generator().manual_seed(2))
    t, token = torch.tensor([7]), torch.tensor([1])
    assert_unet_agrees_with_and_without_winograd(kwargs, x, t, token)


def assert_unet_agrees_with_and_without_winograd(kwargs, x, t, token):
    """The UNet's output and every parameter's gradient with Winograd on and off, without and
    with gradient checkpointing: different (Winograd did run), within the float32 bound."""
    for checkpointing in (False, True):
        results = []
        for enabled in (True, False):
            torch.manual_seed(0)
            model = randomise(UNet(**kwargs, gradient_checkpointing=checkpointing))
            with winograd_enabled(enabled):
                out = model(x, t, token)
                out.square().mean().backward()
            results.append([out.detach()] + [p.grad for p in model.parameters()])
        assert not torch.equal(results[0][0], results[1][0])  # Winograd did run
        for a, e in zip(*results):
            assert_within_bound(a, e)


def saved_for_backward(fn, *args) -> int:
    """How many elements ``fn(*args)`` keeps for its backward pass."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(sizes)


def test_winograd_keeps_no_more_for_backward_than_the_direct_convolution():
    x, weight, bias = conv_inputs(2, 8, 8, 8, 8, dtype=torch.float32)
    assert saved_for_backward(winograd_conv2d, x, weight, bias) <= saved_for_backward(
        direct, x, weight, bias)


def test_residual_convolutions_of_the_benchmark_2d_model_are_routed_by_width():
    """bench/peers.py's 2D workload (batch 8, 64 x 64, widths 64/128/256): every 3x3
    convolution of a residual block at 256 channels (16 x 16) takes Winograd, none at 64."""
    model = UNet(dims=2, in_channels=2, out_channels=2, base_channels=64,
                 channel_mults=(1, 2, 4), num_res_blocks=2, attention_levels=(2,),
                 num_heads=4, num_classes=60)
    size = {64: 64, 128: 32, 256: 16}
    routes = {64: set(), 128: set(), 256: set()}
    for block in model.modules():
        if isinstance(block, ResBlock):
            for conv in (block.conv1, block.conv2):
                x = torch.empty(8, conv.in_channels, size[conv.out_channels],
                                size[conv.out_channels]).contiguous(
                                    memory_format=torch.channels_last)
                routes[conv.out_channels].add(winograd_pays_off(
                    x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups))
    assert routes == {64: {False}, 128: {True, False}, 256: {True}}


def counted_weight_transforms(monkeypatch) -> list:
    """Record every weight transform actually computed (not taken from the cache)."""
    calls, original = [], winograd._transform_weight
    monkeypatch.setattr(winograd, "_transform_weight",
                        lambda w: calls.append(w.shape) or original(w))
    return calls


def test_sampling_reuses_a_weight_transform_until_the_weight_changes(winograd_everywhere,
                                                                       monkeypatch):
    calls = counted_weight_transforms(monkeypatch)
    torch.manual_seed(2)
    conv = Conv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        uncached = conv(x)
        with winograd.reused_weight_transforms():
            assert torch.equal(conv(x), uncached) and torch.equal(conv(x), uncached)
            assert len(calls) == 2  # the uncached call, then one for both cached ones
            conv.weight.mul_(-1)  # an in-place change (an EMA update, say) bumps the version
            changed = conv(x)
            assert len(calls) == 3
            assert_within_bound(changed, direct(x, conv.weight, conv.bias))
        conv(x)  # outside the block: computed again, and nothing is kept
        assert len(calls) == 4 and winograd._weight_cache is None


def test_weight_transforms_are_cached_for_parameters_only(winograd_everywhere, monkeypatch):
    calls = counted_weight_transforms(monkeypatch)
    x, weight, bias = conv_inputs(2, 6, 4, 8, 8, dtype=torch.float32, bias=True)
    parameter = torch.nn.Parameter(weight.detach().clone())
    with torch.no_grad(), winograd.reused_weight_transforms():
        plain = weight.detach().clone()  # a temporary: its storage could be reused
        winograd_conv2d(x, plain, bias), winograd_conv2d(x, plain, bias)
        assert len(calls) == 2
        winograd_conv2d(x, parameter, bias), winograd_conv2d(x, parameter, bias)
        assert len(calls) == 3


def test_gradients_through_cached_weight_transforms_are_right(winograd_everywhere):
    x, weight, bias = conv_inputs(2, 6, 4, 8, 8, dtype=torch.float64, bias=True)
    parameter = torch.nn.Parameter(weight.detach().clone())
    with winograd.reused_weight_transforms():
        values_and_grads(winograd_conv2d, x, parameter, bias)  # fills the cache
        with torch.no_grad():
            parameter.mul_(0.5)  # an optimiser step: the cached transform is now stale
        actual = values_and_grads(winograd_conv2d, x, parameter, bias)
    expected = values_and_grads(direct, x, parameter, bias)
    for name, a, e in zip(("output", "grad x", "grad weight", "grad bias"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_the_samplers_reuse_weight_transforms_across_steps(winograd_everywhere, monkeypatch):
    from ddpm.flow import flow_sample
    from ddpm.sampling import sample
    from ddpm.schedule import NoiseSchedule

    calls = counted_weight_transforms(monkeypatch)
    torch.manual_seed(3)
    conv = Conv2d(3, 3, 3, padding=1)

    def denoiser(x, t):
        return conv(x.contiguous(memory_format=torch.channels_last))

    sample(denoiser, NoiseSchedule("cosine", 100), (2, 3, 8, 8), steps=4, progress=False)
    assert len(calls) == 1
    flow_sample(denoiser, (2, 3, 8, 8), steps=3, method="heun", progress=False)
    assert len(calls) == 2
