"""The UNet's fast paths compute the same numbers as the plain ones, within stated tolerances.

float32 paths that only reorder the arithmetic (memory layout, the 3D convolution as a 2D
one, the fused GroupNorm + SiLU) must agree to float32 rounding: rtol 1e-4, atol 1e-5 on
values of order one. Where the math itself is checked, float64 is used and the bound is tight.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise
from torch import nn

import ddpm.convolutions as convolutions
import ddpm.group_norm_silu as fused_norm
from ddpm.convolutions import Conv3d, conv3d_as_conv2d, upsample_nearest_conv
from ddpm.group_norm_silu import conv_of_group_norm_silu, group_norm_silu
from ddpm.unet import AttentionBlock, ResBlock, UNet

FP32 = dict(rtol=1e-4, atol=1e-5)


def tiny_unet(dims: int, **overrides) -> UNet:
    """Two levels, attention on the lower one, every weight random (none zero-initialised)."""
    kwargs = dict(dims=dims, in_channels=2, out_channels=2, base_channels=16,
                  channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                  norm_groups=8, num_classes=4)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return randomise(UNet(**kwargs))


def inputs(dims: int, batch: int = 2, size: int | None = None):
    torch.manual_seed(2)
    size = size or (16 if dims == 2 else 8)
    x = torch.randn(batch, 2, *([size] * dims))
    return x, torch.randint(0, 1000, (batch,)), torch.tensor([0, 3, 1, 2][:batch])


def output_and_grads(model: UNet, x, t, token):
    out = model(x, t, token)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_values_and_gradients(actual, expected, wrt, **tolerance):
    """``actual`` and ``expected`` agree, and so do their gradients with respect to ``wrt``
    for one random output gradient."""
    torch.testing.assert_close(actual, expected, **tolerance)
    grad = torch.randn_like(expected)
    actual_grads = torch.autograd.grad(actual, wrt, grad)
    for a, e in zip(actual_grads, torch.autograd.grad(expected, wrt, grad)):
        torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_computes_what_contiguous_computes(dims):
    x, t, token = inputs(dims)
    out_cl, grads_cl = output_and_grads(tiny_unet(dims, channels_last=True), x, t, token)
    out_nc, grads_nc = output_and_grads(tiny_unet(dims, channels_last=False), x, t, token)
    torch.testing.assert_close(out_cl, out_nc, **FP32)
    for name, grad in grads_nc.items():
        torch.testing.assert_close(grads_cl[name], grad, **FP32, msg=name)


@pytest.mark.parametrize("dims, layout", [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_output_comes_back_in_the_layout_of_the_input(dims, layout):
    model = tiny_unet(dims)  # channels-last inside, on CPU
    x, t, token = inputs(dims)
    assert model(x, t, token).is_contiguous()
    assert model(x.contiguous(memory_format=layout), t, token).is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(1, 16, 6, 5, 7), (2, 8, 4, 4, 4)])
def test_conv3d_as_conv2d_matches_conv3d_and_its_gradients(shape, layout):
    torch.manual_seed(3)
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    conv = nn.Conv3d(shape[1], 5, 3, padding=1)
    expected = F.conv3d(x, conv.weight, conv.bias, padding=1)
    actual = conv3d_as_conv2d(x, conv.weight, conv.bias)
    assert_same_values_and_gradients(actual, expected, (x, conv.weight, conv.bias), **FP32)


@pytest.mark.parametrize("shape, dtype, rerouted", [
    ((1, 128, 12, 12, 12), torch.float32, True),    # PyTorch would take its slow kernel
    ((1, 32, 24, 24, 24), torch.float32, True),
    ((1, 64, 24, 24, 24), torch.float32, False),    # oneDNN already: keep PyTorch's path
    ((2, 128, 12, 12, 12), torch.float32, False),   # batch > 1: oneDNN already
    ((1, 128, 12, 12, 12), torch.bfloat16, False),  # bfloat16 always goes to oneDNN
])
def test_only_slow_float32_batch1_convolutions_are_rerouted(shape, dtype, rerouted):
    conv = Conv3d(shape[1], 8, 3, padding=1)
    x = torch.empty(shape, dtype=dtype)
    assert convolutions._native_conv3d_is_slow(x, conv) is rerouted


def test_3d_unet_gives_the_same_gradients_with_and_without_the_rerouted_convolution(
        monkeypatch):
    x, t, token = inputs(3, batch=1, size=8)
    fast_out, fast_grads = output_and_grads(tiny_unet(3), x, t, token)
    monkeypatch.setattr(convolutions, "_native_conv3d_is_slow", lambda x, conv: False)
    plain_out, plain_grads = output_and_grads(tiny_unet(3), x, t, token)
    torch.testing.assert_close(fast_out, plain_out, **FP32)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, **FP32, msg=name)


def test_bf16_weight_gradient_of_a_volume_shallower_than_the_kernel_is_right():
    """On some CPUs (AVX512-BF16 without AMX) oneDNN's bfloat16 weight gradient of such a
    volume leaves entries it never writes. Holes of the gradient's size, filled with NaN and
    freed just before, make any such entry show."""
    torch.manual_seed(7)
    conv = convolutions.Conv3d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 2, 4, 4)
    grad = torch.randn(2, 32, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    keep = []
    for dtype in (torch.bfloat16, torch.float32):
        blocks = [torch.full_like(conv.weight, float("nan"), dtype=dtype) for _ in range(64)]
        keep += blocks[1::2]  # every other one stays, so the freed holes keep their size
        del blocks
    y.backward(grad.bfloat16())
    expected = torch.ops.aten.convolution_backward(
        grad.bfloat16().float(), x, conv.weight, [32], [1] * 3, [1] * 3, [1] * 3, False,
        [0] * 3, 1, [False, True, False])[1]
    # bfloat16 inputs (8 significant bits) put each sum off by about 1% of the largest.
    scale = expected.abs().max().item()
    torch.testing.assert_close(conv.weight.grad, expected, rtol=0, atol=2**-5 * scale)


def test_only_low_precision_volumes_shallower_than_the_kernel_go_to_float32():
    unsafe = convolutions._bf16_weight_gradient_is_unsafe
    weight3, weight2 = torch.zeros(8, 4, 3, 3, 3, requires_grad=True), torch.zeros(
        8, 4, 2, 2, 2, requires_grad=True)
    shallow, deep = torch.zeros(1, 4, 2, 8, 8), torch.zeros(1, 4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unsafe(shallow, weight3)
        assert unsafe(torch.zeros(1, 4, 1, 8, 8), weight2)  # the upsampling's 2-tap kernel
        assert not unsafe(deep, weight3)
        assert not unsafe(shallow, weight2)
        with torch.no_grad():
            assert not unsafe(shallow, weight3)
    assert unsafe(shallow.bfloat16(), weight3)
    assert not unsafe(shallow, weight3)  # float32: oneDNN writes every entry


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 4, 3, 5, 4), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_nearest_conv_is_upsample_then_convolve_with_its_gradients(shape,
                                                                            channels_last):
    """float64, so the bound checks the folded taps, not rounding."""
    torch.manual_seed(4)
    dims = len(shape) - 2
    layout = convolutions.CHANNELS_LAST[dims] if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_()
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(shape[1], 5, 3, padding=1).double()
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    actual = upsample_nearest_conv(x, conv.weight, conv.bias)
    assert actual.is_contiguous(memory_format=layout)
    assert_same_values_and_gradients(actual, expected, (x, conv.weight, conv.bias),
                                     rtol=1e-12, atol=1e-12)


def test_upsample_of_a_small_batch1_float32_volume_takes_the_padded_route_and_agrees():
    torch.manual_seed(5)
    x = torch.randn(1, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    assert convolutions._below_onednn_threshold(x)  # so the input is padded before conv3d
    x.requires_grad_()
    conv = nn.Conv3d(8, 8, 3, padding=1)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    actual = upsample_nearest_conv(x, conv.weight, conv.bias)
    assert_same_values_and_gradients(actual, expected, (x, conv.weight, conv.bias), **FP32)


def plain_norm_silu(x, norm, scale, shift, silu):
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale[..., None, None]) + shift[..., None, None]
    return F.silu(h) if silu else h


@pytest.mark.parametrize("size", [(5, 6), (67, 800)])  # the larger: 5 slices in backward
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("film", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_group_norm_silu_matches_the_separate_modules_in_float64(layout, film, silu, size):
    torch.manual_seed(4)
    norm = nn.GroupNorm(4, 16).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # A mean far from zero and a spread unlike one: what a conv output looks like.
    x = (torch.randn(3, 16, *size, dtype=torch.float64) * 2 + 1).contiguous(memory_format=layout)
    x.requires_grad_()
    scale = torch.randn(3, 16, dtype=torch.float64, requires_grad=True) if film else None
    shift = torch.randn(3, 16, dtype=torch.float64, requires_grad=True) if film else None
    expected = plain_norm_silu(x, norm, scale, shift, silu)
    actual = group_norm_silu(x, norm, scale, shift, silu)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    wrt = [x, norm.weight, norm.bias] + ([scale, shift] if film else [])
    grad = torch.randn_like(expected)
    actual_grads = torch.autograd.grad(actual, wrt, grad)
    for a, e in zip(actual_grads, torch.autograd.grad(expected, wrt, grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("film", [True, False])
def test_normalising_from_saved_statistics_matches_group_norm(film, dtype):
    """The backward pass and the recomputation normalise from the forward's statistics
    instead of reducing again: float32 agrees with GroupNorm to rounding, and bfloat16 (which
    keeps the native kernel) exactly."""
    torch.manual_seed(5)
    x = (torch.randn(3, 16, 9, 7) * 3 + 2).contiguous(memory_format=torch.channels_last)
    a = torch.randn(3 if film else 1, 16)
    b = torch.randn(3 if film else 1, 16)
    x = x.to(dtype)
    xhat, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, 3, 16, 63, 4, 1e-5)
    expected = F.group_norm(x.double(), 4, eps=1e-5) * a[..., None, None] + b[..., None, None]
    actual = fused_norm._normalize(x, mean, rstd, 4, 1e-5, a.to(dtype), b.to(dtype))
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected, **FP32)
        torch.testing.assert_close(fused_norm._normalize(x, mean, rstd, 4, 1e-5), xhat, **FP32)
    else:
        a, b = a[..., None, None].to(dtype), b[..., None, None].to(dtype)
        assert torch.equal(actual, torch.addcmul(b, xhat, a))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch, layout", [(3, torch.contiguous_format),
                                           (3, torch.channels_last_3d),
                                           (1, torch.channels_last_3d)])
def test_slices_cover_x_once_and_are_normalised_alike(batch, layout, dtype):
    """Large enough to go in slices (along the batch, or along dim 2 for one sample), with a
    last slice shorter than the others."""
    torch.manual_seed(6)
    size = (70, 40, 48) if batch == 1 else (10, 40, 48)  # 8.6 or 3.7 MiB in bfloat16
    x = (torch.randn(batch, 16, *size, dtype=torch.float64) * 3 + 1).to(dtype)
    x = x.contiguous(memory_format=layout)
    a, b = torch.randn(batch, 16, dtype=torch.float64), torch.randn(batch, 16, dtype=torch.float64)
    xhat, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, batch, 16, x[0, 0].numel(),
                                                        4, 1e-5)
    expected = xhat.double() * a[..., None, None, None] + b[..., None, None, None]
    covered = torch.zeros(x.shape, dtype=torch.int)
    with mock.patch.object(fused_norm, "_SLICE_BYTES", 1 << 20):
        indices = list(fused_norm._slices(x))
    assert len(indices) > 1
    normalized = fused_norm._SliceNormalizer(x, mean, rstd, a, b)
    for index in indices:
        covered[index] += 1
        piece = normalized(index)
        assert piece.dtype == dtype
        # bfloat16: the statistics are stored rounded to 8 bits, the kernel keeps them in
        # float32; each differs from the other by a few roundings of 2^-9.
        tolerance = (dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64
                     else dict(rtol=2**-6, atol=2**-5))
        torch.testing.assert_close(piece.double(), expected[index], **tolerance)
    assert covered.eq(1).all()


def test_a_gpu_tensor_is_normalised_whole():
    """Slices serve the CPU's caches; on a GPU each would only add kernel launches. (The meta
    device stands in for a GPU: it has shapes and no data.)"""
    x = torch.empty(32, 64, 128, 128, dtype=torch.bfloat16, device="meta")  # 64 MiB
    assert len(list(fused_norm._slices(x))) == 1
    assert len(list(fused_norm._slices(torch.empty(x.shape, dtype=x.dtype)))) > 1


def saved_activation_elements(fn, *args) -> int:
    """Elements of the tensors autograd keeps for the backward pass (by storage, once each)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args)
    return sum(storages.values()) // 4


