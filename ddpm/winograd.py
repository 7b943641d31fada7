"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3) (Lavin & Gray 2016, Sec. 4).

Every 4x4 block of outputs of a 3x3 convolution (stride 1, zero padding 1) is computed from
the 6x6 input tile around it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A,

where d is the input tile, g the 3x3 kernel, ``*`` the elementwise product and the matrices
are the F(4, 3) ones below. Summed over input channels, the elementwise product becomes 36
independent matrix products (tiles x C_in) @ (C_in x C_out): 36 multiplications per 16
outputs instead of 144, a quarter of the direct convolution's. The transforms cost memory
traffic that does not shrink with the channel count, so this pays off only for wide layers;
``winograd_pays_off`` holds the measured rule. Each transform M t M^T of all tiles at once
is two matrix products with the small factor M (``_two_sided``). The rounding differs from
the direct convolution's: relative errors of about 1e-5 in float32 instead of 1e-6 (tests bound it).

The same products compute a 3x3 convolution of the nearest-neighbour doubled image without
building it: the 6x6 tile of the doubled image around an output block repeats a 4x4 tile of
the input, d = R e R^T with R the (6, 4) repetition below, so its transform is
(B^T R) e (B^T R)^T, read straight from the input with step 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
# The weight transform as one matrix on row-major flattened 3x3 kernels: vec(G g G^T) =
# (G kron G) vec(g), one product that reads the weight in its own layout.
_G_KRON = torch.kron(_G, _G)  # (36, 9)
# Rows 4i - 1 ... 4i + 4 of the doubled image are rows 2i - 1, 2i, 2i, 2i + 1, 2i + 1, 2i + 2
# of the input: the 6x6 tile of an output block repeats the input's 4x4 tile at step 2.
_REPEAT = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0],
                        [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
_B_T_REPEAT = _B_T @ _REPEAT  # (6, 4)


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Where the input tiles of the output blocks lie: ``size`` x ``size`` tiles of the input
    at step ``step``, each transformed to ``transform`` d ``transform``^T (``transform``:
    (6, size)); the output has ``scale`` times the input's size."""

    size: int
    step: int
    transform: torch.Tensor
    scale: int


_CONV = _Tiling(size=6, step=4, transform=_B_T, scale=1)
_UPSAMPLE_CONV = _Tiling(size=4, step=2, transform=_B_T_REPEAT, scale=2)

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
# The upsampling form competes with ``upsample_nearest_conv``'s direct form, which already
# needs only 4/9 of a plain convolution's multiply-adds. Forward + backward, by input size
# (``python -m bench.winograd``): 1.2-1.8x where one output image is at most 2^14 blocks x
# channels (8 x 256 x 16^2: 1.5x; 8 x 128 x 16^2: 1.2x); beyond it 8 x 128 x 32^2 gave
# 0.8-1.0x in two runs, 8 x 256 x 32^2 1.1-1.5x, and 64 channels lose (0.8x).
MIN_CHANNELS_UPSAMPLE = 128
MAX_BLOCKS_TIMES_CHANNELS_UPSAMPLE = 2**14
_enabled = True
# id(weight) -> (weight, (its version, its storage), G g G^T) within
# ``reused_weight_transforms``; else None
_weight_cache: dict[int, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] | None = None


@contextlib.contextmanager
def winograd_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, let ``winograd_pays_off`` (and ``ddpm.winograd_axis``'s rule) choose
    Winograd (True, the default) or keep every convolution direct (False), e.g. to reproduce
    direct-convolution rounding."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def winograd_is_enabled() -> bool:
    """Whether Winograd paths may be chosen (``winograd_enabled``)."""
    return _enabled


@contextlib.contextmanager
def reused_weight_transforms() -> Iterator[None]:
    """Within the block, transform each weight parameter once and reuse the result for as
    long as the parameter is unchanged (the same tensor at the same version; an in-place
    update such as an optimiser or EMA step makes a new one): a sampler runs the same weights
    at every step. The transformed weights, four times the size of the Winograd layers'
    weights, are freed when the block ends. Nested blocks share the outermost one's cache.
    ``ddpm.sampling.sample`` and ``ddpm.flow.flow_sample`` run in such a block."""
    global _weight_cache
    previous = _weight_cache
    if previous is None:
        _weight_cache = {}
    try:
        yield
    finally:
        _weight_cache = previous


def winograd_pays_off(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                      groups: int, upsample: bool = False) -> bool:
    """Whether ``conv2d(x, weight, ...)`` is a convolution this module computes faster than
    PyTorch: float32 on the CPU (no autocast), channels-last, a 3x3 kernel with stride 1,
    padding 1, no dilation or groups, and a size in the range where it was measured to be
    faster (``MIN_CHANNELS``, ``MIN_BLOCKS``; one image within ``MAX_BLOCKS_TIMES_CHANNELS``).
    ``upsample``: the convolution of the doubled ``x``, against ``upsample_nearest_conv``'s
    direct form (``MIN_CHANNELS_UPSAMPLE``, ``MAX_BLOCKS_TIMES_CHANNELS_UPSAMPLE``).
    """
    scale = 2 if upsample else 1
    tiles_h, tiles_w = _tile_counts(scale * x.shape[-2], scale * x.shape[-1])
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
        and min(weight.shape[0], weight.shape[1]) >= (MIN_CHANNELS_UPSAMPLE if upsample
                                                       else MIN_CHANNELS)
        and MIN_BLOCKS <= blocks
        and tiles_h * tiles_w * max(weight.shape[0], weight.shape[1]) <= (
            MAX_BLOCKS_TIMES_CHANNELS_UPSAMPLE if upsample else MAX_BLOCKS_TIMES_CHANNELS)
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def conv2d_3x3(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)``, by ``winograd_conv2d`` where that pays off."""
    if winograd_pays_off(x, weight, (1, 1), (1, 1), (1, 1), 1):
        return winograd_conv2d(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    upsample: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight``, by F(4x4, 3x3); with
    ``upsample``, the same convolution of ``x`` doubled by nearest-neighbour repetition,
    without building the doubled image.

    ``x`` (N, C, H, W), any size; the result is (N, C_out, H, W), or (N, C_out, 2H, 2W), in
    the channels-last layout. Differentiable; the backward pass keeps only ``x`` and ``weight``
    and recomputes the input transform, so it stores no more than the direct convolution. A
    large batch is transformed in chunks of images (``_chunks``), so the temporaries stay
    cache-sized.
    """
    if tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"winograd_conv2d needs a (C_out, {x.shape[1]}, 3, 3) weight for an "
                         f"input of shape {tuple(x.shape)}; got {tuple(weight.shape)}")
    return _Winograd.apply(x, weight, bias, _UPSAMPLE_CONV if upsample else _CONV)


def _tile_counts(height: int, width: int) -> tuple[int, int]:
    """How many 4x4 output blocks cover the image, per axis."""
    return math.ceil(height / 4), math.ceil(width / 4)


def _input_transform(x_nhwc: torch.Tensor, tiles_h: int, tiles_w: int,
                     tiling: _Tiling) -> torch.Tensor:
    """B^T d B for the input tile d of every output block: (36, N tiles_h tiles_w, C)."""
    n, h, w, c = x_nhwc.shape
    size, step = tiling.size, tiling.step
    padded = F.pad(x_nhwc, (0, 0, 1, _padded_size(tiles_w, tiling) - 1 - w,
                            1, _padded_size(tiles_h, tiling) - 1 - h))
    # the tiles along H and W -> (size, size, N, tiles_h, tiles_w, C), copied once
    d = padded.unfold(1, size, step).unfold(2, size, step).permute(4, 5, 0, 1, 2, 3).contiguous()
    return _two_sided(tiling.transform.to(d), d).view(36, n * tiles_h * tiles_w, c)


def _two_sided(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """M t M^T for every tile: ``t`` (q, q, ...) holds tile entry (k, l) of all tiles at
    t[k, l]; returns (p, p, ...) for M (p, q).

    Two products with the small factor: M @ (q, q R), then M on each of the p rows. That is
    p q (p + q) multiply-adds per tile instead of the p^2 q^2 of one product with M kron M
    (432 instead of 1296 for the 6x6 input tiles). On a 2-core AMD EPYC, whose matrix
    products are slow, this took the Winograd layers of the benchmark models from 1.08-1.33x
    to 1.40-1.55x the direct convolution's speed (``python -m bench.winograd``).
    """
    p, q = m.shape
    half = (m @ t.reshape(q, -1)).view(p, q, -1)  # sum over the tile's first axis
    return torch.matmul(m, half).view(p, p, *t.shape[2:])  # then over its second, per row


def _padded_size(tiles: int, tiling: _Tiling) -> int:
    """Length of the zero-padded input axis that ``tiles`` input tiles cover."""
    return tiling.step * tiles + tiling.size - tiling.step


def _weight_transform(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T for every (C_out, C_in) kernel: (36, C_out, C_in); from the cache of
    ``reused_weight_transforms`` where that is on and ``weight`` is a parameter (a temporary
    tensor's storage could be reused by the next one, and it changes at every call anyway).

    One matrix product reading the weight in its own layout: (36, 9) @ (9, C_out C_in), the
    second factor a transposed view. The matrix products that use it take it transposed too.
    """
    cache = _weight_cache
    if (cache is None or not isinstance(weight, torch.nn.Parameter)
            or torch.is_inference(weight)):  # an inference tensor has no version counter
        return _transform_weight(weight)
    state = (weight._version, weight.data_ptr())  # ``.data =`` keeps the version
    entry = cache.get(id(weight))  # each entry holds its weight, so no other object has its id
    if entry is None or entry[1] != state:
        entry = cache[id(weight)] = (weight, state, _transform_weight(weight))
    return entry[2]


def _transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``_weight_transform`` without the cache."""
    out_ch, in_ch = weight.shape[:2]
    taps = weight.reshape(out_ch * in_ch, 9).T
    return (_G_KRON.to(weight) @ taps).view(36, out_ch, in_ch)


def _overlap_add(tiles: torch.Tensor, tiles_h: int, tiles_w: int,
                 tiling: _Tiling) -> torch.Tensor:
    """Sum the input tiles (size, size, N, tiles_h, tiles_w, C), placed at their steps, into
    the padded input (N, padded H, padded W, C): the adjoint of the tile extraction.

    One axis at a time; the first ``step`` offsets of the grid never overlap, so they are
    copied, and only the others are added.
    """
    size, step = tiling.size, tiling.step
    _, _, n, _, _, c = tiles.shape
    width = _padded_size(tiles_w, tiling)
    rows = tiles.new_empty(size, n, tiles_h, width, c)  # the W axis summed, H still in tiles
    rows[:, :, :, step * tiles_w:].zero_()
    for j in range(size):
        target = rows[:, :, :, j:j + step * tiles_w:step]
        if j < step:
            target.copy_(tiles[:, j])
        else:
            target.add_(tiles[:, j])
    image = tiles.new_empty(n, _padded_size(tiles_h, tiling), width, c)
    image[:, step * tiles_h:].zero_()
    for i in range(size):
        target = image[:, i:i + step * tiles_h:step]
        if i < step:
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
    over overlapping tiles; dg = G^T dV G. All are the same products transposed. ``tiling``
    says where the tiles d lie in x (``_CONV``, or ``_UPSAMPLE_CONV`` for the doubled x).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tiling: _Tiling):
        n, _, h, w = x.shape
        out_ch = weight.shape[0]
        out_h, out_w = tiling.scale * h, tiling.scale * w
        tiles_h, tiles_w = _tile_counts(out_h, out_w)
        weight_t = _weight_transform(weight).transpose(1, 2)  # (36, C_in, C_out)
        a_t = _A_T.to(x)
        out = torch.empty((n, out_ch, 4 * tiles_h, 4 * tiles_w), dtype=x.dtype,
                          device=x.device, memory_format=torch.channels_last)
        x_nhwc, out_nhwc = x.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)
        for images in _chunks(n, tiles_h * tiles_w, max(weight.shape[:2])):
            k = images.stop - images.start
            u = _input_transform(x_nhwc[images], tiles_h, tiles_w, tiling)
            m = torch.bmm(u, weight_t)
            del u
            blocks = _two_sided(a_t, m.view(6, 6, k, tiles_h, tiles_w, out_ch))
            del m
            # blocks[a, b, n, i, j] is output pixel (4i + a, 4j + b): write through that view
            target = out_nhwc[images].view(k, tiles_h, 4, tiles_w, 4, out_ch)
            target = target.permute(2, 4, 0, 1, 3, 5)
            if bias is None:
                target.copy_(blocks)
            else:
                torch.add(blocks, bias.to(blocks.dtype), out=target)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.tiling = bias is not None, tiling
        if (4 * tiles_h, 4 * tiles_w) == (out_h, out_w):
            return out
        return out[:, :, :out_h, :out_w].contiguous(memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        tiling = ctx.tiling
        n, in_ch, h, w = x.shape
        out_ch = weight.shape[0]
        out_h, out_w = grad_y.shape[-2:]
        tiles_h, tiles_w = _tile_counts(out_h, out_w)
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_nhwc = grad_y.permute(0, 2, 3, 1)
        if (4 * tiles_h, 4 * tiles_w) != (out_h, out_w):  # F.pad copies even when it pads nothing
            grad_nhwc = F.pad(grad_nhwc, (0, 0, 0, 4 * tiles_w - out_w, 0, 4 * tiles_h - out_h))
        a, b = _A_T.T.to(x), tiling.transform.T.to(x)  # the transposed transforms
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
            grad_m = _two_sided(a, grad_blocks).view(36, -1, out_ch)
            del grad_blocks
            if need_x:
                grad_u = torch.bmm(grad_m, weight_t)  # (36, blocks, C_in)
                grad_tiles = _two_sided(b, grad_u.view(6, 6, k, tiles_h, tiles_w, in_ch))
                del grad_u
                padded = _overlap_add(grad_tiles, tiles_h, tiles_w, tiling)
                del grad_tiles
                grad_x.permute(0, 2, 3, 1)[images] = padded[:, 1:h + 1, 1:w + 1]
            if need_weight:
                u = _input_transform(x.permute(0, 2, 3, 1)[images], tiles_h, tiles_w, tiling)
                if grad_v is None:  # the first chunk writes it: no zero-filled buffer
                    grad_v = torch.bmm(grad_m.transpose(1, 2), u)
                else:
                    grad_v.baddbmm_(grad_m.transpose(1, 2), u)
        if need_weight:
            # (9, 36) @ (36, C_out C_in), then one copy into the weight's own layout: 3-4x
            # faster than the product (C_out C_in, 36) @ (36, 9) that would write it directly
            taps = _G_KRON.T.to(grad_v) @ grad_v.view(36, -1)
            grad_weight = taps.T.reshape(out_ch, in_ch, 3, 3)
        if ctx.has_bias and need_bias:
            grad_bias = grad_y.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None
