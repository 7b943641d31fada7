"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3) (Lavin & Gray 2016, Sec. 4).

Every 4x4 block of outputs of a 3x3 convolution (stride 1, zero padding 1) is computed from
the 6x6 input tile around it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A,

where d is the input tile, g the 3x3 kernel, ``*`` the elementwise product and the matrices
are the F(4, 3) ones below. Summed over input channels, the elementwise product becomes 36
independent matrix products (tiles x C_in) @ (C_in x C_out): 36 multiplications per 16
outputs instead of 144, a quarter of the direct convolution's. The transforms cost memory
traffic that does not shrink with the channel count, so this pays off only for wide layers;
``winograd_pays_off`` holds the measured rule. The rounding differs from the direct
convolution's: relative errors of about 1e-5 in float32 instead of 1e-6 (tests bound it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# F(4, 3) with the interpolation points 0, +-1, +-2 and infinity (Lavin & Gray 2016, Sec. 4).
_B_T = torch.tensor([
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
], dtype=torch.float64)
_G = torch.tensor([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=torch.float64)
_A_T = torch.tensor([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
], dtype=torch.float64)
# The 2D transforms as single matrices on row-major flattened tiles: vec(M t M^T) =
# (M kron M) vec(t). One matrix product per transform is one pass over memory, which is what
# these products are bound by.
_B_T_KRON = torch.kron(_B_T, _B_T)  # (36, 36)
_G_KRON = torch.kron(_G, _G)  # (36, 9)
_A_T_KRON = torch.kron(_A_T, _A_T)  # (16, 36)

# Where this path beats oneDNN's direct convolution, measured on a 2-core AVX-512 CPU in
# float32, channels-last (``python -m bench.winograd``, bench/README.md):
# - the narrowest side (min of C_in, C_out): 64 channels 0.5-0.8x, 128 about 1-1.3x,
#   256 1.4-1.8x, forward + backward;
# - the number of 4x4 output blocks (batch x tiles): 16 or 32 are too few to keep the 36
#   matrix products busy (0.7-1x);
# - the transformed tiles, (36, blocks, channels), outgrow the caches beyond about 2^17
#   blocks x channels (19 MB; 8 x 128 x 64^2 in one piece: 0.65x). Larger batches are
#   therefore transformed a chunk of images at a time, and one image must fit in a chunk.
MIN_CHANNELS = 128
MIN_BLOCKS = 64
MAX_BLOCKS_TIMES_CHANNELS = 2**17
_enabled = True


@contextlib.contextmanager
def winograd_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, let ``winograd_pays_off`` choose this path (True, the default) or
    keep every convolution direct (False), e.g. to reproduce direct-convolution rounding."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def winograd_pays_off(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                      groups: int) -> bool:
    """Whether ``conv2d(x, weight, ...)`` is a convolution this module computes faster than
    PyTorch: float32 on the CPU (no autocast), channels-last, a 3x3 kernel with stride 1,
    padding 1, no dilation or groups, and a size in the range where it was measured to be
    faster (``MIN_CHANNELS``, ``MIN_BLOCKS``; one image within ``MAX_BLOCKS_TIMES_CHANNELS``).
    """
    tiles_h, tiles_w = _tile_counts(*x.shape[-2:])
    blocks = x.shape[0] * tiles_h * tiles_w
    return (
        _enabled
        and x.ndim == 4
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and tuple(weight.shape[2:]) == (3, 3)
        and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1)
        and groups == 1
        and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
        and MIN_BLOCKS <= blocks
        and tiles_h * tiles_w * max(weight.shape[0], weight.shape[1]) <= MAX_BLOCKS_TIMES_CHANNELS
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def conv2d_3x3(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)``, by ``winograd_conv2d`` where that pays off."""
    if winograd_pays_off(x, weight, (1, 1), (1, 1), (1, 1), 1):
        return winograd_conv2d(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight``, by F(4x4, 3x3).

    ``x`` (N, C, H, W), any size; the result is (N, C_out, H, W) in the channels-last layout.
    Differentiable; the backward pass keeps only ``x`` and ``weight`` and recomputes the input
    transform, so it stores no more than the direct convolution. A large batch is transformed
    in chunks of images (``_chunks``), so the temporaries stay cache-sized.
    """
    if tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"winograd_conv2d needs a (C_out, {x.shape[1]}, 3, 3) weight for an "
                         f"input of shape {tuple(x.shape)}; got {tuple(weight.shape)}")
    return _Winograd.apply(x, weight, bias)


