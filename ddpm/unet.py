"""The denoising network: one UNet for 2D slices and 3D volumes (``dims=2`` or ``dims=3``).

The architecture follows Ho et al. 2020 (Appendix B) with the refinements of Dhariwal &
Nichol 2021 ("Diffusion Models Beat GANs", Sec. 3): residual blocks whose second GroupNorm
is modulated by the conditioning embedding (scale-shift, "AdaGN"), multi-head self-attention
at chosen resolutions, and zero-initialised last layers so every residual branch starts as
the identity and the untrained network predicts exactly zero.

Conditioning is one embedding vector per sample, the sum of
  - the sinusoidal timestep embedding passed through a small MLP,
  - optionally a learned class-token embedding (with a null token for classifier-free
    guidance, Ho & Salimans 2022),
  - optionally an embedding of a continuous position in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ddpm.conditioning import PositionEmbedding, TokenEmbedding, sinusoidal_embedding

_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


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


def _native_conv3d_is_slow(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    """Whether this 3x3x3 convolution (the kind ``conv3d_as_conv2d`` computes) would take
    PyTorch's slow kernel (see ``_below_onednn_threshold``)."""
    return (
        _below_onednn_threshold(x)
        and conv.kernel_size == (3, 3, 3)
        and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
    )


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
    y = F.conv2d(slices, taps, tap_bias, padding=1)  # (N D, 3 C_out, H, W)
    y = y.permute(0, 2, 3, 1).reshape(n, d, h, w, 3, o)  # a view if channels-last
    out = y[..., 1, :].contiguous()  # (N, D, H, W, C_out): the tap at the same depth
    out[:, 1:] += y[:, :-1, ..., 0, :]  # slice d - 1 through the first tap
    out[:, :-1] += y[:, 1:, ..., 2, :]  # slice d + 1 through the last tap
    return out.permute(0, 4, 1, 2, 3)  # (N, C_out, D, H, W), channels-last strides


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that avoids PyTorch's slow float32 CPU kernel for batch-1 volumes."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode == "zeros" and _native_conv3d_is_slow(x, self):
            return conv3d_as_conv2d(x, weight, bias)
        return super()._conv_forward(x, weight, bias)


_CONV = {2: nn.Conv2d, 3: Conv3d}


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout ``x`` is in: contiguous (NC...) or channels-last (N...C)."""
    if x.is_contiguous():
        return torch.contiguous_format
    channels_last = _CHANNELS_LAST[x.ndim - 2]
    if x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


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
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        # Two activation-sized buffers besides grad_y: xhat, which becomes grad_x, and z,
        # which becomes grad_z.
        x, a, b, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        groups, spatial = ctx.groups, tuple(range(2, x.ndim))
        xhat = torch.ops.aten.native_group_norm(
            x, None, None, n, c, x[0, 0].numel(), groups, ctx.eps)[0]
        grad_z = grad_y
        if ctx.silu:
            z = torch.addcmul(_per_channel(b, x), xhat, _per_channel(a, x))
            grad_z = torch.ops.aten.silu_backward.grad_input(grad_y, z, grad_input=z)
        # Sums in the input dtype (CPU and CUDA accumulate bf16 in fp32 internally); asking
        # for an fp32 result would first copy the whole tensor to fp32.
        acc = torch.promote_types(x.dtype, torch.float32)
        grad_b = grad_z.sum(spatial).to(acc)  # (B, C)
        grad_a = _sum_of_products(grad_z, xhat, spatial, acc)  # (B, C)
        # GroupNorm's input gradient with g = a * grad_z, r = rstd, means over each group:
        # dx = r * (g - mean(g) - xhat * mean(g * xhat)); both means follow from grad_a, grad_b.
        a32 = a.to(acc).expand(n, c)
        r = rstd.to(acc).reshape(n, groups, 1)
        mean_g = (a32 * grad_b).reshape(n, groups, -1).mean(-1, keepdim=True) / x[0, 0].numel()
        mean_gx = (a32 * grad_a).reshape(n, groups, -1).mean(-1, keepdim=True) / x[0, 0].numel()
        coef_grad = (a32.reshape(n, groups, -1) * r).reshape(n, c)
        coef_xhat = (-mean_gx * r).expand(n, groups, c // groups).reshape(n, c)
        const = (-mean_g * r).expand(n, groups, c // groups).reshape(n, c)
        grad_x = _multiply_add_into(xhat, _per_channel(coef_xhat, x), _per_channel(const, x))
        grad_x = grad_x.addcmul_(grad_z, _per_channel(coef_grad, x))
        if a.shape[0] == 1 < n:  # a, b were broadcast over the batch
            grad_a, grad_b = grad_a.sum(0, keepdim=True), grad_b.sum(0, keepdim=True)
        return grad_x, grad_a.to(a.dtype), grad_b.to(b.dtype), None, None, None


def _norm_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a layout native_group_norm takes: channels-last on CPU only, nothing strided
    oddly."""
    layout = _memory_format(x) if x.device.type == "cpu" else torch.contiguous_format
    return x.contiguous(memory_format=layout)


