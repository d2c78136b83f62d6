"""Weights and training state on disk: safetensors for tensors, JSON for everything else.

Nothing here unpickles: a run directory can be shared and loaded without trusting its author.
Every file is written under a temporary name and renamed, so a kill (or a full disk) never
leaves a half-written checkpoint behind; the previous one stays valid until the rename.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
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
STATE_JSON = "state.json"


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors file, atomically; tensors are made contiguous CPU copies (shared storage is allowed)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def tensors_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise S3DError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/foreign files
        raise S3DError(f"{path}: not a readable safetensors file ({e})") from None


def save_model(directory: str | Path, state_dict: Mapping[str, torch.Tensor], config: dict) -> None:
    """`directory/model.safetensors` + `directory/config.json`; the config is written last so its
    presence means the weights beside it are complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / MODEL_FILE, state_dict)
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
    optimiser buffers, step, RNG states. JSON is written last: it marks the state as complete."""
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
        "optimizer": opt_meta,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng_numpy": json_safe(list(np.random.get_state())),
        "rng_python": json_safe(list(random.getstate())),
        "extra": extra or {},
    }
    # Both files carry the step, so a kill between the two renames is detected at load time.
    save_tensors(directory / STATE_FILE, tensors, metadata={"step": str(int(step))})
    write_json(directory / STATE_JSON, meta)


def load_training_state(
    directory: str | Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, dict]:
    """Restore what `save_training_state` wrote; returns (step, extra)."""
    directory = Path(directory)
    meta = read_json(directory / STATE_JSON)
    tensors = load_tensors(directory / STATE_FILE)
    if tensors_metadata(directory / STATE_FILE).get("step") != str(meta["step"]):
        raise S3DError(f"{directory}: {STATE_FILE} and {STATE_JSON} disagree on the step (interrupted save)")
    module_sd = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    missing, unexpected = module.load_state_dict(module_sd, strict=False)
    if missing or unexpected:
        raise S3DError(
            f"{directory / STATE_FILE}: does not match this model "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys); was it written by another config?"
        )
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    kind, keys, pos, has_gauss, gauss = meta["rng_numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss or 0.0))
    version, internal, gauss_next = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss_next))
    return int(meta["step"]), meta.get("extra", {})


def has_training_state(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / STATE_JSON).exists() and (directory / STATE_FILE).exists()
