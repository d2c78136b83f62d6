"""The training loop: schedule, checkpoints, resume after SIGKILL, frozen groups, DDP on gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from s3d.checkpoint import (
    load_model,
    load_training_state,
    read_json,
    save_model,
    save_training_state,
    write_json,
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


def test_interrupted_save_is_detected(tmp_path):
    obj = _Toy()
    opt = torch.optim.SGD(obj.parameters(), lr=0.1)
    save_training_state(tmp_path, obj, opt, step=3)
    meta = read_json(tmp_path / "state.json")
    meta["step"] = 4  # as if state.json of a later save landed but its tensors did not
    write_json(tmp_path / "state.json", meta)
    with pytest.raises(S3DError, match="disagree"):
        load_training_state(tmp_path, obj, opt)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_loop import _Toy, _batches
    from s3d.train.loop import TrainConfig, train

    class Slow(_Toy):
        def forward(self, batch):
            time.sleep(0.05)
            return super().forward(batch)

    torch.manual_seed(0)
    train(Slow(), _batches, TrainConfig(steps=int(sys.argv[2]), checkpoint_every=5, log_every=5, device="cpu"),
          sys.argv[1], resume=sys.argv[3] == "1")
    """
)


def test_sigkill_then_resume_reaches_the_same_step(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(run), "200", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "state.json").exists():
        time.sleep(0.1)
    time.sleep(0.4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "state.json").exists(), "no checkpoint was written before the kill"
    killed_at = read_json(run / "state.json")["step"]
    assert 0 < killed_at < 200
    done = subprocess.run([sys.executable, str(script), str(run), "200", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {run} at step {killed_at}" in done.stderr + done.stdout
    assert read_json(run / "state.json")["step"] == 200
    import csv

    steps = [int(r["step"]) for r in csv.DictReader((run / "log.csv").open())]
    assert steps == sorted(set(steps)) and steps[-1] == 200


def test_existing_state_without_resume_is_refused(tmp_path):
    obj = _Toy()
    train(obj, _batches, TrainConfig(steps=2, device="cpu"), tmp_path)
    with pytest.raises(S3DError, match="--resume"):
        train(_Toy(), _batches, TrainConfig(steps=2, device="cpu"), tmp_path)
