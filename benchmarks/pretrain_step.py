"""Pre-training step cost: sparse MAE vs a dense forward+backward of the same network and batch.

For every network (default resenc-s and resenc-l, 64^3, batch 2) and precision (fp32, bf16 autocast) it
times, in one process and interleaved repetition by repetition (so that a busy machine slows all of them
alike), a dense step (ResEncUNet, 1 output, L2 to the input), the S3D sparse-emulated MAE step (masking,
masked InstanceNorm, mask tokens, densification, masked L2) and, where built, the block-sparse MAE step;
it prints medians, the ratios to dense and the peak memory of one step of each above what is allocated
before it (CUDA: max_memory_allocated; CPU: glibc's bytes in use, sampled after every aten op).
The MAE masks 75% (the middle of S3D's U[0.6, 0.9]) so that every repetition costs the same.

    python benchmarks/pretrain_step.py                        # resenc-s and resenc-l, 64^3, batch 2, fp32 + bf16
    python benchmarks/pretrain_step.py --arch resenc-l --patch 160 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

MODES = ("dense", "sparse", "block")


def build(arch: str, patch: int, batch: int, device: torch.device, mode: str, amp: str,
          ratio: float = 0.75) -> Callable[[], None]:
    """One training step of `mode` as a closure (fixed input and mask, fresh gradients each call)."""
    from s3d.nn.mae import MAEModel, MaskedMSELoss
    from s3d.nn.masking import default_block_size, random_block_mask
    from s3d.nn.resenc import ResEncUNet
    from s3d.train.pretrain import PretrainConfig, network_config

    cfg = PretrainConfig(arch=arch, patch_size=(patch,) * 3, spacing=(1.0, 1.0, 1.0))
    net_cfg = network_config(cfg)
    torch.manual_seed(0)
    x = torch.randn(batch, 1, *cfg.patch_size, device=device)
    dtype = torch.bfloat16 if amp == "bf16" else None
    if mode == "simtrot":
        from s3d.train.pretrain import make_objective

        objective = make_objective(PretrainConfig(method="simtrot", arch=arch, patch_size=(patch,) * 3), net_cfg)[0]
        module = objective

        def loss_fn() -> torch.Tensor:
            return objective({"image": x})[0]
    elif mode == "dense":
        module: torch.nn.Module = ResEncUNet(net_cfg.__class__.from_dict({**net_cfg.to_dict(), "num_classes": 1}))

        def loss_fn() -> torch.Tensor:
            return ((module(x).float() - x) ** 2).mean()
    else:
        block = default_block_size(cfg.patch_size, net_cfg)
        mask = random_block_mask(batch, cfg.patch_size, block, ratio, torch.Generator().manual_seed(1)).to(device)
        module = MAEModel(net_cfg)
        module.block_sparse = mode == "block"  # "sparse": the masked dense emulation on every stage
        criterion = MaskedMSELoss()

        def loss_fn() -> torch.Tensor:
            return criterion(module(x, mask), x, mask)
    module.to(device)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def available_modes() -> tuple[str, ...]:
    from s3d.nn.mae import MAEModel

    return MODES if hasattr(MAEModel, "block_sparse") else MODES[:2]


class _MallocPeak:
    """Peak bytes in use by glibc malloc (where CPU tensors live), sampled after every aten op."""

    def __init__(self) -> None:
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

        self._fn = ctypes.CDLL("libc.so.6").mallinfo2
        self._fn.restype = Info
        self.peak = self.base = self.now()

    def now(self) -> int:
        info = self._fn()
        return int(info.uordblks + info.hblkhd)  # in-use heap + mmapped chunks (large tensors)

    def sample(self) -> None:
        self.peak = max(self.peak, self.now())


def peak_memory(arch: str, patch: int, batch: int, device: str, mode: str, amp: str) -> float:
    """Peak bytes of one step above what is allocated before it (model, input; after one warm-up step)."""
    dev = torch.device(device)
    step = build(arch, patch, batch, dev, mode, amp)
    step()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return float(torch.cuda.max_memory_allocated() - before)
    from torch.utils._python_dispatch import TorchDispatchMode

    tracker = _MallocPeak()

    class Sample(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            tracker.sample()
            return out

    with Sample():
        step()
    return float(tracker.peak - tracker.base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["resenc-s", "resenc-l"])
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=["off", "bf16"])
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per mode (interleaved)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--simtrot", action="store_true", help="also time a SimTROT step (batch >= 2)")
    args = ap.parse_args()

    device = torch.device(args.device)
    modes = available_modes() + (("simtrot",) if args.simtrot else ())
    print(f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads, modes {', '.join(modes)}")
    for arch in args.arch:
        for amp in args.amp:
            steps = {m: build(arch, args.patch, args.batch, device, m, amp) for m in modes}
            times: dict[str, list[float]] = {m: [] for m in modes}
            for rep in range(args.warmup + args.reps):
                for m in modes:
                    t = time.perf_counter()
                    steps[m]()
                    if rep >= args.warmup:
                        times[m].append(time.perf_counter() - t)
            del steps
            med = {m: statistics.median(v) for m, v in times.items()}
            parts = [f"{m} {med[m] * 1000:.0f} ms" + ("" if m == "dense" else f" ({med[m] / med['dense']:.2f}x)")
                     for m in modes]
            line = f"{arch} {args.patch}^3 x{args.batch} {'fp32' if amp == 'off' else 'bf16'}: " + ", ".join(parts)
            if not args.no_memory:
                mem = {m: peak_memory(arch, args.patch, args.batch, args.device, m, amp) for m in modes}
                line += "; peak memory " + ", ".join(
                    f"{m} {mem[m] / 2**20:.0f} MiB" + ("" if m == "dense" else f" ({mem[m] / mem['dense']:.2f}x)")
                    for m in modes)
            print(line, flush=True)


if __name__ == "__main__":
    main()
