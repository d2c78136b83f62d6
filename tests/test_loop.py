"""The training loop: schedule, checkpoints, resume after SIGKILL, frozen groups, DDP on gloo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from s3d.checkpoint import (
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)
from s3d.errors import S3DError
from s3d.train.loop import Phase, TrainConfig, lr_factor, train


def test_poly_schedule_matches_nnunet_formula():
    phases = [Phase("poly", 100)]
    for step in (0, 1, 50, 99):
        f, frozen = lr_factor(step, phases)
        assert f == pytest.approx((1 - step / 100) ** 0.9)
        assert frozen == ()


def test_warmup_phases_ramp_then_decay_and_freeze():
    phases = [Phase("warmup", 10, frozen=("encoder",)), Phase("warmup", 10), Phase("poly", 80)]
    lrs = [lr_factor(s, phases)[0] for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.1) and lrs[19] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[20:], lrs[21:], strict=False))
    assert all(lr_factor(s, phases)[1] == ("encoder",) for s in range(10))
    assert all(lr_factor(s, phases)[1] == () for s in range(10, 100))


def test_finetune_schedule_with_and_without_warmup():
    from s3d.train.finetune import FinetuneConfig, schedule

    # S3D's default: 5% decoder-only, 5% whole-network warm-up, then poly
    assert [(p.kind, p.steps, p.frozen) for p in schedule(FinetuneConfig(steps=100), True)] == [
        ("warmup", 5, ("encoder",)), ("warmup", 5, ()), ("poly", 90, ())]
    # (0, 0): SimTROT's fine-tuning, the whole network at the peak lr from the first step, as from scratch
    none = schedule(FinetuneConfig(steps=100, warmup_steps=(0, 0)), True)
    assert [(p.kind, p.steps, p.frozen) for p in none] == [("poly", 100, ())]
    assert lr_factor(0, none) == (1.0, ())
    assert [p.steps for p in schedule(FinetuneConfig(steps=100, warmup_steps=(0, 7)), True)] == [7, 93]
    with pytest.raises(S3DError, match="negative"):
        schedule(FinetuneConfig(steps=100, warmup_steps=(-1, 5)), True)


def test_schedule_must_cover_steps():
    with pytest.raises(S3DError, match="add up"):
        TrainConfig(steps=50, phases=[Phase("poly", 40)]).schedule()


class _Toy(nn.Module):
    """Linear regression objective: a deterministic problem whose optimum is known."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, batch):
        pred = self.head(self.encoder(batch["x"]))
        return ((pred[:, 0] - batch["y"]) ** 2).mean(), {"pred_mean": float(pred.detach().mean())}


def _batches(start):
    g = torch.Generator().manual_seed(start)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    while True:
        x = torch.randn(16, 4, generator=g)
        yield {"x": x, "y": x @ w}


def test_loop_learns_and_writes_weights_state_and_log(tmp_path):
    torch.manual_seed(0)
    obj = _Toy()
    cfg = TrainConfig(steps=60, lr=1e-2, checkpoint_every=20, log_every=10, device="cpu")
    exported = []
    train(obj, _batches, cfg, tmp_path, export=lambda o, s: (save_model(tmp_path / "w", o.state_dict(), {"step": s}),
                                                            exported.append(s)))
    import csv

    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60]
    assert float(rows[-1]["loss"]) < 0.1 * float(rows[0]["loss"])
    assert exported == [20, 40, 60]
    sd, config = load_model(tmp_path / "w")
    assert config["step"] == 60
    assert torch.equal(sd["head.weight"], obj.head.weight.detach())


def test_frozen_group_does_not_move(tmp_path):
    torch.manual_seed(0)
    obj = _Toy()
    before = obj.encoder.weight.detach().clone()
    cfg = TrainConfig(steps=20, phases=[Phase("warmup", 10, frozen=("encoder",)), Phase("poly", 10)], device="cpu")
    groups = lambda m: {"encoder": list(m.encoder.parameters()), "head": list(m.head.parameters())}  # noqa: E731

    head_before = obj.head.weight.detach().clone()

    def stop_after(step):
        if step == 9:  # last step of the frozen warm-up
            assert torch.equal(obj.encoder.weight.detach(), before)
            assert not torch.equal(obj.head.weight.detach(), head_before)

    obj.after_step = stop_after
    train(obj, _batches, cfg, tmp_path, param_groups=groups)
    assert not torch.equal(obj.encoder.weight.detach(), before)  # unfrozen after the warm-up


def test_training_state_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    obj = _Toy()
    opt = torch.optim.SGD(obj.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    loss, _ = obj(next(_batches(0)))
    loss.backward()
    opt.step()
    np.random.seed(3)
    save_training_state(tmp_path, obj, opt, step=7, extra={"a": 1})
    expected_np = np.random.rand()
    expected_torch = torch.rand(1)

    obj2 = _Toy()
    opt2 = torch.optim.SGD(obj2.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    step, extra = load_training_state(tmp_path, obj2, opt2)
    assert step == 7 and extra == {"a": 1}
    for a, b in zip(obj.state_dict().values(), obj2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    mom = [opt.state[p]["momentum_buffer"] for p in obj.parameters()]
    mom2 = [opt2.state[p]["momentum_buffer"] for p in obj2.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(mom, mom2, strict=True))
    assert np.random.rand() == expected_np and torch.equal(torch.rand(1), expected_torch)


def test_existing_state_without_resume_is_refused(tmp_path):
    obj = _Toy()
    train(obj, _batches, TrainConfig(steps=2, device="cpu"), tmp_path)
    with pytest.raises(S3DError, match="--resume"):
        train(_Toy(), _batches, TrainConfig(steps=2, device="cpu"), tmp_path)
