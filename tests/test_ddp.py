"""Multi-process training through torch.distributed (torchrun + DDP, gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from s3d.train.loop import TrainConfig, train

    method = sys.argv[2]
    rank = int(os.environ["RANK"])
    if method == "toy":
        obj = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

        class Obj(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = obj
            def forward(self, b):
                return ((self.net(b["x"])[:, 0] - b["y"]) ** 2).mean(), {}
        objective = Obj()

        def batches(start):
            g = torch.Generator().manual_seed(1000 * rank + start)  # each rank sees different data
            while True:
                x = torch.randn(8, 4, generator=g)
                yield {"x": x, "y": x.sum(1)}
    else:
        from s3d.nn.resenc import plan_network
        from s3d.train.pretrain import MAEObjective
        cfg = plan_network((32, 32, 32), (1.0, 1.0, 1.0), preset="resenc-s", in_channels=1, num_classes=1)
        cfg.deep_supervision = False
        if method == "mae":
            objective = MAEObjective(cfg, (32, 32, 32), 0.75, (16, 16, 16))
        else:  # B-TROT: an EMA target and batch-norm heads, whose buffers must agree across ranks too
            from s3d.train.pretrain import BTROTObjective, PretrainConfig
            pcfg = PretrainConfig(method="btrot", arch="resenc-s", patch_size=(32, 32, 32), batch_size=2)
            objective = BTROTObjective(cfg, (32, 32, 32), pcfg)

        def batches(start):
            g = torch.Generator().manual_seed(1000 * rank + start)
            while True:
                yield {"image": torch.randn(2, 1, 32, 32, 32, generator=g)}

    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    train(objective, batches, TrainConfig(steps=3, device="cpu", checkpoint_every=100), sys.argv[1])
    save_file({k: v.contiguous() for k, v in objective.state_dict().items()},
              os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
    """
)


@pytest.mark.parametrize("method", ["toy", "mae", "btrot"])
def test_two_gloo_ranks_hold_identical_weights(tmp_path, method):
    script = tmp_path / "ddp.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(out), method],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(str(out / "rank0.safetensors"))
    b = load_file(str(out / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs between ranks"
    init = {}
    import torch

    torch.manual_seed(0)
    if method == "toy":  # the weights moved away from rank 0's initialisation
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        init = {f"net.{k}": v for k, v in net.state_dict().items()}
        assert any(not torch.equal(init[k], a[k]) for k in init)
