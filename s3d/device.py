"""Where tensors live and in which precision they compute: shared by training and prediction.

Neither training nor inference owns these choices, so they sit below both (`train` and `predict`
import from here; nothing here imports from them).
"""

from __future__ import annotations

import os

import torch

from s3d.env import env_int
from s3d.errors import S3DError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`; under torchrun, the local rank's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise S3DError(f"--device {spec}: no CUDA device is available (use --device cpu)")
        if spec == "cuda" and "LOCAL_RANK" in os.environ:
            spec = f"cuda:{env_int('LOCAL_RANK', 0)}"
    elif spec != "cpu":
        raise S3DError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return torch.device(spec)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp SETTING` on `device`, or None for full fp32.

    `auto` is bf16 on CUDA and fp32 on CPU: on CPUs without native bf16 the emulation is slower than fp32.
    GPUs without bf16 (before Ampere) get fp16 instead.
    """
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "fp16":
        return torch.float16
    if setting in ("bf16", "auto"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    raise S3DError(f"--amp {setting}: expected {', '.join(AMP_CHOICES)}")


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 / AMX), so bf16 autocast pays off there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
