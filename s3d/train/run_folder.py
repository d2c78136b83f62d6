"""A run folder has one owner and one set of settings.

While a process trains in a folder it holds an exclusive lock on `RUN/.s3d-lock` (flock: the kernel
drops it when the process dies, even by SIGKILL, so a killed run never leaves a stale lock). The
settings file (`finetune.json`, `pretrain.json`) is written once, when a new run is accepted; a
refused start never touches it, and `--resume` always continues with what is saved there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from s3d.checkpoint import STATE_FILE, find_training_state, has_training_state
from s3d.env import rank
from s3d.errors import S3DError
from s3d.files import read_json, write_json

LOCK_FILE = ".s3d-lock"
T = TypeVar("T")


def _is_main_rank() -> bool:
    return rank() == 0


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock for the block; S3DError at once when another process holds it.
    Under torchrun only rank 0 locks (the other ranks never write into the folder)."""
    if not _is_main_rank():
        yield
        return
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise S3DError(f"{run_dir}: another s3d process (pid {owner}) is training in this folder; "
                           "wait for it or pick another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for leftover in Path(run_dir).glob("*.tmp-*"):
            # with the lock held, a temporary file can only be a killed writer's: never a complete file
            if leftover.name.rsplit(".tmp-", 1)[1].split(".")[0].isdigit():
                leftover.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def begin_run(run_dir: str | Path, settings_file: str, resume: bool) -> dict | None:
    """Decide, before any work, whether this start is accepted; returns the saved settings to resume
    with, or None for a new run. Refuses (S3DError) a start without `--resume` in a folder that holds a
    run already, and a `--resume` whose state files exist but are all unusable."""
    run_dir = Path(run_dir)
    settings = run_dir / settings_file
    if not resume and not _is_main_rank():
        return None  # rank 0 decides; it may already have written the settings of this very start
    if not resume:
        # Only a checkpoint makes a run worth protecting: settings without one come from a start that
        # failed (a bad option, no GPU) or was killed before its first save, and a corrected start may
        # replace them.
        if has_training_state(run_dir):
            raise S3DError(f"{run_dir}: holds a run already ({STATE_FILE}); pass --resume to continue it or pick a "
                           "new folder")
        return None
    state = find_training_state(run_dir)  # an unusable state is an error now, not after preprocessing
    if not settings.exists():
        if state is not None:
            raise S3DError(f"{run_dir}: has {state.path.name} but no {settings_file}; cannot tell how it was "
                           "trained")
        return None
    saved = read_json(settings)
    if not isinstance(saved, dict):
        raise S3DError(f"{settings}: not a settings object (a JSON dict); was it edited?")
    return saved


def _type_name(hint: object) -> str:
    if hint is type(None):
        return "null"
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural.get(args[0], _type_name(args[0]))}"
        return f"a list of {len(args)} {' / '.join(sorted({plural.get(a, _type_name(a)) for a in args}))}"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "an object",
            list: "a list"}.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _fits(value: object, hint: object) -> bool:
    """Whether a JSON value can stand for a field of type `hint` (tuples are JSON lists; an integer is a
    number; bool is never an integer, although Python says so). Hints it does not know are accepted."""
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _as_field(value: object, hint: object) -> object:
    """JSON lists back into the tuples a tuple-typed field holds."""
    if isinstance(value, list) and any(typing.get_origin(a) is tuple
                                       for a in (hint, *typing.get_args(hint))):
        return tuple(value)
    return value


def settings_from_saved(cls: type[T], saved: dict, path: Path, **override: object) -> T:
    """The settings dataclass `cls` rebuilt from its saved dict (plus `override`); S3DError naming `path`
    for keys this version does not know or values it cannot take. Values are checked against the field
    types: an edited `"steps": "1000"` must stop here, not hours later inside the training loop."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise S3DError(f"{path}: unknown setting {unknown[0]!r} (written by another s3d version, or edited)")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot evaluate: skip the check, not the run
        hints = {}
    saved = dict(saved)
    for key, value in saved.items():
        hint = hints.get(key)
        if hint is None:
            continue
        if not _fits(value, hint):
            raise S3DError(f"{path}: setting {key!r} must be {_type_name(hint)}, got {json.dumps(value)} "
                           "(edited?)")
        saved[key] = _as_field(value, hint)
    try:
        return cls(**{**saved, **override})
    except (TypeError, ValueError) as e:
        raise S3DError(f"{path}: settings cannot be used ({' '.join(str(e).split())})") from None


def write_settings(run_dir: str | Path, settings_file: str, settings: dict) -> None:
    """The settings of an accepted new run (rank 0 only)."""
    if _is_main_rank():
        write_json(Path(run_dir) / settings_file, settings)
