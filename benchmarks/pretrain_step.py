"""Pre-training step cost: sparse MAE vs a dense forward+backward of the same network and batch,
and a SimTROT step. The masking overhead (re-masking after every conv, masked InstanceNorm, mask
tokens, densification) should stay within 15% of the dense step.

    python benchmarks/pretrain_step.py --arch resenc-s --patch 64 --batch 2 --device cpu
    python benchmarks/pretrain_step.py --arch resenc-l --patch 160 --batch 2 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resenc-s")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    from s3d.nn.masking import default_block_size
    from s3d.nn.resenc import ResEncUNet
    from s3d.train.pretrain import MAEObjective, PretrainConfig, SimTROTObjective, network_config

    device = torch.device(args.device)
    cfg = PretrainConfig(arch=args.arch, patch_size=(args.patch,) * 3, spacing=(1.0, 1.0, 1.0))
    net_cfg = network_config(cfg)
    x = torch.randn(args.batch, 1, *cfg.patch_size, device=device)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def step(module, batch_fn):  # noqa: ANN001
        def run():
            module.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = batch_fn()
            loss.backward()
        return run

    dense_cfg = net_cfg.__class__.from_dict({**net_cfg.to_dict(), "num_classes": 1})
    dense = ResEncUNet(dense_cfg).to(device)
    t_dense = timed(step(dense, lambda: ((dense(x) - x) ** 2).mean()), args.warmup, args.iters, device)
    mae = MAEObjective(net_cfg, cfg.patch_size, (0.6, 0.9), default_block_size(cfg.patch_size, net_cfg)).to(device)
    t_mae = timed(step(mae, lambda: mae({"image": x})[0]), args.warmup, args.iters, device)
    line = (f"{args.arch} patch {args.patch}^3 batch {args.batch} {device.type} amp={args.amp}: "
            f"dense {t_dense * 1000:.0f} ms, sparse MAE {t_mae * 1000:.0f} ms "
            f"(overhead {100 * (t_mae / t_dense - 1):+.1f}%)")
    if args.batch >= 2:
        sim = SimTROTObjective(net_cfg, cfg.patch_size, cfg).to(device)
        t_sim = timed(step(sim, lambda: sim({"image": x})[0]), args.warmup, args.iters, device)
        line += f", simtrot {t_sim * 1000:.0f} ms"
    if device.type == "cuda":
        line += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(line)


if __name__ == "__main__":
    main()
