"""EMA of weights: warm-up, swapping, state round trip."""

import copy

import pytest
import torch
from torch import nn

from ddpm.ema import EMA


def _moved_pair():
    """A model and a copy whose weights have moved far away (as after training)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    start = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return start, model


def _rel_distance(ema, model):
    return ema.distance(model)


def test_warmup_tracks_the_live_weights_after_200_updates_and_plain_decay_does_not():
    start, moved = _moved_pair()
    warm, cold = EMA(start, decay=0.9999, warmup=True), EMA(start, decay=0.9999, warmup=False)
    for _ in range(200):
        warm.update(moved)
        cold.update(moved)
    assert _rel_distance(warm, moved) < 0.01
    assert _rel_distance(cold, moved) > 0.5  # still ~98% the initial weights


def test_warmup_decay_follows_min_decay_formula():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


def test_update_is_a_lerp_towards_the_live_weights():
    start, moved = _moved_pair()
    ema = EMA(start, decay=0.9, warmup=False)
    ema.update(moved)
    for s, p0, p1 in zip(ema.shadow, start.parameters(), moved.parameters()):
        torch.testing.assert_close(s, 0.9 * p0 + 0.1 * p1)


def test_buffers_are_copied_not_averaged():
    start, moved = _moved_pair()
    moved[1].running_mean.fill_(3.0)
    ema = EMA(start, decay=0.9999)
    ema.update(moved)
    assert torch.all(ema.buffers[0] == 3.0)


def test_swapped_in_uses_ema_weights_inside_and_restores_live_ones_after():
    start, moved = _moved_pair()
    ema = EMA(start, decay=0.9999, warmup=False)
    live = [p.clone() for p in moved.parameters()]
    with ema.swapped_in(moved):
        for p, s in zip(moved.parameters(), ema.shadow):
            torch.testing.assert_close(p, s)
    for p, saved in zip(moved.parameters(), live):
        assert torch.equal(p, saved)


def test_state_dict_round_trip_restores_everything():
    start, moved = _moved_pair()
    ema = EMA(start, decay=0.99)
    for _ in range(5):
        ema.update(moved)
    other = EMA(moved, decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 5 and other.decay == 0.99 and other.warmup
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)


def test_state_dict_of_another_architecture_is_refused():
    ema = EMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict(EMA(nn.Sequential(nn.Linear(2, 2))).state_dict())


def test_decay_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(2, 2), decay=1.0)
