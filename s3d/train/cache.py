"""Raw image folders preprocessed once into a cache and reused by later runs."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from s3d.errors import S3DError
from s3d.files import read_json, write_json


def default_cache_dir() -> Path:
    return Path(os.environ.get("S3D_CACHE", Path.home() / ".cache" / "s3d")) / "preprocessed"


def cache_folder(name: str, key: list[str], cache_dir: Path | None = None) -> Path:
    """The cache folder for the inputs described by `key` (paths, settings): `NAME_<hash of key>`."""
    digest = hashlib.sha1("|".join(key).encode()).hexdigest()[:10]
    return (cache_dir or default_cache_dir()) / f"{name}_{digest}"


def preprocessed_folder(folder: str | Path, spacing, *, norm: str | None = None, tag: str = "",  # noqa: ANN001
                        require_labels: bool = False, jobs: int = 1, cache_dir: Path | None = None) -> Path:
    """`folder` itself when it is an `s3d preprocess` output (has plan.json); otherwise the raw
    folder is validated and preprocessed at `spacing` (None: dataset median) into the cache, keyed by
    its resolved path, the spacing and `tag`. The cached copy is reused while the dataset's files
    are unchanged (sizes and modification times); after an edit, addition or removal the dataset is
    validated again and only what changed is preprocessed again."""
    from s3d.data.dataset import find_dataset
    from s3d.data.preprocess import Plan, _dataset_key, plan_dataset, preprocess_dataset

    folder = Path(folder)
    if (folder / "plan.json").exists():
        return folder
    ds = find_dataset(folder)
    if require_labels and not any(c.label is not None for c in ds.cases):
        raise S3DError(f"{folder}: no labels found (labelsTr/); fine-tuning needs a labeled nnU-Net dataset")
    out = cache_folder(folder.name, [str(folder.resolve()), str(spacing), *([tag] if tag else [])], cache_dir)
    if (out / "plan.json").exists() and not (out / "store.json").exists():
        # a cache of an older s3d (.npz volumes): rebuilt, never mixed with the blosc2 store
        tqdm.write(f"{out}: cache in the old .npz format; rebuilding it as a blosc2 store")
        shutil.rmtree(out)
    source = _dataset_key(ds)
    source_file = out / "source.json"
    if (out / "plan.json").exists():
        if source_file.is_file() and read_json(source_file).get("dataset_key") == source:
            return out
        tqdm.write(f"{folder} changed since it was preprocessed into {out}: checking it again and "
                   "preprocessing the cases that changed")
    else:
        tqdm.write(f"preprocessing {folder} into {out}")
    plan, _ = plan_dataset(ds, spacing=spacing if spacing is not None else "median", norm=norm)
    old_plan = read_json(out / "plan.json") if (out / "plan.json").exists() else None
    # a changed dataset can change the plan itself (median spacing, CT statistics): then every case is redone
    changed_plan = old_plan is not None and Plan.from_dict(old_plan).to_dict() != plan.to_dict()
    preprocess_dataset(ds, out, plan, jobs=jobs, overwrite=changed_plan)
    write_json(source_file, {"dataset_key": source, "folder": str(folder.resolve())})
    return out
