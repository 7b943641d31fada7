"""GroupNorm, scale-shift and SiLU fused into one memory-saving autograd node.

``group_norm_silu`` computes SiLU(GroupNorm(x) * (1 + scale) + shift) keeping only x for the
backward pass; ``conv_of_group_norm_silu`` also lets the following convolution recompute its
input from x instead of storing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ddpm.convolutions import memory_format_of


class _GroupNormSiLU(torch.autograd.Function):
    """y = SiLU(GroupNorm(x) * a + b), keeping only x and the group statistics for backward.

    Separate GroupNorm, scale-shift and SiLU modules would each keep their input alive until
    the backward pass: three activation-sized tensors per use. This keeps one (x, which the
    caller holds anyway) and recomputes the cheap elementwise part in the backward pass.
    ``a``, ``b`` are (1 or B, C): the GroupNorm affine folded with any scale-shift.
    """

    @staticmethod
    def forward(ctx, x, a, b, groups: int, eps: float, silu: bool):
        x = _norm_layout(x)
        y, mean, rstd = _group_norm_silu_forward(x, a, b, groups, eps, silu)
        ctx.save_for_backward(x, a, b, mean, rstd)
        ctx.groups, ctx.eps, ctx.silu = groups, eps, silu
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd  # the statistics let a recomputation skip the reductions

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        # One activation-sized buffer besides grad_y: z, which becomes grad_z, then grad_x.
        # The normalised x exists only a slice at a time.
        x, a, b, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        groups, spatial = ctx.groups, tuple(range(2, x.ndim))
        if ctx.silu:
            z = _normalize(x, mean, rstd, groups, ctx.eps, a, b)  # the forward pass's z
            grad_z = torch.ops.aten.silu_backward.grad_input(grad_y, z, grad_input=z)
            grad_x = grad_z  # grad_x[i] overwrites grad_z[i] once grad_z[i] has been read
        else:
            grad_z, grad_x = grad_y, torch.empty_like(x)
        # Sums in the input dtype (CPU and CUDA accumulate bf16 in fp32 internally); asking
        # for an fp32 result would first copy the whole tensor to fp32.
        acc = torch.promote_types(x.dtype, torch.float32)
        grad_a, grad_b = x.new_zeros((2, n, c), dtype=acc)  # summed a slice at a time
        normalized = _SliceNormalizer(x, mean, rstd)
        for i in _slices(x):  # each slice a temporary, in place from there on
            grad_b[i[:1]] += grad_z[i].sum(spatial).to(acc)
            grad_a[i[:1]] += normalized(i).mul_(grad_z[i]).sum(spatial).to(acc)
        # GroupNorm's input gradient with g = a * grad_z, r = rstd, means over each group:
        # dx = r * (g - mean(g) - xhat * mean(g * xhat)); both means follow from grad_a, grad_b.
        a32 = a.to(acc).expand(n, c)
        r = rstd.to(acc).reshape(n, groups, 1)
        mean_g = (a32 * grad_b).reshape(n, groups, -1).mean(-1, keepdim=True) / x[0, 0].numel()
        mean_gx = (a32 * grad_a).reshape(n, groups, -1).mean(-1, keepdim=True) / x[0, 0].numel()
        coef_grad = _per_channel((a32.reshape(n, groups, -1) * r).reshape(n, c), x)
        coef_xhat = _per_group_to_channel(-mean_gx * r, c)
        const = _per_group_to_channel(-mean_g * r, c)
        # grad_x = coef_grad * grad_z + (coef_xhat * xhat + const), a slice at a time
        term = _SliceNormalizer(x, mean, rstd, coef_xhat, const)
        for i in _slices(x):
            if torch.compiler.is_compiling():  # see _multiply_add_into
                grad_x = torch.addcmul(term(i), grad_z, coef_grad)
            else:
                torch.addcmul(term(i), grad_z[i], coef_grad[i[:1]], out=grad_x[i])
        if a.shape[0] == 1 < n:  # a, b were broadcast over the batch
            grad_a, grad_b = grad_a.sum(0, keepdim=True), grad_b.sum(0, keepdim=True)
        return grad_x, grad_a.to(a.dtype), grad_b.to(b.dtype), None, None, None


def _norm_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a layout native_group_norm takes: channels-last on CPU only, nothing strided
    oddly."""
    layout = memory_format_of(x) if x.device.type == "cpu" else torch.contiguous_format
    return x.contiguous(memory_format=layout)


