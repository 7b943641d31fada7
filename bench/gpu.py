"""The peer benchmark on one CUDA GPU: bf16 autocast, eager and with ``torch.compile``.

At the sizes of published GPU figures for the peers (2D 128x128, batch 32, the JS-DDPM
widths 64/128/256; 3D 128^3, batch 1, widths 32/64/128/256 with 9 anatomy channels + the
noisy dose), each contender trains (noise, forward, MSE, backward, AdamW) and samples (50
DDIM steps through ``ddpm.sampling.sample``). Reported per contender: training samples/s
(median step time over the timed steps), DDIM seconds, peak allocated GPU memory, the
model FLOPs of one training step counted by ``torch.utils.flop_counter`` and the model FLOPs
utilisation (MFU) they give against the bf16 matrix rate measured in the same run.

All contenders share one process. Each is first built, compiled (in untimed warm-up steps,
whose time is reported apart) and measured for peak memory, one after another; all then stay
on the GPU for the timed rounds, in which the contenders take turns (a rotated order each
round), so that the GPU's drift over minutes reaches all alike. Jobs are planned within
``--budget`` seconds: what would not fit is skipped and said so.

    python -m bench.gpu --out bench/results/gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench._common import (
    Workload,
    build_contender,
    build_ddpm,
    make_train_step,
    parameter_count,
    run_ddim,
    write_json_atomic,
)

GPU_WORKLOADS = {
    "2D": Workload(dims=2, size=128, batch=32, in_channels=2, out_channels=2,
                   widths=(64, 128, 256), num_classes=60, head_channels=64),
    "3D": Workload(dims=3, size=128, batch=1, in_channels=10, out_channels=1,
                   widths=(32, 64, 128, 256), num_classes=None, head_channels=32),
}
DATASHEET_BF16_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (NVIDIA datasheet)


@dataclasses.dataclass(frozen=True)
class Job:
    """One contender on one workload: its layout, checkpointing and compile settings."""

    workload: str
    contender: str  # ddpm, diffusers or monai
    channels_last: bool = False
    checkpointing: bool = False
    compile: bool = False
    estimate_s: float = 20.0  # planning only: what the job is expected to take

    @property
    def label(self) -> str:
        extras = [x for x, on in (("channels-last", self.channels_last),
                                  ("checkpointing", self.checkpointing),
                                  ("compile", self.compile)) if on]
        return self.contender + (f" ({', '.join(extras)})" if extras else "")


PLAN = [  # in order of importance: eager figures first, compilation (minutes) last
    Job("2D", "ddpm"), Job("2D", "ddpm", channels_last=True), Job("2D", "diffusers"),
    Job("2D", "monai"),
    Job("3D", "ddpm"), Job("3D", "ddpm", checkpointing=True),
    Job("3D", "ddpm", channels_last=True), Job("3D", "monai"),
    Job("2D", "ddpm", compile=True, estimate_s=110), Job("3D", "ddpm", compile=True,
                                                           estimate_s=110),
    Job("2D", "diffusers", compile=True, estimate_s=110),
    Job("2D", "ddpm", channels_last=True, compile=True, estimate_s=110),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds, the jobs interleaved (default 3)")
    p.add_argument("--steps", type=int, default=7,
                   help="timed training steps per job and round (default 7); a round also "
                        "times one DDIM run per job")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds of work to plan for; jobs that would not fit are skipped")
    p.add_argument("--only", nargs="+", help="labels of the jobs to run (default all)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the compiled jobs (reduce-overhead: CUDA graphs)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N most expensive kernels of an eager training step")
    p.add_argument("--smoke", action="store_true",
                   help="check the script itself on the CPU: tiny images, few steps, no compile")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "gpu.json")
    return p.parse_args(argv)


DEVICE = "cuda"  # "cpu" under --smoke


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synchronized_seconds(fn) -> float:
    """Wall seconds of ``fn()`` with the GPU's queue drained before and after."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def reset_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(resident: int = 0) -> float:
    """The allocator's peak since the last reset, less ``resident`` bytes, in GB."""
    if DEVICE != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated() - resident) / 1e9


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """The bf16 matrix-product rate of this GPU on random data (the MFU denominator)."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = synchronized_seconds(lambda: [a @ b for _ in range(reps)]) / reps
    return 2 * n**3 / seconds / 1e12


def build(job: Job, w: Workload) -> torch.nn.Module:
    """The contender on the GPU; ddpm with the job's layout and checkpointing."""
    torch.manual_seed(0)
    if job.contender == "ddpm":
        model = build_ddpm(w, channels_last=job.channels_last,
                           gradient_checkpointing=job.checkpointing)
    else:
        model = build_contender(job.contender, w)
    return model.to(DEVICE)


def training_flops(model: torch.nn.Module, w: Workload) -> int:
    """Model FLOPs of one training step (forward and backward), counted on the eager model."""
    step = make_train_step(model, w, "bf16", device=DEVICE)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def print_profile(step, rows: int) -> None:
    """torch.profiler's table of three training steps, most device time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize()
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows), flush=True)


@dataclasses.dataclass
class Prepared:
    """A job built, compiled and warmed up, kept on the GPU for the timed rounds."""

    workload: Workload
    net: torch.nn.Module  # compiled where the job says so
    step: object  # one training step (make_train_step)
    result: dict
    train_times: list = dataclasses.field(default_factory=list)
    ddim_times: list = dataclasses.field(default_factory=list)


def prepare(job: Job, args) -> Prepared:
    """Build the job's model, count its FLOPs, then compile and warm up training and DDIM.

    Peak memory is the job's own: the allocator's peak during its warm-up minus what the jobs
    prepared before it keep on the GPU (their weights and optimiser state).
    """
    w = GPU_WORKLOADS[job.workload]
    reset_memory()
    resident = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    result = {"workload": w.describe()}
    if not job.compile:
        result["train_flops"] = training_flops(build(job, w), w)
        reset_memory()
    model = build(job, w)
    result["params"] = parameter_count(model)
    # dynamic=False: each job is compiled for its own fixed sizes, as if alone in the process
    # (the jobs share module code, whose second compilation would otherwise be symbolic)
    net = torch.compile(model, mode=args.compile_mode, dynamic=False) if job.compile else model
    step = make_train_step(net, w, "bf16", device=DEVICE)
    result["warmup_s"] = synchronized_seconds(lambda: [step() for _ in range(args.warmup)])
    result["train_peak_gb"] = peak_memory_gb(resident)
    if args.profile and not job.compile:
        print_profile(step, args.profile)
    before_ddim = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    reset_memory()
    result["ddim_warmup_s"] = synchronized_seconds(lambda: run_ddim(net, w, "bf16", 2,
                                                                    device=DEVICE))
    result["ddim_extra_gb"] = peak_memory_gb(before_ddim)  # above what the job keeps
    return Prepared(w, net, step, result)


def timed_round(run: Prepared, args) -> None:
    """One round of a prepared job: ``args.steps`` training steps and one DDIM run."""
    run.train_times += [synchronized_seconds(run.step) for _ in range(args.steps)]
    run.ddim_times.append(synchronized_seconds(
        lambda: run_ddim(run.net, run.workload, "bf16", args.ddim_steps, device=DEVICE)))


def figures(run: Prepared) -> dict:
    """The job's figures so far: medians over its timed steps and DDIM runs."""
    if not run.ddim_times:
        return run.result | {"skipped": "prepared; no timed round yet"}
    step_s = statistics.median(run.train_times)
    return run.result | {"rounds": len(run.ddim_times), "train_step_ms": step_s * 1e3,
                         "train_samples_per_s": run.workload.batch / step_s,
                         "ddim_s": statistics.median(run.ddim_times)}


def failure(error: Exception) -> dict:
    """A job's entry when it failed: one contender failing must not cost the others' figures."""
    return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def check_loss(run: Prepared) -> None:
    loss = run.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {float(loss)}")


def add_mfu(results: dict, peak_tflops: float) -> None:
    """Model FLOPs utilisation. A compiled job, which is not counted itself, borrows the count
    of its contender's plain eager job: compilation and memory layout change no model FLOPs."""
    for label, r in results.items():
        if "error" in r or "skipped" in r:
            continue
        plain = results.get(" ".join(label.split()[:2]), {})  # e.g. "2D ddpm"
        flops = r.get("train_flops") or plain.get("train_flops")
        if flops:
            r["train_flops"] = flops
            r["train_tflops_per_s"] = flops / (r["train_step_ms"] / 1e3) / 1e12
            r["mfu"] = r["train_tflops_per_s"] / peak_tflops


