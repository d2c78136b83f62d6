"""Numbers read from the environment (torchrun's RANK / WORLD_SIZE, s3d's own settings): a malformed
value is one line naming the variable, not a ValueError traceback from deep inside a run."""

from __future__ import annotations

import os

from s3d.errors import S3DError


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """`$name` as an integer >= minimum, `default` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise S3DError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise S3DError(f"environment variable {name}={raw!r}: must be >= {minimum}")
    return value


def rank() -> int:
    """This process's global rank under torchrun (0 without it)."""
    return env_int("RANK", 0)


def world_size() -> int:
    """Number of torchrun processes (1 without it); RANK must be set when it is above 1."""
    world = env_int("WORLD_SIZE", 1, minimum=1)
    if world > 1 and not os.environ.get("RANK", "").strip():
        raise S3DError(f"WORLD_SIZE={world} but RANK is not set: start multi-process runs with torchrun")
    return world