def _group_norm_silu_forward(x, a, b, groups: int, eps: float, silu: bool):
    """(SiLU(GroupNorm(x) * a + b), group means, group 1/std); no autograd."""
    n, c = x.shape[:2]
    xhat, mean, rstd = torch.ops.aten.native_group_norm(
        x, None, None, n, c, x[0, 0].numel(), groups, eps)
    z = _multiply_add_into(xhat, _per_channel(a, x), _per_channel(b, x))
    return (F.silu(z, inplace=True) if silu else z), mean, rstd


def _multiply_add_into(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x * a + b written over ``x``, in one pass and without a new activation-sized buffer.

    Under torch.compile the out-of-place form: the compiler plans buffers itself, and it does
    not take a channels-last ``out=``."""
    if torch.compiler.is_compiling():
        return torch.addcmul(b, x, a)
    return torch.addcmul(b, x, a, out=x)


def _sum_of_products(u: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...],
                     dtype: torch.dtype) -> torch.Tensor:
    """(u * v).sum(dims) in ``dtype``, without an activation-sized temporary for u * v.

    Large inputs go in eight slices along dim 2, so the product exists an eighth at a time.
    """
    if torch.compiler.is_compiling() or u.numel() < 2**20:
        return (u * v).sum(dims).to(dtype)
    size = -(-u.shape[2] // 8)
    return sum((us * vs).sum(dims).to(dtype) for us, vs in zip(u.split(size, 2), v.split(size, 2)))


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
    return _GroupNormSiLU.apply(x, a, b, norm.num_groups, norm.eps, silu)


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
    y = _GroupNormSiLU.apply(x, a, b, norm.num_groups, norm.eps, True)
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
            y = _group_norm_silu_forward(x, a, b, groups, eps, True)[0]
        return y.as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return conv(y)


def _zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter so a residual branch (or the output) starts at exactly zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding by scale-shift (Dhariwal & Nichol 2021, Sec. 3).

    GroupNorm -> SiLU -> conv -> GroupNorm -> h * (1 + scale) + shift -> SiLU -> dropout -> conv,
    added to the input (through a 1x1 conv when the channel count changes).
    """

    def __init__(self, dims: int, in_ch: int, out_ch: int, emb_dim: int, groups: int,
                 dropout: float):
        super().__init__()
        conv = _CONV[dims]
        self.dims = dims
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)  # -> (scale, shift)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(conv(out_ch, out_ch, 3, padding=1))
        self.skip = conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor,
                recompute_conv_inputs: bool = True) -> torch.Tensor:
        """``x`` (B, C_in, *S); ``emb`` (B, emb_dim), already passed through SiLU.

        ``recompute_conv_inputs``: let the backward pass recompute each convolution's input
        from the block's activations (see ``conv_of_group_norm_silu``) rather than store it.
        Off under gradient checkpointing, which recomputes the whole block anyway.
        """
        recompute = recompute_conv_inputs
        h = conv_of_group_norm_silu(self.conv1, x, self.norm1, recompute=recompute)
        scale, shift = self.emb_proj(emb).chunk(2, dim=1)  # (B, C_out) each
        if self.dropout.p > 0 and self.training:  # the dropped-out input is not recomputable
            h = self.conv2(self.dropout(group_norm_silu(h, self.norm2, scale, shift)))
        else:
            h = conv_of_group_norm_silu(self.conv2, h, self.norm2, scale, shift, recompute)
        skip = self.skip(x)
        if skip.dtype != h.dtype:  # mixed dtypes: keep the promoted sum
            return h + skip
        return h.add_(skip)  # in place: nothing stores h, and the sum's backward needs no values


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, as a residual branch.

    GroupNorm -> 1x1 conv to (q, k, v) -> scaled dot-product attention (Vaswani et al. 2017,
    Eq. 1) per head -> zero-initialised 1x1 output projection -> added to the input.
    """

    def __init__(self, dims: int, channels: int, num_heads: int, groups: int):
        super().__init__()
        conv = _CONV[dims]
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj_out = _zero_init(conv(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        heads = self.num_heads
        # Work on tokens (B, N, C): a view of a channels-last x. The 1x1 convolutions are
        # applied as matrix products, and q, k, v come out with the head dimension d
        # contiguous, as the fused SDPA kernels (flash attention on CPU) need; otherwise
        # PyTorch falls back to a kernel that stores the (N, N) attention matrix.
        tokens = group_norm_silu(x, self.norm, silu=False).movedim(1, -1).reshape(b, -1, c)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, N, 3C)
        qkv = qkv.reshape(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        h = h.transpose(1, 2).reshape(b, -1, c)  # (B, N, C)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        h = h.reshape(b, *spatial, c).movedim(-1, 1)  # (B, C, *S), channels-last strides
        return x + h.contiguous(memory_format=_memory_format(x))


class Downsample(nn.Module):
    """Halve every spatial size with a strided 3x3 convolution."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


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
    never built or stored.
    """
    dims = x.ndim - 2
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
    if _memory_format(x) == torch.contiguous_format:
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


class Upsample(nn.Module):
    """Double every spatial size: nearest-neighbour repeat, then a 3x3 convolution.

    Computed by ``upsample_nearest_conv``, which never builds the repeated image.
    """

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_nearest_conv(x, self.conv.weight, self.conv.bias)


class Stage(nn.Module):
    """One residual block, followed by self-attention at the attention levels."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res, self.attn = res, attn


