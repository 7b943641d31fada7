"""From a checkpoint to generated slices: load, condition, sample, post-process, save.

Everything comes from the checkpoint, never from the current config: the resolved config
(model shape, schedule, conditioning), the cache's ``meta.yaml`` (image size, z-range,
n_bins, affine) and the per-bin priors. So a checkpoint samples the same way after the
config file or the cache has changed, or without any cache at all.

Shared by ``sample.py`` and ``evaluate.py``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .builders import build_model, build_schedule, prior_channel
from .checkpoint import load_checkpoint
from .conditioning import class_token, model_conditions, quantize_z_local
from .config import Config, config_from_dict
from .ema import EMA
from .runtime import resolve_device, reuse_freed_memory
from .sampling import guided, sample
from .schedule import NoiseSchedule

MASK_THRESHOLD = 0.0  # the mask channel is -1 (background) / +1 (lesion): lesion = value > 0
HEAD_THRESHOLD = 0.5  # a pixel is head where the z-bin's mean head mask is >= 0.5
BACKGROUND = -1.0  # value of the background in both channels (the cache's encoding)
WEIGHTS = ("ema", "live")


@dataclass
class TrainedModel:
    """A model restored from a checkpoint with everything needed to sample and score it.

    ``model`` holds the live (optimised) weights; :meth:`weights` swaps the EMA in.
    """

    model: torch.nn.Module
    ema: EMA
    schedule: NoiseSchedule
    cfg: Config
    meta: dict  # the cache's meta.yaml as recorded at training time
    priors: dict  # {"head_mask", "image"}: (n_bins, H, W) float tensors
    path: Path
    step: int = 0
    history: list = field(default_factory=list)
    schedule_record: dict | None = None  # the checkpoint's own schedule record, if any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_bins(self) -> int:
        return int(self.meta["n_bins"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @contextlib.contextmanager
    def weights(self, which: str = "ema"):
        """Context in which ``self.model`` holds the ``"ema"`` or the ``"live"`` weights."""
        if which not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {which!r}")
        self.model.eval()
        if which == "live":
            yield self.model
        else:
            with self.ema.swapped_in(self.model):
                yield self.model


def load_trained(path, device: str = "auto") -> TrainedModel:
    """Restore the model, EMA, schedule, cache meta and priors of a training checkpoint."""
    path = Path(path)
    state = load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("ema", "cache_meta", "priors") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: it was not written by "
                         "ddpm.trainer, which records them for sampling")
    cfg = config_from_dict(state["config"], source=f"{path} (config)")
    task = getattr(cfg.train, "task", "lesion")
    objective = getattr(cfg.model, "objective", "diffusion")
    if task != "lesion" or cfg.model.dims != 2:
        raise ValueError(f"checkpoint {path}: train.task={task!r}, model.dims={cfg.model.dims}; "
                         "slice sampling needs a 2D lesion-synthesis model (train.task 'lesion')")
    if objective != "diffusion":
        raise ValueError(f"checkpoint {path}: model.objective={objective!r}; sample.py and "
                         "evaluate.py sample diffusion models (model.objective 'diffusion')")
    meta = state["cache_meta"]
    for key in ("image_size", "n_bins", "z_range", "geometry"):
        if key not in meta:
            raise ValueError(f"checkpoint {path}: cache_meta lacks {key!r}")
    device = resolve_device(device)
    reuse_freed_memory(device)  # CPU sampling otherwise page-faults on every activation
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    ema = EMA(model, decay=cfg.ema.decay, warmup=cfg.ema.warmup)
    ema.load_state_dict(state["ema"])
    ema.to(device)
    priors = {k: torch.as_tensor(v).float() for k, v in state["priors"].items()}
    return TrainedModel(model, ema, build_schedule(cfg).to(device), cfg, meta, priors, path,
                        int(state.get("step", 0)), list(state.get("history", [])),
                        state.get("schedule"))


# --- conditions --------------------------------------------------------------------------------


def parse_z_bins(text: str, n_bins: int) -> list[int]:
    """``"all"``, a list ``"0,3,5"``, a range ``"2-7"`` (inclusive) or a mix ``"0,4-6"``."""
    text = str(text).strip()
    if text == "all":
        return list(range(n_bins))
    bins: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                if hi < lo:
                    raise ValueError
                bins.extend(range(lo, hi + 1))
            else:
                bins.append(int(part))
        except ValueError:
            raise ValueError(f"--z-bins {text!r}: {part!r} is not a bin, a range 'a-b' (a <= b) "
                             "or 'all'") from None
    bad = [b for b in bins if not 0 <= b < n_bins]
    if bad:
        raise ValueError(f"--z-bins {text!r}: bins {bad} outside 0..{n_bins - 1} (the "
                         f"checkpoint's cache has n_bins={n_bins})")
    return list(dict.fromkeys(bins))


def parse_pathology(text: str) -> list[int]:
    """``"0"`` (healthy), ``"1"`` (lesion) or ``"both"`` -> list of pathology classes."""
    options = {"0": [0], "1": [1], "both": [0, 1], "healthy": [0], "lesion": [1]}
    if str(text) not in options:
        raise ValueError(f"--pathology {text!r}: expected 0, 1 or both")
    return options[str(text)]


def condition_list(z_bins, pathologies) -> list[tuple[int, int]]:
    """Every (z_bin, pathology) pair, bin-major: [(b0, 0), (b0, 1), (b1, 0), ...]."""
    return [(int(b), int(p)) for b in z_bins for p in pathologies]


def expand_conditions(conditions, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_bins, pathology) long tensors (len(conditions) * n,), ``n`` per condition in a row."""
    z = torch.tensor([b for b, _ in conditions], dtype=torch.long).repeat_interleave(n)
    p = torch.tensor([q for _, q in conditions], dtype=torch.long).repeat_interleave(n)
    return z, p


