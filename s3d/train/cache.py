"""Raw image folders preprocessed once into a cache and reused by later runs."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from s3d.errors import S3DError


def default_cache_dir() -> Path:
    return Path(os.environ.get("S3D_CACHE", Path.home() / ".cache" / "s3d")) / "preprocessed"


def preprocessed_folder(folder: str | Path, spacing, *, norm: str | None = None, tag: str = "",  # noqa: ANN001
                        require_labels: bool = False, jobs: int = 1, cache_dir: Path | None = None) -> Path:
    """`folder` itself when it is an `s3d preprocess` output (has plan.json); otherwise the raw
    folder is validated and preprocessed at `spacing` (None: dataset median) into the cache, keyed by
    its resolved path, the spacing and `tag`, and the cached copy is reused on the next call."""
    from s3d.data.dataset import find_dataset
    from s3d.data.preprocess import plan_dataset, preprocess_dataset

    folder = Path(folder)
    if (folder / "plan.json").exists():
        return folder
    ds = None
    if require_labels:
        ds = find_dataset(folder)
        if not any(c.label is not None for c in ds.cases):
            raise S3DError(f"{folder}: no labels found (labelsTr/); fine-tuning needs a labeled nnU-Net dataset")
    key = "|".join([str(folder.resolve()), str(spacing), *([tag] if tag else [])])
    out = (cache_dir or default_cache_dir()) / f"{folder.name}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (out / "plan.json").exists() and not (out / "store.json").exists():
        # a cache of an older s3d (.npz volumes): rebuilt, never mixed with the blosc2 store
        tqdm.write(f"{out}: cache in the old .npz format; rebuilding it as a blosc2 store")
        shutil.rmtree(out)
    if not (out / "plan.json").exists():
        tqdm.write(f"preprocessing {folder} into {out}")
        ds = ds or find_dataset(folder)
        plan, _ = plan_dataset(ds, spacing=spacing if spacing is not None else "median", norm=norm)
        preprocess_dataset(ds, out, plan, jobs=jobs)
    return out
