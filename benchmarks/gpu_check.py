"""One prepared GPU check (issue 17): pre-training, fine-tuning, prediction and the data path, measured
in one process on one accelerator, within a time budget.

Sections (`--sections`, in this order):
  tests     the CUDA-only tests of the suite (`pytest -k cuda` over the test files that use CUDA; they
            skip themselves elsewhere), pass/fail counts;
  pretrain  one training step as `s3d pretrain` runs it (objective from s3d.train.pretrain.make_objective,
            pre-training augmentation, autocast, SGD + gradient clipping as s3d.train.loop), for a dense
            forward+backward of the same network, S3D sparse MAE and SimTROT, at each --batches, with and
            without channels_last_3d (and MAE at the largest batch with cudnn.benchmark on): median
            s/step over --steps synchronised steps after --warmup, peak torch.cuda.max_memory_allocated
            (reset per configuration), conv TFLOP/s (the FLOPs of every forward convolution that runs,
            block-sparse cells included, x3 for forward + backward) against --peak-tflops;
  finetune  the fine-tuning step at the paper's setting (s3d.train.finetune.SegmentationObjective with
            Augmenter.for_segmentation, deep supervision, batch 2), and the augmentation alone;
  predict   sliding window (s3d.infer.sliding_window_predict, autocast, TTA off and on) over a
            512x512x300 volume at 1 mm: a real 1 mm scan wrap-tiled to that size (random data only when no
            scan is found; the JSON says which); windows/s and seconds per case (network + accumulation,
            from the volume in memory);
  data      a blosc2 store built by the library's corpus preprocessing from a few real scans, then the MAE
            step fed by s3d.data.loader.make_loader vs one batch replayed from memory
            (benchmarks/pretrain_loader.child_train): a ratio near 1 means the GPU does not wait for data;
  compile   the dense and MAE steps at the largest batch under torch.compile, if the budget leaves
            --compile-min-s for it (last, so a slow compile costs no other section).

Every section checks the budget (--budget-s, from the script's start) and records "skipped: budget"
instead of overrunning; a section that fails (out of memory, compile error, ...) is recorded with its
message and the next one still runs; OUT/gpu_check.json is rewritten (atomically) after every section,
so a run killed from outside still leaves what it measured. OUT/gpu_check.md is the Markdown table.

The paper targets (issue 17) are evaluated as pass / miss: S3D MAE step <= 0.5 s at batch 6 x 160^3;
sparse MAE step <= dense step; MAE peak memory at batch 2 within the FakeTensor estimate x 1.25; conv
throughput >= 35% of the bf16 peak; prediction of 512x512x300 with TTA < 60 s.

CPU smoke run (resenc-s, 32^3, 3 steps; < 2 minutes on 2 cores):

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check

Device recipe (the `device` tool; the machine has torch + CUDA + pytest but no package registry, and
neither nibabel, blosc2 nor ndindex; s3d runs from the working tree). Once, here, in the repo root:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        nibabel==5.4.2 blosc2==4.15.0 ndindex==1.10.1
    mkdir -p .cache/gpu_check_data
    for f in voxelmorph_brain_t1 totalseg_ct_aorta_1p5mm totalseg_ct_pulmonary_1p5mm tcia_brain_study3_11; do
        cp ../shared/data/unlabeled/$f.nii.gz .cache/gpu_check_data/; done

then one `run` with carry [".whl", ".cache/gpu_check_data"], timeout_s 540 and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; nvidia-smi -L;
    python3 benchmarks/gpu_check.py --out $OUT --data .cache/gpu_check_data --budget-s 420 2>&1 | tee $OUT/log.txt

(one line; benchmarks/README.md, section "GPU check (issue 17)", has it verbatim).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "pretrain", "finetune", "predict", "data", "compile")
METHODS = ("dense", "mae", "simtrot")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"
DEFAULT_DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))
H200_BF16_DENSE_TFLOPS = 790.0  # the device tool's figure for an 8192^3 bf16 matmul on the H200
FAKETENSOR_ESTIMATE_GIB = 15.2  # benchmarks/README.md: ResEnc-L, 160^3, batch 2, bf16, MAE step
MEMORY_MARGIN = 1.25  # cuDNN workspaces and allocator fragmentation, which the estimate leaves out

# Real 1 mm (or finer, resampled by the corpus preprocessing) scans that hold a 160^3 patch, and tiny
# 1 mm crops for the smoke run; the first one found of each list is also the prediction / fine-tuning image.
DEVICE_SCANS = ("voxelmorph_brain_t1.nii.gz", "totalseg_ct_aorta_1p5mm.nii.gz", "totalseg_ct_pulmonary_1p5mm.nii.gz",
                "tcia_brain_study3_11.nii.gz")
SMOKE_SCANS = ("tcia_brain_study1_13-hcropvolume.nii.gz", "tcia_brain_study2_14-hcropvolume.nii.gz",
               "tcia_brain_study3_11-hcropvolume.nii.gz")


class BudgetExceeded(Exception):
    """Raised by the alarm when a section runs past the budget plus its grace."""


@dataclass
class Settings:
    """Shapes and counts of one run: the paper's on a GPU, tiny ones for --smoke."""

    device: torch.device
    amp: torch.dtype | None
    arch: str
    patch: int
    batches: tuple[int, ...]
    methods: tuple[str, ...]
    finetune_batch: int
    warmup: int
    steps: int
    predict_shape: tuple[int, int, int]
    predict_batch: int
    scans: tuple[str, ...]
    data: Path
    workers: int
    peak_tflops: float
    compile_min_s: float
    fail: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["device"] = str(self.device)
        out["amp"] = str(self.amp).replace("torch.", "") if self.amp else "off"
        out["data"] = str(self.data)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# ----------------------------------------------------------------------------------------- output
