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
the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import re
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file, dict or override that cannot be used; the message says where and why."""


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
class ModelConfig:
    """The UNet: shape, conditioning and execution options."""

    dims: Literal[2, 3] = 2  # 2 for slices (lesion synthesis), 3 for volumes (dose)
    # Input channels of the data (image + mask); the anatomical prior channel is added on
    # top when `use_prior` is set (see Config.input_channels).
    in_channels: int = 2
    out_channels: int = 2  # predicted channels (one per diffused channel)
    base_channels: int = 32  # channels at the first resolution level
    # Channel multiplier per resolution level; each level after the first halves the size.
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2  # residual blocks per resolution level
    attention_levels: list[int] = field(default_factory=lambda: [2])  # levels with self-attention
    num_heads: int = 4  # attention heads (must divide the channels of every attention level)
    dropout: float = 0.0  # dropout inside the residual blocks
    # "token": one learned embedding per (z-bin, pathology) token; "position": sinusoidal
    # embedding of the continuous z position plus a pathology token; "none": unconditional.
    conditioning: Literal["token", "position", "none"] = "token"
    use_prior: bool = False  # concatenate the mean brain mask of the slice's z-bin as input
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    channels_last: bool = True  # NHWC memory layout (faster convolutions on recent GPUs)
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
        """Channels the UNet actually receives: the data channels plus the prior, if used."""
        return self.model.in_channels + int(self.model.use_prior)


# Section name -> its dataclass, e.g. "optim" -> OptimConfig.
SECTIONS: dict[str, type] = get_type_hints(Config)
_ALL_KEYS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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


# --- type checking -------------------------------------------------------------------------

_MISMATCH = object()  # returned by _convert when a value does not fit a type


def _convert(value, tp):
    """``value`` as type ``tp`` (int -> float, tuple -> list), or ``_MISMATCH``."""
    origin = get_origin(tp)
    if origin is Literal:
        # type(...) is compared too, so True never passes for 1 nor 1.0 for 1.
        ok = any(type(value) is type(c) and value == c for c in get_args(tp))
        return value if ok else _MISMATCH
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            out = _convert(value, arg)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        (item_type,) = get_args(tp)
        items = [_convert(v, item_type) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else items
    if tp is type(None):
        return None if value is None else _MISMATCH
    if isinstance(value, bool):  # bool is an int subclass: keep it out of int and float
        return value if tp is bool else _MISMATCH
    if tp is int:
        return int(value) if isinstance(value, numbers.Integral) else _MISMATCH
    if tp is float:
        return float(value) if isinstance(value, numbers.Real) else _MISMATCH
    if tp is str:
        return value if isinstance(value, str) else _MISMATCH
    if tp is bool:
        return _MISMATCH
    raise TypeError(f"config fields of type {tp!r} are not supported")


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return "None" if tp is type(None) else tp.__name__


def _closest(word, candidates) -> str | None:
    """The valid name nearest to a misspelt ``word``, or None if none is close."""
    word, candidates = str(word), list(candidates)
    # A name with a part added or dropped ("lr_rate" for "lr", "n_bin" for "n_bins") is the
    # likeliest slip; plain similarity would rank a longer name sharing more letters
    # ("min_lr_ratio") above it, so such names are preferred when there are any.
    related = [c for c in candidates if word.startswith(c + "_") or c.startswith(word)]
    if related:
        return difflib.get_close_matches(word, related, n=1, cutoff=0.0)[0]
    matches = difflib.get_close_matches(word, candidates, n=1)
    return matches[0] if matches else None


def _check_value(value, tp, key: str, source: str):
    """``value`` converted to ``tp``; a ConfigError naming key, source and type otherwise."""
    out = _convert(value, tp)
    if out is not _MISMATCH:
        return out
    message = f"{source}: expected {_type_name(tp)} for '{key}', got {value!r}"
    message += f" ({type(value).__name__})"
    if isinstance(value, (list, tuple)) and get_origin(tp) is list:
        item_type = get_args(tp)[0]
        bad = next(i for i, v in enumerate(value) if _convert(v, item_type) is _MISMATCH)
        message += f": element {bad} is {value[bad]!r}"
    if get_origin(tp) is Literal and isinstance(value, str):
        guess = _closest(value, [c for c in get_args(tp) if isinstance(c, str)])
        if guess is not None:
            message += f"; did you mean {guess!r}?"
    raise ConfigError(message)


def _section_class(section, source: str) -> type:
    """The dataclass of ``section``; a ConfigError with a suggestion if unknown."""
    if section in SECTIONS:
        return SECTIONS[section]
    guess = _closest(section, SECTIONS)
    if guess is None:  # a key written at the top level instead of inside its section?
        guess = next((k for k in _ALL_KEYS if k.split(".")[1] == section), None)
    hint = f"; did you mean '{guess}'?" if guess else f"; sections are {', '.join(SECTIONS)}"
    raise ConfigError(f"{source}: unknown section '{section}'{hint}")


def _field_type(section, key, source: str):
    """The annotated type of ``section.key``; a ConfigError with a suggestion if unknown."""
    hints = get_type_hints(_section_class(section, source))
    if key not in hints:
        # Match against every dotted key, so a key put in the wrong section is found too.
        guess = _closest(f"{section}.{key}", _ALL_KEYS)
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
            values[key] = _check_value(value, tp, f"{section}.{key}", source)
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
        if _convert(value, tp) is _MISMATCH and _convert("", tp) is not _MISMATCH:
            value = text.partition("=")[2]
        setattr(getattr(cfg, section), key, _check_value(value, tp, f"{section}.{key}", source))


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Allowed interval of every bounded number (of each element, for lists); None passes.
_RANGES = {
    "[1, inf)": (
        "data.n_subjects data.phantom_size data.image_size data.n_bins data.lesion_min_voxels "
        "model.in_channels model.out_channels model.base_channels model.channel_mults "
        "model.num_res_blocks model.num_heads diffusion.timesteps optim.grad_accum "
        "train.epochs train.max_steps train.batch_size train.val_every train.sample_every "
        "train.checkpoint_every train.early_stop_patience train.nan_patience train.log_every "
        "ema.update_every eval.val_batches eval.batch_size sample.steps "
        "sample.n_per_condition"
    ),
    "[0, inf)": (
        "data.z_range data.num_workers loss.channel_weights loss.lesion_weight "
        "optim.weight_decay optim.warmup_steps optim.grad_clip sample.eta sample.guidance"
    ),
    "(0, 1]": "data.split_fractions",
    "[0, 100]": "data.clip_percentiles",
    "[0, 1]": "data.mask_threshold optim.min_lr_ratio",
    "(0, inf)": "data.oversample_lesions loss.min_snr_gamma optim.lr eval.alarm_psnr_gap_db",
    "[0, 1)": "model.dropout diffusion.cond_drop_prob optim.betas ema.decay",
}
_INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")


def _check_range(key: str, value, interval: str, source: str) -> None:
    opening, low, high, closing = _INTERVAL.fullmatch(interval).groups()
    low, high = float(low), float(high)
    for v in value if isinstance(value, list) else [value]:
        above = v is None or (low <= v if opening == "[" else low < v)
        below = v is None or (v <= high if closing == "]" else v < high)
        if not (above and below):
            raise ConfigError(f"{source}: {key} must be in {interval}, got {value}")


def validate(cfg: Config, source: str = "<config>") -> None:
    """Check every field's type and range and the consistency between fields.

    Loaders call this; call it yourself after editing a Config in code. Raises ConfigError
    naming ``source``. Fields are normalised in place (int -> float, tuple -> list).
    """
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for key, tp in get_type_hints(type(obj)).items():
            setattr(obj, key, _check_value(getattr(obj, key), tp, f"{section}.{key}", source))
    for interval, keys in _RANGES.items():
        for key in keys.split():
            section, name = key.split(".")
            _check_range(key, getattr(getattr(cfg, section), name), interval, source)

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {message}")

    d, m, diff, sm = cfg.data, cfg.model, cfg.diffusion, cfg.sample
    require(d.source != "manifest" or d.manifest is not None,
            "data.source 'manifest' needs data.manifest (the CSV of image/mask paths)")
    require(len(d.z_range) == 2 and d.z_range[0] <= d.z_range[1],
            f"data.z_range must be [low, high] with low <= high, got {d.z_range}")
    n_slices = d.z_range[1] - d.z_range[0] + 1
    require(n_slices >= d.n_bins, f"data.z_range {d.z_range} holds {n_slices} slices, fewer "
            f"than data.n_bins={d.n_bins}: some z-bins would never be used")
    require(d.source != "phantom" or d.z_range[1] < d.phantom_size,
            f"data.z_range {d.z_range} reaches past the phantom volume "
            f"(data.phantom_size={d.phantom_size}: slices 0..{d.phantom_size - 1})")
    require(len(d.split_fractions) == 3 and abs(sum(d.split_fractions) - 1) < 1e-6,
            f"data.split_fractions must be three fractions (train, val, test) summing to 1, "
            f"got {d.split_fractions}")
    clip = d.clip_percentiles
    require(len(clip) == 2 and clip[0] < clip[1],
            f"data.clip_percentiles must be [low, high] with low < high, got {clip}")

    levels = len(m.channel_mults)
    require(levels >= 1, "model.channel_mults must list at least one level")
    for level in m.attention_levels:
        require(0 <= level < levels, f"model.attention_levels has level {level}, but "
                f"model.channel_mults {m.channel_mults} defines levels 0..{levels - 1}")
        channels = m.base_channels * m.channel_mults[level]
        require(channels % m.num_heads == 0, f"model.num_heads={m.num_heads} does not divide "
                f"the {channels} channels of attention level {level}")
    require(d.image_size % 2 ** (levels - 1) == 0,
            f"data.image_size={d.image_size} must be divisible by {2 ** (levels - 1)}: the "
            f"UNet halves it {levels - 1} times (model.channel_mults has {levels} levels)")
    require(not m.use_prior or m.dims == 2,
            "model.use_prior needs model.dims == 2 (the prior is a 2D mask per z-bin)")

    require(not diff.zero_terminal_snr or diff.prediction != "eps",
            "diffusion.zero_terminal_snr needs diffusion.prediction 'v' or 'x0': at zero "
            "SNR the noise says nothing about x0 (Lin et al. 2024)")
    weights = cfg.loss.channel_weights
    require(len(weights) == m.out_channels and sum(weights) > 0,
            f"loss.channel_weights must hold model.out_channels={m.out_channels} weights, "
            f"not all 0, got {weights}")
    require(len(cfg.optim.betas) == 2, f"optim.betas must be [beta1, beta2], "
            f"got {cfg.optim.betas}")
    require(_DEVICE_PATTERN.fullmatch(cfg.train.device) is not None, f"train.device must be "
            f"'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {cfg.train.device!r}")
    bad = [t for t in cfg.eval.timesteps if not 0 <= t < diff.timesteps]
    require(not bad, f"eval.timesteps {bad} lie outside 0..{diff.timesteps - 1} "
            f"(diffusion.timesteps={diff.timesteps})")
    require(sm.steps <= diff.timesteps,
            f"sample.steps={sm.steps} exceeds diffusion.timesteps={diff.timesteps}")
    if sm.guidance > 0:
        require(m.conditioning != "none",
                "sample.guidance > 0 needs a conditional model (model.conditioning is 'none')")
        require(diff.cond_drop_prob > 0,
                "sample.guidance > 0 needs diffusion.cond_drop_prob > 0 in training: "
                "without it the model never learns the unconditional prediction")
