"""Flow matching with the straight (rectified-flow) path: training pairs and ODE samplers.

The probability path joins a data sample x0 to a noise sample n ~ N(0, I) by a straight
line (Liu et al. 2023, "Flow Straight and Fast", Eq. 1; Lipman et al. 2023, "Flow Matching
for Generative Modeling", Eq. 20-23 with sigma_min = 0):

    x_s = (1 - s) x0 + s n,        s in [0, 1]:  s = 0 is the data, s = 1 pure noise.

Sign convention: the velocity is the derivative along increasing s, i.e. towards the noise,

    v = d x_s / ds = n - x0,

and a network ``v_theta(x_s, s)`` is trained to regress it (the conditional flow-matching
loss, Lipman et al. 2023, Eq. 23). Generation integrates dx/ds = v_theta from s = 1 (noise)
down to s = 0 (data), so every step moves *against* v: x_{s - h} = x_s - h v.

The UNet's time embedding was designed for integer DDPM timesteps 0..999, so the network
sees ``s * TIME_SCALE`` (= s * 1000): the same embedding frequencies cover the same range.
This is the convention of Esser et al. 2024 (Stable Diffusion 3), who also recommend
drawing the training s from a logit-normal density, which puts more weight on the middle of
the path where the velocity is hardest to predict (Sec. 3.1, Eq. 19).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .winograd import reused_weight_transforms

TIME_SCALE = 1000.0  # the UNet receives t = s * TIME_SCALE
TIME_KINDS = ("uniform", "logit_normal")
METHODS = ("euler", "heun")


def _expand(s, like: torch.Tensor) -> torch.Tensor:
    """s (a float or a (B,) tensor) shaped (B, 1, 1, ...) to broadcast against ``like``."""
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    return s.reshape(s.shape + (1,) * (like.ndim - s.ndim))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, s) -> torch.Tensor:
    """x_s = (1 - s) x0 + s noise (Liu et al. 2023, Eq. 1; Lipman et al. 2023, Eq. 22).

    ``s`` is a float or a (B,) tensor in [0, 1]; s = 0 gives x0, s = 1 the noise.
    """
    s = _expand(s, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = d x_s / ds = noise - x0, the regression target (Lipman et al. 2023, Eq. 23).

    It points from the data towards the noise and does not depend on s: the path is straight.
    """
    return noise - x0


def predict_x0(x_s: torch.Tensor, s, velocity: torch.Tensor) -> torch.Tensor:
    """x0 = x_s - s v: the data point a velocity implies (Eq. 1 solved with n = x0 + v)."""
    return x_s - _expand(s, x_s) * velocity


def predict_noise(x_s: torch.Tensor, s, velocity: torch.Tensor) -> torch.Tensor:
    """noise = x_s + (1 - s) v: the noise a velocity implies (Eq. 1 solved with x0 = n - v)."""
    return x_s + (1 - _expand(s, x_s)) * velocity


def sample_times(n: int, generator: torch.Generator | None = None, kind: str = "uniform",
                 *, loc: float = 0.0, scale: float = 1.0, device=None) -> torch.Tensor:
    """(n,) training times s in [0, 1] (float32).

    ``uniform``: s ~ U[0, 1) (Lipman et al. 2023; Liu et al. 2023).
    ``logit_normal``: s = sigmoid(loc + scale * u), u ~ N(0, 1) (Esser et al. 2024, Eq. 19),
    which concentrates s around sigmoid(loc) (0.5 for loc = 0).
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        if scale <= 0:
            raise ValueError(f"logit_normal time sampling needs scale > 0, got {scale}")
        u = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(loc + scale * u)
    raise ValueError(f"unknown time sampling kind {kind!r}; expected one of {TIME_KINDS}")


def model_velocity(model: torch.nn.Module, extra_channels: torch.Tensor | None = None,
                   time_scale: float = TIME_SCALE, **cond) -> Callable:
    """A ``velocity_fn(x_s, s)`` calling ``model(cat(x_s, extra_channels), s * time_scale)``.

    ``extra_channels`` (B, C_cond, *S) are the conditioning channels (e.g. the anatomy of a
    dose-prediction model) concatenated after the state, as in training; ``cond`` holds
    further keyword arguments of the model (``token``, ``position``).
    """

    def fn(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x_in = x_s if extra_channels is None else torch.cat([x_s, extra_channels], dim=1)
        return model(x_in, s * time_scale, **cond)

    return fn


def time_grid(steps: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(steps + 1,) evenly spaced times 1 = s_0 > s_1 > ... > s_steps = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=dtype, device=device)


@torch.inference_mode()
@reused_weight_transforms()  # the same weights at every step
def flow_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape=None,
    *,
    x1: torch.Tensor | None = None,
    steps: int = 50,
    method: str = "euler",
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = True,
) -> torch.Tensor:
    """Integrate dx/ds = velocity_fn(x, s) from s = 1 (noise) to s = 0 (data); returns x at 0.

    ``velocity_fn(x, s_batch)`` gets the state (B, C, *S) and the times (B,) in [0, 1] (wrap a
    network with :func:`model_velocity`). Start from ``x1`` or from N(0, I) noise of ``shape``
    drawn with ``generator`` on ``device``. The time grid is uniform (:func:`time_grid`), with
    h = s_i - s_{i+1} > 0:

    * ``euler``: x_{i+1} = x_i - h v(x_i, s_i) (Liu et al. 2023, Sec. 2.1); one evaluation
      per step.
    * ``heun`` (2nd order, Karras et al. 2022, "Elucidating the Design Space", Algorithm 1):
      predict x' = x_i - h v_i, correct x_{i+1} = x_i - h (v_i + v(x', s_{i+1})) / 2; the step
      that ends at s = 0 stays an Euler step, as in Karras et al., so ``steps`` Heun steps
      cost 2 * steps - 1 evaluations (one first-order step adds O(h^2) error: the sampler
      stays second order).

    On a straight path (a velocity constant along each trajectory) both are exact for any
    number of steps.
    """
    if method not in METHODS:
        raise ValueError(f"unknown flow sampler {method!r}; expected one of {METHODS}")
    if x1 is None:
        if shape is None:
            raise ValueError("flow_sample() needs either shape or x1")
        x1 = torch.randn(shape, generator=generator, device=device)
    x = x1
    times = time_grid(steps, device=x.device).to(x.dtype)
    batch = x.shape[0]
    for i in tqdm(range(steps), desc=f"flow sampling ({method})", leave=False,
                  disable=not progress):
        s, s_next = times[i], times[i + 1]
        h = s - s_next
        v = velocity_fn(x, s.expand(batch)).to(x.dtype)
        x_euler = x - h * v
        if method == "euler" or i == steps - 1:
            x = x_euler
        else:
            v_next = velocity_fn(x_euler, s_next.expand(batch)).to(x.dtype)
            x = x - h * 0.5 * (v + v_next)
    return x