def _tile_counts(height: int, width: int) -> tuple[int, int]:
    """How many 4x4 output blocks cover the image, per axis."""
    return math.ceil(height / 4), math.ceil(width / 4)


def _input_transform(x_nhwc: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """B^T d B for every 6x6 input tile: (36, N tiles_h tiles_w, C)."""
    n, h, w, c = x_nhwc.shape
    padded = F.pad(x_nhwc, (0, 0, 1, 4 * tiles_w + 1 - w, 1, 4 * tiles_h + 1 - h))
    # tiles of 6 with step 4 along H and W -> (6, 6, N, tiles_h, tiles_w, C), copied once
    d = padded.unfold(1, 6, 4).unfold(2, 6, 4).permute(4, 5, 0, 1, 2, 3).contiguous()
    return (_B_T_KRON.to(d) @ d.view(36, -1)).view(36, n * tiles_h * tiles_w, c)


def _weight_transform(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T for every (C_out, C_in) kernel: (36, C_out, C_in).

    One matrix product reading the weight in its own layout: (36, 9) @ (9, C_out C_in), the
    second factor a transposed view. The matrix products that use it take it transposed too.
    """
    out_ch, in_ch = weight.shape[:2]
    taps = weight.reshape(out_ch * in_ch, 9).T
    return (_G_KRON.to(weight) @ taps).view(36, out_ch, in_ch)


def _overlap_add(tiles: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """Sum 6x6 tiles (6, 6, N, tiles_h, tiles_w, C) placed with step 4 into the padded image
    (N, 4 tiles_h + 2, 4 tiles_w + 2, C): the adjoint of the tile extraction.

    One axis at a time; the first four offsets of a step-4 grid never overlap, so they are
    copied, and only offsets 4 and 5 are added.
    """
    _, _, n, _, _, c = tiles.shape
    width = 4 * tiles_w + 2
    rows = tiles.new_empty(6, n, tiles_h, width, c)  # the W axis summed, H still in tiles
    rows[:, :, :, 4 * tiles_w:].zero_()
    for j in range(6):
        target = rows[:, :, :, j:j + 4 * tiles_w:4]
        if j < 4:
            target.copy_(tiles[:, j])
        else:
            target.add_(tiles[:, j])
    image = tiles.new_empty(n, 4 * tiles_h + 2, width, c)
    image[:, 4 * tiles_h:].zero_()
    for i in range(6):
        target = image[:, i:i + 4 * tiles_h:4]
        if i < 4:
            target.copy_(rows[i])
        else:
            target.add_(rows[i])
    return image


def _chunks(n: int, tiles_per_image: int, channels: int) -> list[slice]:
    """The batch in slices of about equal size, each holding at most
    ``MAX_BLOCKS_TIMES_CHANNELS`` blocks x channels (at least one image), so that the
    transformed tiles of a slice stay cache-sized however large the batch."""
    per_chunk = max(1, MAX_BLOCKS_TIMES_CHANNELS // (tiles_per_image * channels))
    count = math.ceil(n / per_chunk)
    size = math.ceil(n / count)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class _Winograd(torch.autograd.Function):
    """F(4x4, 3x3) convolution with an explicit backward pass.

    With U = B^T d B (input), V = G g G^T (weight) and M = U V per tile position, the output
    is A^T M A. Backward: dM = A dY A^T; dU = dM V^T, dV = U^T dM; d(tile) = B dU B^T, summed
    over overlapping tiles; dg = G^T dV G. All are the same products transposed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        n, _, h, w = x.shape
        out_ch = weight.shape[0]
        tiles_h, tiles_w = _tile_counts(h, w)
        weight_t = _weight_transform(weight).transpose(1, 2)  # (36, C_in, C_out)
        a_t = _A_T_KRON.to(x)
        out = torch.empty((n, out_ch, 4 * tiles_h, 4 * tiles_w), dtype=x.dtype,
                          device=x.device, memory_format=torch.channels_last)
        x_nhwc, out_nhwc = x.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)
        for images in _chunks(n, tiles_h * tiles_w, max(weight.shape[:2])):
            k = images.stop - images.start
            m = torch.bmm(_input_transform(x_nhwc[images], tiles_h, tiles_w), weight_t)
            blocks = (a_t @ m.view(36, -1)).view(4, 4, k, tiles_h, tiles_w, out_ch)
            del m
            # blocks[a, b, n, i, j] is output pixel (4i + a, 4j + b): write through that view
            target = out_nhwc[images].view(k, tiles_h, 4, tiles_w, 4, out_ch)
            target = target.permute(2, 4, 0, 1, 3, 5)
            if bias is None:
                target.copy_(blocks)
            else:
                torch.add(blocks, bias.to(blocks.dtype), out=target)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if (4 * tiles_h, 4 * tiles_w) == (h, w):
            return out
        return out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        n, in_ch, h, w = x.shape
        out_ch = weight.shape[0]
        tiles_h, tiles_w = _tile_counts(h, w)
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_nhwc = grad_y.permute(0, 2, 3, 1)
        if (4 * tiles_h, 4 * tiles_w) != (h, w):  # F.pad copies even when it pads nothing
            grad_nhwc = F.pad(grad_nhwc, (0, 0, 0, 4 * tiles_w - w, 0, 4 * tiles_h - h))
        a_kron, b_kron = _A_T_KRON.T.to(x), _B_T_KRON.T.to(x)
        grad_x = grad_weight = grad_bias = None
        if need_x:
            weight_t = _weight_transform(weight)  # (36, C_out, C_in)
            grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_v = None  # (36, C_out, C_in), summed over the chunks
        for images in _chunks(n, tiles_h * tiles_w, max(in_ch, out_ch)):
            k = images.stop - images.start
            # (4, 4, k, tiles_h, tiles_w, C_out): output block entry (a, b) first
            grad_blocks = grad_nhwc[images].reshape(k, tiles_h, 4, tiles_w, 4, out_ch)
            grad_blocks = grad_blocks.permute(2, 4, 0, 1, 3, 5).contiguous()
            grad_m = (a_kron @ grad_blocks.view(16, -1)).view(36, -1, out_ch)
            del grad_blocks
            if need_x:
                grad_u = torch.bmm(grad_m, weight_t)  # (36, blocks, C_in)
                grad_tiles = (b_kron @ grad_u.view(36, -1)).view(6, 6, k, tiles_h, tiles_w, in_ch)
                del grad_u
                padded = _overlap_add(grad_tiles, tiles_h, tiles_w)
                del grad_tiles
                grad_x.permute(0, 2, 3, 1)[images] = padded[:, 1:h + 1, 1:w + 1]
            if need_weight:
                u = _input_transform(x.permute(0, 2, 3, 1)[images], tiles_h, tiles_w)  # again
                if grad_v is None:  # the first chunk writes it: no zero-filled buffer
                    grad_v = torch.bmm(grad_m.transpose(1, 2), u)
                else:
                    grad_v.baddbmm_(grad_m.transpose(1, 2), u)
        if need_weight:
            # (C_out C_in, 36) @ (36, 9): the rows come out in the weight's own order
            taps = grad_v.view(36, -1).T @ _G_KRON.to(grad_v)
            grad_weight = taps.view(out_ch, in_ch, 3, 3)
        if ctx.has_bias and need_bias:
            grad_bias = grad_y.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias
