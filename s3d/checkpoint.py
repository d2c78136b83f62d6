"""Weights and training state on disk: safetensors for tensors, JSON for everything else.

Nothing here unpickles: a run directory can be shared and loaded without trusting its author.
Every file is written under a temporary name and renamed, so a kill (or a full disk) never
leaves a half-written file behind.

The training state is one file, `state.safetensors`: tensors plus the step, optimiser layout and
RNG states as JSON in its metadata, so no kill can separate the two. Saving keeps the previous
state as `state.prev.safetensors` until the new one is in place, and loading falls back to it when
the newest is missing or damaged: the last complete checkpoint is never lost.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s3d.errors import S3DError
from s3d.files import atomic_path, json_safe, read_json, write_json  # noqa: F401 - re-exported

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.safetensors"
PREVIOUS_STATE_FILE = "state.prev.safetensors"
STATE_JSON = "state.json"  # earlier s3d builds kept the metadata beside the tensors; still read
STATE_FORMAT = "s3d-training-state"
STATE_VERSION = "2"


def pause_point(name: str) -> None:
    """Test hook for kill tests: with S3D_PAUSE_AT="NAME:N:FLAGFILE" the N-th time the process passes
    the point NAME it writes FLAGFILE and sleeps, so that a test can SIGKILL it exactly there."""
    spec = os.environ.get("S3D_PAUSE_AT")
    if not spec:
        return
    want, count, flag = spec.split(":", 2)
    if want != name:
        return
    _PAUSE_COUNTS[name] = _PAUSE_COUNTS.get(name, 0) + 1
    if _PAUSE_COUNTS[name] == int(count):
        Path(flag).write_text(str(os.getpid()))
        time.sleep(3600)


_PAUSE_COUNTS: dict[str, int] = {}


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None,
    *, durable: bool = False,
) -> None:
    """safetensors file, atomically; tensors are made contiguous CPU copies (shared storage is allowed).
    durable: flush the file to disk before the rename, so a power cut cannot leave an empty file."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())