def print_table(results: dict) -> None:
    print(f"\n{'job':34s} {'params':>7s} {'samples/s':>9s} {'step ms':>8s} {'peak GB':>8s} "
          f"{'DDIM s':>7s} {'TFLOP/s':>8s} {'MFU':>6s} {'warm-up s':>9s}")
    for key, r in results.items():
        if "error" in r or "skipped" in r:
            print(f"{key:34s} {r.get('error') or r.get('skipped')}")
            continue
        print(f"{key:34s} {r['params'] / 1e6:6.1f}M {r['train_samples_per_s']:9.1f} "
              f"{r['train_step_ms']:8.1f} {r['train_peak_gb']:8.2f} {r['ddim_s']:7.3f} "
              f"{r.get('train_tflops_per_s', float('nan')):8.1f} "
              f"{r.get('mfu', float('nan')):6.1%} {r['warmup_s']:9.1f}", flush=True)


def main(argv=None) -> int:
    global DEVICE
    args = parse_args(argv)
    labels = {job.label for job in PLAN} | {f"{job.workload} {job.label}" for job in PLAN}
    unknown = sorted(set(args.only or ()) - labels)
    if unknown:
        print(f"--only: unknown job(s) {unknown}; expected some of {sorted(labels)}",
              file=sys.stderr)
        return 2
    plan = PLAN
    if args.smoke:
        DEVICE = "cpu"
        for name, w in GPU_WORKLOADS.items():
            # 3D at 32^3, so that the 4-level models' lowest level (4^3) is deeper than a
            # kernel: oneDNN's CPU bf16 weight gradient is wrong (NaN) for shallower inputs
            GPU_WORKLOADS[name] = dataclasses.replace(w, size=16 if w.dims == 2 else 32,
                                                      batch=2)
        plan = [job for job in PLAN if not job.compile]
        args.steps, args.warmup, args.ddim_steps, args.rounds = 2, 1, 3, 2
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; none is visible (--smoke checks the script on "
              "the CPU)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    peak = matmul_tflops(1024 if args.smoke else 8192)
    machine = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none (--smoke)",
               "torch": torch.__version__,
               "cuda": torch.version.cuda, "bf16_matmul_tflops": peak,
               "datasheet_bf16_tflops": DATASHEET_BF16_TFLOPS}
    print(json.dumps(machine), flush=True)
    if any(job.compile for job in plan):  # every compiled job stays alive: one cache entry each
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    errors, prepared = {}, {}

    def save() -> dict:
        results = {}
        for job in plan:
            key = f"{job.workload} {job.label}"
            if key in errors or key in prepared:
                results[key] = errors.get(key) or figures(prepared[key])
        add_mfu(results, peak)
        write_json_atomic(args.out, {"machine": machine, "settings": vars(args) | {"out": None},
                                     "results": results})
        return results

    # 1. Each job built, compiled and warmed up, one after another; all stay on the GPU.
    for job in plan:
        key = f"{job.workload} {job.label}"
        if args.only and job.label not in args.only and key not in args.only:
            continue
        elapsed = time.perf_counter() - start
        if elapsed + job.estimate_s > args.budget:
            errors[key] = {"skipped": f"skipped: {elapsed:.0f} s spent of a {args.budget:.0f} s "
                                      f"budget, about {job.estimate_s:.0f} s needed"}
            continue
        print(f"-- preparing {key}", flush=True)
        try:
            prepared[key] = prepare(job, args)
        except Exception as error:
            errors[key] = failure(error)
        save()

    # 2. Timed rounds with the jobs interleaved, each round in a rotated order, so that the
    # GPU's drift over minutes (clocks, temperature, neighbours) reaches every job alike.
    order = list(prepared)
    for r in range(args.rounds):
        if r and time.perf_counter() - start > args.budget:
            print(f"-- budget spent: {r} of {args.rounds} rounds", flush=True)
            break
        shift = r % max(len(order), 1)
        for key in order[shift:] + order[:shift]:
            if key in errors:
                continue
            try:
                timed_round(prepared[key], args)
            except Exception as error:
                errors[key] = failure(error)
        print(f"-- round {r + 1}/{args.rounds} done ({time.perf_counter() - start:.0f} s)",
              flush=True)
        save()
    for key, run in prepared.items():
        try:
            check_loss(run)
        except Exception as error:
            errors[key] = failure(error)
    results = save()
    print_table(results)
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
