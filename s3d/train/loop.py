"""The one training loop: fine-tuning and every pre-training method run through `train`.

A method is an *objective*: an `nn.Module` whose `forward(batch) -> (loss, logs)` does the whole
step's computation, optionally with `after_step(step)` (e.g. an EMA update) and
`frozen_parameters(step)` (parameters that must not move at this step, e.g. the encoder during the
decoder warm-up). The loop owns the optimiser, the schedule, AMP, DDP, checkpoints, resume and logs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from s3d.checkpoint import (
    PREVIOUS_STATE_FILE,
    find_training_state,
    has_training_state,
    load_training_state,
    save_training_state,
)
from s3d.device import amp_dtype, resolve_device
from s3d.env import world_size
from s3d.errors import S3DError
from s3d.files import atomic_path


@dataclass
class Phase:
    """A stretch of the LR schedule.

    kind: "warmup" (linear from ~0 to peak), "poly" (peak * (1 - t)^0.9, nnU-Net's PolyLR) or
    "constant". `frozen` names parameter groups that do not move during this phase.
    """

    kind: str
    steps: int
    frozen: tuple[str, ...] = ()


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-2  # nnU-Net's initial LR for SGD (S3D fine-tuning peaks at 1e-3)
    momentum: float = 0.99  # nnU-Net: SGD, Nesterov, momentum 0.99, weight decay 3e-5
    weight_decay: float = 3e-5
    nesterov: bool = True
    grad_clip: float = 12.0  # nnU-Net clips the gradient norm at 12
    phases: list[Phase] = field(default_factory=list)  # empty -> one poly phase over all steps
    checkpoint_every: int = 250
    val_every: int = 0  # 0: only at the end
    log_every: int = 10
    device: str = "auto"
    amp: str = "auto"  # auto: bf16 (fp16 + scaler if unsupported) on CUDA, off on CPU; or off|bf16|fp16
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["phases"] = [Phase(p["kind"], p["steps"], tuple(p.get("frozen", ()))) for p in d.get("phases", [])]
        return cls(**d)

    def schedule(self) -> list[Phase]:
        phases = list(self.phases) or [Phase("poly", self.steps)]
        if sum(p.steps for p in phases) != self.steps:
            raise S3DError(
                f"schedule phases add up to {sum(p.steps for p in phases)} steps but --steps is {self.steps}"
            )
        return phases


POLY_EXPONENT = 0.9  # nnU-Net PolyLRScheduler


def lr_factor(step: int, phases: list[Phase]) -> tuple[float, tuple[str, ...]]:
    """LR as a fraction of the peak at `step` (0-based) and the groups frozen then."""
    start = 0
    for phase in phases:
        if step < start + phase.steps:
            t = step - start
            if phase.kind == "warmup":
                return (t + 1) / phase.steps, phase.frozen
            if phase.kind == "poly":
                return (1 - t / phase.steps) ** POLY_EXPONENT, phase.frozen
            if phase.kind == "constant":
                return 1.0, phase.frozen
            raise ValueError(f"unknown schedule phase {phase.kind!r}")
        start += phase.steps
    return 0.0, ()


def check_lr(lr: float) -> None:
    """S3DError unless the peak learning rate can train: positive and finite."""
    if not (math.isfinite(lr) and lr > 0):
        raise S3DError(f"--lr {lr}: must be a positive number (nnU-Net 1e-2, S3D fine-tuning 1e-3)")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun; (rank, world_size)."""
    if world_size() <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


class _Logger:
    """Appends one row per logged step to log.csv (rank 0 only); columns grow as new keys appear."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        if path.exists():
            with path.open() as f:
                self.rows = list(csv.DictReader(f))

    def log(self, row: dict) -> None:
        self.rows = [r for r in self.rows if int(r["step"]) < int(row["step"])]  # drop rows after a resume point
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)


def _mean_logs(logs: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in logs for k in d}
    return {k: sum(d[k] for d in logs if k in d) / sum(1 for d in logs if k in d) for k in sorted(keys)}


def train(
    objective: nn.Module,
    make_batches: Callable[[int], Iterable[dict]],
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    param_groups: Callable[[nn.Module], dict[str, list[nn.Parameter]]] | None = None,
    export: Callable[[nn.Module, int], None] | None = None,
    validate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    resume: bool = False,
    desc: str = "train",
) -> nn.Module:
    """Run `cfg.steps` optimiser steps of `objective` and return it (unwrapped from DDP).

    make_batches(start_step) yields batches (dicts of CPU tensors) forever; it is re-created on
    resume so that data order is a function of (seed, start step, rank).
    param_groups(objective) splits trainable parameters into named groups (names usable in
    `Phase.frozen`); default: one group "all".
    export(objective, step) writes the user-facing weights (rank 0, at every checkpoint and the end).
    validate(objective, step) returns metrics to log (rank 0, every cfg.val_every steps and at the end).
    """
    run_dir = Path(run_dir)
    check_lr(cfg.lr)
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    main_rank = rank == 0
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)

    objective.to(device)
    groups = (param_groups or (lambda m: {"all": [p for p in m.parameters() if p.requires_grad]}))(objective)
    group_names = list(groups)
    optimizer = torch.optim.SGD(
        [{"params": ps, "name": n} for n, ps in groups.items()],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    phases = cfg.schedule()

    start = 0
    state = find_training_state(run_dir) if resume else None
    if state is not None:
        start, _ = load_training_state(run_dir, objective, optimizer, scaler, state=state)
        if main_rank:
            origin = "previous state " if state.path.name == PREVIOUS_STATE_FILE else ""
            tqdm.write(f"resuming {run_dir} at step {start}/{cfg.steps} from {origin}{state.path.name} "
                       f"(saved {state.saved})" + (f"; {state.note}" if state.note else ""))
            if export is not None:
                export(objective, start)  # a kill during the last export may have left it one save behind
    elif resume and main_rank:
        tqdm.write(f"resuming {run_dir}: no checkpoint was written yet, starting at step 0/{cfg.steps}")
    elif has_training_state(run_dir) and main_rank:
        raise S3DError(f"{run_dir}: holds a training state already; pass --resume to continue it or pick a new folder")
    torch.manual_seed(cfg.seed * 1000 + rank + start)

    model: nn.Module = objective
    if world > 1:
        # static_graph: the same parameters go unused at every step (seg heads that deep supervision
        # weighs 0, the MAE decoder's unused heads), which plain DDP rejects as an error.
        model = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
        )

    logger = _Logger(run_dir / "log.csv") if main_rank else None
    params_by_group = {n: [p for p in groups[n]] for n in group_names}
    all_params = [p for ps in params_by_group.values() for p in ps]

    def checkpoint(step: int) -> None:
        if main_rank:
            save_training_state(run_dir, objective, optimizer, step, scaler=scaler)
            if export is not None:
                export(objective, step)

    step = start
    batches: Iterator[dict] = iter(make_batches(start))
    recent: list[dict[str, float]] = []
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not main_rank, dynamic_ncols=True)
    objective.train()
    try:
        while step < cfg.steps:
            factor, frozen = lr_factor(step, phases)
            for g in optimizer.param_groups:
                g["lr"] = 0.0 if g["name"] in frozen else cfg.lr * factor
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                     for k, v in next(batches).items()}
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, logs = model(batch)
            if not torch.isfinite(loss):
                raise S3DError(f"loss became {loss.item()} at step {step}: lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for name in frozen:
                # grad=None makes SGD skip the parameter entirely (no momentum, no weight decay):
                # works the same with and without DDP, unlike toggling requires_grad.
                for p in params_by_group.get(name, []):
                    p.grad = None
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in all_params if p.grad is not None], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if hasattr(objective, "after_step"):
                objective.after_step(step)
            step += 1
            recent.append({"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}})
            bar.update(1)
            lr_now = max(g["lr"] for g in optimizer.param_groups)
            bar.set_postfix(loss=f"{recent[-1]['loss']:.4f}", lr=f"{lr_now:.2e}")
            if main_rank and (step % cfg.log_every == 0 or step == cfg.steps):
                row = {"step": step, "lr": lr_now, "grad_norm": float(grad_norm), **_mean_logs(recent)}
                logger.log(row)
                recent = []
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step)
            if validate is not None and main_rank and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
                _run_validation(validate, objective, step, run_dir)
                objective.train()
    finally:
        bar.close()
    checkpoint(step)
    if validate is not None and main_rank:
        _run_validation(validate, objective, step, run_dir)
    if world > 1:
        dist.barrier()
    return objective


def _run_validation(validate: Callable, objective: nn.Module, step: int, run_dir: Path) -> None:
    objective.eval()
    metrics = validate(objective, step)
    with (run_dir / "validation.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                            for k, v in metrics.items()}}) + "\n")
    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
