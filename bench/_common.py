"""Shared pieces of the benchmarks: the two workloads, the contenders built alike, one training
step, one DDIM run, and the process settings every measuring process starts with.

Only the scripts in ``bench/`` import this; the ``ddpm`` package never imports a peer library.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.runtime import reuse_freed_memory
from ddpm.sampling import guided, sample
from ddpm.schedule import NoiseSchedule

THREADS = 2
TIMESTEPS = 1000
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark problem: image size, batch and the network widths every contender uses."""

    dims: int
    size: int
    batch: int
    in_channels: int
    out_channels: int
    widths: tuple[int, ...]
    num_classes: int | None
    head_channels: int  # channels per attention head (4 heads at the lowest level)
    res_blocks: int = 2

    @property
    def cond_channels(self) -> int:
        """Channels concatenated to the noisy image (the anatomy of the dose workload)."""
        return self.in_channels - self.out_channels

    def image_shape(self) -> tuple[int, ...]:
        return (self.batch, self.out_channels, *([self.size] * self.dims))

    def describe(self) -> str:
        spatial = "x".join([str(self.size)] * self.dims)
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return (f"{self.dims}D {spatial}, batch {self.batch}, {self.in_channels} in / "
                f"{self.out_channels} out, widths {'/'.join(map(str, self.widths))}{classes}")


# JS-DDPM slices and dose volumes, as in the project's configs.
WORKLOADS = {
    2: Workload(dims=2, size=64, batch=8, in_channels=2, out_channels=2, widths=(64, 128, 256),
                num_classes=60, head_channels=64),
    3: Workload(dims=3, size=48, batch=1, in_channels=10, out_channels=1, widths=(32, 64, 128),
                num_classes=None, head_channels=32),
}
PEERS = {2: ("diffusers", "monai"), 3: ("monai",)}  # diffusers has no 3D UNet
CONTIGUOUS = "ddpm[contiguous]"  # the project's UNet without its CPU channels-last layout
CHECKPOINTING = "ddpm[checkpointing]"  # the project's UNet with gradient checkpointing


def setup_process(flush_denormal: bool = True, threads: int = THREADS,
                  reuse_memory: bool = True) -> None:
    """Settings every measuring process starts with, before any parallel work.

    Flushing denormals must happen before the thread pool exists: worker threads inherit the
    floating-point mode of the thread that creates them, and only then do all threads flush.
    Zero-initialised layers (used by ddpm and MONAI) make gradients and AdamW's second moment
    denormal during the first steps after initialisation, which runs 3-5x slower otherwise.
    ``reuse_memory``: ``ddpm.runtime.reuse_freed_memory``, as ddpm's trainer and samplers
    apply it on the CPU; given to every contender alike.
    """
    torch.set_flush_denormal(flush_denormal)
    torch.set_num_threads(threads)
    if reuse_memory:
        reuse_freed_memory()


# ----------------------------------------------------------------------------- contenders


class DiffusersAdapter(nn.Module):
    """diffusers ``UNet2DModel`` behind the call ``(x, t, token=None) -> prediction``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, token=None):
        return self.net(x, t, class_labels=token, return_dict=False)[0]


class MonaiAdapter(nn.Module):
    """MONAI ``DiffusionModelUNet`` behind the call ``(x, t, token=None) -> prediction``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, token=None):
        return self.net(x, t, class_labels=token)


