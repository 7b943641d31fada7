"""The UNet's convolutions, each computing what its PyTorch counterpart computes, faster.

- ``Conv2d``: wide float32 CPU 3x3 layers by Winograd's F(4x4, 3x3) (``ddpm.winograd``).
- ``Conv3d``: float32 CPU volumes by F(4, 3) along the depth axis (``ddpm.winograd_axis``);
  batch-1 volumes whose low-resolution levels PyTorch would send to a slow kernel or whose
  wide layers Winograd computes faster, as one 2D convolution over the depth slices
  (``conv3d_as_conv2d``).
- ``upsample_nearest_conv``: nearest-neighbour upsampling followed by a 3^d convolution,
  computed at the input resolution (wide 2D layers by Winograd as well).

Also the memory-layout helpers the UNet shares with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ddpm.winograd import conv2d_3x3, winograd_conv2d, winograd_pays_off
from ddpm.winograd_axis import axis_winograd_conv, axis_winograd_pays_off

CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}  # per spatial dims


def _below_onednn_threshold(x: torch.Tensor) -> bool:
    """Whether PyTorch would send a float32 3D convolution of ``x`` to its slow im2col kernel.

    PyTorch picks oneDNN for a float32 CPU convolution with a kernel under 4 only if the batch
    is > 1 or N * C * D * H > 20480 (a heuristic tuned on 2D shapes; it ignores W). With batch
    1 that sends the low-resolution levels of a 3D UNet (e.g. 128 x 12^3) to a native kernel
    that is 2-3x slower than oneDNN, forward and backward. bfloat16 always goes to oneDNN.
    """
    return (
        x.ndim == 5
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.shape[0] == 1
        and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= 20480
    )


def _is_plain_3x3x3(conv: nn.Conv3d) -> bool:
    """Whether ``conv`` is the kind of convolution ``conv3d_as_conv2d`` computes."""
    return (
        conv.kernel_size == (3, 3, 3)
        and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
    )


def _native_conv3d_is_slow(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    """Whether this 3x3x3 convolution (the kind ``conv3d_as_conv2d`` computes) would take
    PyTorch's slow kernel (see ``_below_onednn_threshold``)."""
    return _below_onednn_threshold(x) and _is_plain_3x3x3(conv)


MAX_ROUTED_TAP_OUTPUTS = 2**20  # 4 MiB of float32 (see _winograd_route_pays_off)