class UNet(nn.Module):
    """Noise-prediction UNet for 2D (``dims=2``) or 3D (``dims=3``) inputs.

    Encoder: per level ``num_res_blocks`` stages then a strided-conv downsample (not on the
    last level); middle: res, attention, res; decoder: per level ``num_res_blocks + 1``
    stages, each fed the concatenation with the matching encoder activation (Ho et al. 2020),
    then a nearest+conv upsample (not on the first level). Level ``i`` has
    ``base_channels * channel_mults[i]`` channels; ``attention_levels`` lists level indices.

    ``channels_last``: compute in the channels-last layout (N, *S, C in memory). None (the
    default) means on CPU, where oneDNN's convolutions, GroupNorm and flash attention all run
    natively in that layout and the contiguous layout costs a reorder per convolution. The
    output is returned in the layout of the input either way.
    """

    def __init__(
        self,
        dims: int = 2,
        in_channels: int = 2,
        out_channels: int = 2,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (2,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        use_position: bool = False,
        norm_groups: int = 32,
        gradient_checkpointing: bool = False,
        channels_last: bool | None = None,
    ):
        super().__init__()
        channel_mults, attention_levels = tuple(channel_mults), tuple(attention_levels)
        _validate_args(dims, in_channels, out_channels, base_channels, channel_mults,
                       num_res_blocks, attention_levels, num_heads, dropout, num_classes,
                       norm_groups)
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels
        self.channel_mults = channel_mults
        self.num_classes, self.use_position = num_classes, use_position
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        conv = _CONV[dims]
        emb_dim = 4 * base_channels

        # Conditioning embeddings, summed into one (B, emb_dim) vector.
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.token_embedding = TokenEmbedding(num_classes, emb_dim) if num_classes else None
        self.position_embedding = PositionEmbedding(emb_dim) if use_position else None

        def stage(in_ch: int, out_ch: int, level: int) -> Stage:
            attn = (AttentionBlock(dims, out_ch, num_heads, norm_groups)
                    if level in attention_levels else None)
            return Stage(ResBlock(dims, in_ch, out_ch, emb_dim, norm_groups, dropout), attn)

        # Encoder; every module in `down` hands one skip activation to the decoder.
        self.input_conv = conv(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, base_channels * mult, level))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(dims, ch))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([
            ResBlock(dims, ch, ch, emb_dim, norm_groups, dropout),
            AttentionBlock(dims, ch, num_heads, norm_groups),
            ResBlock(dims, ch, ch, emb_dim, norm_groups, dropout),
        ])

        # Decoder; every Stage in `up` consumes one skip activation (last in, first out).
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out_ch = base_channels * channel_mults[level]
                self.up.append(stage(ch + skip_channels.pop(), out_ch, level))
                ch = out_ch
            if level > 0:
                self.up.append(Upsample(dims, ch))

        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups, ch),
            nn.SiLU(),
            _zero_init(conv(ch, out_channels, 3, padding=1)),
        )

    @property
    def null_token(self) -> int | None:
        """Token meaning "no condition" (classifier-free guidance); None without class tokens."""
        return self.token_embedding.null_token if self.token_embedding is not None else None

    @property
    def downsample_factor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (len(self.channel_mults) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, token: torch.Tensor | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from ``x`` (B, in_channels, *S) at timesteps ``t`` (B,) (int or float).

        ``token`` (B,) int class tokens, used only with ``num_classes``: a negative token or
        ``num_classes`` is the null token, and None means null for the whole batch.
        ``position`` (B,) floats in [0, 1], required with ``use_position``.
        Returns (B, out_channels, *S).
        """
        self._check_input(x)
        input_format = _memory_format(x)
        use_channels_last = (self.channels_last if self.channels_last is not None
                             else x.device.type == "cpu")
        if use_channels_last:
            x = x.contiguous(memory_format=_CHANNELS_LAST[self.dims])
        emb = self._embedding(x, t, token, position)  # (B, emb_dim)
        emb = F.silu(emb)  # every ResBlock projects SiLU(emb); computed once here

        h = self.input_conv(x)
        skips = [h]
        for module in self.down:
            h = module(h) if isinstance(module, Downsample) else self._stage(module, h, emb)
            skips.append(h)

        res1, attn, res2 = self.mid
        h = self._block(res1, h, emb)
        h = self._block(attn, h)
        h = self._block(res2, h, emb)

        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = self._stage(module, torch.cat([h, skips.pop()], dim=1), emb)
        norm, _, conv = self.out  # GroupNorm, SiLU, conv
        return conv_of_group_norm_silu(conv, h, norm).contiguous(memory_format=input_format)

    def _stage(self, stage: Stage, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._block(stage.res, h, emb)
        return self._block(stage.attn, h) if stage.attn is not None else h

    def _block(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        # Recompute activations in the backward pass instead of storing them (saves memory).
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The checkpoint recomputes the whole block: a residual block's own
            # recomputation of its convolution inputs would only keep more tensors alive.
            kwargs = {"recompute_conv_inputs": False} if isinstance(module, ResBlock) else {}
            return checkpoint(module, *args, use_reentrant=False, **kwargs)
        return module(*args)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            expected = "(B, C, D, H, W)" if self.dims == 3 else "(B, C, H, W)"
            raise ValueError(
                f"UNet(dims={self.dims}) expects x of shape {expected} with "
                f"C={self.in_channels}, got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        factor = self.downsample_factor
        if any(s % factor for s in spatial):
            raise ValueError(
                f"spatial size {spatial} must be divisible by {factor} for "
                f"channel_mults={self.channel_mults}"
            )

    def _embedding(self, x: torch.Tensor, t, token, position) -> torch.Tensor:
        batch, device = x.shape[0], x.device
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
        emb = self.time_mlp(sinusoidal_embedding(t, self.base_channels))

        if self.token_embedding is not None:
            if token is None:
                token = torch.full((batch,), self.null_token, dtype=torch.long, device=device)
            token = torch.as_tensor(token, device=device)
            if token.shape != (batch,) or token.is_floating_point():
                raise ValueError(
                    f"token must be an integer tensor of shape ({batch},), got "
                    f"{token.dtype} {tuple(token.shape)}"
                )
            # A range check needs the values on the host; skip it on accelerators where
            # it would stall the pipeline (the embedding lookup fails there anyway), and
            # under torch.compile, where reading a value splits the graph.
            if (token.device.type == "cpu" and not torch.compiler.is_compiling()
                    and token.numel() and int(token.max()) > self.num_classes):
                raise ValueError(
                    f"token {int(token.max())} out of range: expected 0..{self.num_classes - 1}, "
                    f"or {self.num_classes} / a negative value for the null token"
                )
            emb = emb + self.token_embedding(token)
        elif token is not None:
            raise ValueError("token given but the UNet was built without num_classes")

        if self.position_embedding is not None:
            if position is None:
                raise ValueError(
                    "position (B,) in [0, 1] is required: the UNet has use_position=True"
                )
            position = torch.as_tensor(position, device=device, dtype=torch.float32)
            if position.shape != (batch,):
                raise ValueError(
                    f"position must have shape ({batch},), got {tuple(position.shape)}"
                )
            emb = emb + self.position_embedding(position)
        elif position is not None:
            raise ValueError("position given but the UNet was built with use_position=False")
        return emb


def _validate_args(dims, in_channels, out_channels, base_channels, channel_mults,
                   num_res_blocks, attention_levels, num_heads, dropout, num_classes,
                   norm_groups) -> None:
    """Raise a ValueError naming the first constructor argument that cannot work."""
    if dims not in (2, 3):
        raise ValueError(f"UNet: dims must be 2 or 3, got {dims}")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_channels", base_channels), ("num_res_blocks", num_res_blocks),
                        ("num_heads", num_heads), ("norm_groups", norm_groups)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"UNet: {name} must be a positive integer, got {value!r}")
    if not channel_mults or any(not isinstance(m, int) or m < 1 for m in channel_mults):
        raise ValueError(f"UNet: channel_mults must be positive integers, got {channel_mults}")
    if base_channels % norm_groups:
        raise ValueError(
            f"UNet: base_channels={base_channels} must be divisible by norm_groups={norm_groups}"
        )
    levels = len(channel_mults)
    for level in attention_levels:
        if not isinstance(level, int) or not 0 <= level < levels:
            raise ValueError(
                f"UNet: attention level {level!r} out of range: channel_mults={channel_mults} "
                f"has levels 0..{levels - 1}"
            )
    # The middle block always attends at the deepest level.
    for level in {*attention_levels, levels - 1}:
        width = base_channels * channel_mults[level]
        if width % num_heads:
            raise ValueError(
                f"UNet: {width} channels at level {level} not divisible by num_heads={num_heads}"
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(
            f"UNet: num_classes must be a positive integer or None, got {num_classes!r}"
        )
