"""Tiny PNG previews (no imaging library needed): mid slices of volumes side by side."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from s3d.files import atomic_path


def write_png(path: str | Path, gray: np.ndarray) -> None:
    """Write a 2-D uint8 array as an 8-bit grayscale PNG (atomically)."""
    img = np.ascontiguousarray(gray, dtype=np.uint8)
    h, w = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))  # filter type 0 per scanline

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def to_uint8(slice_: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((slice_ - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def panel(volumes: list[np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Rows: the three orthogonal mid slices; columns: `volumes` (each (i,j,k)), windowed together
    on the first volume's 1-99 percentiles so reconstructions are comparable to the input."""
    lo, hi = np.percentile(volumes[0], [1, 99])
    rows = []
    for axis in range(3):
        tiles = []
        for v in volumes:
            s = np.take(v, v.shape[axis] // 2, axis=axis)
            tiles.append(np.rot90(to_uint8(s, lo, hi)))
        h = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, h - t.shape[0]), (0, gap)), constant_values=0) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, gap), (0, w - r.shape[1])), constant_values=0) for r in rows]
    img = np.concatenate(rows, axis=0)
    return np.kron(img, np.ones((scale, scale), dtype=np.uint8))