def test_fused_group_norm_silu_keeps_only_its_input_for_backward():
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 32, 32, requires_grad=True)
    scale = torch.randn(2, 16, requires_grad=True)
    shift = torch.randn(2, 16, requires_grad=True)
    fused = saved_activation_elements(group_norm_silu, x, norm, scale, shift)
    plain = saved_activation_elements(plain_norm_silu, x, norm, scale, shift, True)
    assert fused < 1.1 * x.numel() < plain / 2


def peak_bytes_allocated_during(fn) -> int:
    """The most bytes that ``fn()`` held allocated at once, beyond what existed before it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("batch, layout", [(4, torch.channels_last),
                                           (1, torch.channels_last_3d)])
def test_fused_group_norm_silu_backward_holds_one_activation_sized_buffer(batch, layout):
    """Besides the incoming gradient: z, which becomes grad_z and then grad_x in place; the
    normalised x exists a slice (about 4 MiB) at a time. Computing it whole would hold two."""
    spatial = (128, 128) if layout == torch.channels_last else (32, 32, 32)
    x = torch.randn(batch, 64, *spatial).contiguous(memory_format=layout)  # 16 or 8 MiB
    x.requires_grad_()
    norm = nn.GroupNorm(8, 64)
    scale, shift = torch.randn(batch, 64), torch.randn(batch, 64)
    y = group_norm_silu(x, norm, scale, shift)
    grad_y = torch.randn_like(y)
    peak = peak_bytes_allocated_during(lambda: y.backward(grad_y))
    x_bytes = x.numel() * x.element_size()
    assert x_bytes <= peak < x_bytes + (6 << 20)


def norm_conv_inputs(dims: int, batch: int, layout, film: bool):
    """A GroupNorm, a 3^d conv from 16 to 8 channels, x and (scale, shift), all random."""
    torch.manual_seed(5)
    norm = randomise(nn.GroupNorm(4, 16))
    conv = randomise(convolutions.CONV[dims](16, 8, 3, padding=1))
    x = (torch.randn(batch, 16, *([6] * dims)) * 2 + 1).contiguous(memory_format=layout)
    x.requires_grad_()
    scale = torch.randn(batch, 16, requires_grad=True) if film else None
    shift = torch.randn(batch, 16, requires_grad=True) if film else None
    return norm, conv, x, scale, shift


@pytest.mark.parametrize("film", [True, False])
@pytest.mark.parametrize("dims, batch, layout", [
    (2, 3, torch.contiguous_format),
    (2, 3, torch.channels_last),
    (3, 2, torch.channels_last_3d),
    (3, 1, torch.channels_last_3d),  # through conv3d_as_conv2d: the input is saved as a view
])
def test_recomputed_conv_input_gives_exactly_the_stored_one_gradients(dims, batch, layout, film):
    """The backward pass rebuilds the conv input with the same kernels from the same x, so
    every gradient is bit-for-bit the one the stored input gives."""
    norm, conv, x, scale, shift = norm_conv_inputs(dims, batch, layout, film)
    expected = conv(group_norm_silu(x, norm, scale, shift))
    actual = conv_of_group_norm_silu(conv, x, norm, scale, shift)
    wrt = [x, *norm.parameters(), *conv.parameters()] + ([scale, shift] if film else [])
    assert_same_values_and_gradients(actual, expected, wrt, rtol=0, atol=0)


def bytes_still_allocated_after(fn) -> int:
    """Bytes that ``fn()`` allocated and that are still allocated once it has returned (its
    result, and whatever autograd keeps for the backward pass), from the allocator's records.

    Counting the tensors autograd saves would miss the point here: the function under test
    replaces some of them through saved-tensor hooks, which outrank any outer counting hooks.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        result = fn()
    allocated = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    del result
    return allocated


