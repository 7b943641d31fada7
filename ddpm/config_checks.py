"""Checks of a configuration: value types, allowed ranges and consistency between fields.

``ddpm.config`` builds a ``Config`` from YAML, dicts and overrides and calls ``validate`` on
it; the type helpers here also check each value as it is read. Every error is a
``ConfigError`` that names the source (file, override), the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import re
import types
from typing import TYPE_CHECKING, Literal, Union, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from ddpm.config import Config


class ConfigError(ValueError):
    """A config file, dict or override that cannot be used; the message says where and why."""


# --- type checking -------------------------------------------------------------------------

MISMATCH = object()  # returned by convert_value when a value does not fit a type


def convert_value(value, tp):
    """``value`` as type ``tp`` (int -> float, tuple -> list), or ``MISMATCH``."""
    origin = get_origin(tp)
    if origin is Literal:
        # type(...) is compared too, so True never passes for 1 nor 1.0 for 1.
        ok = any(type(value) is type(c) and value == c for c in get_args(tp))
        return value if ok else MISMATCH
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            out = convert_value(value, arg)
            if out is not MISMATCH:
                return out
        return MISMATCH
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return MISMATCH
        (item_type,) = get_args(tp)
        items = [convert_value(v, item_type) for v in value]
        return MISMATCH if any(i is MISMATCH for i in items) else items
    if tp is type(None):
        return None if value is None else MISMATCH
    if isinstance(value, bool):  # bool is an int subclass: keep it out of int and float
        return value if tp is bool else MISMATCH
    if tp is int:
        return int(value) if isinstance(value, numbers.Integral) else MISMATCH
    if tp is float:
        return float(value) if isinstance(value, numbers.Real) else MISMATCH
    if tp is str:
        return value if isinstance(value, str) else MISMATCH
    if tp is bool:
        return MISMATCH
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


def closest_name(word, candidates) -> str | None:
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


def check_value(value, tp, key: str, source: str):
    """``value`` converted to ``tp``; a ConfigError naming key, source and type otherwise."""
    out = convert_value(value, tp)
    if out is not MISMATCH:
        return out
    message = f"{source}: expected {_type_name(tp)} for '{key}', got {value!r}"
    message += f" ({type(value).__name__})"
    if isinstance(value, (list, tuple)) and get_origin(tp) is list:
        item_type = get_args(tp)[0]
        bad = next(i for i, v in enumerate(value) if convert_value(v, item_type) is MISMATCH)
        message += f": element {bad} is {value[bad]!r}"
    if get_origin(tp) is Literal and isinstance(value, str):
        guess = closest_name(value, [c for c in get_args(tp) if isinstance(c, str)])
        if guess is not None:
            message += f"; did you mean {guess!r}?"
    raise ConfigError(message)


# --- ranges and consistency -------------------------------------------------------------


# Allowed interval of every bounded number (of each element, for lists); None passes.
_RANGES = {
    "[1, inf)": (
        "data.n_subjects data.phantom_size data.image_size data.n_bins data.lesion_min_voxels "
        "model.in_channels model.out_channels model.base_channels model.channel_mults "
        "model.num_res_blocks model.num_heads model.norm_groups diffusion.timesteps "
        "optim.grad_accum dose.anatomy_channels dose.window_batch "
        "train.epochs train.max_steps train.batch_size train.val_every train.sample_every "
        "train.checkpoint_every train.early_stop_patience train.nan_patience train.log_every "
        "ema.update_every eval.val_batches eval.batch_size sample.steps "
        "sample.n_per_condition dose.n_patients dose.phantom_size dose.patch_size"
    ),
    "[0, inf)": (
        "data.z_range data.num_workers loss.channel_weights loss.lesion_weight "
        "optim.weight_decay optim.warmup_steps optim.grad_clip sample.eta sample.guidance "
        "loss.gradient_weight"
    ),
    "(0, 1]": "data.split_fractions",
    "[0, 100]": "data.clip_percentiles",
    "[0, 1]": "data.mask_threshold optim.min_lr_ratio dose.split_fractions dose.ptv_fraction",
    "(0, inf)": (
        "data.oversample_lesions loss.min_snr_gamma optim.lr eval.alarm_psnr_gap_db "
        "dose.spacing_mm dose.dose_scale_gy flow.logit_scale"
    ),
    "[0, 1)": "model.dropout diffusion.cond_drop_prob optim.betas ema.decay dose.window_overlap",
}
_INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
    for section_field in dataclasses.fields(cfg):
        section = section_field.name
        obj = getattr(cfg, section)
        for key, tp in get_type_hints(type(obj)).items():
            setattr(obj, key, check_value(getattr(obj, key), tp, f"{section}.{key}", source))
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
    for level, mult in enumerate(m.channel_mults):
        require((m.base_channels * mult) % m.norm_groups == 0,
                f"model.norm_groups={m.norm_groups} does not divide the "
                f"{m.base_channels * mult} channels of level {level}")
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

    dose = cfg.dose
    if cfg.train.task == "lesion":
        require(m.objective == "diffusion", f"model.objective {m.objective!r} needs train.task "
                "'dose': the lesion workload trains a diffusion model only")
    else:
        require(m.dims == 3, "train.task 'dose' needs model.dims 3 (volumes)")
        require(m.conditioning == "none" and not m.use_prior,
                "train.task 'dose' needs model.conditioning 'none' and model.use_prior false: "
                "the anatomy channels are the condition")
        require(m.in_channels == 1 and m.out_channels == 1,
                f"train.task 'dose' needs model.in_channels 1 and model.out_channels 1 (the "
                f"dose), got {m.in_channels} and {m.out_channels}")
        require(dose.patch_size % 2 ** (levels - 1) == 0,
                f"dose.patch_size={dose.patch_size} must be divisible by {2 ** (levels - 1)}: "
                f"the UNet halves it {levels - 1} times (model.channel_mults has {levels} "
                "levels)")
        require(diff.cond_drop_prob == 0 and sm.guidance == 0,
                "train.task 'dose' has no class token to drop: diffusion.cond_drop_prob and "
                "sample.guidance must be 0")
    require(dose.source != "manifest" or dose.manifest is not None,
            "dose.source 'manifest' needs dose.manifest (the CSV of patient,ct,dose,... paths)")
    require(len(dose.ct_window) == 2 and dose.ct_window[0] < dose.ct_window[1],
            f"dose.ct_window must be [low, high] HU with low < high, got {dose.ct_window}")
    require(dose.spacing_mm is None or len(dose.spacing_mm) == 3,
            f"dose.spacing_mm must be three sizes [x, y, z] in mm or null, got {dose.spacing_mm}")
    fractions = dose.split_fractions
    require(len(fractions) == 3 and abs(sum(fractions) - 1) < 1e-6 and fractions[0] > 0,
            f"dose.split_fractions must be three fractions (train, val, test) summing to 1, "
            f"train > 0, got {fractions}")