def load_unet_module(path: str | None):
    """The project's ``ddpm.unet``, or a ``unet.py`` at ``path`` (e.g. an older version)."""
    if path is None:
        import ddpm.unet

        return ddpm.unet
    spec = importlib.util.spec_from_file_location(f"unet_variant_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"--unet-variant: cannot load a module from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_ddpm(w: Workload, unet_path: str | None = None, **overrides) -> nn.Module:
    """The project's UNet at the workload's widths; attention at the lowest level only."""
    kwargs = dict(dims=w.dims, in_channels=w.in_channels, out_channels=w.out_channels,
                  base_channels=w.widths[0],
                  channel_mults=tuple(c // w.widths[0] for c in w.widths),
                  num_res_blocks=w.res_blocks, attention_levels=(len(w.widths) - 1,),
                  num_heads=w.widths[-1] // w.head_channels, num_classes=w.num_classes,
                  norm_groups=32)
    kwargs.update(overrides)
    return load_unet_module(unet_path).UNet(**kwargs)


def build_diffusers(w: Workload) -> nn.Module:
    """diffusers UNet2DModel with the same levels; scale-shift conditioning like ddpm's."""
    from diffusers import UNet2DModel

    if w.dims != 2:
        raise ValueError("diffusers has no 3D UNet2DModel counterpart")
    levels = len(w.widths)
    net = UNet2DModel(
        sample_size=w.size, in_channels=w.in_channels, out_channels=w.out_channels,
        block_out_channels=w.widths, layers_per_block=w.res_blocks,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        attention_head_dim=w.head_channels, norm_num_groups=32,
        resnet_time_scale_shift="scale_shift", num_class_embeds=w.num_classes,
    )
    return DiffusersAdapter(net)


def build_monai(w: Workload) -> nn.Module:
    """MONAI DiffusionModelUNet with the same levels, using PyTorch's fused attention."""
    from monai.networks.nets import DiffusionModelUNet

    levels = len(w.widths)
    net = DiffusionModelUNet(
        spatial_dims=w.dims, in_channels=w.in_channels, out_channels=w.out_channels,
        num_res_blocks=w.res_blocks, channels=w.widths,
        attention_levels=(False,) * (levels - 1) + (True,), norm_num_groups=32,
        num_head_channels=w.head_channels, num_class_embeds=w.num_classes,
        use_flash_attention=True,
    )
    return MonaiAdapter(net)


def build_contender(name: str, w: Workload, unet_path: str | None = None) -> nn.Module:
    """``ddpm`` (or a ``ddpm[label]`` variant loaded from ``unet_path``; ``ddpm[contiguous]``
    is the project's UNet kept in the contiguous layout, ``ddpm[checkpointing]`` the project's
    UNet with gradient checkpointing), diffusers or monai."""
    if name == CONTIGUOUS:
        return build_ddpm(w, channels_last=False)
    if name == CHECKPOINTING:
        return build_ddpm(w, gradient_checkpointing=True)
    if name == "ddpm" or name.startswith("ddpm["):
        return build_ddpm(w, unet_path)
    if name == "diffusers":
        return build_diffusers(w)
    if name == "monai":
        return build_monai(w)
    raise ValueError(f"unknown contender {name!r}; expected ddpm, diffusers or monai")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- work


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 kernels in oneDNN (AVX512-BF16 / AMX)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def autocast(precision: str, device_type: str = "cpu"):
    """fp32: no autocast; bf16: autocast to bfloat16 on ``device_type``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclasses.dataclass
class Batch:
    """A synthetic batch: clean images, conditioning channels and class tokens."""

    x0: torch.Tensor  # (B, out_channels, *S) in [-1, 1]
    cond: torch.Tensor | None  # (B, cond_channels, *S)
    token: torch.Tensor | None  # (B,)


def synthetic_batch(w: Workload, seed: int = 0, device: str = "cpu") -> Batch:
    """The same data for every contender: uniform images in [-1, 1] and random tokens."""
    g = torch.Generator().manual_seed(seed)
    spatial = [w.size] * w.dims
    x0 = torch.rand(w.image_shape(), generator=g) * 2 - 1
    cond = (torch.rand((w.batch, w.cond_channels, *spatial), generator=g)
            if w.cond_channels else None)
    token = (torch.randint(0, w.num_classes, (w.batch,), generator=g)
             if w.num_classes else None)
    return Batch(*(None if v is None else v.to(device) for v in (x0, cond, token)))


def make_train_step(model: nn.Module, w: Workload, precision: str, seed: int = 0,
                    device: str = "cpu") -> Callable[[], torch.Tensor]:
    """One step of diffusion training: noise, forward, MSE on eps, backward, AdamW step.

    Returns the loss as a tensor, so that a GPU step never waits for the host.
    """
    schedule = NoiseSchedule("cosine", TIMESTEPS).to(device)
    # Fused, as ddpm's trainer uses it; every contender gets the same optimiser.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  fused=torch.device(device).type in ("cpu", "cuda"))
    batch = synthetic_batch(w, seed, device)
    g = torch.Generator(device).manual_seed(seed + 1)
    device_type = torch.device(device).type

    def step() -> torch.Tensor:
        model.train()
        t = torch.randint(0, TIMESTEPS, (w.batch,), generator=g, device=device)
        noise = torch.randn(batch.x0.shape, generator=g, device=device)
        x_t = schedule.q_sample(batch.x0, t, noise)
        x_in = x_t if batch.cond is None else torch.cat([x_t, batch.cond], dim=1)
        with autocast(precision, device_type):
            prediction = model(x_in, t, batch.token)
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def run_ddim(model: nn.Module, w: Workload, precision: str, steps: int, seed: int = 0,
             device: str = "cpu"):
    """Sample with ``ddpm.sampling.sample`` (deterministic DDIM) around any contender."""
    batch = synthetic_batch(w, seed, device)
    model.eval()
    if batch.cond is not None:
        denoiser = guided(model, extra_channels=batch.cond)
    else:
        denoiser = guided(model, token=batch.token)
    generator = torch.Generator(device).manual_seed(seed + 2)
    with autocast(precision, torch.device(device).type):
        return sample(denoiser, NoiseSchedule("cosine", TIMESTEPS), w.image_shape(),
                      steps=steps, sampler="ddim", generator=generator, device=device,
                      progress=False)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for lib in ("diffusers", "monai"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            versions[lib] = None
    return {"cpu": cpu, "cores": os.cpu_count(),
            "bf16_supported": bf16_supported(), "load_average": os.getloadavg(),
            "versions": versions}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file next to ``path``, then rename it into place."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