def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: a kill leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "python": platform.python_version(),
            "host": platform.node(), "cpu_cores": len(os.sched_getaffinity(0)), "device": str(device),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info["name"] = "cpu"
    return info


# ----------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    """Forget the last configuration's tensors and peak, so each peak is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


@contextmanager
def count_conv_flops() -> Iterator[dict]:
    """Within the block, every forward convolution (``aten.convolution``: Conv3d and ConvTranspose3d modules
    and functional convs alike, e.g. the block-sparse stages' convs of visible cells) adds its forward FLOPs
    to record["flops"]; record["first"] describes the first call (for checking against the formula)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    record: dict = {"flops": 0.0, "calls": 0, "first": None}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.convolution.default:
                inp, weight, transposed, groups = args[0], args[1], bool(args[6]), int(args[8])
                k = math.prod(weight.shape[2:])
                # weight (C_out, C_in/g, *k) for a conv, (C_in, C_out/g, *k) for a transposed conv
                f = 2.0 * (inp.numel() if transposed else out.numel()) * weight.shape[1] * k
                record["flops"] += f
                record["calls"] += 1
                if record["first"] is None:
                    c_in = weight.shape[0] if transposed else weight.shape[1] * groups
                    c_out = weight.shape[1] * groups if transposed else weight.shape[0]
                    record["first"] = {"type": "ConvTranspose3d" if transposed else "Conv3d", "in_channels": c_in,
                                       "out_channels": c_out, "kernel": list(weight.shape[2:]), "groups": groups,
                                       "input_shape": list(inp.shape), "output_shape": list(out.shape), "flops": f}
            return out

    with Counter():
        yield record


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device, budget: Budget
               ) -> dict:
    """Per-step seconds (synchronised before and after each step) of `steps` steps after `warmup`; the
    timed loop stops early when the budget runs out (then truncated is true and fewer steps count)."""
    for _ in range(warmup):
        step()
    sync(device)
    times: list[float] = []
    for _ in range(steps):
        if times and budget.left() <= 0:
            break
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"warmup": warmup, "steps": len(times), "truncated": len(times) < steps,
            "step_s": [round(t, 5) for t in times], "median_s": round(statistics.median(times), 5),
            "mean_s": round(statistics.fmean(times), 5)}


def train_step(objective: nn.Module, batch: Callable[[], dict], s: Settings, module: nn.Module | None = None
               ) -> Callable[[], torch.Tensor]:
    """One optimiser step as s3d.train.loop runs it: autocast forward, backward, gradient clipping, SGD
    with the loop's defaults. `module`: what to call instead of `objective` (e.g. its compiled form)."""
    from s3d.train.loop import TrainConfig

    tc = TrainConfig(steps=1)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                          nesterov=tc.nesterov)
    call = module if module is not None else objective
    objective.train()

    def step() -> torch.Tensor:
        with torch.autocast(s.device.type, dtype=s.amp or torch.float32, enabled=s.amp is not None):
            loss, _ = call(batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], tc.grad_clip)
        opt.step()
        return loss.detach()

    return step


def throughput(flops_fwd: float, median_s: float, peak_tflops: float) -> dict:
    """Conv FLOPs of a training step (forward x3: the backward computes input and weight gradients)."""
    per_step = 3.0 * flops_fwd
    tflops = per_step / median_s / 1e12
    return {"conv_flops_per_step": per_step, "conv_tflops": round(tflops, 3),
            "peak_fraction": round(tflops / peak_tflops, 4)}


# ----------------------------------------------------------------------------------------- data
def find_scans(root: Path, names: tuple[str, ...]) -> list[Path]:
    """The files of `names` found directly in `root` or anywhere below it, in the order given."""
    out = []
    for name in names:
        hits = [root / name] if (root / name).is_file() else sorted(root.rglob(name)) if root.is_dir() else []
        if hits:
            out.append(hits[0])
    return out


