"""Dose evaluation: per-patient metrics in Gy, the steps and ensemble ablations, and the
side-by-side comparison of regression, diffusion and flow checkpoints.

Every checkpoint predicts every patient of a split with :func:`ddpm.dose_predict.predict_dose`
(whole volumes, sliding window at every step). Per patient, in Gy:

- ``mae_gy``: mean absolute dose error inside the body (the OpenKBP dose score);
- ``dvh_score`` and one absolute error per DVH point and structure (``ddpm.dose.dvh_metrics``:
  D1/D95/D99 for PTVs, Dmean/D0.1cc for the others);
- ``gamma_3pct_3mm`` and ``gamma_2pct_2mm``: global gamma pass rates (%), 10% dose cut-off.

The comparison uses one sample (seed ``seed``) at each model's default steps. The ablations
run for the generative models: ``steps`` (``ablation_samples`` samples per step count: MAE
of each sample, per-voxel std across them inside the body, seconds per sample) and
``ensemble`` (N samples at the default steps: MAE of their mean, their per-voxel std,
seconds for all N). Samples are shared: the seed-k sample at s steps is computed once per
patient, so an ensemble of 5 holds the comparison's sample and the ensemble of 3; they are
dropped once the patient is scored.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .builders import build_model, build_schedule
from .caching import StaleCacheError, settings_value
from .checkpoint import load_checkpoint
from .config import Config, config_from_dict
from .dose import dose_score, dvh_metrics, dvh_score, gamma_pass_rate
from .dose_cache import dose_to_gy, load_dose_meta
from .dose_data import DoseVolumeDataset
from .dose_plots import ablation_plot, dose_panels
from .dose_predict import predict_dose
from .ema import EMA
from .runtime import resolve_device, reuse_freed_memory
from .schedule import NoiseSchedule

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GAMMA_CRITERIA = {"gamma_3pct_3mm": (3.0, 3.0), "gamma_2pct_2mm": (2.0, 2.0)}  # (%, mm)
GENERATIVE = ("diffusion", "flow")
PICTURES = 3  # doses_<patient>.png for the first patients only


@dataclass
class DoseEvalSettings:
    """What :func:`evaluate_dose` computes."""

    split: str = "test"
    max_patients: int | None = None  # the first N patients of the split (None = all)
    steps: list[int] = field(default_factory=list)  # steps ablation (empty = none)
    ensemble: list[int] = field(default_factory=list)  # ensemble sizes (empty = none)
    ablation_samples: int = 2  # samples per step count in the steps ablation (for the std)
    ablate: tuple[str, ...] = GENERATIVE  # objectives the ablations run for
    default_steps: int | None = None  # comparison / ensemble steps (None: each sample.steps)
    weights: str = "ema"  # "ema" or "live"
    seed: int = 0  # seed of the first sample; sample k uses seed + k


@dataclass
class DoseModel:
    """A trained dose model ready to predict: the network holds the chosen weights."""

    name: str
    path: Path
    cfg: Config
    model: torch.nn.Module
    schedule: NoiseSchedule
    cache_meta: dict

    @property
    def objective(self) -> str:
        return self.cfg.model.objective

    @property
    def autocast_dtype(self):
        return AUTOCAST[self.cfg.train.precision] if self.model_device.type == "cuda" else None

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        """The objective and what defines it: target, solver or loss."""
        c = self.cfg
        if self.objective == "diffusion":
            return (f"diffusion ({c.diffusion.prediction}-prediction, {c.diffusion.schedule}, "
                    f"{c.sample.sampler} {c.sample.spacing})")
        if self.objective == "flow":
            return f"flow matching ({c.flow.solver})"
        gradient = f" + {c.loss.gradient_weight:g} gradient" if c.loss.gradient_weight else ""
        return f"regression ({c.loss.regression}{gradient})"


def load_dose_model(path, device="auto", weights: str = "ema", name: str | None = None
                    ) -> DoseModel:
    """Load a dose checkpoint with its ``weights`` ("ema" or "live") on ``device``."""
    state = load_checkpoint(path, map_location="cpu")
    cfg = config_from_dict(state["config"], source=f"checkpoint {path}")
    if cfg.train.task != "dose" or "cache_meta" not in state:
        raise ValueError(f"{path} is not a dose checkpoint (train.task {cfg.train.task!r}); "
                         "evaluate lesion checkpoints with evaluate.py")
    if weights not in ("ema", "live"):
        raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}")
    device = resolve_device(device) if isinstance(device, str) else device
    reuse_freed_memory(device)  # CPU sampling otherwise page-faults on every activation
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    if weights == "ema":
        ema = EMA(model, decay=cfg.ema.decay, warmup=cfg.ema.warmup)
        ema.load_state_dict(state["ema"])
        ema.copy_to(model)
    model.to(device).eval()
    return DoseModel(name or cfg.train.name, Path(path), cfg, model,
                     build_schedule(cfg).to(device), state["cache_meta"])


def check_cache_matches(models: list[DoseModel], cache_dir) -> dict:
    """The cache's meta, after checking it holds the data every model was trained on."""
    meta = load_dose_meta(cache_dir)
    have = settings_value(meta["settings"])
    for m in models:
        want = settings_value(m.cache_meta["settings"])
        diffs = [f"  dose.{k}: checkpoint {want.get(k)!r} vs cache {have.get(k)!r}"
                 for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        if diffs:
            raise StaleCacheError(f"dose cache {cache_dir} differs from the data {m.path} was "
                                  "trained on:\n" + "\n".join(diffs))
        if m.cache_meta["channels"] != meta["channels"]:
            raise StaleCacheError(f"dose cache {cache_dir} has channels {meta['channels']}, "
                                  f"{m.path} was trained on {m.cache_meta['channels']}")
    return meta


def patient_metrics(pred_gy, ref_gy, body, structures: dict, spacing_mm) -> dict:
    """MAE in the body, DVH score and point errors, gamma pass rates of one prediction (Gy)."""
    present = {k: v for k, v in structures.items() if v.any()}
    ref_dvh = dvh_metrics(ref_gy, present, spacing_mm)
    pred_dvh = dvh_metrics(pred_gy, present, spacing_mm)
    out = {"mae_gy": dose_score(pred_gy, ref_gy, body), "dvh_score": dvh_score(pred_dvh, ref_dvh)}
    for name, criteria in GAMMA_CRITERIA.items():
        out[name] = gamma_pass_rate(pred_gy, ref_gy, spacing_mm, *criteria)
    out["dvh_errors"] = {f"{s}:{p}": abs(pred_dvh[s][p] - v)
                         for s, points in ref_dvh.items() for p, v in points.items()}
    return out


class SampleBank:
    """Predictions in Gy, computed once per (model, patient, steps, seed), with their time."""

    def __init__(self, progress: bool = False):
        self.doses: dict[tuple, torch.Tensor] = {}
        self.seconds: dict[tuple, float] = {}
        self.progress = progress

    def get(self, m: DoseModel, patient: str, anatomy, steps: int, seed: int, scale_gy: float):
        """(dose (X, Y, Z) float32 Gy on the CPU, seconds it took)."""
        key = (m.name, patient, steps if m.objective in GENERATIVE else 0, seed)
        if key not in self.doses:
            start = time.perf_counter()
            pred = predict_dose(m.model, m.cfg, anatomy, schedule=m.schedule, steps=steps,
                                seeds=(seed,), autocast_dtype=m.autocast_dtype,
                                progress=self.progress)
            self.doses[key] = dose_to_gy(pred[0, 0].float().cpu(), scale_gy)
            self.seconds[key] = time.perf_counter() - start
        return self.doses[key], self.seconds[key]

    def forget(self, m: DoseModel, patient: str) -> None:
        """Drop the samples of one model and patient (all that is needed of them is kept)."""
        for key in [k for k in self.doses if k[:2] == (m.name, patient)]:
            del self.doses[key], self.seconds[key]


def _std_in_body(samples: list[torch.Tensor], body) -> float:
    """Mean over the body of the per-voxel std (unbiased) across ``samples``; 0 for one."""
    if len(samples) < 2:
        return 0.0
    std = torch.stack(samples).std(dim=0, correction=1)
    return float(std[torch.as_tensor(body)].mean())


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def evaluate_dose(checkpoints, out_dir, settings: DoseEvalSettings | None = None, *,
                  cache_dir=None, device="auto", names=None, progress: bool = True) -> dict:
    """Evaluate dose checkpoints on one split and write tables, plots and ``metrics.json``.

    Returns the metrics dict (also written). Files in ``out_dir``: comparison.csv (one row
    per model), per_patient.csv, dvh_errors.csv, steps_ablation.csv/.png and
    ensemble_ablation.csv/.png (when asked for), doses_<patient>.png (first 3 patients),
    summary.md.
    """
    settings = settings or DoseEvalSettings()
    out_dir = Path(out_dir)
    names = list(names) if names else [None] * len(checkpoints)
    models = [load_dose_model(p, device, settings.weights, n) for p, n in zip(checkpoints, names)]
    seen = {}
    for m in models:  # unique labels: the run name, numbered when two runs share one
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:
            m.name = f"{m.name}#{seen[m.name]}"
    cache_dir = Path(cache_dir or models[0].cfg.dose.cache_dir)
    meta = check_cache_matches(models, cache_dir)
    scale_gy = float(meta["normalisation"]["dose_scale_gy"])
    dataset = DoseVolumeDataset(cache_dir, settings.split)
    n_patients = len(dataset) if settings.max_patients is None else min(settings.max_patients,
                                                                        len(dataset))
    if n_patients < 1:
        raise ValueError(f"split {settings.split!r} of {cache_dir} holds no patient")
    bank = SampleBank(progress=progress)
    per_patient, steps_rows, ensemble_rows, examples = [], [], [], {}
    for m in models:
        rows = _evaluate_model(m, dataset, n_patients, settings, bank, scale_gy, examples,
                               progress)
        per_patient += rows[0]
        steps_rows += rows[1]
        ensemble_rows += rows[2]

    comparison = []
    for m in models:
        rows = [r for r in per_patient if r["model"] == m.name]
        comparison.append({
            "model": m.name, "method": m.describe(),
            "steps": rows[0]["steps"], "patients": len(rows),
            **{key: _mean(r[key] for r in rows)
               for key in ("mae_gy", "dvh_score", *GAMMA_CRITERIA, "time_s")},
        })
    metrics = {
        "split": settings.split, "patients": [dataset[k]["patient"] for k in range(n_patients)],
        "cache_dir": str(cache_dir), "weights": settings.weights, "seed": settings.seed,
        "models": {m.name: {"checkpoint": str(m.path), "method": m.describe()} for m in models},
        "comparison": comparison, "per_patient": per_patient,
        "steps_ablation": steps_rows, "ensemble_ablation": ensemble_rows,
        "steps_vs_default": _steps_vs_default(steps_rows, models, settings),
    }
    _write_outputs(out_dir, metrics, examples, scale_gy)
    return metrics


def _evaluate_model(m: DoseModel, dataset, n_patients: int, settings: DoseEvalSettings,
                    bank: SampleBank, scale_gy: float, examples: dict, progress: bool):
    """(per-patient rows, steps-ablation rows, ensemble rows) of one model; ``examples``
    collects each patient's comparison prediction (and, under "_ct", its CT and plan)."""
    default = settings.default_steps or m.cfg.sample.steps
    ablate = m.objective in GENERATIVE and m.objective in settings.ablate
    steps_list = settings.steps if ablate else []
    sizes = settings.ensemble if ablate else []
    seeds_steps = [settings.seed + k for k in range(settings.ablation_samples)]
    by_steps = {s: {"mae": [], "std": [], "time": []} for s in steps_list}
    by_size = {n: {"mae": [], "single": [], "std": [], "time": []} for n in sizes}
    per_patient = []
    for k in tqdm(range(n_patients), desc=f"evaluating {m.name}", disable=not progress):
        item = dataset[k]
        patient, anatomy = item["patient"], item["anatomy"].to(m.model_device)
        ref_gy = dose_to_gy(item["dose"][0], scale_gy)
        body = item["body"]

        def get(steps, seed, patient=patient, anatomy=anatomy):
            return bank.get(m, patient, anatomy, steps, seed, scale_gy)

        pred, seconds = get(default, settings.seed)
        metrics = patient_metrics(pred, ref_gy, body, item["structures"], item["spacing_mm"])
        per_patient.append({"model": m.name, "patient": patient,
                            "steps": default if m.objective in GENERATIVE else "",
                            "time_s": seconds, **metrics})
        if k < PICTURES:
            examples.setdefault(patient, {})[m.name] = pred
            examples.setdefault("_ct", {})[patient] = (item["anatomy"][0], ref_gy)
        for s in steps_list:
            doses, times = zip(*[get(s, seed) for seed in seeds_steps], strict=True)
            by_steps[s]["mae"] += [dose_score(d, ref_gy, body) for d in doses]
            by_steps[s]["std"].append(_std_in_body(list(doses), body))
            by_steps[s]["time"] += list(times)
        for n in sizes:
            doses, times = zip(*[get(default, settings.seed + j) for j in range(n)], strict=True)
            by_size[n]["mae"].append(dose_score(torch.stack(doses).mean(0), ref_gy, body))
            by_size[n]["single"] += [dose_score(d, ref_gy, body) for d in doses]
            by_size[n]["std"].append(_std_in_body(list(doses), body))
            by_size[n]["time"].append(sum(times))
        bank.forget(m, patient)
    steps_rows = [{"model": m.name, "objective": m.objective, "steps": s,
                   "mae_gy": _mean(v["mae"]), "std_gy": _mean(v["std"]),
                   "time_s": _mean(v["time"]), "samples": len(seeds_steps),
                   "patients": n_patients} for s, v in by_steps.items()]
    ensemble_rows = [{"model": m.name, "objective": m.objective, "ensemble": n, "steps": default,
                      "mae_gy": _mean(v["mae"]), "mae_single_gy": _mean(v["single"]),
                      "std_gy": _mean(v["std"]), "time_s": _mean(v["time"]),
                      "patients": n_patients} for n, v in by_size.items()]
    return per_patient, steps_rows, ensemble_rows


def _steps_vs_default(rows, models, settings) -> list[dict]:
    """Relative MAE change of every ablated step count against each model's default steps."""
    out = []
    for m in models:
        default = settings.default_steps or m.cfg.sample.steps
        mine = {r["steps"]: r["mae_gy"] for r in rows if r["model"] == m.name}
        if default not in mine:
            continue
        for s, mae in sorted(mine.items()):
            out.append({"model": m.name, "steps": s, "default_steps": default, "mae_gy": mae,
                        "relative_change": mae / mine[default] - 1.0})
    return out


# ----------------------------------------------------------------------------- writing


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_text(rows: list[dict]) -> str:
    import io

    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _flat(row: dict) -> dict:
    """A per-patient row with its DVH errors as columns."""
    flat = {k: v for k, v in row.items() if k != "dvh_errors"}
    flat.update({f"dvh_err_{k}": v for k, v in row.get("dvh_errors", {}).items()})
    return flat


def _dvh_table(per_patient: list[dict]) -> list[dict]:
    """Mean absolute DVH point error per model, structure and point, over patients."""
    sums: dict[tuple, list] = {}
    for r in per_patient:
        for key, err in r["dvh_errors"].items():
            structure, point = key.split(":")
            sums.setdefault((r["model"], structure, point), []).append(err)
    return [{"model": m, "structure": s, "point": p, "mean_abs_error_gy": _mean(v),
             "patients": len(v)} for (m, s, p), v in sums.items()]


def markdown_table(rows: list[dict], columns: list[str], digits: int = 2) -> str:
    """A GitHub-markdown table of ``columns`` of ``rows`` (floats rounded to ``digits``)."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(metrics: dict) -> str:
    """The comparison and ablation tables as markdown (what summary.md holds)."""
    parts = [f"Split {metrics['split']}: {len(metrics['patients'])} patient(s) "
             f"({', '.join(metrics['patients'])}); {metrics['weights']} weights.", "",
             markdown_table(metrics["comparison"], ["model", "method", "steps", "mae_gy",
                                                    "dvh_score", *GAMMA_CRITERIA, "time_s"])]
    if metrics["steps_ablation"]:
        parts += ["", "Steps ablation (MAE: mean over samples and patients; std: per-voxel "
                  "sample std in the body; time: seconds per sample):", "",
                  markdown_table(metrics["steps_ablation"],
                                 ["model", "steps", "mae_gy", "std_gy", "time_s", "samples"])]
    if metrics["ensemble_ablation"]:
        parts += ["", "Ensemble ablation (MAE of the ensemble mean; time: seconds for all "
                  "members):", "",
                  markdown_table(metrics["ensemble_ablation"],
                                 ["model", "ensemble", "steps", "mae_gy", "mae_single_gy",
                                  "std_gy", "time_s"], digits=3)]
    return "\n".join(parts) + "\n"


def write_ablation_plots(metrics: dict, out_dir: Path) -> None:
    """The steps and ensemble ablation tables and plots, regression MAEs as reference lines."""
    references = {r["model"]: r["mae_gy"] for r in metrics["comparison"]
                  if r["method"].startswith("regression")}
    if metrics["steps_ablation"]:
        _atomic_text(out_dir / "steps_ablation.csv", _csv_text(metrics["steps_ablation"]))
        ablation_plot(metrics["steps_ablation"], "steps", out_dir / "steps_ablation.png",
                      "Sampling steps: MAE and sample spread", log_x=True,
                      references=references)
    if metrics["ensemble_ablation"]:
        _atomic_text(out_dir / "ensemble_ablation.csv", _csv_text(metrics["ensemble_ablation"]))
        ablation_plot(metrics["ensemble_ablation"], "ensemble", out_dir / "ensemble_ablation.png",
                      "Ensemble size: MAE of the mean and sample spread", references=references)


def _write_outputs(out_dir: Path, metrics: dict, examples: dict, scale_gy: float) -> None:
    _atomic_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    _atomic_text(out_dir / "comparison.csv", _csv_text(metrics["comparison"]))
    _atomic_text(out_dir / "per_patient.csv", _csv_text([_flat(r) for r in
                                                         metrics["per_patient"]]))
    _atomic_text(out_dir / "dvh_errors.csv", _csv_text(_dvh_table(metrics["per_patient"])))
    write_ablation_plots(metrics, out_dir)
    _atomic_text(out_dir / "summary.md", summary_markdown(metrics))
    cts = examples.pop("_ct", {})
    for patient, predictions in examples.items():
        ct, reference = cts[patient]
        dose_panels(ct, reference, predictions, out_dir / f"doses_{patient}.png",
                    title=f"patient {patient}", vmax=scale_gy)


def wants_dose_evaluation(argv) -> bool:
    """Whether command-line ``argv`` asks for a dose evaluation: ``--dose`` is given, or the
    first ``--checkpoint`` is a dose run's (its config says train.task: dose)."""
    argv = list(argv)
    if "--dose" in argv:
        return True
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--checkpoint" and i + 1 < len(argv) else None
        if arg.startswith("--checkpoint="):
            path = arg.split("=", 1)[1]
        if path:
            try:
                state = load_checkpoint(path)
            except (FileNotFoundError, ValueError):
                return False
            return state["config"].get("train", {}).get("task") == "dose"
    return False
