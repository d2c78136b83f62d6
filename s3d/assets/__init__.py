"""Data shipped inside the package: the real labelled scans `s3d demo` trains on (CC BY-SA 4.0)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_DATASET = "Dataset004_Hippocampus"


def demo_dataset() -> Path:
    """The bundled 24-case hippocampus dataset (nnU-Net raw format) as a folder on disk."""
    # setuptools installs package data as plain files (wheels are never zip-imported here), so the
    # Traversable is a real directory; fail loudly if a zipped install ever breaks that assumption
    root = resources.files(__name__) / DEMO_DATASET
    path = Path(str(root))
    if not (path / "dataset.json").is_file():
        from s3d.errors import S3DError

        raise S3DError(f"{path}: the demo dataset is missing from this s3d install (reinstall s3d-ssl)")
    return path
