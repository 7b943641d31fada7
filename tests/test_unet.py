"""Specification of ddpm.unet.UNet, on tiny 2D (16x16) and 3D (8^3) models."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import randomise
from torch import nn

from ddpm.unet import AttentionBlock, UNet

NUM_CLASSES = 6


def tiny_unet(dims: int = 2, **overrides) -> UNet:
    """A two-level UNet small enough to run in milliseconds, attention on the lower level."""
    kwargs = dict(dims=dims, in_channels=2, out_channels=2, base_channels=16,
                  channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  num_heads=2, norm_groups=8)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return UNet(**kwargs)



def inputs(dims: int, batch: int = 2, size: int | None = None):
    size = size or (16 if dims == 2 else 8)
    torch.manual_seed(2)
    x = torch.randn(batch, 2, *([size] * dims))
    t = torch.randint(0, 1000, (batch,))
    return x, t


@pytest.mark.parametrize("dims", [2, 3])
def test_output_has_input_spatial_shape_and_out_channels(dims):
    model = tiny_unet(dims, in_channels=3, out_channels=1)
    x = torch.randn(2, 3, *([16 if dims == 2 else 8] * dims))
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, 1, *x.shape[2:])


def test_fresh_model_predicts_zero():
    model = tiny_unet()
    x, t = inputs(2)
    assert torch.count_nonzero(model(x, t)) == 0


def test_float_and_int_timesteps_give_same_output():
    model = randomise(tiny_unet())
    x, t = inputs(2)
    torch.testing.assert_close(model(x, t), model(x, t.float()))


def test_changing_class_token_changes_output():
    model = randomise(tiny_unet(num_classes=NUM_CLASSES))
    x, t = inputs(2)
    out_a = model(x, t, token=torch.tensor([0, 0]))
    out_b = model(x, t, token=torch.tensor([3, 3]))
    assert (out_a - out_b).abs().max() > 1e-4


def test_changing_position_changes_output():
    model = randomise(tiny_unet(use_position=True))
    x, t = inputs(2)
    out_a = model(x, t, position=torch.tensor([0.1, 0.1]))
    out_b = model(x, t, position=torch.tensor([0.9, 0.9]))
    assert (out_a - out_b).abs().max() > 1e-4


def test_negative_token_and_num_classes_are_the_same_null_token():
    model = randomise(tiny_unet(num_classes=NUM_CLASSES))
    x, t = inputs(2)
    assert model.null_token == NUM_CLASSES
    out_negative = model(x, t, token=torch.tensor([-1, -1]))
    out_null = model(x, t, token=torch.tensor([NUM_CLASSES, NUM_CLASSES]))
    torch.testing.assert_close(out_negative, out_null, rtol=0, atol=0)


def test_missing_token_means_null_token():
    model = randomise(tiny_unet(num_classes=NUM_CLASSES))
    x, t = inputs(2)
    torch.testing.assert_close(model(x, t), model(x, t, token=torch.tensor([-1, -1])),
                               rtol=0, atol=0)


def test_unconditional_model_has_no_null_token():
    assert tiny_unet().null_token is None


def test_missing_position_is_an_error():
    model = tiny_unet(use_position=True)
    x, t = inputs(2)
    with pytest.raises(ValueError, match="position.*required"):
        model(x, t)


@pytest.mark.parametrize("kwargs, message", [
    (dict(token=torch.tensor([0, 1])), "num_classes"),
    (dict(position=torch.tensor([0.5, 0.5])), "use_position"),
])
def test_conditioning_the_model_was_not_built_for_is_an_error(kwargs, message):
    model = tiny_unet()
    x, t = inputs(2)
    with pytest.raises(ValueError, match=message):
        model(x, t, **kwargs)


def test_token_out_of_range_is_an_error():
    model = tiny_unet(num_classes=NUM_CLASSES)
    x, t = inputs(2)
    with pytest.raises(ValueError, match="out of range"):
        model(x, t, token=torch.tensor([0, NUM_CLASSES + 1]))


def _gradients(checkpointing: bool, state: dict) -> dict[str, torch.Tensor]:
    model = tiny_unet(num_classes=NUM_CLASSES, gradient_checkpointing=checkpointing)
    model.load_state_dict(state)
    model.train()
    x, t = inputs(2)
    model(x, t, token=torch.tensor([1, 2])).square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_same_gradients():
    state = randomise(tiny_unet(num_classes=NUM_CLASSES)).state_dict()
    plain, checkpointed = _gradients(False, state), _gradients(True, state)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def _saved_tensor_count(model: UNet) -> int:
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    x, t = inputs(2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t)
    return count


def test_gradient_checkpointing_saves_fewer_activations():
    plain = tiny_unet().train()
    checkpointed = tiny_unet(gradient_checkpointing=True).train()
    assert _saved_tensor_count(checkpointed) < _saved_tensor_count(plain) / 2


@pytest.mark.parametrize("dims, memory_format",
                         [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_channels_last_matches_contiguous(dims, memory_format):
    model = randomise(tiny_unet(dims, num_classes=NUM_CLASSES))
    x, t = inputs(dims)
    token = torch.tensor([0, 4])
    expected = model(x, t, token)
    model = model.to(memory_format=memory_format)
    out = model(x.to(memory_format=memory_format), t, token)
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_runs_and_backpropagates_under_bf16_autocast():
    model = randomise(tiny_unet(num_classes=NUM_CLASSES))
    x, t = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, token=torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_block_is_multi_head_self_attention_over_positions():
    channels, heads = 16, 2
    block = randomise(AttentionBlock(dims=2, channels=channels, num_heads=heads, groups=4))
    reference = nn.MultiheadAttention(channels, heads, batch_first=True)
    with torch.no_grad():  # same q/k/v and output weights, as (C_out, C_in) matrices
        reference.in_proj_weight.copy_(block.qkv.weight.flatten(1))
        reference.in_proj_bias.copy_(block.qkv.bias)
        reference.out_proj.weight.copy_(block.proj_out.weight.flatten(1))
        reference.out_proj.bias.copy_(block.proj_out.bias)
    x = torch.randn(2, channels, 4, 5)
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    attended, _ = reference(tokens, tokens, tokens, need_weights=False)
    expected = x + attended.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)


def test_downsample_factor_is_two_per_downsampling():
    assert tiny_unet(channel_mults=(1, 2, 2, 4), attention_levels=()).downsample_factor == 8


@pytest.mark.parametrize("dims, shape", [(2, (30, 32)), (3, (8, 8, 6))])
def test_indivisible_spatial_size_names_size_and_multiple(dims, shape):
    model = tiny_unet(dims, channel_mults=(1, 2, 2), attention_levels=())
    x = torch.randn(1, 2, *shape)
    expected = f"spatial size {shape} must be divisible by 4 for channel_mults=(1, 2, 2)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        model(x, torch.tensor([0]))


def test_wrong_input_channels_is_an_error():
    model = tiny_unet()
    with pytest.raises(ValueError, match="C=2"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([0]))


@pytest.mark.parametrize("overrides, message", [
    (dict(dims=1), "dims must be 2 or 3"),
    (dict(base_channels=12), "divisible by norm_groups"),
    (dict(attention_levels=(2,)), "attention level 2 out of range"),
    (dict(num_heads=3), "not divisible by num_heads"),
    (dict(channel_mults=()), "channel_mults"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_constructor_argument_is_an_error_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(**overrides)