def real_volume(s: Settings, shape: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    """(X,Y,Z) float32, z-scored, of the first scan found, wrap-tiled (or cropped) to `shape`; random
    normal data when no scan is there. The label says which, for the report."""
    scans = find_scans(s.data, s.scans)
    if not scans:
        return np.random.default_rng(0).standard_normal(shape, dtype=np.float32), "random normal data (no scan found)"
    from s3d.data.io import read_channels

    images, geom = read_channels([scans[0]])
    vol = images[0].astype(np.float32)
    vol = (vol - vol.mean()) / max(float(vol.std()), 1e-6)
    pad = [(0, max(0, t - n)) for t, n in zip(shape, vol.shape, strict=True)]
    tiled = np.pad(vol, pad, mode="wrap")[: shape[0], : shape[1], : shape[2]]
    spacing = "x".join(f"{v:g}" for v in geom.spacing) if hasattr(geom, "spacing") else "?"
    how = "wrap-tiled" if any(p[1] for p in pad) else "cropped"
    return np.ascontiguousarray(tiled), (f"real scan {scans[0].name} ({'x'.join(map(str, vol.shape))} voxels at "
                                         f"{spacing} mm, used as a 1 mm grid), z-scored, {how} to "
                                         f"{'x'.join(map(str, shape))}")


def crops(vol: np.ndarray, batch: int, patch: int) -> np.ndarray:
    """`batch` patch^3 crops from evenly spaced corners of `vol` (B,1,P,P,P)."""
    out = []
    for i in range(batch):
        f = i / max(1, batch - 1)
        start = [int(f * (n - patch)) for n in vol.shape]
        out.append(vol[start[0]: start[0] + patch, start[1]: start[1] + patch, start[2]: start[2] + patch])
    return np.stack(out)[:, None]


# ----------------------------------------------------------------------------------------- sections
def section_tests(s: Settings, budget: Budget, res: dict) -> None:
    if s.device.type != "cuda":
        res.update(status="skipped", reason="no CUDA device: the CUDA-only tests skip themselves here")
        return
    own = Path(__file__).name.replace("gpu_check", "test_gpu_check")
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if p.name != own and "cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", *files]
    res["command"] = " ".join(cmd[1:])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=max(10.0, min(240.0, budget.left())))
    tail = (proc.stdout + proc.stderr)[-3000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                               tail.splitlines()[-1] if tail.strip() else "")}
    res.update(returncode=proc.returncode, counts=counts, files=files)
    if proc.returncode not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        res.update(status="error", error=f"pytest exited {proc.returncode}", output_tail=tail)
    elif not counts.get("passed"):
        res.update(status="error", error="no CUDA test passed", output_tail=tail)


class DenseObjective(nn.Module):
    """The dense baseline: the same network (one output channel) forward+backward on the augmented
    input, L2 to it; no masking, no mask tokens, no densification."""

    def __init__(self, net_cfg, augmenter=None) -> None:  # noqa: ANN001 - ResEncConfig, Augmenter
        super().__init__()
        from s3d.nn.resenc import ResEncConfig, ResEncUNet

        self.network = ResEncUNet(ResEncConfig.from_dict({**net_cfg.to_dict(), "num_classes": 1}))
        self.augmenter = augmenter

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x = batch["image"]
        if self.augmenter is not None:
            with torch.no_grad():
                x, _ = self.augmenter(x)
        return ((self.network(x).float() - x.float()) ** 2).mean(), {}


def pretrain_objective(method: str, s: Settings, batch: int) -> nn.Module:
    """The objective `s3d pretrain --method` builds (dense: the baseline above), with its augmentation."""
    from s3d.data.augment import Augmenter
    from s3d.train.pretrain import PretrainConfig, make_objective, network_config

    # "mae-emulated": S3D's masked dense emulation on every stage (`--no-block-sparse`), beside the default
    cfg = PretrainConfig(method="mae" if method in ("dense", "mae-emulated") else method, arch=s.arch,
                         patch_size=(s.patch,) * 3, batch_size=batch, spacing=(1.0, 1.0, 1.0),
                         block_sparse=method != "mae-emulated")
    net_cfg = network_config(cfg)
    augmenter = Augmenter.for_pretraining(cfg.patch_size) if cfg.augment else None
    torch.manual_seed(0)
    if method == "dense":
        return DenseObjective(net_cfg, augmenter)
    return make_objective(cfg, net_cfg, augmenter)[0]