def tensors_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise S3DError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for truncated/foreign files
        raise S3DError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise S3DError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/foreign files
        raise S3DError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def save_model(directory: str | Path, state_dict: Mapping[str, torch.Tensor], config: dict) -> None:
    """`directory/model.safetensors` + `directory/config.json`; the config is written last so its
    presence means the weights beside it are complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / MODEL_FILE, state_dict)
    pause_point("model-written")
    write_json(directory / CONFIG_FILE, config)


def load_model(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() or not (directory / MODEL_FILE).exists():
        raise S3DError(f"{directory}: not a model folder (needs {MODEL_FILE} and {CONFIG_FILE})")
    return load_tensors(directory / MODEL_FILE, device), read_json(directory / CONFIG_FILE)


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, pstate in opt_state["state"].items():
        meta["state"][str(idx)] = {}
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
                meta["state"][str(idx)][name] = "__tensor__"
            else:
                meta["state"][str(idx)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for idx, pstate in meta["state"].items():
        state[int(idx)] = {
            name: tensors[f"optimizer.{idx}.{name}"] if value == "__tensor__" else value
            for name, value in pstate.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    directory: str | Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Everything needed to continue a run: the trained module (objective incl. heads/EMA targets),
    optimiser buffers, step, RNG states, in one file. The state it replaces becomes
    `state.prev.safetensors` and stays there until the next save."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "step": int(step),
        "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
        "optimizer": opt_meta,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng_numpy": json_safe(list(np.random.get_state())),
        "rng_python": json_safe(list(random.getstate())),
        "extra": extra or {},
    }
    metadata = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": str(int(step)),
                "meta": json.dumps(json_safe(meta), allow_nan=False)}
    final, previous = directory / STATE_FILE, directory / PREVIOUS_STATE_FILE
    # Written completely (and flushed) under a temporary name first; then the old state steps aside
    # and the new one takes its name. A kill at any point leaves one complete state to resume from.
    tmp = directory / f"{STATE_FILE}.tmp-{os.getpid()}"
    try:
        save_tensors(tmp, tensors, metadata, durable=True)
        pause_point("state-written")
        if final.exists():
            os.replace(final, previous)
            pause_point("state-moved-aside")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    (directory / STATE_JSON).unlink(missing_ok=True)  # a pre-0.5 pair would shadow nothing, but confuses


@dataclass
class StateFile:
    """A complete training state found on disk: which file, its step and when it was saved."""

    path: Path
    step: int
    saved: str
    note: str = ""  # why an older file is used, when the newest could not be


def _complete_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of `path` after checking, from its header alone, that the file holds
    every byte the header promises: a resume decides which state to use without reading gigabytes."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 << 20:  # safetensors caps its header at 100 MB
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise S3DError(f"{path}: damaged or not a safetensors file ({' '.join(str(e).split())})") from None
    if path.stat().st_size < 8 + size + end:
        raise S3DError(f"{path}: damaged or not a safetensors file (truncated: {path.stat().st_size} bytes, the "
                       f"header needs {8 + size + end})")
    return header.get("__metadata__") or {}


def _read_meta(path: Path) -> dict:
    """The training metadata of one state file, or S3DError saying what is wrong with the file."""
    if not path.exists():
        raise S3DError(f"{path}: file not found")
    metadata = _complete_metadata(path)
    if metadata.get("format") == STATE_FORMAT:
        try:
            meta = json.loads(metadata["meta"])
            int(meta["step"]), meta["optimizer"]["state"], meta["optimizer"]["param_groups"]
        except (KeyError, TypeError, ValueError) as e:
            raise S3DError(f"{path}: not a complete s3d training state (metadata: {e!r})") from None
    else:
        legacy = path.with_name(STATE_JSON)
        if not legacy.exists():
            raise S3DError(f"{path}: not an s3d training state (no training metadata, and no {STATE_JSON})")
        meta = read_json(legacy)
        if not isinstance(meta, dict) or not {"step", "optimizer"} <= set(meta):
            raise S3DError(f"{legacy}: not an s3d training state (needs step and optimizer)")
        if metadata.get("step") != str(meta["step"]):
            raise S3DError(f"{path.parent}: {path.name} and {STATE_JSON} disagree on the step (interrupted save "
                           "by an earlier s3d build)")
    return meta


def find_training_state(directory: str | Path) -> StateFile | None:
    """The newest complete state in `directory` (`state.safetensors`, else `state.prev.safetensors`),
    None when there is none at all; S3DError when files exist but none is usable."""
    directory = Path(directory)
    final, previous = directory / STATE_FILE, directory / PREVIOUS_STATE_FILE
    problems = []
    for path in (final, previous):
        if not path.exists():
            continue
        try:
            meta = _read_meta(path)
        except S3DError as e:
            problems.append(str(e))
            continue
        note = ""
        if path == previous:
            note = (f"{final.name} is missing (killed while saving)" if not problems
                    else f"the newest state is unusable: {problems[0]}")
        return StateFile(path, int(meta["step"]), str(meta.get("saved", "unknown time")), note)
    if problems:
        raise S3DError(problems[0] + " (and no earlier state to fall back to)")
    if (directory / STATE_JSON).exists():
        raise S3DError(f"{directory}: has {STATE_JSON} but its {STATE_FILE} is missing; cannot resume")
    return None


def load_training_state(
    directory: str | Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    state: StateFile | None = None,
) -> tuple[int, dict]:
    """Restore what `save_training_state` wrote (the file `state`, default: find_training_state);
    returns (step, extra)."""
    directory = Path(directory)
    state = state or find_training_state(directory)
    if state is None:
        raise S3DError(f"{directory}: no training state ({STATE_FILE}) to resume from")
    from s3d.model_check import tensor_mismatch

    meta = _read_meta(state.path)
    tensors = load_tensors(state.path)
    module_sd = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    mismatch = tensor_mismatch(module.state_dict(), module_sd)
    if mismatch:
        raise S3DError(f"{state.path}: does not match this model ({mismatch}); was it written by another config?")
    module.load_state_dict(module_sd)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (KeyError, ValueError, TypeError) as e:
        raise S3DError(f"{state.path}: its optimiser state does not fit this run ({' '.join(str(e).split())})"
                       ) from None
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if meta.get("rng_numpy"):
        kind, keys, pos, has_gauss, gauss = meta["rng_numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss or 0.0))
    if meta.get("rng_python"):
        version, internal, gauss_next = meta["rng_python"]
        random.setstate((version, tuple(internal), gauss_next))
    return int(meta["step"]), meta.get("extra", {})


def has_training_state(directory: str | Path) -> bool:
    """Whether `directory` holds any training state file (complete or not)."""
    directory = Path(directory)
    return any((directory / n).exists() for n in (STATE_FILE, PREVIOUS_STATE_FILE, STATE_JSON))
