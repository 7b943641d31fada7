"""Checkpoints: atomic writes, safe loading, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _state():
    return {"model": {"w": torch.arange(4.0)}, "config": {"train": {"seed": 1}}, "step": 3}


def test_save_then_load_round_trips_and_leaves_no_temp_file(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "ckpt" / "last.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["step"] == 3
    assert "ddpm_version" in loaded
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    with pytest.raises((AttributeError, TypeError, RuntimeError)):
        save_checkpoint({"model": lambda: None, "config": {}}, path)  # not picklable
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_save_removes_the_temp_file_a_killed_writer_left(tmp_path):
    """SIGKILL mid-write leaves the writer's temp file; the next save of that checkpoint
    removes it, and leaves other checkpoints' files alone."""
    stale = tmp_path / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".best.pt.w0rk1n.tmp"
    other.write_bytes(b"another checkpoint's")
    save_checkpoint(_state(), tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.pt"]


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": random.Random(0)}, path)
    with pytest.raises(ValueError, match="could not be loaded safely"):
        load_checkpoint(path)


def test_loading_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ddpm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_state_round_trip_reproduces_every_generator(tmp_path):
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint({"model": {}, "config": {}, "rng": state}, tmp_path / "r.pt")
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    second = (random.random(), np.random.rand(), torch.rand(1))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