def run_pretrain_config(s: Settings, budget: Budget, method: str, batch: int, channels_last: bool,
                        cudnn_benchmark: bool = False, compiled: bool = False) -> dict:
    row: dict = {"method": method, "batch": batch, "channels_last_3d": channels_last,
                 "cudnn_benchmark": cudnn_benchmark, "compiled": compiled}
    reset_memory(s.device)
    old_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        objective = pretrain_objective(method, s, batch).to(s.device)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        if channels_last:
            objective = objective.to(memory_format=fmt)
        x = torch.randn(batch, 1, *(s.patch,) * 3, device=s.device).contiguous(memory_format=fmt)
        data = {"image": x}
        if method.startswith("mae"):
            data["valid"] = torch.ones_like(x, dtype=torch.uint8)
        step = train_step(objective, lambda: data, s)
        # the first (eager) step counts the FLOPs, so that the counting dispatch mode stays out of the
        # compiled graph
        t = time.perf_counter()
        with count_conv_flops() as flops:
            step()
        sync(s.device)
        row["first_step_s"] = round(time.perf_counter() - t, 3)
        row.update(conv_calls=flops["calls"], conv_flops_forward=flops["flops"], first_conv=flops["first"])
        if compiled:
            torch._dynamo.reset()
            step = train_step(objective, lambda: data, s, torch.compile(objective))
            t = time.perf_counter()
            step()
            sync(s.device)
            row["compile_step_s"] = round(time.perf_counter() - t, 3)
        row.update(time_steps(step, max(0, s.warmup - 1), s.steps, s.device, budget))
        row.update(throughput(flops["flops"], row["median_s"], s.peak_tflops))
        row["peak_memory_gib"] = peak_gib(s.device)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one configuration's failure (OOM, compile) must not end the section
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:1500]}")
    finally:
        torch.backends.cudnn.benchmark = old_bench
        reset_memory(s.device)
    return row


def _configs_done(res: dict, rows: list[dict], write: Callable[[], None]) -> None:
    res["runs"] = rows
    write()


def section_pretrain(s: Settings, budget: Budget, res: dict, write: Callable[[], None]) -> None:
    # the largest batch first: the step-time targets are judged there, should the budget run short
    configs = [(m, b, cl, False) for b in sorted(s.batches, reverse=True) for m in s.methods for cl in (False, True)
               if not (m == "simtrot" and b < 2)]
    if "mae" in s.methods:
        configs.append(("mae", max(s.batches), False, True))
        configs.append(("mae-emulated", max(s.batches), False, False))
    res["input"] = "random normal patches (timing only); augmentation as s3d pretrain"
    rows: list[dict] = []
    for method, batch, cl, bench in configs:
        if budget.left() <= 0:
            rows.append({"method": method, "batch": batch, "channels_last_3d": cl, "cudnn_benchmark": bench,
                         "compiled": False, "status": "skipped", "reason": "budget"})
            continue
        rows.append(run_pretrain_config(s, budget, method, batch, cl, bench))
        r = rows[-1]
        print(f"  pretrain {method:8s} b{batch} cl={int(cl)} bench={int(bench)}: " + (
            f"{r['median_s']:.4f} s/step, {r['conv_tflops']:.2f} TFLOP/s, peak {r['peak_memory_gib']} GiB"
            if r["status"] == "ok" else r.get("error", r["status"])), flush=True)
        _configs_done(res, rows, write)
    res["runs"] = rows
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        res["status"] = "partial" if len(bad) < len(rows) else ("skipped" if all(
            r["status"] == "skipped" for r in bad) else "error")
        res["reason"] = "budget" if res["status"] == "skipped" else f"{len(bad)} of {len(rows)} configurations not ok"


def section_compile(s: Settings, budget: Budget, res: dict, write: Callable[[], None]) -> None:
    batch = max(s.batches)
    rows: list[dict] = []
    for method in [m for m in s.methods if m != "simtrot"]:
        if budget.left() < s.compile_min_s:
            rows.append({"method": method, "batch": batch, "compiled": True, "status": "skipped",
                         "reason": f"budget ({budget.left():.0f} s left < --compile-min-s {s.compile_min_s:g})"})
            continue
        rows.append(run_pretrain_config(s, budget, method, batch, False, compiled=True))
        r = rows[-1]
        print(f"  compile {method}: " + (f"first step {r['compile_step_s']} s, {r['median_s']:.4f} s/step"
                                         if r["status"] == "ok" else r.get("error", "")), flush=True)
        _configs_done(res, rows, write)
    res["runs"] = rows
    if all(r["status"] == "skipped" for r in rows):
        res.update(status="skipped", reason=rows[0]["reason"])
    elif any(r["status"] != "ok" for r in rows):
        res["status"] = "partial"


