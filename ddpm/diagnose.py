"""A checklist for a checkpoint whose samples look wrong: verdicts in plain words.

Each check returns PASS, WARN or FAIL with one line saying what was found and, when not
PASS, what to try. The checks cover the usual ways a diffusion model trains fine and
still samples badly: a sampling schedule that is not the training schedule, data outside
the range the metrics assume, an EMA that is too young (or never updated) for its decay,
reconstructions that the EMA weights lose, a metric that post-processing moves, and
samples whose statistics are far from the real slices'.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .conditioning import model_conditions
from .data import SliceDataset
from .evaluation import load_split, open_cache, reconstruction_section, timesteps_for
from .generation import TrainedModel, generate, load_trained, postprocess
from .metrics import psnr
from .schedule import NoiseSchedule
from .validation import DATA_RANGE, alarms, fixed_validation_batch

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
SEVERITY = {PASS: 0, WARN: 1, FAIL: 2}
RANGE_TOLERANCE = 1e-3  # the cache stores float16: values may exceed +-1 by its rounding
POSTPROCESS_TOLERANCE_DB = 1.0  # PSNR moved by more than this by clamping/blanking -> WARN


@dataclass
class Check:
    """One line of the checklist."""

    name: str
    verdict: str  # PASS, WARN or FAIL
    explanation: str
    advice: str = ""  # what to try (empty for PASS)
    values: dict = field(default_factory=dict)


def worst(checks) -> str:
    """The most severe verdict of ``checks`` (PASS for none)."""
    return max((c.verdict for c in checks), key=SEVERITY.__getitem__, default=PASS)


# --- individual checks -------------------------------------------------------------------------


def _schedule_settings(s) -> dict:
    if isinstance(s, NoiseSchedule):
        return s.describe()
    return {k: s[k] for k in ("kind", "timesteps", "zero_terminal_snr") if k in s}


def check_schedule(sampling: NoiseSchedule, training, current=None) -> Check:
    """The schedule used for sampling must equal the training schedule, betas and settings.

    ``training``: the training schedule (a NoiseSchedule, or a checkpoint's record with
    ``kind``/``timesteps``/``zero_terminal_snr`` and optionally ``betas``). ``current``: the
    diffusion settings of a config file now on disk, compared only to warn.
    """
    have, want = _schedule_settings(sampling), _schedule_settings(training)
    differ = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
    values = {"sampling": have, "training": want}
    train_betas = training.betas if isinstance(training, NoiseSchedule) else training.get("betas")
    if train_betas is not None:
        train_betas = torch.as_tensor(train_betas).double().cpu()
        betas = sampling.betas.double().cpu()
        if betas.shape != train_betas.shape:
            differ["betas"] = (f"{len(train_betas)} values", f"{len(betas)} values")
        else:
            gap = float((betas - train_betas).abs().max())
            values["max_beta_difference"] = gap
            if gap > 1e-6:
                differ["betas"] = ("training betas", f"max abs difference {gap:.2e}")
    if differ:
        listing = "; ".join(f"{k}: training {a!r}, sampling {b!r}" for k, (a, b) in differ.items())
        return Check("schedule", FAIL, f"the sampling schedule differs from training: {listing}",
                     "build the sampling schedule from the checkpoint's config "
                     "(ddpm.generation.load_trained does), never from a current config", values)
    if current is not None:
        now = {"kind": current.schedule, "timesteps": current.timesteps,
               "zero_terminal_snr": current.zero_terminal_snr}
        values["current_config"] = now
        if now != want:
            return Check("schedule", WARN, f"sampling matches training ({want}), but the config "
                         f"file now says {now}",
                         "sample.py and evaluate.py use the checkpoint's schedule; any other "
                         "code that builds one from the config file would not", values)
    return Check("schedule", PASS, f"sampling schedule equals the training schedule ({want['kind']}"
                 f", T={want['timesteps']}, betas identical)", "", values)


def channel_ranges(x, chunk: int = 4096) -> dict:
    """Min and max of the image channel and whether the mask channel is all -1/+1, for
    slices (N, 2, H, W) (a tensor or a memory-mapped array, read ``chunk`` slices at a time)."""
    lo, hi, binary = math.inf, -math.inf, True
    for start in range(0, len(x), chunk):
        part = np.asarray(x[start:start + chunk], dtype=np.float32)
        lo, hi = min(lo, float(part[:, 0].min())), max(hi, float(part[:, 0].max()))
        binary = binary and bool(np.isin(part[:, 1], (-1.0, 1.0)).all())
    return {"image_min": lo, "image_max": hi, "mask_is_binary": binary}


def check_data_range(meta: dict, splits: dict) -> Check:
    """The cache's normalisation and actual values against the metrics' DATA_RANGE of 2.

    ``splits``: name -> slices (N, 2, H, W), a tensor or a memory-mapped array.
    """
    norm = meta.get("normalisation", {}).get("range")
    values = {"metric_data_range": DATA_RANGE, "cache_range": norm}
    if norm is None:
        return Check("data range", WARN, "the cache's meta.yaml records no normalisation range",
                     "rebuild the cache with this ddpm version so its range is recorded", values)
    lo, hi = (float(v) for v in norm)
    ranges = {name: channel_ranges(x) for name, x in splits.items()}
    values["splits"] = ranges
    if abs((hi - lo) - DATA_RANGE) > 1e-9:
        return Check("data range", FAIL, f"the cache maps images to [{lo:g}, {hi:g}] but PSNR and "
                     f"SSIM assume a data range of {DATA_RANGE:g}",
                     "make ddpm.validation.DATA_RANGE equal hi - lo of the cache, or rebuild the "
                     "cache to [-1, 1]", values)
    outside = [n for n, r in ranges.items()
               if r["image_min"] < lo - RANGE_TOLERANCE or r["image_max"] > hi + RANGE_TOLERANCE]
    bad_masks = [n for n, r in ranges.items() if not r["mask_is_binary"]]
    if outside or bad_masks:
        return Check("data range", FAIL, "values outside the cache's encoding: images outside "
                     f"[{lo:g}, {hi:g}] in {outside or 'no split'}, masks not all -1/+1 in "
                     f"{bad_masks or 'no split'}",
                     "rebuild the cache (python cache.py); the sampler clamps to [-1, 1], so "
                     "data outside it can never be reconstructed", values)
    narrow = [n for n, r in ranges.items() if r["image_max"] - r["image_min"] < 0.5 * (hi - lo)]
    if narrow:
        return Check("data range", WARN, f"images of {narrow} span less than half of "
                     f"[{lo:g}, {hi:g}]: PSNR with data range {DATA_RANGE:g} reads optimistic",
                     "check data.clip_percentiles and the intensity normalisation", values)
    return Check("data range", PASS, f"cache normalised to [{lo:g}, {hi:g}] = metric data range "
                 f"{DATA_RANGE:g}; every image inside, masks all -1/+1", "", values)


def initial_weight_fraction(num_updates: int, decay: float, warmup: bool) -> float:
    """Share of the random initial weights left in the EMA after ``num_updates`` updates.

    Each update keeps a fraction d_k of the average: prod_k d_k. Without warm-up that is
    decay^n; with warm-up d_k = min(decay, (1 + k) / (10 + k)) (see ``ddpm.ema``), whose first
    m factors multiply to m! 9! / (m + 9)!, m being the updates before d_k reaches decay.
    """
    n = int(num_updates)
    if n <= 0:
        return 1.0
    if decay <= 0:
        return 0.0
    if not warmup:
        return math.exp(n * math.log(decay))
    ramp = max(0, math.ceil((10 * decay - 1) / (1 - decay)))  # updates with d_k < decay
    m = min(n, ramp)
    log_ramp = math.lgamma(m + 1) + math.lgamma(10) - math.lgamma(m + 10)
    return math.exp(log_ramp + (n - m) * math.log(decay))


def check_ema_age(num_updates: int, decay: float, warmup: bool, step: int,
                  update_every: int = 1) -> Check:
    """Is the EMA old enough for its decay, and was it updated as often as training stepped?"""
    time_constant = 1.0 / (1.0 - decay) if decay < 1 else math.inf
    left = initial_weight_fraction(num_updates, decay, warmup)
    expected = step // max(update_every, 1)
    values = {"num_updates": num_updates, "expected_updates": expected, "decay": decay,
              "warmup": warmup, "time_constant_updates": time_constant,
              "initial_weight_fraction": left}
    if num_updates == 0 and step > 0:
        return Check("EMA age", FAIL, f"the EMA was never updated in {step} training steps: "
                     "its weights are the random initial weights",
                     "check that ema.update(model) runs after each optimizer step and that the "
                     "EMA state is saved and restored with the checkpoint; until then sample "
                     "with --no-ema (live weights)", values)
    if left > 0.5:
        return Check("EMA age", FAIL, f"{left:.0%} of the EMA is still the random initial "
                     f"weights: {num_updates} updates at decay {decay} (time constant "
                     f"{time_constant:.0f} updates){'' if warmup else ', no warm-up'}",
                     "turn on ema.warmup, lower ema.decay, or train for several time constants; "
                     "meanwhile sample with --no-ema", values)
    if left > 0.05:
        return Check("EMA age", WARN, f"{left:.0%} of the EMA is still the initial weights "
                     f"({num_updates} updates, time constant {time_constant:.0f})",
                     "train longer, or use ema.warmup / a lower ema.decay", values)
    if expected and abs(num_updates - expected) > max(1, 0.01 * expected):
        return Check("EMA age", WARN, f"the EMA has {num_updates} updates but {step} steps / "
                     f"update_every {update_every} = {expected} were expected",
                     "updates were skipped, or the EMA state was not restored on resume", values)
    return Check("EMA age", PASS, f"{num_updates} updates, time constant {time_constant:.0f} "
                 f"updates; initial weights left: {left:.1e}", "", values)


def check_ema_distance(distance: float) -> Check:
    """Relative L2 distance of the EMA from the live weights (``EMA.distance``)."""
    values = {"relative_distance": distance}
    if not math.isfinite(distance):
        return Check("EMA distance", FAIL, "the EMA or live weights hold NaN/Inf",
                     "training diverged: lower optim.lr, check the data", values)
    if distance > 0.5:
        return Check("EMA distance", WARN, f"EMA weights are {distance:.2f} (relative L2) from the "
                     "live weights: far more than an average over recent steps should be",
                     "check the EMA is updated from this model and restored with it", values)
    return Check("EMA distance", PASS, f"EMA is {distance:.3g} (relative L2) from the live "
                 "weights", "", values)


def check_reconstruction(live: dict, ema: dict, timesteps, gap_db: float) -> Check:
    """Per-t one-step x0 PSNR, live vs EMA: EMA far below live, or anything below 0 dB, fails."""
    values = {"timesteps": list(timesteps),
              "psnr_live": [live[f"psnr_t{t}"] for t in timesteps],
              "psnr_ema": [ema[f"psnr_t{t}"] for t in timesteps], "gap_db": gap_db}
    behind = [t for t in timesteps if ema[f"psnr_t{t}"] < live[f"psnr_t{t}"] - gap_db]
    negative = [t for t in timesteps if min(live[f"psnr_t{t}"], ema[f"psnr_t{t}"]) < 0]
    if behind or negative:
        t = (behind or negative)[0]
        # ddpm.validation.alarms words the causes; its message after "Likely causes" is advice
        message = alarms(live, ema, t, gap_db, after_warmup=True)[0]
        found = []
        if behind:
            gaps = [live[f"psnr_t{t}"] - ema[f"psnr_t{t}"] for t in behind]
            found.append(f"EMA x0-PSNR trails the live weights by up to {max(gaps):.1f} dB "
                         f"(tolerance {gap_db:g} dB) at t={behind}")
        if negative:
            found.append(f"x0-PSNR below 0 dB at t={negative}")
        return Check("x0 reconstruction", FAIL, "; ".join(found),
                     "Likely causes: " + message.split("Likely causes: ")[-1], values)
    worst_gap = max(live[f"psnr_t{t}"] - ema[f"psnr_t{t}"] for t in timesteps)
    return Check("x0 reconstruction", PASS, f"EMA within {max(worst_gap, 0):.1f} dB of the live "
                 f"weights at every t (tolerance {gap_db:g} dB); all above 0 dB", "", values)


@torch.inference_mode()
def one_step_x0(tm: TrainedModel, model, batch: dict, t: int, seed: int = 0) -> torch.Tensor:
    """Unclamped x0 prediction (B, C, H, W) from x_t, with the noise ``reconstruction_metrics``
    uses for the same seed."""
    device = tm.device
    x0 = batch["x"].to(device).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    t_batch = torch.full((len(x0),), int(t), device=device, dtype=torch.long)
    x_t = tm.schedule.q_sample(x0, t_batch, noise)
    cond = model_conditions(tm.cfg.model.conditioning, tm.n_bins, batch["z_bin"],
                            batch["pathology"], batch.get("position"))
    cond = {k: v.to(device) for k, v in cond.items()}
    x_in = torch.cat([x_t, batch["prior"].to(device)], 1) if "prior" in batch else x_t
    out = model(x_in, t_batch, **cond).float()
    return tm.schedule.x0_and_eps(x_t, t_batch, out, tm.cfg.diffusion.prediction)[0].cpu()


def check_postprocessing(psnr_by_variant: dict, t: int,
                         tolerance_db: float = POSTPROCESS_TOLERANCE_DB) -> Check:
    """Does a post-processing step move the reconstruction PSNR by more than the tolerance?

    ``psnr_by_variant``: PSNR of the same x0 predictions after successive steps, in order
    (e.g. raw, clamped, clamped+blanked); each step is judged against the one before.
    """
    names = list(psnr_by_variant)
    effects = {f"{b} vs {a}": psnr_by_variant[b] - psnr_by_variant[a]
               for a, b in zip(names, names[1:])}
    values = {"t": t, "psnr": psnr_by_variant, "effects_db": effects,
              "tolerance_db": tolerance_db}
    text = ", ".join(f"{k} {v:.2f} dB" for k, v in psnr_by_variant.items())
    large = {k: v for k, v in effects.items() if not math.isfinite(v) or abs(v) > tolerance_db}
    if large:
        advice = ["report which post-processing every number used"]
        if any("clamp" in k.split(" vs ")[0] and "blank" not in k for k in large):
            advice.append("a large clamping effect means predictions leave [-1, 1]")
        if any("blank" in k for k in large):
            advice.append("a large blanking effect means the bin's prior head mask cuts real "
                          "anatomy (or the model paints outside the head): compare samples "
                          "with and without --no-blank-background")
        moved = ", ".join(f"{k} {v:+.2f} dB" for k, v in large.items())
        return Check("post-processing", WARN, f"the metric depends on post-processing at t={t}: "
                     f"{moved} ({text})", "; ".join(advice), values)
    return Check("post-processing", PASS, f"clamping and blanking change x0-PSNR at t={t} by "
                 f"less than {tolerance_db:g} dB ({text})", "", values)


def check_sample_statistics(generated: torch.Tensor, real: torch.Tensor) -> Check:
    """Mean and std of the generated image channel against the real slices'."""
    g, r = generated[:, 0].double(), real[:, 0].double()
    values = {"n_generated": len(generated)}
    if not torch.isfinite(g).all():
        return Check("sample statistics", FAIL, "generated images hold NaN/Inf values",
                     "check the schedule and prediction settings; sample with fewer steps "
                     "or the live weights to isolate the cause", values)
    values.update(generated_mean=float(g.mean()), generated_std=float(g.std()),
                  real_mean=float(r.mean()), real_std=float(r.std()))
    shift = abs(values["generated_mean"] - values["real_mean"]) / max(values["real_std"], 1e-6)
    ratio = values["generated_std"] / max(values["real_std"], 1e-6)
    values.update(mean_shift_in_real_std=shift, std_ratio=ratio)
    text = (f"generated mean {values['generated_mean']:.3f}, std {values['generated_std']:.3f}; "
            f"real mean {values['real_mean']:.3f}, std {values['real_std']:.3f}")
    if shift > 0.5 or not 0.5 <= ratio <= 2.0:
        return Check("sample statistics", WARN, f"samples are off the real intensities: {text}",
                     "train longer; if reconstructions are good but samples are not, check the "
                     "sampler (steps, spacing 'trailing', eta, clip_x0) and the EMA", values)
    return Check("sample statistics", PASS, text, "", values)


