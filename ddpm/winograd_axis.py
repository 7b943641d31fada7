"""3x3 and 3x3x3 convolutions by Winograd's F(4, 3) along the outermost spatial axis.

Along one axis, every 4 outputs of a 3-tap filter come from the 6 inputs around them as

    y = A^T [ (G g) * (B^T d) ]

(Lavin & Gray 2016, Sec. 4; the F(4, 3) matrices of ``ddpm.winograd``). Here each "input"
d_k is a whole row of the image (H of a 2D image, so a 1 x W row; D of a volume, so an H x W
slice), each "tap" g_j the kernel's slice at that offset, and the product ``*`` a
convolution over the remaining axes, which oneDNN computes directly. Six such convolutions
give 4 output rows where the direct convolution does 4 x 3 = 12: half the multiply-adds, at
oneDNN's own speed. The transforms B^T, A^T are a few elementwise passes over the rows.

Unlike F(4x4, 3x3), whose 36 matrix products need wide layers to pay for their transforms,
this keeps oneDNN's kernels, so it pays off for the narrow, high-resolution layers too; the
rounding is about the same (relative errors of a few 1e-6 in float32). The rows are read and
written where they lie (a tile's row outside the image reads as zero), so besides chunk-sized
temporaries it holds no more memory than the direct convolution: no padded copy of the input,
the output or the input's gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ddpm.winograd import _A_T, _B_T, _G, winograd_is_enabled

# Transformed rows held at once, times channels: a chunk of tiles is transformed, convolved
# and transformed back before the next, so the temporaries (six transformed rows per tile,
# and their gradients) stay bounded however large the image: 16 MiB of float32 each. Twice
# that was no faster on the benchmark layers and raised the 3D benchmark model's peak RSS
# from 1396 to 1522 MiB (a short ``bench.peers --contenders ddpm`` run); half of it, 1406 MiB.
MAX_CHUNK_ELEMENTS = 2**22
# Where this path beats what ``Conv2d``/``Conv3d`` compute otherwise (oneDNN's direct
# convolution, or ``conv3d_as_conv2d``), forward + backward, float32, channels-last, on a
# 2-core AVX-512 CPU (``python -m bench.winograd``, bench/README.md): volumes of 32 to 128
# channels at 24^3 to 48^3, 1.25-1.5x; 8 images of 64 to 192 channels at 64^2, 1.13-1.14x
# (a 1 x 3 inner convolution leaves less work to halve). Below the thresholds the transforms
# and the fixed cost of its ~60 operations take most or all of the gain: 16 channels at 48^3
# and 32 channels at 16^3 gave 1.05x and 1.03x there and 0.9x and 0.8x in the probes that set
# the rule; 64 channels at 32^2, 0.95x in both.
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
MIN_CHANNELS = {2: 64, 3: 32}  # per spatial dims
MIN_WORK = {2: 2**27, 3: 2**23}  # C_in x C_out x pixels or voxels (all images)


def axis_winograd_conv(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d``/``conv3d(x, weight, bias, padding=1)`` for a 3^d ``weight``, by F(4, 3)
    along the first spatial axis and direct 2D convolutions over the others.

    ``x`` (N, C, S_1, ..., S_d), d = 2 or 3, in the channels-last layout; the result is
    (N, C_out, S_1, ..., S_d), channels-last. Differentiable; the backward pass keeps only
    ``x`` and ``weight`` and recomputes the transformed input.
    """
    dims = x.ndim - 2
    if dims not in (2, 3) or tuple(weight.shape[2:]) != (3,) * dims or (
            weight.shape[1] != x.shape[1]):
        raise ValueError(f"axis_winograd_conv needs a (C_out, {x.shape[1]}, 3, ...) 3^d weight "
                         f"for an input of shape {tuple(x.shape)}; got {tuple(weight.shape)}")
    return _AxisWinograd.apply(x, weight, bias)


def axis_winograd_pays_off(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                           groups: int) -> bool:
    """Whether ``conv2d``/``conv3d(x, weight, ...)`` is a convolution ``axis_winograd_conv``
    computes faster than ``Conv2d``/``Conv3d`` otherwise would: float32 on the CPU (no
    autocast), channels-last, a 3^d kernel with stride 1, padding 1, no dilation or groups,
    and at least ``MIN_CHANNELS`` channels in and out and ``MIN_WORK`` multiply-adds per
    kernel tap (per spatial dims). ``winograd_enabled(False)`` turns it off too.
    """
    dims = x.ndim - 2
    return (
        winograd_is_enabled()
        and dims in (2, 3)
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and weight.shape[2:] == (3,) * dims
        and tuple(stride) == (1,) * dims and tuple(padding) == (1,) * dims
        and tuple(dilation) == (1,) * dims and groups == 1
        and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS[dims]
        and weight.shape[0] * weight.shape[1] * x[0, 0].numel() * x.shape[0] >= MIN_WORK[dims]
        and x.is_contiguous(memory_format=_CHANNELS_LAST[dims])
    )


