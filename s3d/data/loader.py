"""The DataLoader that feeds training: PatchDataset batches cut in worker processes.

Augmentation stays on the training device (s3d.data.augment runs batched on the GPU); workers only
decompress and crop, which is why a few of them keep a GPU busy.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.data import DataLoader

from s3d.env import env_int
from s3d.messages import active, install_in_worker

# Batches each worker prepares ahead (DataLoader's prefetch_factor): enough to hide the jitter of a
# slow read, few enough that W workers hold 2W batches at most.
PREFETCH = 2
# nnU-Net v2 uses 12 augmentation processes per GPU by default (nnUNet_n_proc_DA); ours only crop,
# so 8 are plenty.
MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Loader processes per training process: the cores this process may use, shared among the
    torchrun processes of this machine, minus one for the training process itself, at most 8."""
    per_process = available_cores() // env_int("LOCAL_WORLD_SIZE", 1, minimum=1)
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


def _worker_init(_: int, show_messages: bool = False) -> None:
    # every worker is one of several processes on the cores: more threads would only contend
    torch.set_num_threads(1)
    install_in_worker(show_messages)  # a spawned worker (macOS, Windows) starts without the CLI's
    try:
        import blosc2

        blosc2.set_nthreads(1)
    except ImportError:  # pragma: no cover - blosc2 is a dependency
        pass


def make_loader(dataset: torch.utils.data.IterableDataset, workers: int, device: torch.device) -> DataLoader:
    """An endless DataLoader over `dataset` (which yields whole batches).

    workers = 0 cuts patches in the training process. Memory is pinned for fast copies to CUDA.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    kwargs: dict = {}
    if workers > 0:
        kwargs = {"prefetch_factor": PREFETCH, "persistent_workers": True,
                  "worker_init_fn": functools.partial(_worker_init, show_messages=active())}
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda", **kwargs)
