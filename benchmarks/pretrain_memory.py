"""Estimated peak memory of one S3D MAE pre-training step, without the GPU.

Runs the step on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data, no compute) under
torch's MemTracker, which sums parameters, gradients, optimizer state, saved activations and
temporaries. It answers "does ResEnc-L at 160^3, batch 2 fit?" on any machine. The estimate runs the
CPU autocast policy (this CPU-only torch cannot fake CUDA tensors) and leaves out cuDNN workspaces
and allocator fragmentation: confirm on a GPU with `pretrain_step.py --device cuda`.

    python benchmarks/pretrain_memory.py --arch resenc-l --patch 160 --batch 2 --amp bf16
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resenc-l")
    ap.add_argument("--patch", type=int, default=160, help="cubic patch edge (voxels)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--amp", default="bf16", choices=["off", "bf16"])
    args = ap.parse_args()

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    import s3d.nn.sparse
    from s3d.nn.mae import MAEModel, MaskedMSELoss
    from s3d.nn.masking import default_block_size
    from s3d.train.pretrain import PretrainConfig, network_config

    cfg = PretrainConfig(arch=args.arch, patch_size=(args.patch,) * 3)
    net_cfg = network_config(cfg)
    block = default_block_size(cfg.patch_size, net_cfg)
    # Fake tensors hold no values: the two data-dependent calls (truncated-normal init of the mask tokens,
    # the mask-alignment check) are skipped; neither allocates anything that matters here.
    torch.nn.init.trunc_normal_ = lambda t, **_: t
    s3d.nn.sparse.torch = _NoEqualTorch()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = MAEModel(net_cfg)
        loss_fn = MaskedMSELoss()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        x = torch.randn(args.batch, 1, *cfg.patch_size)
        coarse = [p // b for p, b in zip(cfg.patch_size, block, strict=True)]
        mask = (torch.rand(args.batch, 1, *coarse) > 0.75).float()
        mask = torch.nn.functional.interpolate(mask, size=cfg.patch_size, mode="nearest")
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            for _ in range(2):  # the second step holds the momentum buffers
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                    loss = loss_fn(model(x, mask).float(), x, mask)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    totals: dict[str, int] = {}
    for per_type in peak.values():
        for kind, nbytes in per_type.items():
            totals[str(kind)] = totals.get(str(kind), 0) + nbytes
    total = sum(v for k, v in totals.items() if k != "Total")
    parts = ", ".join(f"{k.split('.')[-1].lower()} {v / 2**30:.2f}" for k, v in totals.items() if k != "Total" and v)
    print(f"{args.arch} MAE step, patch {args.patch}^3, batch {args.batch}, amp {args.amp}: "
          f"estimated peak {total / 2**30:.1f} GiB ({parts} GiB)")


class _NoEqualTorch:
    """`torch` as s3d.nn.sparse sees it, with `equal` always true (fake tensors cannot compare values)."""

    def __getattr__(self, name: str):  # noqa: ANN204
        return (lambda a, b: True) if name == "equal" else getattr(torch, name)


if __name__ == "__main__":
    main()