# The F(4, 3) points +1, -1 and +2, -2: their rows of B^T and A, and their columns of A^T and
# B, agree on the even powers and differ in sign on the odd ones.
_POINT_PAIRS = ((1, 2), (3, 4))


@dataclasses.dataclass(frozen=True)
class _Span:
    """The tiles ``start`` ... ``start + tensor.shape[1] - 1`` of a chunk: one row per tile,
    ``tensor`` (N, tiles, *inner, C). A tile's row that falls outside the image has no span
    entry: it reads as zero and is dropped when written."""

    tensor: torch.Tensor
    start: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.tensor.shape[1]

    def window(self, start: int, stop: int) -> torch.Tensor:
        """Its tiles ``start`` ... ``stop - 1`` (chunk numbering)."""
        return self.tensor[:, start - self.start:stop - self.start]


def _row_span(rows: torch.Tensor, offset: int, tiles: slice) -> _Span | None:
    """Rows 4 t + ``offset`` of ``rows`` (N, S_1, *inner, C) for the tiles t in ``tiles`` whose
    row lies in the image, as a span of the chunk; None where no tile's does."""
    first = max(tiles.start, -(offset // 4))  # 4 t + offset >= 0
    stop = min(tiles.stop, (rows.shape[1] - 1 - offset) // 4 + 1)  # 4 t + offset < S_1
    if stop <= first:
        return None
    view = rows[:, 4 * first + offset:4 * (stop - 1) + offset + 1:4]
    return _Span(view, first - tiles.start)


def _combine(matrix: list[list[float]], sources: list[_Span | None],
             targets: list[_Span | None], accumulate: bool = False,
             point_rows: bool = False) -> None:
    """targets[i] (+)= sum_k matrix[i, k] sources[k], in elementwise passes, over the tiles of
    each target (a missing source reads as zero; a missing target is skipped).

    With ``point_rows`` (B^T, A: a row per interpolation point), the two rows of a point pair
    (``_POINT_PAIRS``) are E + O and E - O: their even part E and odd part O are computed
    once each, as in Lavin & Gray's transforms (for targets over the same tiles).
    """
    done = set()
    for i, j in _POINT_PAIRS if point_rows and not accumulate else ():
        a, b = matrix[i], matrix[j]
        even = [x if x == y else 0 for x, y in zip(a, b)]
        odd = [x if x == -y else 0 for x, y in zip(a, b)]
        if (any(even) and any(odd) and all(x in (y, -y) for x, y in zip(a, b))
                and targets[i] is not None and targets[j] is not None
                and (targets[i].start, targets[i].stop) == (targets[j].start, targets[j].stop)):
            _combine_row(even, sources, targets[i])
            _combine_row(odd, sources, targets[j])
            ti, tj = targets[i].tensor, targets[j].tensor
            ti.add_(tj)  # E + O
            torch.add(ti, tj, alpha=-2, out=tj)  # E - O
            done |= {i, j}
    for i, (row, target) in enumerate(zip(matrix, targets)):
        if i not in done and target is not None:
            _combine_row(row, sources, target, accumulate)


def _combine_row(row: list[float], sources: list[_Span | None], target: _Span,
                 accumulate: bool = False) -> None:
    """target (+)= sum_k row[k] sources[k] over the target's tiles, one pass per nonzero; a
    row with a coefficient 1 starts with ``add(that source, another, alpha=...)``, saving a
    separate scaling pass. The first pass writes the whole target, so it takes sources that
    cover it; the others add over the tiles they share with it."""
    lo, hi = target.start, target.stop
    terms = [(c, s) for c, s in zip(row, sources)
             if c != 0 and s is not None and s.start < hi and s.stop > lo]
    if not accumulate:
        covering = [i for i, (_, s) in enumerate(terms) if s.start <= lo and s.stop >= hi]
        unit = next((i for i in covering if terms[i][0] == 1), None)
        if unit is not None and len(covering) > 1:
            second = next(i for i in covering if i != unit)
            (_, first), (c, other) = terms[unit], terms[second]
            torch.add(first.window(lo, hi), other.window(lo, hi), alpha=c, out=target.tensor)
            terms = [t for i, t in enumerate(terms) if i not in (unit, second)]
        elif covering:
            c, first = terms.pop(covering[0])
            torch.mul(first.window(lo, hi), c, out=target.tensor)
        else:
            target.tensor.zero_()
    for c, s in terms:
        start, stop = max(lo, s.start), min(hi, s.stop)
        target.window(start, stop).add_(s.window(start, stop), alpha=c)


def _pair_sources(matrix: torch.Tensor, sources: list[torch.Tensor]) -> list[list[float]]:
    """Overwrite the sources of each point pair whose columns agree up to sign in every row
    (A^T's, B's) with their sum and difference; returns the matrix that combines the new
    sources as ``matrix`` combined the old: c s_i + c s_j = c (s_i + s_j), c s_i - c s_j =
    c (s_i - s_j)."""
    rows = matrix.tolist()
    for i, j in _POINT_PAIRS:
        if all(abs(r[i]) == abs(r[j]) for r in rows):
            sources[i].add_(sources[j])
            torch.add(sources[i], sources[j], alpha=-2, out=sources[j])
            for r in rows:
                r[i], r[j] = (r[i], 0) if r[i] == r[j] else (0, r[i])
    return rows


def _images(rows: torch.Tensor) -> torch.Tensor:
    """Rows (N, T, *inner, C) as the channels-last batch the inner convolution takes: a
    volume's slices as (N T, C, H, W) images; an image's rows as one (N, C, T, W) image,
    convolved with a 1 x 3 kernel."""
    if rows.ndim == 5:
        n, t, h, w, c = rows.shape
        return rows.reshape(n * t, h, w, c).permute(0, 3, 1, 2)
    return rows.permute(0, 3, 1, 2)


def _inner_padding(dims: int) -> tuple[int, int]:
    """The inner convolution's padding: none across rows (a 2D image's 1 x 3 kernel)."""
    return (1, 1) if dims == 3 else (0, 1)


def _tap_transform(weight: torch.Tensor) -> torch.Tensor:
    """G g over the first kernel axis: (6, C_out, C_in, *inner kernel), the inner kernel
    (3, 3) for a volume and (1, 3) for an image."""
    out_ch, in_ch = weight.shape[:2]
    taps = weight.movedim(2, 0).reshape(3, -1)
    kernels = (_G.to(weight) @ taps).view(6, out_ch, in_ch, *weight.shape[3:])
    return kernels if weight.ndim == 5 else kernels.unsqueeze(3)


def _chunks(tiles: int, row_elements: int) -> list[slice]:
    """The tiles in about equal slices of at most ``MAX_CHUNK_ELEMENTS`` transformed-row
    elements (six rows per tile, at least one tile)."""
    per_chunk = max(1, MAX_CHUNK_ELEMENTS // (6 * row_elements))
    count = math.ceil(tiles / per_chunk)
    size = math.ceil(tiles / count)
    return [slice(start, min(start + size, tiles)) for start in range(0, tiles, size)]


def _input_transform(rows: torch.Tensor, tiles: slice) -> torch.Tensor:
    """B^T d for the tiles: (6, N, tiles, *inner, C), contiguous. Row k of tile t is the
    input's row 4 t + k - 1, read in place (zero where that is outside the input)."""
    n, _, *inner, c = rows.shape
    u = rows.new_empty((6, n, tiles.stop - tiles.start, *inner, c))
    sources = [_row_span(rows, k - 1, tiles) for k in range(6)]
    _combine(_B_T.tolist(), sources, [_Span(t) for t in u], point_rows=True)
    return u


def _overlap_add(grad_u: list[torch.Tensor], grad_rows: torch.Tensor, tiles: slice) -> None:
    """Add B dU, the gradient of the tiles' six input rows, into the input's gradient rows
    ``grad_rows`` (N, S_1, *inner, C): row k of tile t is input row 4 t + k - 1. Rows 0-3 of
    a tile ("its own") are read by no other tile; rows 4, 5 are the next tile's rows 0, 1
    (the last tile's row 4 is the input's last row when S_1 = 4 T, read by no other tile).
    Chunks come in order, so the own rows of ``tiles`` are written here first, except the
    first tile's rows 0, 1, which the previous chunk's last tile already added to.
    """
    first, stop = tiles.start, tiles.stop
    carried = None
    if first > 0:  # input rows 4 first - 1 and 4 first, which exist for any tile after the first
        carried = grad_rows[:, 4 * first - 1:4 * first + 1].clone()
    b = _pair_sources(_B_T.T, grad_u)
    sources = [_Span(g) for g in grad_u]
    _combine(b[:4], sources, [_row_span(grad_rows, k - 1, tiles) for k in range(4)])
    if carried is not None:
        grad_rows[:, 4 * first - 1:4 * first + 1] += carried
    following = [_row_span(grad_rows, k - 1, slice(first + 1, stop + 1)) for k in range(2)]
    # the last tile's rows 4, 5 are not yet written: the next chunk's first own rows, or after
    # the last tile the input's last row, where that exists (the slice stops at the input's end)
    grad_rows[:, 4 * stop - 1:4 * stop + 1].zero_()
    _combine(b[4:], sources, following, accumulate=True)


class _AxisWinograd(torch.autograd.Function):
    """F(4, 3) along the first spatial axis, with an explicit backward pass.

    With U_p = (B^T d)_p (input rows), V_p = (G g)_p (kernels) and M_p = conv(U_p, V_p), the
    output rows are A^T M. Backward: dM = A dY; dU_p, dV_p = conv's backward; d(rows) =
    B dU, summed over the two rows where neighbouring tiles overlap; dg = G^T dV.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        dims = x.ndim - 2
        n, _, length, *inner = x.shape
        out_ch = weight.shape[0]
        tiles = math.ceil(length / 4)
        rows = x.movedim(1, -1)  # (N, S_1, *inner, C): a view of channels-last x
        kernels = _tap_transform(weight)
        out = torch.empty((n, out_ch, length, *inner), dtype=x.dtype, device=x.device,
                          memory_format=_CHANNELS_LAST[dims])
        out_rows = out.movedim(1, -1)
        for chunk in _chunks(tiles, n * math.prod(inner) * max(x.shape[1], out_ch)):
            u = _input_transform(rows, chunk)
            m = [F.conv2d(_images(u[p]), kernels[p], bias if p == 1 else None,
                          padding=_inner_padding(dims)) for p in range(6)]
            del u  # the bias rides on M_1: A^T's column 1 is all ones
            m = [mp.permute(0, 2, 3, 1).reshape(_row_shape(n, chunk, inner, out_ch)) for mp in m]
            # output row j of tile t is row 4 t + j, where that is in the image
            _combine(_pair_sources(_A_T, m), [_Span(mp) for mp in m],
                     [_row_span(out_rows, j, chunk) for j in range(4)])
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        dims = x.ndim - 2
        n, in_ch, length, *inner = x.shape
        out_ch = weight.shape[0]
        tiles = math.ceil(length / 4)
        need_x, need_weight, need_bias = ctx.needs_input_grad
        need_bias = need_bias and ctx.has_bias
        layout = _CHANNELS_LAST[dims]
        grad_rows = grad_y.contiguous(memory_format=layout).movedim(1, -1)
        rows = x.movedim(1, -1)
        kernels = _tap_transform(weight)
        grad_x = torch.empty_like(x, memory_format=layout) if need_x else None
        grad_kernels = kernels.new_zeros(kernels.shape) if need_weight else None
        grad_bias = grad_y.new_zeros(out_ch) if need_bias else None
        padding = list(_inner_padding(dims))
        for chunk in _chunks(tiles, n * math.prod(inner) * max(in_ch, out_ch)):
            grad_m = grad_rows.new_empty((6, *_row_shape(n, chunk, inner, out_ch)))
            _combine(_A_T.T.tolist(), [_row_span(grad_rows, j, chunk) for j in range(4)],
                     [_Span(g) for g in grad_m], point_rows=True)
            if need_weight:
                u = _input_transform(rows, chunk)
            else:  # the backward pass only reads the input's shape
                u = grad_rows.new_empty((1, *_row_shape(n, chunk, inner, in_ch)))
                u = u.expand(6, *[-1] * (dims + 2))
            grad_u = []
            for p in range(6):
                with_bias = p == 1 and need_bias  # the bias rode on M_1
                gx, gw, gb = torch.ops.aten.convolution_backward(
                    _images(grad_m[p]), _images(u[p]), kernels[p],
                    [out_ch] if with_bias else None, [1, 1], padding, [1, 1], False, [0, 0],
                    1, [need_x, need_weight, with_bias])
                if need_x:
                    grad_u.append(gx.permute(0, 2, 3, 1).reshape(_row_shape(n, chunk, inner,
                                                                         in_ch)))
                if need_weight:
                    grad_kernels[p] += gw
                if with_bias:
                    grad_bias += gb
            del grad_m, u
            if need_x:
                _overlap_add(grad_u, grad_x.movedim(1, -1), chunk)
        grad_weight = None
        if need_weight:
            taps = _G.T.to(grad_kernels) @ grad_kernels.reshape(6, -1)  # (3, C_out C_in ...)
            grad_weight = taps.view(3, *weight.shape[:2], *weight.shape[3:]).movedim(0, 2)
            grad_weight = grad_weight.contiguous()
        return grad_x, grad_weight, grad_bias


def _row_shape(n: int, tiles: slice, inner: list[int], channels: int) -> tuple[int, ...]:
    """The shape of one transformed row of the tiles: (N, tiles, *inner, C)."""
    return (n, tiles.stop - tiles.start, *inner, channels)