def _group_norm_silu_forward(x, a, b, groups: int, eps: float, silu: bool):
    """(SiLU(GroupNorm(x) * a + b), group means, group 1/std); no autograd."""
    n, c = x.shape[:2]
    xhat, mean, rstd = torch.ops.aten.native_group_norm(
        x, None, None, n, c, x[0, 0].numel(), groups, eps)
    z = _normalize(x, mean, rstd, groups, eps, a, b, xhat=xhat)
    return (F.silu(z, inplace=True) if silu else z), mean, rstd


def _normalize(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, groups: int,
               eps: float, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
               xhat: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(x) * a + b (``a``, ``b``: (1 or B, C); None for 1 and 0) from the group
    statistics, without reducing over x again.

    In float32 and float64 one multiply-add per element, x * (a rstd) + (b - a mean rstd) per
    channel: a third of the cost of ``native_group_norm``. The forward pass computes it this
    way too, so a recomputation in the backward pass gives the same values bit for bit.
    Lower precisions scale the native kernel's output instead: their statistics are stored
    rounded, and the two folded terms would cancel to that rounding. ``xhat``: that output
    where the caller has it (the forward pass); its buffer takes the result.
    """
    n, c = x.shape[:2]
    if x.dtype not in (torch.float32, torch.float64):
        if xhat is None:
            xhat = torch.ops.aten.native_group_norm(
                x, None, None, n, c, x[0, 0].numel(), groups, eps)[0]
        return xhat if a is None else _multiply_add_into(xhat, _per_channel(a, x),
                                                         _per_channel(b, x))

    rstd_c = _per_group_to_channel(rstd.to(x.dtype), c)
    scale = rstd_c if a is None else rstd_c * a.to(x.dtype)
    shift = -_per_group_to_channel(mean.to(x.dtype), c) * scale
    if b is not None:
        shift = shift + b.to(x.dtype)
    scale, shift = _per_channel(scale, x), _per_channel(shift, x)
    if xhat is None or torch.compiler.is_compiling():  # see _multiply_add_into
        return torch.addcmul(shift, x, scale)
    return torch.addcmul(shift, x, scale, out=xhat)


def _per_group_to_channel(stat: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, groups) or (B, groups, 1) -> (B, C): each group's value for each of its channels."""
    n, groups = stat.shape[:2]
    stat = stat.reshape(n, groups, 1)
    return stat.expand(n, groups, channels // groups).reshape(n, channels)


def _multiply_add_into(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x * a + b written over ``x``, in one pass and without a new activation-sized buffer.

    Under torch.compile the out-of-place form: the compiler plans buffers itself, and it does
    not take a channels-last ``out=``."""
    if torch.compiler.is_compiling():
        return torch.addcmul(b, x, a)
    return torch.addcmul(b, x, a, out=x)


_SLICE_BYTES = 4 << 20  # the backward pass normalises x this much at a time (_slices)


class _SliceNormalizer:
    """``normalizer(i)`` = (GroupNorm(x) * a + b)[i] for an index ``i`` from ``_slices(x)``,
    from the group statistics; ``a``, ``b``: (B, C), or None for 1 and 0.

    Float32 and float64 fold everything into one multiply-add per element, as ``_normalize``
    does (bit for bit its result without ``a``, ``b``); lower precisions subtract the mean
    first (their statistics are stored rounded, and the folded terms would cancel to that).
    """

    def __init__(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 a: torch.Tensor | None = None, b: torch.Tensor | None = None):
        n, c = x.shape[:2]
        self.x, self.exact = x, x.dtype in (torch.float32, torch.float64)
        shape = (n, c) + (1,) * (x.ndim - 2)

        def per_channel(v: torch.Tensor | None, fill: float, per_group: bool = False):
            if v is None:
                return torch.full(shape, fill, dtype=x.dtype, device=x.device)
            v = _per_group_to_channel(v, c) if per_group else v.expand(n, c)
            return v.to(x.dtype).reshape(shape)

        self.mean, self.b = per_channel(mean, 0, True), per_channel(b, 0)
        self.scale = per_channel(rstd, 1, True) * per_channel(a, 1)  # (x - mean) * scale + b
        self.shift = self.b - self.mean * self.scale  # x * scale + shift

    def __call__(self, i: tuple[slice, ...]) -> torch.Tensor:
        rows = i[:1]  # the samples of this slice, for the (B, C, 1, ...) coefficients
        if self.exact:
            return torch.addcmul(self.shift[rows], self.x[i], self.scale[rows])
        return torch.addcmul(self.b[rows], self.x[i] - self.mean[rows], self.scale[rows])


def _slices(x: torch.Tensor):
    """Indices cutting a CPU tensor ``x`` into pieces of about ``_SLICE_BYTES``, each a block
    of memory: along the batch, or for one channels-last sample along dim 2 (its outermost
    spatial axis). Only the whole of x for one sample in the contiguous layout, whose slices
    would be strided; under torch.compile, which plans its own buffers; and on a GPU, where
    slices buy no cache locality and each costs a round of kernel launches."""
    # compilation first: a symbolic shape has no byte count to read
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        yield (slice(None),)
        return
    pieces = -(-x.nbytes // _SLICE_BYTES)
    n = x.shape[0]
    if pieces == 1 or (n == 1 and memory_format_of(x) == torch.contiguous_format):
        yield (slice(None),)
    elif n > 1:
        step = -(-n // min(pieces, n))
        yield from ((slice(s, s + step),) for s in range(0, n, step))
    else:
        step = -(-x.shape[2] // min(pieces, x.shape[2]))
        yield from ((slice(None), slice(None), slice(s, s + step))
                    for s in range(0, x.shape[2], step))


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(1 or B, C) -> (1 or B, C, 1, ...) in the dtype of ``like``, to broadcast against it."""
    return v.to(like.dtype).reshape(v.shape + (1,) * (like.ndim - 2))


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None, silu: bool = True) -> torch.Tensor:
    """SiLU(norm(x) * (1 + scale) + shift) in one memory-saving autograd node.

    ``scale``, ``shift``: (B, C) or None; ``silu=False`` leaves out the SiLU. The GroupNorm
    affine and the scale-shift fold into one per-channel multiply-add: with
    a = gamma (1 + scale) and b = beta (1 + scale) + shift the result is SiLU(xhat a + b).
    """
    a, b = _folded_affine(norm, scale, shift)
    return _GroupNormSiLU.apply(x, a, b, norm.num_groups, norm.eps, silu)[0]


def _folded_affine(norm: nn.GroupNorm, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (1 or B, C): the GroupNorm affine folded with the scale-shift."""
    a, b = norm.weight[None], norm.bias[None]  # (1, C)
    if scale is not None:
        a, b = a * (1 + scale), b * (1 + scale) + shift
    return a, b


def conv_of_group_norm_silu(conv: nn.Module, x: torch.Tensor, norm: nn.GroupNorm,
                            scale: torch.Tensor | None = None,
                            shift: torch.Tensor | None = None,
                            recompute: bool = True) -> torch.Tensor:
    """conv(group_norm_silu(x, norm, scale, shift)), keeping only ``x`` for the backward pass.

    A convolution keeps its input to compute its weight gradient. Here that input is a cheap
    elementwise function of ``x``, which the normalisation keeps anyway, so instead of
    storing it the backward pass recomputes it from ``x``: one activation-sized tensor less
    per use (two per residual block), for one GroupNorm + SiLU more per use.
    ``recompute=False`` stores the input as usual.
    """
    if not recompute:
        return conv(group_norm_silu(x, norm, scale, shift))
    x = _norm_layout(x)  # here, so that the norm and the recomputation share one copy
    a, b = _folded_affine(norm, scale, shift)
    y, mean, rstd = _GroupNormSiLU.apply(x, a, b, norm.num_groups, norm.eps, True)
    if not (y.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return conv(y)  # nothing to save; or the compiler plans what to keep itself
    x, a, b = x.detach(), a.detach(), b.detach()
    groups, eps = norm.num_groups, norm.eps
    storage = y.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() != storage:
            return t
        return t.size(), t.stride(), t.storage_offset()  # a view of y: remember which

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        with torch.no_grad():
            y = F.silu(_normalize(x, mean, rstd, groups, eps, a, b), inplace=True)
        return y.as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return conv(y)