# --- the checklist -----------------------------------------------------------------------------


def diagnose(checkpoint, *, split: str = "val", cache_dir=None, n_samples: int = 16,
             steps: int | None = None, seed: int = 0, recon_slices: int = 32, timesteps=None,
             current_config=None, device: str = "auto", progress: bool = True) -> list[Check]:
    """Run every check on ``checkpoint`` against the ``split`` of its (verified) cache.

    ``timesteps`` of the reconstruction check: default ``DEFAULT_TIMESTEPS`` and the config's
    ``eval.timesteps``. ``n_samples`` slices (conditions of random real ones) are generated
    with ``steps`` (default: the checkpoint's) for the sample-statistics check.
    """
    tm = load_trained(checkpoint, device)
    folder = open_cache(tm, cache_dir)
    real = load_split(folder, split, limit=2000, seed=seed)  # for the sample statistics
    checks = [
        check_schedule(tm.schedule, tm.schedule_record or NoiseSchedule(
            tm.cfg.diffusion.schedule, tm.cfg.diffusion.timesteps,
            zero_terminal_snr=tm.cfg.diffusion.zero_terminal_snr),
            current_config.diffusion if current_config is not None else None),
        check_data_range(tm.meta, {name: np.load(SliceDataset(folder, name).array_path,
                                                  mmap_mode="r") for name in ("train", split)}),
        check_ema_age(tm.ema.num_updates, tm.ema.decay, tm.ema.warmup, tm.step,
                      tm.cfg.ema.update_every),
        check_ema_distance(tm.ema.distance(tm.model)),
    ]
    dataset = SliceDataset(folder, split, with_prior=tm.cfg.model.use_prior)
    timesteps = timesteps_for(tm, timesteps)
    recon = reconstruction_section(tm, dataset, timesteps, recon_slices, seed)
    checks.append(check_reconstruction(recon["live"], recon["ema"], timesteps,
                                       tm.cfg.eval.alarm_psnr_gap_db))

    t_check = min(tm.cfg.eval.timesteps)
    batch = fixed_validation_batch(dataset, recon_slices, seed=seed)
    with tm.weights("ema") as model:
        x0_hat = one_step_x0(tm, model, batch, t_check, seed)
    clamped = x0_hat.clamp(-1, 1)
    blanked = postprocess(clamped, batch["z_bin"], tm.priors, blank_background=True,
                          binarise_mask=True)
    target = batch["x"][:, :1].float()
    variants = {name: float(psnr(v[:, :1], target, DATA_RANGE).mean())
                for name, v in (("raw", x0_hat), ("clamped", clamped),
                                ("clamped+blanked", blanked))}
    checks.append(check_postprocessing(variants, t_check))

    picks = load_split(folder, split, limit=n_samples, seed=seed + 1)
    x = generate(tm, picks["z_bin"], picks["pathology"], weights="ema", steps=steps, seed=seed,
                 progress=progress)
    checks.append(check_sample_statistics(x, real["x"]))
    return checks


def report_text(checks, title: str = "") -> str:
    """The checklist as text: one verdict line per check, then what to try."""
    lines = [title] if title else []
    for c in checks:
        lines.append(f"[{c.verdict}] {c.name}: {c.explanation}")
        if c.advice and c.verdict != PASS:
            lines.append(f"       try: {c.advice}")
    lines.append(f"overall: {worst(checks)}")
    return "\n".join(lines)


def report_dict(checks, **extra) -> dict:
    """The checklist as a JSON-ready dict (what diagnose.json holds)."""
    return {**extra, "overall": worst(checks), "checks": [asdict(c) for c in checks]}
