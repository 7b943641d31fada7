"""Configuration: YAML -> dataclasses, command-line overrides, validation with clear errors.

A config file has one mapping per section; every key is optional and falls back to the
default documented next to its field below (this file is the reference for every option)::

    data:
      n_bins: 10
      z_range: [8, 55]
    optim:
      lr: 2.0e-4

Overrides use the same names, ``section.key=value``, with the value read as YAML
(``optim.lr=3e-4``, ``data.z_range=[10,50]``, ``model.use_prior=true``,
``train.max_steps=null``). Unknown keys, wrong types and inconsistent values are errors
that name the file (or the override), the key, what was expected and, for a misspelt key,
the nearest valid one (the type, range and consistency checks live in ``ddpm.config_checks``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_type_hints

import yaml

from ddpm.config_checks import (
    MISMATCH,
    ConfigError,
    check_value,
    closest_name,
    convert_value,
    validate,
)


@dataclass
class DataConfig:
    """Where the volumes come from and how they become 2D training slices."""

    # "phantom": synthetic subjects generated into `root`; "manifest": a CSV listing
    # image/mask paths (`manifest`); "folder": image/mask pairs found in `root` by glob.
    source: Literal["phantom", "manifest", "folder"] = "phantom"
    root: str = "data/phantoms"  # phantom output folder, or the folder searched by "folder"
    manifest: str | None = None  # CSV of image/mask paths, required when source is "manifest"
    image_glob: str = "*_image.nii*"  # "folder" source: file pattern of the images
    mask_glob: str = "*_mask.nii*"  # "folder" source: file pattern of the lesion masks
    n_subjects: int = 24  # "phantom" source: how many synthetic subjects to generate
    phantom_size: int = 64  # "phantom" source: edge length of the cubic volumes, in voxels
    phantom_seed: int = 0  # "phantom" source: seed, so the same subjects come back every time
    cache_dir: str = "cache/quickstart"  # where the slice cache (arrays + index + meta) lives
    image_size: int = 64  # in-plane size of the square slices fed to the model, in pixels
    # Inclusive [low, high] range of axial slice indices kept, in the canonical RAS voxel
    # grid; the z-bins divide this range, not the whole volume.
    z_range: list[int] = field(default_factory=lambda: [8, 55])
    n_bins: int = 10  # number of z-bins (class tokens are z_bin + pathology * n_bins)
    # Train / validation / test fractions of SUBJECTS (never of slices: no subject leaks).
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = 0  # seed of the subject shuffle behind the split
    # Intensity percentiles [low, high] clipped to and mapped to [-1, 1], per volume.
    clip_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    mask_threshold: float = 0.5  # a mask voxel above this value counts as lesion
    lesion_min_voxels: int = 3  # a slice is "pathological" with at least this many lesion pixels
    # Loader only: how much more often lesion slices are drawn (1.0 = as they come).
    oversample_lesions: float = 1.0
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)


@dataclass
class DoseDataConfig:
    """Where the dose-prediction patients come from and how they are cached and sampled."""

    # "phantom": synthetic patients generated into `root`; "manifest": a CSV of
    # patient,ct,dose,<structure>... paths (`manifest`).
    source: Literal["phantom", "manifest"] = "phantom"
    root: str = "data/dose_phantoms"  # phantom output folder
    manifest: str | None = None  # CSV of patient files, required when source is "manifest"
    n_patients: int = 12  # "phantom" source: how many synthetic patients to generate
    phantom_size: int = 48  # "phantom" source: edge length of the cubic volumes, in voxels
    phantom_seed: int = 0  # "phantom" source: seed, so the same patients come back every time
    cache_dir: str = "cache/dose_quickstart"  # where the dose cache (arrays + meta) lives
    # Voxel size [x, y, z] in mm every patient is resampled to (RAS axes); null keeps the
    # spacing of the first patient of the manifest.
    spacing_mm: list[float] | None = None
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1500.0])  # HU -> [-1, 1]
    dose_scale_gy: float = 80.0  # dose in Gy mapped as [0, scale] -> [-1, 1] (not clipped)
    # Train / validation / test fractions of PATIENTS (never of patches: no patient leaks).
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = 0  # seed of the patient shuffle behind the split
    patch_size: int = 32  # edge of the cubic training patches, in voxels
    ptv_fraction: float = 0.5  # fraction of training patches centred on a random PTV voxel
    # Conditioning channels of the cache: the CT plus one per structure (9 for the phantoms:
    # CT + 8 structures); checked against the cache when training starts.
    anatomy_channels: int = 9
    # Whole-volume inference: windows of patch_size overlapping by this fraction, blended
    # with Gaussian weights (ddpm.inference.SlidingWindow).
    window_overlap: float = 0.5
    window_batch: int = 8  # whole-volume inference: window positions per network call


@dataclass
class ModelConfig:
    """The UNet: shape, conditioning and execution options."""

    dims: Literal[2, 3] = 2  # 2 for slices (lesion synthesis), 3 for volumes (dose)
    # What the network learns (the workload is train.task): "diffusion" (a DDPM, see the
    # diffusion section), "flow" (rectified-flow matching, see the flow section) or
    # "regression" (the target predicted directly from the conditioning channels).
    objective: Literal["diffusion", "flow", "regression"] = "diffusion"
    # Channels of the data the model generates (lesion: image + mask = 2; dose: 1). The
    # conditioning channels are added on top (the prior, the dose anatomy); see
    # Config.input_channels.
    in_channels: int = 2
    out_channels: int = 2  # predicted channels (one per diffused channel)
    base_channels: int = 32  # channels at the first resolution level
    # Channel multiplier per resolution level; each level after the first halves the size.
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2  # residual blocks per resolution level
    attention_levels: list[int] = field(default_factory=lambda: [2])  # levels with self-attention
    num_heads: int = 4  # attention heads (must divide the channels of every attention level)
    norm_groups: int = 32  # GroupNorm groups (must divide the channels of every level)
    dropout: float = 0.0  # dropout inside the residual blocks
    # "token": one learned embedding per (z-bin, pathology) token; "position": sinusoidal
    # embedding of the continuous z position plus a pathology token; "none": unconditional.
    conditioning: Literal["token", "position", "none"] = "token"
    use_prior: bool = False  # concatenate the mean brain mask of the slice's z-bin as input
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # Compute in the channels-last layout (N, *S, C in memory); None: on the CPU only, where
    # oneDNN runs natively in it (1.12x faster training); on CUDA it measured no faster.
    channels_last: bool | None = None
    compile: bool = False  # wrap the model in torch.compile


@dataclass
class DiffusionConfig:
    """The forward process and what the network predicts."""

    schedule: Literal["linear", "cosine", "sigmoid"] = "cosine"  # beta schedule
    timesteps: int = 1000  # T, the number of diffusion steps
    prediction: Literal["eps", "x0", "v"] = "eps"  # the network's target
    # Rescale the schedule so the last step is pure noise (Lin et al. 2024); needs "v" or
    # "x0" prediction, since eps carries no information about x0 at zero SNR.
    zero_terminal_snr: bool = False
    # Probability of replacing the condition by the null token in training, which teaches
    # the unconditional model classifier-free guidance needs (Ho & Salimans 2022).
    cond_drop_prob: float = 0.0


@dataclass
class LossConfig:
    """How the per-pixel diffusion loss is weighted."""

    channel_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # one per output
    lesion_weight: float = 1.0  # extra weight of pixels inside the lesion mask (1 = none)
    # Learn one log-variance per channel and weight the channel losses by it (Kendall et
    # al. 2018) instead of fixed channel_weights.
    uncertainty_weighting: bool = False
    min_snr_gamma: float | None = None  # Min-SNR-gamma weighting (Hang et al. 2023); None = off
    regression: Literal["l1", "mse"] = "l1"  # model.objective "regression": the pixel loss
    # model.objective "regression": weight of the finite-difference gradient loss added to
    # it (0 = off), which penalises blurred dose fall-offs.
    gradient_weight: float = 0.0


@dataclass
class FlowConfig:
    """Flow matching on the straight path x_s = (1 - s) x0 + s noise (``ddpm.flow``)."""

    # Training times s: "uniform" on [0, 1), or "logit_normal" (Esser et al. 2024), which
    # favours the middle of the path: s = sigmoid(logit_loc + logit_scale * N(0, 1)).
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_loc: float = 0.0  # "logit_normal": the mean of the logit of s
    logit_scale: float = 1.0  # "logit_normal": the std of the logit of s
    solver: Literal["euler", "heun"] = "euler"  # ODE solver of sampling (steps: sample.steps)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warm-up, then cosine decay)."""

    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    warmup_steps: int = 200  # optimizer steps of linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step


