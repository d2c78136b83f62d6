"""Atomic file writes and JSON that every reader accepts: one implementation for the whole package.

A kill, a full disk or an exception never leaves a half-written file under the final name: content
goes to `<name>.tmp-<pid>` in the same folder and is renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from s3d.errors import S3DError


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_suffix: str = "") -> Iterator[Path]:
    """Yield `<path>.tmp-<pid>`; renamed onto `path` when the block succeeds, removed when it fails.

    keep_suffix: a suffix of `path` that must stay last in the temporary name too (writers that pick
    the format from it, like blosc2's ".b2nd"): `<stem>.tmp-<pid><suffix>`.
    """
    path = Path(path)
    if keep_suffix and path.name.endswith(keep_suffix):
        tmp = path.with_name(f"{path.name[: -len(keep_suffix)]}.tmp-{os.getpid()}{keep_suffix}")
    else:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def json_safe(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays and paths converted, NaN/inf become None (null)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON atomically (see `json_safe`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parsed JSON, or an S3DError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise S3DError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise S3DError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None


def refuse_inputs(path: str | Path, inputs: tuple = (), *, what: str = "output folder",
                  inside_inputs_ok: bool = False) -> None:
    """S3DError when the output `path` is one of `inputs`, or lies inside one (unless inside_inputs_ok)."""
    resolved = Path(path).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if resolved == inp or (not inside_inputs_ok and inp.is_dir() and inp in resolved.parents):
            raise S3DError(f"{path}: the {what} must not be the input {inp}" + ("" if inside_inputs_ok
                                                                               else " or inside it"))


def prepare_output_dir(path: str | Path, *, inputs: tuple = (), what: str = "output folder",
                       inside_inputs_ok: bool = False) -> Path:
    """Create `path` (a folder) and check it is writable, before any work starts; S3DError in one line
    when it is, or lies inside, one of `inputs` (unless inside_inputs_ok), when a parent is a file, or
    when it cannot be created or written."""
    path = Path(path)
    resolved = path.resolve()
    refuse_inputs(path, inputs, what=what, inside_inputs_ok=inside_inputs_ok)
    for parent in (resolved, *resolved.parents):
        if parent.exists():
            if not parent.is_dir():
                raise S3DError(f"{path}: cannot create the {what}: {parent} is a file")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".s3d-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise S3DError(f"{path}: cannot write the {what} ({e.strerror or type(e).__name__})") from None
    return path
