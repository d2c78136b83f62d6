"""Helpers several test files share: a small real dataset, the CLI in-process, a kill at a pause point."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path


def hippocampus_subset(hippocampus_dir: Path, root: Path, n: int) -> Path:
    """The first `n` real hippocampus cases copied into `root` as an nnU-Net raw dataset."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (hippocampus_dir / "imagesTr").glob("*_0000.nii.gz"))
    for c in ids[:n]:
        shutil.copy(hippocampus_dir / "imagesTr" / f"{c}_0000.nii.gz", root / "imagesTr")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{c}.nii.gz", root / "labelsTr")
    meta = json.loads((hippocampus_dir / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": n}))
    return root


def run_s3d(args: list[str], capsys) -> tuple[int, str]:  # noqa: ANN001 - pytest's capsys
    """`s3d ARGS` in this process as the console script runs it: (exit code, everything printed)."""
    from s3d.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


def kill_when_paused(proc: subprocess.Popen, flag: Path, timeout: float = 120) -> None:
    """SIGKILL `proc` once it has written `flag` (an S3D_PAUSE_AT pause point); fail if it ends first."""
    deadline = time.time() + timeout
    while not flag.exists():
        assert proc.poll() is None, f"the run ended before the pause point:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "the pause point was never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