@dataclass
class TrainConfig:
    """The training run: length, precision, device and what happens when."""

    run_dir: str = "runs"  # parent folder of all runs
    name: str = "quickstart"  # this run's folder inside run_dir
    # The workload: "lesion" (2D slices with their lesion mask, the `data` section) or
    # "dose" (3D dose from anatomy, the `dose` section).
    task: Literal["lesion", "dose"] = "lesion"
    epochs: int = 30  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps (None = run all epochs)
    batch_size: int = 16  # samples per micro-batch
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype (fp16 adds loss scaling)
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:N" or "mps"
    seed: int = 0  # seed of the model initialisation, shuffling and noise
    val_every: int = 5  # validate every this many epochs
    sample_every: int = 10  # write sample grids every this many epochs
    checkpoint_every: int = 1  # save a checkpoint every this many epochs
    early_stop_metric: str | None = None  # validation metric to early-stop on (None = off)
    early_stop_patience: int = 10  # validations without improvement before stopping
    nan_patience: int = 5  # consecutive non-finite losses tolerated before the run aborts
    log_every: int = 50  # log the training loss every this many steps


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, used for validation and sampling."""

    decay: float = 0.999  # weight of the old average at each update
    # Ramp the decay up as min(decay, (1 + n) / (10 + n)) over the first updates, so the
    # average is not dominated by the random initial weights.
    warmup: bool = True
    update_every: int = 1  # update the average every this many optimizer steps


@dataclass
class EvalConfig:
    """Validation during training."""

    # Timesteps at which the one-step x0 reconstruction is scored (each < diffusion.timesteps).
    timesteps: list[int] = field(default_factory=lambda: [50, 250, 500, 750])
    val_batches: int = 2  # validation batches per evaluation
    batch_size: int = 16  # samples per validation batch
    # Raise the alarm when the EMA model's PSNR trails the live model's by more than this
    # many dB (a sign of a broken or too-slow average).
    alarm_psnr_gap_db: float = 3.0


@dataclass
class SampleConfig:
    """Generation from a trained model."""

    steps: int = 50  # denoising steps (<= diffusion.timesteps)
    sampler: Literal["ddim", "ddpm"] = "ddim"  # DDIM (Song et al. 2021) or ancestral DDPM
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic, 1 = DDPM-like variance)
    # How the sampling timesteps are picked from 0..T-1 (Lin et al. 2024, Table 2);
    # "trailing" starts at t = T-1, so the first step sees pure noise.
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    guidance: float = 0.0  # classifier-free guidance scale w (0 = plain conditional model)
    clip_x0: bool = True  # clamp the predicted x0 to [-1, 1] at every step
    n_per_condition: int = 1  # samples generated for each class token
    seed: int = 0  # seed of the initial noise


@dataclass
class Config:
    """The whole configuration; ``Config()`` is a small, complete default run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    dose: DoseDataConfig = field(default_factory=DoseDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    @property
    def num_classes(self) -> int:
        """Class tokens the model embeds, derived from the conditioning (null token not counted).

        "token": ``2 * n_bins`` (z-bin x pathology); "position": 2 (pathology only, z enters
        as a continuous position); "none": 0.
        """
        if self.model.conditioning == "token":
            return 2 * self.data.n_bins
        if self.model.conditioning == "position":
            return 2
        return 0

    @property
    def input_channels(self) -> int:
        """Channels the UNet actually receives.

        Lesion: the data channels plus the prior, if used. Dose: the anatomy channels, plus
        the noisy dose for diffusion and flow (a regression model sees the anatomy alone).
        """
        if self.train.task == "dose":
            state = 0 if self.model.objective == "regression" else self.model.in_channels
            return state + self.dose.anatomy_channels
        return self.model.in_channels + int(self.model.use_prior)


# Section name -> its dataclass, e.g. "optim" -> OptimConfig.
SECTIONS: dict[str, type] = get_type_hints(Config)
_ALL_KEYS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# --- YAML ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` and ``1e5`` as floats.

    YAML 1.1 (PyYAML) only accepts floats with a dot and a signed exponent, so ``lr: 3e-4``
    would silently load as the string "3e-4"; YAML 1.2 and Python both read it as a float.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc


# --- names ---------------------------------------------------------------------------------


def _section_class(section, source: str) -> type:
    """The dataclass of ``section``; a ConfigError with a suggestion if unknown."""
    if section in SECTIONS:
        return SECTIONS[section]
    guess = closest_name(section, SECTIONS)
    if guess is None:  # a key written at the top level instead of inside its section?
        guess = next((k for k in _ALL_KEYS if k.split(".")[1] == section), None)
    hint = f"; did you mean '{guess}'?" if guess else f"; sections are {', '.join(SECTIONS)}"
    raise ConfigError(f"{source}: unknown section '{section}'{hint}")


def _field_type(section, key, source: str):
    """The annotated type of ``section.key``; a ConfigError with a suggestion if unknown."""
    hints = get_type_hints(_section_class(section, source))
    if key not in hints:
        # Match against every dotted key, so a key put in the wrong section is found too.
        guess = closest_name(f"{section}.{key}", _ALL_KEYS)
        hint = f"; did you mean '{guess}'?" if guess else f"; valid keys: {', '.join(hints)}"
        raise ConfigError(f"{source}: unknown key '{section}.{key}'{hint}")
    return hints[key]


# --- building, overriding, validating --------------------------------------------------


def _build(d, source: str) -> Config:
    """Config from a ``{section: {key: value}}`` dict, with names and types checked."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), "
            f"got {type(d).__name__}"
        )
    sections = {}
    for section, body in d.items():
        section_class = _section_class(section, source)
        if body is None:  # "optim:" with nothing under it
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(
                f"{source}: section '{section}' must be a mapping of keys, "
                f"got {type(body).__name__}"
            )
        values = {}
        for key, value in body.items():
            tp = _field_type(section, key, source)
            values[key] = check_value(value, tp, f"{section}.{key}", source)
        sections[section] = section_class(**values)
    return Config(**sections)


def config_from_dict(d: dict, source: str = "<dict>") -> Config:
    """Config from a ``{section: {key: value}}`` dict; missing keys keep their defaults.

    ``source`` names the dict's origin in error messages (a file name, a checkpoint).
    """
    cfg = _build(d, source)
    validate(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """Split ``"section.key=value"`` into ``(section, key, value)``, the value read as YAML.

    ``"optim.lr=3e-4"`` -> ``("optim", "lr", 0.0003)``; ``"data.z_range=[10,50]"`` ->
    ``("data", "z_range", [10, 50])``; an empty value or ``null`` gives ``None``.
    """
    source = f"--set {text}"
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key or "." in key:
        raise ConfigError(f"{source}: expected section.key=value, e.g. optim.lr=3e-4")
    return section, key, _read_yaml(raw, source)


def _apply(cfg: Config, overrides) -> None:
    """Set each ``"section.key=value"`` override on ``cfg`` in place, type-checked."""
    for text in overrides:
        source = f"--set {text}"
        section, key, value = parse_override(text)
        tp = _field_type(section, key, source)
        # Shell users should not have to quote YAML: a value that does not fit a text
        # field (train.name=2024, train.name=no) is kept as the text typed.
        if convert_value(value, tp) is MISMATCH and convert_value("", tp) is not MISMATCH:
            value = text.partition("=")[2]
        setattr(getattr(cfg, section), key, check_value(value, tp, f"{section}.{key}", source))


def _with_overrides(source: str, overrides) -> str:
    return source + "".join(f" --set {text}" for text in overrides)


def apply_overrides(cfg: Config, overrides=()) -> Config:
    """A validated copy of ``cfg`` with ``"section.key=value"`` overrides applied in order."""
    cfg = _build(config_to_dict(cfg), "<config>")
    _apply(cfg, overrides)
    validate(cfg, _with_overrides("<config>", overrides))
    return cfg


def load_config(path, overrides=()) -> Config:
    """Read a YAML config file, apply ``"section.key=value"`` overrides and validate.

    Errors name the file, or the override (``--set optim.lr=abc: expected float ...``).
    The consistency checks run after the overrides, so an override can repair the file.
    """
    path = Path(path)
    cfg = _build(_read_yaml(path.read_text(), str(path)), str(path))
    _apply(cfg, overrides)
    validate(cfg, _with_overrides(str(path), overrides))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain ``{section: {key: value}}`` dict of builtin types (lists, not tuples)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path) -> None:
    """Write ``cfg`` as YAML, atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a config is for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