def section_finetune(s: Settings, budget: Budget, res: dict, write: Callable[[], None]) -> None:
    from s3d.data.augment import Augmenter
    from s3d.nn.resenc import ResEncUNet, plan_network
    from s3d.train.finetune import SegmentationObjective

    patch = (s.patch,) * 3
    vol, what = real_volume(s, tuple(max(p, 2 * s.patch) for p in patch))
    image = crops(vol, s.finetune_batch, s.patch)
    # three classes by intensity tertiles: the loss and augmentation need labels, not meaningful ones
    seg = np.digitize(image, np.quantile(image, [1 / 3, 2 / 3])).astype(np.int64)
    res["input"] = f"{what}; {s.finetune_batch} crops, labels = intensity tertiles (3 classes)"
    reset_memory(s.device)
    net_cfg = plan_network(patch, (1.0, 1.0, 1.0), preset=s.arch, in_channels=1, num_classes=3)
    net_cfg.deep_supervision = True
    torch.manual_seed(0)
    augmenter = Augmenter.for_segmentation(patch)
    objective = SegmentationObjective(ResEncUNet(net_cfg), augmenter).to(s.device)
    data = {"image": torch.from_numpy(image).to(s.device), "seg": torch.from_numpy(seg).to(s.device)}
    step = train_step(objective, lambda: data, s)
    with count_conv_flops() as flops:
        step()
    res.update(arch=s.arch, patch=list(patch), batch=s.finetune_batch, deep_supervision=True,
               conv_flops_forward=flops["flops"], first_conv=flops["first"])
    res.update(time_steps(step, max(0, s.warmup - 1), s.steps, s.device, budget))
    res.update(throughput(flops["flops"], res["median_s"], s.peak_tflops))
    res["peak_memory_gib"] = peak_gib(s.device)
    write()

    def aug() -> None:
        with torch.no_grad():
            augmenter(data["image"], data["seg"])

    timed = time_steps(aug, 1, s.steps, s.device, budget)
    res["augment"] = {"median_s": timed["median_s"], "steps": timed["steps"],
                      "fraction_of_step": round(timed["median_s"] / res["median_s"], 4)}


def section_predict(s: Settings, budget: Budget, res: dict, write: Callable[[], None]) -> None:
    from s3d.infer import sliding_window_positions, sliding_window_predict
    from s3d.nn.resenc import ResEncUNet, plan_network

    patch = (s.patch,) * 3
    vol, what = real_volume(s, s.predict_shape)
    image = torch.from_numpy(vol)[None]
    res["input"] = what
    positions = math.prod(len(p) for p in sliding_window_positions(s.predict_shape, patch, 0.5))
    net_cfg = plan_network(patch, (1.0, 1.0, 1.0), preset=s.arch, in_channels=1, num_classes=3)
    net_cfg.deep_supervision = True  # as fine-tuning saves it; prediction uses the first output
    reset_memory(s.device)
    torch.manual_seed(0)
    network = ResEncUNet(net_cfg).to(s.device).eval()
    with torch.inference_mode(), torch.autocast(s.device.type, dtype=s.amp or torch.float32,
                                                enabled=s.amp is not None):
        network(torch.zeros(s.predict_batch, 1, *patch, device=s.device))  # cuDNN / allocator warm-up
    sync(s.device)
    res.update(shape=list(s.predict_shape), patch=list(patch), windows=positions, batch=s.predict_batch, runs=[])
    seconds_off = None
    for tta in (False, True):
        mirrors = 8 if tta else 1
        if seconds_off is not None and seconds_off * mirrors > budget.left():
            why = f"budget (estimated {seconds_off * mirrors:.0f} s, {budget.left():.0f} s left)"
            res["runs"].append({"tta": tta, "status": "skipped", "reason": why})
            continue
        if budget.left() <= 0:
            res["runs"].append({"tta": tta, "status": "skipped", "reason": "budget"})
            continue
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        t = time.perf_counter()
        sliding_window_predict(network, image, patch, 3, mirror_axes=(0, 1, 2) if tta else None,
                               batch_size=s.predict_batch, device=s.device, autocast=s.amp)
        sync(s.device)
        dt = time.perf_counter() - t
        seconds_off = dt if not tta else seconds_off
        res["runs"].append({"tta": tta, "status": "ok", "seconds_per_case": round(dt, 3),
                            "forwards": positions * mirrors, "windows_per_s": round(positions * mirrors / dt, 2),
                            "peak_memory_gib": peak_gib(s.device)})
        print(f"  predict tta={tta}: {dt:.2f} s, {positions * mirrors / dt:.1f} windows/s", flush=True)
        write()
    if any(r["status"] != "ok" for r in res["runs"]):
        res["status"] = "partial"
    del network
    reset_memory(s.device)