def test_recomputed_conv_input_is_not_kept_for_backward():
    norm, conv, x, scale, shift = norm_conv_inputs(2, 4, torch.channels_last, film=True)
    x_bytes = x.numel() * x.element_size()  # the conv input has x's shape
    recomputed = bytes_still_allocated_after(
        lambda: conv_of_group_norm_silu(conv, x, norm, scale, shift))
    stored = bytes_still_allocated_after(lambda: conv(group_norm_silu(x, norm, scale, shift)))
    assert stored - recomputed > 0.9 * x_bytes


def test_res_block_recomputation_changes_no_gradient():
    block = randomise(ResBlock(dims=2, in_ch=16, out_ch=8, emb_dim=12, groups=4, dropout=0.0))
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 12)
    grads = []
    for recompute in (True, False):
        block.zero_grad()
        block(x, emb, recompute_conv_inputs=recompute).square().sum().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for recomputed, stored in zip(*grads):
        torch.testing.assert_close(recomputed, stored, rtol=0, atol=0)


def test_attention_does_not_keep_the_attention_matrix_for_backward():
    block = AttentionBlock(dims=2, channels=16, num_heads=2, groups=4)
    x = torch.randn(1, 16, 32, 32, requires_grad=True)  # N = 1024 tokens
    tokens = 32 * 32
    assert saved_activation_elements(block, x) < tokens * tokens / 4


