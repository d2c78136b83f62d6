"""Shared fixtures: the real scans in ../shared/data (override with S3D_TEST_DATA=/path/to/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))

# Tests run on 2 CPU cores in CI; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set S3D_TEST_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    return _need(DATA / "Dataset004_Hippocampus")


@pytest.fixture(scope="session")
def unlabeled_dir() -> Path:
    return _need(DATA / "unlabeled")


@pytest.fixture(scope="session")
def edge_cases_dir() -> Path:
    return _need(DATA / "edge_cases")