def section_data(s: Settings, budget: Budget, res: dict, write: Callable[[], None], work: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pretrain_loader

    from s3d.data.corpus import find_corpus
    from s3d.data.corpus_preprocess import corpus_plan, preprocess_corpus

    scans = find_scans(s.data, s.scans)
    if not scans:
        res.update(status="skipped", reason=f"no scan of {', '.join(s.scans)} under {s.data} (see --data)")
        return
    store = work / "store"
    jobs = max(1, min(len(scans), len(os.sched_getaffinity(0)) - 1, 4))
    t = time.perf_counter()
    report = preprocess_corpus(find_corpus(scans), store, corpus_plan((1.0, 1.0, 1.0)), jobs=jobs,
                               patch_size=(s.patch,) * 3)
    res["store"] = {"scans": [p.name for p in scans], "written": report.written, "skipped": len(report.skipped),
                    "preprocess_s": round(time.perf_counter() - t, 2), "jobs": jobs,
                    "bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file())}
    res["input"] = (f"blosc2 store of {report.written} real scans ({', '.join(p.name for p in scans)}) at 1 mm, "
                    f"{res['store']['preprocess_s']} s to preprocess with -j {jobs}")
    write()
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[s.amp]
    spec = {"kind": "train", "device": str(s.device), "store": str(store), "patch": [s.patch] * 3, "arch": s.arch,
            "batch": max(s.batches), "amp": amp, "seed": 0, "warmup": s.warmup, "steps": s.steps}
    res.update(arch=s.arch, patch=s.patch, batch=spec["batch"], runs=[],
               note="MAE step of benchmarks/pretrain_loader.child_train (mean s/step, not median)")
    for feed, workers in (("replay", 0), ("loader", s.workers)):
        estimate = res["runs"][0]["s_per_step"] * (s.warmup + s.steps) if res["runs"] else 0.0
        if budget.left() <= estimate:
            res["runs"].append({"feed": feed, "workers": workers, "status": "skipped", "reason": "budget"})
            continue
        r = pretrain_loader.child_train({**spec, "feed": feed, "workers": workers})
        res["runs"].append({"feed": feed, "workers": workers, "status": "ok", **r})
        print(f"  data {feed} ({workers} workers): {r['s_per_step']:.4f} s/step", flush=True)
        write()
    ok = [r for r in res["runs"] if r["status"] == "ok"]
    if len(ok) == 2:
        res["loader_over_replay_steps_per_s"] = round(ok[1]["steps_per_s"] / ok[0]["steps_per_s"], 3)
    else:
        res["status"] = "partial"


# ----------------------------------------------------------------------------------------- targets
def evaluate_targets(results: dict, s: Settings, paper_setting: bool) -> list[dict]:
    """pass / miss / not measured for each of the issue's targets, with the value behind it."""
    sections = results["sections"]
    pre = [r for r in sections.get("pretrain", {}).get("runs", []) if r.get("status") == "ok"]
    big = max(s.batches)

    def best(method: str, batch: int) -> dict | None:
        rows = [r for r in pre if r["method"] == method and r["batch"] == batch]
        return min(rows, key=lambda r: r["median_s"]) if rows else None

    def target(name: str, rule: str, value: float | None, ok: Callable[[float], bool], unit: str, where: str
               ) -> dict:
        status = "not measured" if value is None else ("pass" if ok(value) else "miss")
        return {"target": name, "rule": rule, "value": value, "unit": unit, "status": status, "config": where,
                "paper_setting": paper_setting}

    mae, dense = best("mae", big), best("dense", big)

    def cfg(r: dict | None) -> str:
        return (f"batch {r['batch']}, channels_last_3d {r['channels_last_3d']}, cudnn.benchmark "
                f"{r['cudnn_benchmark']}" if r else "")

    mae2 = [r for r in pre if r["method"] == "mae" and r["batch"] == min(s.batches) and not r["cudnn_benchmark"]]
    mem2 = max((r["peak_memory_gib"] for r in mae2 if r.get("peak_memory_gib") is not None), default=None)
    pred = [r for r in sections.get("predict", {}).get("runs", []) if r.get("status") == "ok" and r["tta"]]
    limit = round(FAKETENSOR_ESTIMATE_GIB * MEMORY_MARGIN, 2)
    return [
        target("S3D MAE step", f"<= 0.5 s/step at batch {big}", mae["median_s"] if mae else None,
               lambda v: v <= 0.5, "s", cfg(mae)),
        target("sparse <= dense", f"MAE step / dense step <= 1 at batch {big}",
               round(mae["median_s"] / dense["median_s"], 3) if mae and dense else None, lambda v: v <= 1.0, "x",
               f"MAE {cfg(mae)}; dense {cfg(dense)}"),
        target("MAE memory", f"peak at batch {min(s.batches)} <= {FAKETENSOR_ESTIMATE_GIB} GiB FakeTensor estimate "
               f"x {MEMORY_MARGIN}", mem2, lambda v: v <= limit, "GiB", "largest of the MAE rows"),
        target("conv throughput", f">= 35% of {s.peak_tflops:g} TFLOP/s", mae["peak_fraction"] if mae else None,
               lambda v: v >= 0.35, "fraction", f"MAE {cfg(mae)}"),
        target("predict with TTA", f"< 60 s per {'x'.join(map(str, s.predict_shape))} case",
               pred[0]["seconds_per_case"] if pred else None, lambda v: v < 60, "s", "bf16" if s.amp else "fp32"),
    ]


# ----------------------------------------------------------------------------------------- report
def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict) -> str:
    d = results["device_info"]
    st = results["settings"]
    lines = [f"# GPU check ({results['started']})", "",
             f"Device: {d.get('name')} (capability {d.get('capability', '-')}, {d.get('memory_gib', '-')} GiB); "
             f"torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}; amp {st['amp']}; "
             f"{'SMOKE RUN (tiny shapes, CPU)' if results['smoke'] else 'paper setting'}; "
             f"budget {results['budget_s']:g} s, used {results.get('elapsed_s', '-')} s.", "",
             f"Command: `{results['command']}`", "", "## Sections", "", "| section | status | seconds | note |",
             "| --- | --- | --- | --- |"]
    for name, sec in results["sections"].items():
        note = sec.get("error") or sec.get("reason") or sec.get("input") or ""
        lines.append(f"| {name} | {sec['status']} | {_fmt(sec.get('seconds'), 1)} | {str(note)[:200]} |")
    pre = results["sections"].get("pretrain", {}).get("runs", []) + results["sections"].get("compile", {}).get(
        "runs", [])
    if pre:
        lines += ["", f"## Pre-training step ({st['arch']}, {st['patch']}^3, median of the timed steps)", "",
                  "| method | batch | channels_last_3d | cudnn.benchmark | compiled | status | first step s | "
                  "s/step (median) | steps | peak GiB | conv TFLOP/s | % of peak |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in pre:
            pct = f"{100 * r['peak_fraction']:.1f}" if r.get("peak_fraction") is not None else "-"
            why = str(r.get("error") or r.get("reason"))[:80]
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {why}"
            lines.append(f"| {r['method']} | {r['batch']} | {r.get('channels_last_3d', False)} | "
                         f"{r.get('cudnn_benchmark', False)} | {r.get('compiled', False)} | "
                         f"{status} | {_fmt(r.get('compile_step_s', r.get('first_step_s')), 2)} | "
                         f"{_fmt(r.get('median_s'), 4)} | {_fmt(r.get('steps'))} | "
                         f"{_fmt(r.get('peak_memory_gib'), 2)} | "
                         f"{_fmt(r.get('conv_tflops'), 2)} | {pct} |")
    ft = results["sections"].get("finetune", {})
    if ft.get("median_s") is not None:
        aug = ft.get("augment", {})
        lines += ["", "## Fine-tuning step", "", "| arch | patch | batch | s/step (median) | steps | peak GiB | "
                  "conv TFLOP/s | augmentation s (share of step) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {ft['arch']} | {ft['patch'][0]}^3 | {ft['batch']} | {_fmt(ft['median_s'], 4)} | {ft['steps']} | "
                  f"{_fmt(ft.get('peak_memory_gib'), 2)} | {_fmt(ft.get('conv_tflops'), 2)} | "
                  f"{_fmt(aug.get('median_s'), 4)} ({_fmt(aug.get('fraction_of_step'), 3)}) |"]
    pr = results["sections"].get("predict", {})
    if pr.get("runs"):
        lines += ["", f"## Prediction ({'x'.join(map(str, pr['shape']))}, {pr['windows']} windows of "
                  f"{pr['patch'][0]}^3, batch {pr['batch']})", "",
                  "| TTA | status | seconds per case | network forwards | windows/s | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in pr["runs"]:
            lines.append(f"| {'on' if r['tta'] else 'off'} | {r['status']} | {_fmt(r.get('seconds_per_case'), 2)} | "
                         f"{_fmt(r.get('forwards'))} | {_fmt(r.get('windows_per_s'), 1)} | "
                         f"{_fmt(r.get('peak_memory_gib'), 2)} |")
    da = results["sections"].get("data", {})
    if da.get("runs"):
        lines += ["", f"## Data path (MAE step, {da['arch']}, {da['patch']}^3, batch {da['batch']})", "",
                  "| fed by | workers | status | s/step | steps/s |", "| --- | --- | --- | --- | --- |"]
        for r in da["runs"]:
            lines.append(f"| {r['feed']} | {r['workers']} | {r['status']} | {_fmt(r.get('s_per_step'), 4)} | "
                         f"{_fmt(r.get('steps_per_s'), 3)} |")
        if "loader_over_replay_steps_per_s" in da:
            lines += ["", f"loader / replay steps/s: **{da['loader_over_replay_steps_per_s']}**"]
    lines += ["", "## Targets (issue 17)", "", "| target | rule | measured | status |", "| --- | --- | --- | --- |"]
    for t in results.get("targets", []):
        flag = t["status"] if t["paper_setting"] else f"{t['status']} (not the paper setting)"
        lines.append(f"| {t['target']} | {t['rule']} | {_fmt(t['value'], 4)} {t['unit']} | **{flag}** |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT,
                    help="folder for gpu_check.json and gpu_check.md (default: $OUT, else %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: resenc-s, 32^3, batch 2, 3 steps")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total seconds; sections past it are skipped")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, help="default: all (all but compile with --smoke)")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (--smoke: cpu)")
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                    help="autocast (auto: bf16 on CUDA, off on CPU)")
    ap.add_argument("--arch", help="default resenc-l (--smoke: resenc-s)")
    ap.add_argument("--patch", type=int, help="cubic patch edge (default 160, --smoke 32)")
    ap.add_argument("--batches", type=int, nargs="+", help="pre-training batches (default 2 6, --smoke 2)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="pre-training steps to time (compile: all but simtrot)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3, --smoke 1)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 10, --smoke 3)")
    ap.add_argument("--predict-shape", type=int, nargs=3, help="default 512 512 300 (--smoke 64 64 40)")
    ap.add_argument("--predict-batch", type=int, default=2, help="sliding-window batch (s3d predict's default)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="folder holding the real scans (searched recursively; default %(default)s)")
    ap.add_argument("--workers", type=int, help="loader workers of the data section (default: "
                    "s3d.data.loader.default_workers(); --smoke 1)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                    help="the chip's dense bf16 peak the conv throughput is compared with (default: H200)")
    ap.add_argument("--compile-min-s", type=float, default=150.0,
                    help="start the compile section only with this much budget left")
    ap.add_argument("--fail", nargs="+", choices=SECTIONS, default=[], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    from s3d.data.loader import default_workers
    from s3d.device import amp_dtype, resolve_device

    device = torch.device("cpu") if args.smoke and args.device == "auto" else resolve_device(args.device)

    def pick(value: object, full: object, smoke: object) -> object:
        return value if value is not None else (smoke if args.smoke else full)

    return Settings(
        device=device, amp=amp_dtype(args.amp, device), arch=pick(args.arch, "resenc-l", "resenc-s"),
        patch=pick(args.patch, 160, 32), batches=tuple(pick(args.batches, (2, 6), (2,))), methods=tuple(args.methods),
        finetune_batch=2, warmup=pick(args.warmup, 3, 1), steps=pick(args.steps, 10, 3),
        predict_shape=tuple(pick(args.predict_shape, (512, 512, 300), (64, 64, 40))),
        predict_batch=args.predict_batch, scans=SMOKE_SCANS if args.smoke else DEVICE_SCANS, data=args.data,
        workers=pick(args.workers, default_workers(), 1), peak_tflops=args.peak_tflops,
        compile_min_s=args.compile_min_s, fail=tuple(args.fail))


def _on_alarm(signum: int, frame: object) -> None:
    raise BudgetExceeded("the section ran past the budget and was interrupted")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    s = settings_from(args)
    chosen = args.sections or [n for n in SECTIONS if not (args.smoke and n == "compile")]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    paper = (not args.smoke and s.arch == "resenc-l" and s.patch == 160 and s.device.type == "cuda")
    results: dict = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "smoke": args.smoke,
        "paper_setting": paper, "budget_s": args.budget_s, "device_info": device_info(s.device),
        "settings": s.to_dict(), "sections": {}, "targets": [],
    }

    def write() -> None:
        results["elapsed_s"] = round(budget.elapsed(), 1)
        results["targets"] = evaluate_targets(results, s, paper)
        write_atomic(out / "gpu_check.json", json.dumps(results, indent=1) + "\n")
        write_atomic(out / "gpu_check.md", markdown(results))

    # A section that outlives the budget by this much is interrupted (Python code, e.g. compilation, sees
    # the alarm at once; a running CUDA kernel finishes first).
    grace = max(30.0, 0.1 * args.budget_s)
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
    print(f"gpu_check: {results['device_info'].get('name')}, sections {' '.join(chosen)}, budget {args.budget_s:g} s",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        runners: dict[str, Callable[[dict], None]] = {
            "tests": lambda res: section_tests(s, budget, res),
            "pretrain": lambda res: section_pretrain(s, budget, res, write),
            "finetune": lambda res: section_finetune(s, budget, res, write),
            "predict": lambda res: section_predict(s, budget, res, write),
            "data": lambda res: section_data(s, budget, res, write, Path(tmp)),
            "compile": lambda res: section_compile(s, budget, res, write),
        }
        for name in SECTIONS:
            res: dict = {"status": "ok"}
            results["sections"][name] = res
            if name not in chosen:
                res.update(status="skipped", reason="not selected (--sections)")
                continue
            if budget.left() <= 0:
                res.update(status="skipped", reason="budget")
                write()
                continue
            t = time.perf_counter()
            if use_alarm:
                signal.alarm(max(1, math.ceil(budget.left() + grace)))
            try:
                if name in s.fail:
                    raise RuntimeError(f"--fail {name}: a planted failure, to check that the next section runs")
                runners[name](res)
            except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
                res.update(status="error", error=f"{type(e).__name__}: {str(e)[:1500]}",
                           traceback=traceback.format_exc()[-3000:])
                reset_memory(s.device)
            finally:
                if use_alarm:
                    signal.alarm(0)
            res["seconds"] = round(time.perf_counter() - t, 2)
            print(f"[{budget.elapsed():6.1f} s] {name}: {res['status']}"
                  + (f" ({res.get('error') or res.get('reason')})" if res["status"] != "ok" else ""), flush=True)
            write()
    write()
    print(markdown(results))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return results


if __name__ == "__main__":
    main()
