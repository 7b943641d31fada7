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
from torch.utils.checkpoint import checkpoint

from ddpm.conditioning import PositionEmbedding, TokenEmbedding, sinusoidal_embedding
from ddpm.convolutions import CHANNELS_LAST, CONV, memory_format_of, upsample_nearest_conv
from ddpm.group_norm_silu import conv_of_group_norm_silu, group_norm_silu


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
        conv = CONV[dims]
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
        conv = CONV[dims]
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
        return x + h.contiguous(memory_format=memory_format_of(x))


class Downsample(nn.Module):
    """Halve every spatial size with a strided 3x3 convolution."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = CONV[dims](channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double every spatial size: nearest-neighbour repeat, then a 3x3 convolution.

    Computed by ``upsample_nearest_conv``, which never builds the repeated image.
    """

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = CONV[dims](channels, channels, 3, padding=1)

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
        conv = CONV[dims]
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
        input_format = memory_format_of(x)
        use_channels_last = (self.channels_last if self.channels_last is not None
                             else x.device.type == "cpu")
        if use_channels_last:
            x = x.contiguous(memory_format=CHANNELS_LAST[self.dims])
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
