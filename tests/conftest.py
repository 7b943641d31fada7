"""Shared fixtures: a tiny phantom cache and a tiny training config, built once per session."""

import pytest
import torch
from torch import nn

from ddpm.caching import build_cache
from ddpm.config import config_from_dict

# The test models are tiny: per-operation overhead dominates and a second thread only adds
# synchronisation (and, on a busy machine, OpenMP spin-waiting). One thread is faster here.
torch.set_num_threads(1)

TINY = {
    "data": {"n_subjects": 6, "phantom_size": 32, "image_size": 16, "z_range": [8, 23],
             "n_bins": 4, "split_fractions": [0.5, 0.25, 0.25]},
    "model": {"base_channels": 32, "channel_mults": [1, 2], "num_res_blocks": 1,
              "attention_levels": [1]},
    "train": {"epochs": 4, "batch_size": 8, "val_every": 1, "sample_every": 100, "log_every": 1},
    "optim": {"warmup_steps": 5},
    "eval": {"timesteps": [50, 250], "batch_size": 8, "val_batches": 1},
    "sample": {"steps": 4},
}


def tiny_config(root, **sections):
    """A tiny, fast config rooted in ``root``; ``sections`` update TINY section by section."""
    d = {k: dict(v) for k, v in TINY.items()}
    d["data"].update(root=str(root / "data"), cache_dir=str(root / "cache"))
    d["train"].update(run_dir=str(root / "runs"))
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return config_from_dict(d, source="tiny test config")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A folder holding the tiny phantom data and its slice cache (built once)."""
    root = tmp_path_factory.mktemp("tiny")
    build_cache(tiny_config(root).data, progress=False)
    return root


def randomise(model: nn.Module) -> nn.Module:
    """Replace every weight (zero-initialised ones included) with small noise.

    A fresh UNet outputs exactly zero (zero-initialised output conv), so without this any
    test comparing two outputs would pass whatever the conditioning did.
    """
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model