def _winograd_route_pays_off(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    """Whether ``conv3d_as_conv2d`` of this batch-1 channels-last volume would take Winograd
    for its 2D convolution (``winograd_pays_off`` on the depth slices and the 3 C_out tap
    channels), which then beats oneDNN's direct conv3d, and the volume is small.

    On a 2-core AMD EPYC, forward + backward, layer by layer (``python -m bench.winograd``):
    1.03-1.23x for 384, 256 or 192 -> 128 channels at 12^3 (forward alone 0.92-1.02x) and
    1.15-1.39x for 192 or 128 -> 64 at 24^3, the wide decoder layers of the 3D benchmark
    model; the layers the Winograd rule turns down lose (96 or 64 -> 64 at 24^3: 0.79-0.85x).
    Only volumes whose tap outputs (3 C_out D H W) fit in ``MAX_ROUTED_TAP_OUTPUTS`` are
    routed: the route's temporaries (the taps, then Winograd's transformed tiles) are several
    times the layer's output, and with the 24^3 layers routed too the model's peak RSS was
    40 MiB higher in one ``bench.peers`` run (1506 against 1466 MiB). Training speed against
    no routing (``python -m bench.ab --switch winograd-3d-route-off --dims 3``): 1.02x either
    way.
    """
    if not (x.ndim == 5 and x.shape[0] == 1 and _is_plain_3x3x3(conv)
            and 3 * conv.out_channels * x[0, 0].numel() <= MAX_ROUTED_TAP_OUTPUTS
            and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return False
    n, c, d, h, w = x.shape
    slices = x.movedim(2, 1).reshape(n * d, c, h, w)  # a view: x is channels-last
    taps = torch.empty((3 * conv.out_channels, c, 3, 3), dtype=conv.weight.dtype, device="meta")
    return winograd_pays_off(slices, taps, (1, 1), (1, 1), (1, 1), 1)


def conv3d_as_conv2d(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3x3 convolution (stride 1, zero padding 1) computed by one 2D convolution.

    out[:, :, d] = sum_k conv2d(x[:, :, d + k - 1], W[:, :, k]) with x zero outside the volume:
    the depth slices become the batch of one conv2d whose 3 * C_out output channels are the
    three depth taps, then each output slice sums its three taps. Same arithmetic as conv3d,
    but the batch of D slices takes oneDNN's fast path (see ``_native_conv3d_is_slow``).
    """
    n, c, d, h, w = x.shape
    o = weight.shape[0]
    slices = x.movedim(2, 1).reshape(n * d, c, h, w)  # (N D, C, H, W); a view if channels-last
    taps = weight.movedim(2, 0).reshape(3 * o, c, 3, 3)  # (3 C_out, C, 3, 3), tap-major
    tap_bias = None
    if bias is not None:  # the bias belongs to the output once: put it on the middle tap
        zeros = torch.zeros_like(bias)
        tap_bias = torch.cat([zeros, bias, zeros])
    y = conv2d_3x3(slices, taps, tap_bias)  # (N D, 3 C_out, H, W)
    y = y.permute(0, 2, 3, 1).reshape(n, d, h, w, 3, o)  # a view if channels-last
    out = y[..., 1, :].contiguous()  # (N, D, H, W, C_out): the tap at the same depth
    out[:, 1:] += y[:, :-1, ..., 0, :]  # slice d - 1 through the first tap
    out[:, :-1] += y[:, 1:, ..., 2, :]  # slice d + 1 through the last tap
    return out.permute(0, 4, 1, 2, 3)  # (N, C_out, D, H, W), channels-last strides


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes wide float32 CPU 3x3 layers by Winograd's F(4x4, 3x3)
    (``ddpm.winograd``), where that is measured to be faster than PyTorch's kernel."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode == "zeros" and winograd_pays_off(
                x, weight, self.stride, self.padding, self.dilation, self.groups):
            return winograd_conv2d(x, weight, bias)
        if self.padding_mode == "zeros" and axis_winograd_pays_off(
                x, weight, self.stride, self.padding, self.dilation, self.groups):
            return axis_winograd_conv(x, weight, bias)
        return super()._conv_forward(x, weight, bias)


def _bf16_weight_gradient_is_unsafe(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN would compute the weight gradient of this 3D bfloat16 CPU convolution
    partly from memory it never wrote: seen for a volume shallower than the kernel (2 deep
    under 3, 1 under 2: the lowest levels of a deep UNet on small patches) on an AVX512-BF16
    CPU without AMX. The gradient then holds whatever the allocator's memory held before, NaN
    or silently wrong values (a test fills that memory with NaN to show it).
    """
    if not (x.ndim == 5 and x.shape[2] < weight.shape[2] and x.device.type == "cpu"):
        return False  # the usual case, decided before any autocast or grad-mode lookup
    low_precision = x.dtype in (torch.bfloat16, torch.float16) or (
        x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"))
    return low_precision and torch.is_grad_enabled() and weight.requires_grad


def _conv3d_in_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       **kwargs) -> torch.Tensor:
    """``F.conv3d`` in float32, returned in the low precision it was asked in (tiny volumes
    only, where float32 costs little; see ``_bf16_weight_gradient_is_unsafe``)."""
    dtype = torch.get_autocast_dtype("cpu") if x.dtype == torch.float32 else x.dtype
    with torch.autocast("cpu", enabled=False):
        y = F.conv3d(x.float(), weight.float(), None if bias is None else bias.float(),
                     **kwargs)
    return y.to(dtype)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that takes Winograd through the 2D route or along the depth axis
    (``ddpm.winograd_axis``) where that pays off, avoids PyTorch's slow float32 CPU kernel
    for batch-1 volumes, and avoids PyTorch's unsafe bfloat16
    weight gradient for volumes shallower than the kernel."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode == "zeros" and _winograd_route_pays_off(x, self):
            return conv3d_as_conv2d(x, weight, bias)
        if self.padding_mode == "zeros" and axis_winograd_pays_off(
                x, weight, self.stride, self.padding, self.dilation, self.groups):
            return axis_winograd_conv(x, weight, bias)
        if self.padding_mode == "zeros" and _native_conv3d_is_slow(x, self):
            return conv3d_as_conv2d(x, weight, bias)
        if self.padding_mode == "zeros" and _bf16_weight_gradient_is_unsafe(x, weight):
            return _conv3d_in_float32(x, weight, bias, stride=self.stride, padding=self.padding,
                                      dilation=self.dilation, groups=self.groups)
        return super()._conv_forward(x, weight, bias)


CONV = {2: Conv2d, 3: Conv3d}  # the convolution module per dims


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout ``x`` is in: contiguous (NC...) or channels-last (N...C)."""
    if x.is_contiguous():
        return torch.contiguous_format
    channels_last = CHANNELS_LAST[x.ndim - 2]
    if x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def upsample_nearest_conv(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """conv(nearest_upsample_x2(x), weight, bias) for a 3^d kernel (stride 1, zero padding 1),
    computed at the input resolution.

    Along one axis, an even output 2i of the doubled input sees the inputs (i-1, i, i) through
    the taps (w0, w1, w2), and an odd output 2i+1 sees (i, i, i+1): so the even outputs are
    the 2-tap convolution (w0, w1 + w2) at offsets (-1, 0), the odd ones (w0 + w1, w2) at
    offsets (0, +1). Each of the 2^d output parities is thus a 2^d-tap convolution of ``x``;
    all come from one convolution with 2^d * C_out output channels over ``x`` padded by 1,
    where parity p reads its output at offset p. Same function as upsample-then-convolve,
    with (2/3)^d of the multiply-adds (0.44x in 2D, 0.30x in 3D), and the doubled input is
    never built or stored. Wide float32 CPU layers go to Winograd's F(4x4, 3x3) instead
    (``winograd_conv2d(..., upsample=True)``), with a quarter of the multiply-adds.
    """
    dims = x.ndim - 2
    if dims == 2 and winograd_pays_off(x, weight, (1, 1), (1, 1), (1, 1), 1, upsample=True):
        return winograd_conv2d(x, weight, bias, upsample=True)  # a quarter of the multiplies
    n, _, *size = x.shape
    out_ch, in_ch = weight.shape[:2]
    kernel = weight  # (O, C, 3, ..., 3)
    for axis in range(dims):  # per axis: 3 taps -> (parity, 2 taps), parity axes in front
        tap_dim = kernel.ndim - dims + axis
        w0, w1, w2 = kernel.unbind(tap_dim)
        even = torch.stack([w0, w1 + w2], tap_dim)  # offsets (-1, 0)
        odd = torch.stack([w0 + w1, w2], tap_dim)  # offsets (0, +1)
        kernel = torch.stack([even, odd], axis)
    # (p_1, ..., p_d, O, C, 2, ..., 2) -> parity-major output channels
    kernel = kernel.reshape(2**dims * out_ch, in_ch, *(2,) * dims)
    parity_bias = None if bias is None else bias.repeat(2**dims)
    if _below_onednn_threshold(x):  # padding first lifts x over PyTorch's oneDNN threshold
        y = F.conv3d(F.pad(x, (1, 1) * dims), kernel, parity_bias)
    elif _bf16_weight_gradient_is_unsafe(x, kernel):
        y = _conv3d_in_float32(x, kernel, parity_bias, padding=1)
    else:
        y = (F.conv2d if dims == 2 else F.conv3d)(x, kernel, parity_bias, padding=1)
    # y: (N, 2^d O, S+1)

    # out[n, o, 2i + p, ...] = y[n, (p, ..., o), i + p, ...]: along each axis the pair (i, p)
    # steps through y by (stride of i, stride of i + stride of parity p), so the doubled image
    # is a strided view of y, copied once into the layout of x.
    stride_n, stride_c, *stride_s = y.stride()
    stride_parity = [2 ** (dims - 1 - axis) * out_ch * stride_c for axis in range(dims)]
    pair_sizes = [v for s in size for v in (s, 2)]
    pair_strides = [v for si, sp in zip(stride_s, stride_parity) for v in (si, si + sp)]
    doubled = [2 * s for s in size]
    if memory_format_of(x) == torch.contiguous_format:
        pairs = _StridedCopy.apply(y, (n, out_ch, *pair_sizes), (stride_n, stride_c, *pair_strides))
        return pairs.view(n, out_ch, *doubled)
    # channels-last: the channel axis goes last in the copy, so channels vary fastest
    pairs = _StridedCopy.apply(y, (n, *pair_sizes, out_ch), (stride_n, *pair_strides, stride_c))
    return pairs.view(n, *doubled, out_ch).movedim(-1, 1)


class _StridedCopy(torch.autograd.Function):
    """``y.as_strided(size, stride).contiguous()`` for a view that touches no element twice.

    Autograd's own backward of ``as_strided`` cannot assume that and scatters with an index
    (``index_add_``), which took 3% of a training step; here the gradient is written back
    through the same strided view.
    """

    @staticmethod
    def forward(ctx, y, size, stride):
        ctx.y_shape, ctx.y_stride, ctx.size, ctx.stride = y.shape, y.stride(), size, stride
        return y.as_strided(size, stride).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_y = grad.new_empty_strided(ctx.y_shape, ctx.y_stride).zero_()
        grad_y.as_strided(ctx.size, ctx.stride).copy_(grad)
        return grad_y, None, None
