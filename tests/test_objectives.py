"""The three training objectives: what the network sees, what it is compared with, and the
clean sample one network call implies."""

from __future__ import annotations

import pytest
import torch

from ddpm.config import config_from_dict
from ddpm.flow import TIME_SCALE
from ddpm.losses import DiffusionLoss, gradient_loss
from ddpm.objectives import (
    DiffusionObjective,
    FlowObjective,
    RegressionObjective,
    build_objective,
)
from ddpm.schedule import NoiseSchedule
from ddpm.unet import UNet

ANATOMY = 3


def toy_batch(seed=0):
    """x0: a (2, 1, 8, 8, 8) dose in [-1, 1]; extra: (2, 3, 8, 8, 8) anatomy channels."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((2, 1, 8, 8, 8), generator=g) * 2 - 1
    extra = torch.rand((2, ANATOMY, 8, 8, 8), generator=g).round() * 2 - 1
    return x0, extra


def zero_unet(in_channels):
    """A tiny 3D UNet; its last layer is zero-initialised, so it outputs exactly 0."""
    return UNet(dims=3, in_channels=in_channels, out_channels=1, base_channels=8,
                channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=2,
                norm_groups=4)


class Recorder(torch.nn.Module):
    """Records its inputs and returns zeros (or ``answer(x, t)`` when given)."""

    def __init__(self, answer=None):
        super().__init__()
        self.answer, self.inputs, self.times = answer, [], []
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        self.inputs.append(x)
        self.times.append(t)
        if self.answer is not None:
            return self.answer(x, t)
        return torch.zeros_like(x[:, :1]) + self.weight


def dose_loss():
    return DiffusionLoss(channel_names=("dose",), channel_weights=(1.0,))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusion_loss_of_a_zero_output_network_is_the_mean_square_of_its_target(prediction):
    schedule = NoiseSchedule("cosine", 1000)
    x0, extra = toy_batch()
    objective = DiffusionObjective(schedule, dose_loss(), prediction)
    loss, parts = objective(zero_unet(1 + ANATOMY), x0, {}, extra,
                            torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the objective's order
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    target = schedule.training_target(x0, t, noise, prediction)
    torch.testing.assert_close(loss, (target**2).mean())
    assert set(parts) == {"loss_dose"}


def test_flow_loss_of_a_zero_output_network_is_the_mean_square_of_the_velocity():
    x0, extra = toy_batch()
    loss, _ = FlowObjective(dose_loss())(zero_unet(1 + ANATOMY), x0, {}, extra,
                                         torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(2, generator=g)  # the times s
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())


def test_regression_l1_loss_with_a_gradient_term_of_a_zero_output_network():
    x0, extra = toy_batch()
    loss, parts = RegressionObjective("l1", gradient_weight=0.5)(zero_unet(ANATOMY), x0, {},
                                                                extra, None)
    expected = x0.abs().mean() + 0.5 * gradient_loss(torch.zeros_like(x0), x0)
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"loss_l1", "loss_gradient"}


def test_regression_mse_loss_of_a_zero_output_network_is_the_mean_square_of_x0():
    x0, extra = toy_batch()
    loss, parts = RegressionObjective("mse")(zero_unet(ANATOMY), x0, {}, extra, None)
    torch.testing.assert_close(loss, (x0**2).mean())
    assert set(parts) == {"loss_mse"}


def test_regression_sees_only_the_anatomy_and_draws_no_noise():
    x0, extra = toy_batch()
    model, g = Recorder(), torch.Generator().manual_seed(3)
    before = g.get_state()
    RegressionObjective()(model, x0, {}, extra, g)
    assert torch.equal(model.inputs[0], extra)
    assert torch.equal(model.times[0], torch.zeros(2, dtype=torch.long))
    assert torch.equal(g.get_state(), before)


@pytest.mark.parametrize("objective", [
    DiffusionObjective(NoiseSchedule("cosine", 1000), dose_loss(), "v"),
    FlowObjective(dose_loss()),
])
def test_generative_objectives_see_the_noisy_state_followed_by_the_anatomy(objective):
    x0, extra = toy_batch()
    model = Recorder()
    objective(model, x0, {}, extra, torch.Generator().manual_seed(0))
    seen = model.inputs[0]
    assert seen.shape[1] == 1 + ANATOMY
    assert torch.equal(seen[:, 1:], extra)
    assert not torch.equal(seen[:, :1], x0)  # noised


def test_the_flow_network_gets_the_time_scaled_to_the_unet_range():
    x0, extra = toy_batch()
    model = Recorder()
    FlowObjective(dose_loss(), "logit_normal")(model, x0, {}, extra,
                                               torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    s = torch.sigmoid(torch.randn(2, generator=g))
    torch.testing.assert_close(model.times[0], s * TIME_SCALE)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("t", [10, 500])
def test_one_step_x0_of_an_oracle_diffusion_model_is_x0(prediction, t):
    schedule = NoiseSchedule("cosine", 1000)
    x0, extra = toy_batch()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    oracle = Recorder(lambda x, tt: schedule.training_target(x0, tt, noise, prediction))
    objective = DiffusionObjective(schedule, dose_loss(), prediction)
    x0_hat = objective.one_step_x0(oracle, x0, {}, extra, t, noise)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


def test_one_step_x0_of_an_oracle_flow_model_is_x0():
    x0, extra = toy_batch()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    oracle = Recorder(lambda x, tt: noise - x0)
    objective = FlowObjective(dose_loss(), timesteps=1000)
    x0_hat = objective.one_step_x0(oracle, x0, {}, extra, 700, noise)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(oracle.times[0], torch.full((2,), 700.0))  # s = 0.7


@pytest.mark.parametrize("kind, cls", [("diffusion", DiffusionObjective),
                                       ("flow", FlowObjective),
                                       ("regression", RegressionObjective)])
def test_the_model_objective_key_picks_the_objective(kind, cls):
    cfg = config_from_dict({
        "train": {"task": "dose"}, "loss": {"channel_weights": [1.0]},
        "model": {"dims": 3, "objective": kind, "in_channels": 1, "out_channels": 1,
                  "conditioning": "none"}})
    objective = build_objective(cfg, NoiseSchedule("cosine", 1000), dose_loss())
    assert type(objective) is cls