def condition_label(z_bin: int, pathology: int) -> str:
    """Human-readable row label, e.g. ``"bin 3, lesion"``."""
    return f"bin {z_bin}, {'lesion' if pathology else 'healthy'}"


# --- generation --------------------------------------------------------------------------------


@torch.inference_mode()
def generate(tm: TrainedModel, z_bins, pathology, *, weights: str = "ema", steps: int | None = None,
             sampler: str | None = None, eta: float | None = None, guidance: float | None = None,
             spacing: str | None = None, clip_x0: bool | None = None, seed: int = 0,
             batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Samples (N, C, H, W) in [-1, 1] on the CPU for the N conditions ``z_bins``, ``pathology``.

    Settings left as None take the checkpoint config's ``sample`` section. All conditions go
    through the sampler together, ``batch_size`` at a time. Sample i starts from the i-th
    slot of one noise tensor drawn from ``seed`` on the CPU, so the same seed gives the same
    samples on any device; a stochastic sampler (``ddpm``, or ``ddim`` with eta > 0) draws its
    step noise per batch, so its samples also depend on ``batch_size``.
    """
    s = tm.cfg.sample
    steps = s.steps if steps is None else int(steps)
    sampler = s.sampler if sampler is None else sampler
    eta = s.eta if eta is None else float(eta)
    guidance = s.guidance if guidance is None else float(guidance)
    spacing = s.spacing if spacing is None else spacing
    clip_x0 = s.clip_x0 if clip_x0 is None else bool(clip_x0)
    if guidance > 0 and tm.cfg.diffusion.cond_drop_prob == 0:
        raise ValueError(f"guidance {guidance} needs a model trained with condition dropout; "
                         f"{tm.path} has diffusion.cond_drop_prob=0, so its unconditional "
                         "prediction is untrained. Use guidance 0.")
    if not 1 <= steps <= tm.schedule.timesteps:
        raise ValueError(f"steps={steps}: expected 1..{tm.schedule.timesteps} "
                         "(diffusion.timesteps of the checkpoint)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    z_bins, pathology = torch.as_tensor(z_bins).long(), torch.as_tensor(pathology).long()
    n, size, device = len(z_bins), tm.image_size, tm.device
    shape = (n, tm.cfg.model.out_channels, size, size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
    out = torch.empty(shape)
    chunks = range(0, n, batch_size)
    with tm.weights(weights) as model:
        for k, start in enumerate(tqdm(chunks, desc="generating", unit="batch",
                                       disable=not progress or len(chunks) < 2)):
            part = slice(start, start + batch_size)
            zb, pa = z_bins[part], pathology[part]
            cond = {key: v.to(device) for key, v in
                    model_conditions(tm.cfg.model.conditioning, tm.n_bins, zb, pa).items()}
            extra = prior_channel(tm.priors, zb).to(device) if tm.cfg.model.use_prior else None
            fn = guided(model, guidance, model.null_token, extra_channels=extra, **cond)
            gen = torch.Generator(device).manual_seed(int(seed) * 1_000_003 + k)
            x = sample(fn, tm.schedule, x_T=x_T[part].to(device), steps=steps, sampler=sampler,
                       eta=eta, spacing=spacing, prediction=tm.cfg.diffusion.prediction,
                       clip_x0=(-1.0, 1.0) if clip_x0 else None, generator=gen,
                       progress=progress and len(chunks) == 1)
            out[part] = x.float().cpu()
    return out


def background_masks(priors: dict, z_bins) -> torch.Tensor:
    """(N, 1, H, W) bool: the background of each sample's z-bin, outside the prior head mask.

    Background = pixels whose mean head mask is below 0.5 AND that connect to the image
    border through such pixels. The cache's head mask is an intensity threshold, so dark
    structures inside the head (CSF in the ventricles) fall below it too; as enclosed holes
    they are not background and are kept.
    """
    head = torch.as_tensor(priors["head_mask"]).float()[torch.as_tensor(z_bins).long()]
    low = (head < HEAD_THRESHOLD)[:, None]  # (N, 1, H, W)
    border = torch.zeros_like(low)
    border[..., 0, :] = border[..., -1, :] = border[..., :, 0] = border[..., :, -1] = True
    reached = low & border
    while True:  # flood fill from the border (4-connected), one ring of pixels per pass
        r = reached.float()
        near = torch.maximum(F.max_pool2d(r, (3, 1), stride=1, padding=(1, 0)),
                             F.max_pool2d(r, (1, 3), stride=1, padding=(0, 1)))
        grown = low & (near > 0)
        if torch.equal(grown, reached):
            return reached
        reached = grown


def postprocess(x: torch.Tensor, z_bins, priors: dict, *, blank_background: bool = True,
                binarise_mask: bool = True) -> torch.Tensor:
    """Optional clean-up of generated (N, 2, H, W) slices; returns a new tensor.

    ``blank_background``: the z-bin's background (:func:`background_masks`: below 0.5 in
    its mean head mask and connected to the border) is set to -1 in the image and the mask
    channel. ``binarise_mask``: the mask channel becomes +1 where it is > 0
    (``MASK_THRESHOLD``) and -1 elsewhere, the cache's encoding.
    """
    x = x.clone()
    if blank_background:
        outside = background_masks(priors, z_bins).to(x.device)  # (N, 1, H, W)
        x = torch.where(outside, torch.full_like(x, BACKGROUND), x)
    if binarise_mask and x.shape[1] > 1:
        x[:, 1] = torch.where(x[:, 1] > MASK_THRESHOLD, 1.0, -1.0)
    return x


# --- writing -----------------------------------------------------------------------------------


def _atomic_path(path: Path) -> Path:
    """A temp path beside ``path`` with the same suffixes (libraries key on them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` onto ``path`` with the permissions a plain open() gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private (0600)
    os.replace(tmp, path)


def save_arrays(path, samples: torch.Tensor, z_bins, pathology, n_bins: int, **extra) -> Path:
    """Write ``samples.npz`` (compressed, atomically): samples, z_bins, pathology, tokens,
    and each keyword of ``extra`` (settings such as the seed) as a 0-d array."""
    path = Path(path)
    tmp = _atomic_path(path)
    z, p = torch.as_tensor(z_bins).long(), torch.as_tensor(pathology).long()
    try:
        np.savez_compressed(tmp, samples=np.asarray(samples, dtype=np.float32), z_bins=z.numpy(),
                            pathology=p.numpy(), tokens=class_token(z, p, n_bins).numpy(),
                            **{k: np.asarray(v) for k, v in extra.items()})
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def bin_centre_z(z_bin: int, z_range, n_bins: int) -> float:
    """Mean z index of the slices that fall into ``z_bin`` (where its samples are placed)."""
    lo, hi = (int(v) for v in z_range)
    zs = [z for z in range(lo, hi + 1) if quantize_z_local(z, (lo, hi), n_bins) == z_bin]
    return float(np.mean(zs))


def slice_affine(meta: dict, z_bin: int) -> np.ndarray:
    """RAS affine of one generated slice: the cache's grid, moved to the bin's centre slice."""
    affine = np.asarray(meta["geometry"]["affine"], dtype=np.float64)
    shift = np.eye(4)
    shift[2, 3] = bin_centre_z(z_bin, meta["z_range"], int(meta["n_bins"]))
    return affine @ shift


def save_nifti(out_dir, samples: torch.Tensor, z_bins, pathology, meta: dict) -> list[Path]:
    """One image and one mask NIfTI per condition, each (H, W, 1, n): a slice, n samples.

    Voxel (i, j) is pixel ``x[c, i, j]``: the cache's RAS grid, placed at the bin's centre z
    (:func:`slice_affine`). Images stay in the model's [-1, 1]; masks are uint8 0/1 when the
    mask channel is binary, float32 in [-1, 1] otherwise. Names: ``bin03_lesion_image.nii.gz``.
    """
    out_dir = Path(out_dir)
    samples = np.asarray(samples, dtype=np.float32)
    z_bins, pathology = np.asarray(z_bins), np.asarray(pathology)
    written = []
    for b, p in dict.fromkeys(zip(z_bins.tolist(), pathology.tolist())):
        pick = (z_bins == b) & (pathology == p)
        group = samples[pick]  # (n, 2, H, W)
        affine = slice_affine(meta, b)
        stem = f"bin{b:02d}_{'lesion' if p else 'healthy'}"
        image = np.moveaxis(group[:, 0], 0, -1)[:, :, None]  # (H, W, 1, n)
        mask = np.moveaxis(group[:, 1], 0, -1)[:, :, None]
        if np.isin(mask, (-1.0, 1.0)).all():
            mask = (mask > MASK_THRESHOLD).astype(np.uint8)
        for kind, data in (("image", image), ("mask", mask)):
            path = out_dir / f"{stem}_{kind}.nii.gz"
            img = nib.Nifti1Image(data, affine)
            img.header.set_xyzt_units("mm")
            tmp = _atomic_path(path)
            try:
                nib.save(img, str(tmp))
                _publish(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(path)
    return written
