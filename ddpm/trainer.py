"""The training loop, top to bottom: data, model, AMP, EMA, validation, checkpoints, DDP.

``train(cfg)`` runs one experiment into ``runs/<name>/``: the resolved ``config.yaml``,
``performance.csv`` (one row per validation), ``checkpoints/{last,best}.pt`` and
``samples/epoch_XXXX.png``. Under ``torchrun`` every rank runs this same function; rank 0
alone writes files.

One loop serves both workloads and all three objectives: ``train.task`` picks the task
(``ddpm.tasks``: its data, how a batch becomes (x0, cond, extra), its validation and
pictures) and ``model.objective`` the objective (``ddpm.objectives``: diffusion, flow or
regression, all called as ``objective(model, x0, cond, extra, generator, autocast)``).

Exact resume: the randomness of a step comes from one noise generator (per rank) and the
global RNGs, all saved in checkpoints; the data order of an epoch is a pure function of
(seed, epoch), and a resumed epoch skips the batches already seen. So training 2N steps
equals training N, stopping, resuming and training N more, bit for bit (on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .builders import build_model, build_schedule
from .checkpoint import (
    BEST,
    LAST,
    find_last_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import Config, config_to_dict, save_config
from .ema import EMA
from .losses import DiffusionLoss
from .objectives import build_objective
from .runtime import Dist, reuse_freed_memory, setup_distributed
from .tasks import DoseTask, LesionTask
from .validation import write_performance

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """Raised after ``train.nan_patience`` consecutive steps with a non-finite loss or gradient."""


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    step: int
    epoch: int
    history: list[dict] = field(default_factory=list)
    stopped: str = "completed"
    alarms: list[str] = field(default_factory=list)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR factor: linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``
    at ``total_steps`` (Loshchilov & Hutter 2017, without restarts)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainState:
    """Everything that changes during training, i.e. everything a resume must restore."""

    model: torch.nn.Module
    ema: EMA
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    noise_gen: torch.Generator
    step: int = 0
    epoch: int = 0
    history: list = field(default_factory=list)
    best: float | None = None
    stale: int = 0  # validations since the early-stopping metric last improved

    def state_dict(self, noise_states: list) -> dict:
        """Plain tensors and values; ``noise_states`` holds every rank's generator state."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "stale": self.stale,
            "rng": rng_state(),
            "noise_generator": [s.cpu() for s in noise_states],
        }

    def load_state_dict(self, state: dict, rank: int) -> None:
        """Restore :meth:`state_dict`, including this rank's noise generator and the RNGs."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.history = state["step"], state["epoch"], state["history"]
        self.best, self.stale = state["best"], state["stale"]
        if rank >= len(state["noise_generator"]):
            raise ValueError(f"the checkpoint was written by {len(state['noise_generator'])} "
                             f"rank(s); it cannot be resumed by rank {rank}")
        self.noise_gen.set_state(state["noise_generator"][rank])
        set_rng_state(state["rng"])


def train(cfg: Config, *, config_path=None, resume: str | None = None, progress: bool = True):
    """Train the model ``cfg`` describes; returns a :class:`RunResult`.

    ``resume``: None (a fresh run; refuses a run folder that already holds checkpoints),
    ``"auto"`` (continue from ``<run>/checkpoints/last.pt`` when there is one) or a path.
    """
    dist_info, device = setup_distributed(cfg.train.device)
    reuse_freed_memory(device)  # a CPU step otherwise page-faults on every fresh activation
    say = tqdm.write if dist_info.is_main else (lambda msg: None)
    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    tc, oc = cfg.train, cfg.optim

    # 1. Data: the task builds (or verifies) its cache; rank 0 first, the others wait.
    if tc.task == "lesion":
        task = LesionTask(cfg, dist_info, config_path, progress)
    elif tc.task == "dose":
        task = DoseTask(cfg, dist_info, config_path, progress)
    else:
        raise ValueError(f"unknown train.task {tc.task!r}; expected 'lesion' or 'dose'")
    loader = DataLoader(task.train_set, batch_size=tc.batch_size, sampler=task.sampler,
                        drop_last=True, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.num_workers > 0)
    steps_per_epoch = task.samples_per_epoch // dist_info.world_size // tc.batch_size
    steps_per_epoch //= oc.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"the training split ({task.samples_per_epoch} {task.unit} per epoch "
                         f"over {dist_info.world_size} rank(s)) holds less than one optimizer "
                         f"step of train.batch_size={tc.batch_size} x optim.grad_accum="
                         f"{oc.grad_accum}")

    # 2. Model, loss, optimiser, EMA. Same seed on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    loss_fn = DiffusionLoss(
        channel_names=task.channel_names[: cfg.model.out_channels],
        channel_weights=cfg.loss.channel_weights, lesion_weight=cfg.loss.lesion_weight,
        uncertainty_weighting=cfg.loss.uncertainty_weighting,
        min_snr_gamma=cfg.loss.min_snr_gamma, prediction=cfg.diffusion.prediction,
    ).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())  # log-variances learn too
    # The fused kernel updates all parameters in one pass; the default loops over them, one
    # small kernel each (2D bench model on 2 CPU threads: 13 ms per step instead of 52).
    optimizer = torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas),
                                  weight_decay=oc.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    total_steps = tc.epochs * steps_per_epoch  # max_steps cuts a run short; it keeps the LR curve
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(oc.warmup_steps, total_steps, oc.min_lr_ratio))
    autocast_dtype = AUTOCAST_DTYPES[tc.precision]
    state = TrainState(
        model=model, ema=EMA(model, decay=cfg.ema.decay, warmup=cfg.ema.warmup), loss_fn=loss_fn,
        optimizer=optimizer, lr_schedule=lr_schedule,
        scaler=torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16"),
        noise_gen=torch.Generator(device).manual_seed(tc.seed * 7919 + dist_info.rank),
    )
    schedule = build_schedule(cfg).to(device)
    objective = build_objective(cfg, schedule, loss_fn, model.null_token)

    # 3. Resume, or start a fresh run folder.
    resume_path = find_last_checkpoint(run_dir) if resume == "auto" else resume
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, map_location=device)
        _check_resumable(checkpoint, cfg, resume_path)
        state.load_state_dict(checkpoint, dist_info.rank)
        say(f"resuming {run_dir} from {resume_path} at step {state.step} (epoch {state.epoch})")
    elif find_last_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume auto to "
                              "continue that run, or choose another train.name")
    if dist_info.is_main:
        save_config(cfg, run_dir / "config.yaml")

    train_model = torch.compile(model) if cfg.model.compile else model
    if dist_info.active:
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                              enabled=autocast_dtype is not None)

    def save(name: str) -> None:
        noise_states = _all_ranks(state.noise_gen.get_state(), dist_info)
        if dist_info.is_main:
            save_checkpoint({**state.state_dict(noise_states), "config": config_to_dict(cfg),
                             "world_size": dist_info.world_size,
                             # What sampling must reproduce; evaluate.py --diagnose compares it.
                             "schedule": {**schedule.describe(), "betas": schedule.betas.cpu()},
                             **task.checkpoint_extras()},
                            run_dir / "checkpoints" / name)

    result = RunResult(run_dir, state.step, state.epoch, state.history)
    bad_steps, start = 0, time.time()

    # 4. The loop.
    while state.epoch < tc.epochs:
        done = state.step - state.epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        task.sampler.set_epoch(state.epoch, skip=done * oc.grad_accum * tc.batch_size)
        model.train()
        loss_sum, loss_count, part_sums = torch.zeros((), device=device), 0, {}
        bar = tqdm(total=steps_per_epoch, initial=done, leave=False,
                   desc=f"epoch {state.epoch + 1}/{tc.epochs}",
                   disable=not (progress and dist_info.is_main))
        for micro, batch in enumerate(loader):
            x0, cond, extra = task.unpack(batch, device)  # target, model kwargs, channels

            accumulating = (micro + 1) % oc.grad_accum != 0
            no_sync = train_model.no_sync if accumulating and dist_info.active else None
            with no_sync() if no_sync else contextlib.nullcontext():
                loss, parts = objective(train_model, x0, cond, extra, state.noise_gen, autocast)
                state.scaler.scale(loss / oc.grad_accum).backward()
            if accumulating:
                continue

            state.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, oc.grad_clip or math.inf)
            if not _all_finite(loss, grad_norm, dist_info) and tc.precision != "fp16":
                optimizer.zero_grad(set_to_none=True)  # skip the step, keep the weights
                bad_steps += 1
                say(f"step {state.step}: non-finite loss or gradient; step skipped "
                    f"({bad_steps} in a row)")
                if bad_steps >= tc.nan_patience:
                    raise TrainingDiverged(
                        f"{bad_steps} consecutive steps with a non-finite loss or gradient at "
                        f"step {state.step}. Try a lower optim.lr, optim.grad_clip 1.0, "
                        "train.precision bf16 or fp32 instead of fp16, and check that the "
                        "cache holds finite values.")
                continue
            state.scaler.step(optimizer)  # with fp16 it skips steps whose gradients overflowed
            state.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_schedule.step()
            bad_steps = 0
            state.step += 1
            if state.step % cfg.ema.update_every == 0:
                state.ema.update(model)
            loss_sum += loss.detach()
            loss_count += 1
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, 0.0) + float(v)
            bar.update(1)
            if state.step % tc.log_every == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / loss_count:.4f}")
            if tc.max_steps is not None and state.step >= tc.max_steps:
                break
        bar.close()

        # 5. End of an epoch (or of a run cut short): validate, sample, checkpoint.
        finished_epoch = state.step >= (state.epoch + 1) * steps_per_epoch
        state.epoch += int(finished_epoch)
        epoch, last_epoch = state.epoch, state.epoch == tc.epochs
        stop_now = tc.max_steps is not None and state.step >= tc.max_steps
        train_loss = _mean_over_ranks(loss_sum, loss_count, dist_info)
        if (finished_epoch and (epoch % tc.val_every == 0 or last_epoch)) or (
                stop_now and not state.history):
            row = {"epoch": epoch, "step": state.step, "lr": lr_schedule.get_last_lr()[0],
                   "train_loss": train_loss, "time_s": round(time.time() - start, 1),
                   **{k: v / max(loss_count, 1) for k, v in part_sums.items()}}
            metrics, warnings, summary = task.validate(
                model, state.ema, objective, schedule, autocast_dtype,
                after_warmup=state.step > oc.warmup_steps)
            row.update(metrics)
            row["ema_distance"] = state.ema.distance(model)
            row["alarm"] = " | ".join(warnings)
            for message in warnings:
                say(f"WARNING (epoch {epoch}, step {state.step}): {message}")
            result.alarms.extend(warnings)
            state.history.append(row)
            if dist_info.is_main:
                write_performance(run_dir / "performance.csv", state.history)
            say(f"epoch {epoch} step {state.step}: loss {train_loss:.4f} | {summary}")
            if tc.early_stop_metric is not None and _improved(state, row, tc.early_stop_metric):
                save(BEST)
        if finished_epoch and dist_info.is_main and (epoch % tc.sample_every == 0 or last_epoch):
            task.write_samples(model, state.ema, schedule,
                               run_dir / "samples" / f"epoch_{epoch:04d}.png")
        if (finished_epoch and epoch % tc.checkpoint_every == 0) or stop_now or last_epoch:
            save(LAST)
        if stop_now:
            result.stopped = "max_steps"
            break
        if tc.early_stop_metric is not None and state.stale >= tc.early_stop_patience:
            say(f"early stop: {tc.early_stop_metric} did not improve in {state.stale} validations")
            result.stopped = "early_stop"
            break

    result.step, result.epoch, result.history = state.step, state.epoch, state.history
    if dist_info.active:
        dist.barrier()
    return result


def _all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, info: Dist) -> bool:
    """Whether loss and gradient norm are finite on every rank (all ranks must agree)."""
    finite = (torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)).float()
    if info.active:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _mean_over_ranks(total: torch.Tensor, count: int, info: Dist) -> float:
    """Mean training loss over all ranks' steps of the epoch."""
    pair = torch.stack([total.float(), torch.tensor(float(count), device=total.device)])
    if info.active:
        dist.all_reduce(pair)
    return float(pair[0] / pair[1].clamp(min=1))


def _all_ranks(value, info: Dist) -> list:
    """``value`` from every rank, in rank order (just ``[value]`` without DDP)."""
    if not info.active:
        return [value]
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def _improved(state: TrainState, row: dict, metric: str) -> bool:
    """Update the early-stopping record with ``row``; True when ``metric`` improved."""
    if metric not in row:
        raise KeyError(f"train.early_stop_metric {metric!r} is not a validation column; choose "
                       f"one of {sorted(k for k in row if k != 'alarm')}")
    lower_is_better = "loss" in metric or metric.startswith("mae")
    value = row[metric]
    if state.best is None or (value < state.best if lower_is_better else value > state.best):
        state.best, state.stale = value, 0
        return True
    state.stale += 1
    return False


def _check_resumable(checkpoint: dict, cfg: Config, path) -> None:
    """Refuse to resume a checkpoint whose data or model settings differ, or those of its
    objective (the diffusion section for diffusion, the flow section for flow)."""
    current = config_to_dict(cfg)
    # Settings that change neither the data nor the model (loading, compiling, inference).
    ignored = {"num_workers", "oversample_lesions", "compile", "window_overlap", "window_batch"}
    sections = ["dose" if cfg.train.task == "dose" else "data", "model"]
    if cfg.model.objective in ("diffusion", "flow"):  # each has a config section of its name
        sections.append(cfg.model.objective)
    diffs = [
        f"{section}.{key}: checkpoint {value!r}, config {current[section].get(key)!r}"
        for section in sections
        for key, value in checkpoint["config"].get(section, {}).items()
        if key not in ignored and current[section].get(key) != value
    ]
    task = checkpoint["config"].get("train", {}).get("task", "lesion")
    if task != cfg.train.task:
        diffs.append(f"train.task: checkpoint {task!r}, config {cfg.train.task!r}")
    if diffs:
        raise ValueError(f"cannot resume from {path}: settings differ:\n  " + "\n  ".join(diffs))