def test_bf16_autocast_forward_stays_close_to_float32():
    """bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 (0.2%).

    Through the ~20 convolutions, norms and attention of the tiny UNet such errors add up
    like a random walk, to about 1% of the output's scale; 4% leaves room for unlucky seeds
    while still failing if any part ran wrongly (a wrong layout or dtype gives errors of 100%).
    """
    for dims in (2, 3):
        model = tiny_unet(dims).eval()
        x, t, token = inputs(dims)
        with torch.no_grad():
            expected = model(x, t, token)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                actual = model(x, t, token)
        assert actual.dtype == torch.bfloat16
        relative = (actual.float() - expected).norm() / expected.norm()
        assert relative < 0.04, f"{dims}D: relative error {relative:.3f}"


@pytest.mark.parametrize("dims, checkpointing", [(2, False), (3, True)])
def test_unet_compiles_as_one_graph(dims, checkpointing):
    """``model.compile: true`` pays off only if torch.compile sees the whole network at once:
    a graph break (e.g. reading a tensor's value on the host) splits it into pieces."""
    model = tiny_unet(dims, gradient_checkpointing=checkpointing).train()
    torch._dynamo.reset()
    report = torch._dynamo.explain(model)(*inputs(dims))
    assert report.graph_break_count == 0, [str(b.reason)[:200] for b in report.break_reasons]


