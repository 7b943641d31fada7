"""Checkpoints: atomic save, safe load, and the RNG state needed for an exact resume.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads
with ``torch.load(weights_only=True)``: a checkpoint from a stranger cannot execute code.
It is written to a temporary file in the same folder and renamed into place, so a process
killed mid-write leaves the previous checkpoint intact; the next save of the same checkpoint
removes the temporary file such a process left behind.
"""

from __future__ import annotations

import ast
import glob
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

import ddpm

LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename); returns the path.

    Then removes the temp files of ``path`` that an earlier writer, killed mid-write (which
    no handler can catch), left behind. Only one process may write a given checkpoint, as in
    training, where rank 0 alone saves.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "ddpm_version": ddpm.__version__}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error if it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise ValueError(f"checkpoint {path} could not be loaded safely: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a ddpm checkpoint (expected keys 'model' and 'config')")
    return state


def find_last_checkpoint(run_dir) -> Path | None:
    """The run's ``checkpoints/last.pt``, or None if the run has none yet."""
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.is_file() else None


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(ast.literal_eval(state["python"]))
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