@pytest.mark.parametrize("dims", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_unet_compiles_with_symbolic_shapes(dims):
    """A compiled model that meets a second input size (or a second model of the same code in
    one process) is traced again with symbolic sizes; forward and backward must still trace,
    and compute what eager does. Dynamo's own "eager" backend traces the forward pass and each
    custom autograd function's backward with fake tensors, as inductor's front end does,
    without inductor's minute of C++ compilation."""
    torch._dynamo.reset()
    compiled = torch.compile(tiny_unet(dims), dynamic=True, backend="eager")
    x, t, token = inputs(dims, size=12)
    eager_out, eager_grads = output_and_grads(tiny_unet(dims), x, t, token)
    out, grads = output_and_grads(compiled, x, t, token)
    torch.testing.assert_close(out, eager_out, **FP32)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[f"_orig_mod.{name}"], grad, **FP32, msg=name)


@pytest.mark.slow
def test_compiled_unet_computes_what_eager_computes():
    """torch.compile (inductor) may reorder and fuse float32 arithmetic, nothing more."""
    x, t, token = inputs(2)
    eager_out, eager_grads = output_and_grads(tiny_unet(2), x, t, token)
    torch._dynamo.reset()
    model = tiny_unet(2)
    compiled_out, compiled_grads = output_and_grads(torch.compile(model), x, t, token)
    torch.testing.assert_close(compiled_out, eager_out, **FP32)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[f"_orig_mod.{name}"], grad, **FP32, msg=name)
