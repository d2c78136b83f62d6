"""benchmarks/gpu_check.py on the CPU: what its JSON says, not how fast anything is.

The script runs on a lent GPU once per session at most; these runs make sure that a kill, an OOM or
a spent budget there still leaves a readable report, and that its FLOP and step counts are right.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _load_script():  # noqa: ANN202 - the module
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "gpu_check.md").is_file()
    return json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run: two pre-training methods, a planted failure in finetune, then predict on a 1-window volume."""
    out = tmp_path_factory.mktemp("gpu_check")
    return _run(out, "--sections", "tests", "pretrain", "finetune", "predict", "--methods", "dense", "mae",
                "--steps", "4", "--warmup", "1", "--predict-shape", "32", "40", "32", "--fail", "finetune")


def test_report_structure(smoke: dict) -> None:
    assert smoke["smoke"] is True and smoke["paper_setting"] is False
    info = smoke["device_info"]
    assert {"torch", "cuda", "name", "device"} <= set(info)
    assert list(smoke["sections"]) == ["tests", "pretrain", "finetune", "predict", "data", "compile"]
    # without a GPU the CUDA-only tests are recorded as skipped, with the reason
    assert smoke["sections"]["tests"]["status"] == "skipped"
    assert "CUDA" in smoke["sections"]["tests"]["reason"]
    for name in ("data", "compile"):
        assert smoke["sections"][name] == {"status": "skipped", "reason": "not selected (--sections)"}
    targets = {t["target"]: t for t in smoke["targets"]}
    assert set(targets) == {"S3D MAE step", "sparse <= dense", "MAE memory", "conv throughput", "predict with TTA"}
    assert all(t["status"] in ("pass", "miss", "not measured") and not t["paper_setting"] for t in targets.values())
    # no CUDA memory figure on a CPU, so that target cannot be judged
    assert targets["MAE memory"]["status"] == "not measured"
    mae = min((r for r in smoke["sections"]["pretrain"]["runs"] if r["method"] == "mae"), key=lambda r: r["median_s"])
    assert targets["S3D MAE step"]["value"] == mae["median_s"]
    assert targets["S3D MAE step"]["status"] == ("pass" if mae["median_s"] <= 0.5 else "miss")


def test_pretrain_rows(smoke: dict) -> None:
    runs = smoke["sections"]["pretrain"]["runs"]
    # dense and mae, each with and without channels_last_3d, mae with cudnn.benchmark, and the emulated mae
    assert [(r["method"], r["channels_last_3d"], r["cudnn_benchmark"]) for r in runs] == [
        ("dense", False, False), ("dense", True, False), ("mae", False, False), ("mae", True, False),
        ("mae", False, True), ("mae-emulated", False, False)]
    for r in runs:
        assert r["status"] == "ok", r.get("error")
        assert r["steps"] == 4 and len(r["step_s"]) == 4 and not r["truncated"]
        assert r["median_s"] == pytest.approx(statistics.median(r["step_s"]), abs=1e-5)
        assert r["conv_flops_per_step"] == 3 * r["conv_flops_forward"]
        # the first conv is the stem: 1 input channel, 3^3 kernel, stride 1, at 32^3 x batch 2 on the dense
        # paths and on the visible e^3 cells (input: the cells with a one-voxel halo) on the block-sparse one,
        # where the masking (60-90% of the cells) leaves 10-40% of them
        first = r["first_conv"]
        assert first["type"] == "Conv3d" and first["in_channels"] == 1 and first["kernel"] == [3, 3, 3]
        if r["method"] == "mae":
            n, e = first["output_shape"][0], first["output_shape"][2]
            assert 32 % e == 0 and first["output_shape"] == [n, first["out_channels"], e, e, e]
            assert 2 * (32 // e) ** 3 * 0.1 <= n <= 2 * (32 // e) ** 3 * 0.4
            assert first["input_shape"] == [n, 1, e + 2, e + 2, e + 2]
        else:
            assert first["output_shape"] == [2, first["out_channels"], 32, 32, 32]
        assert first["flops"] == 2 * math.prod(first["output_shape"]) * 1 * 27
    by = {(r["method"], r["channels_last_3d"], r["cudnn_benchmark"]): r for r in runs}
    # the memory format changes no FLOP; the emulated MAE step adds the densification convs to the dense
    # network; the block-sparse one skips the hidden cells of its high-resolution stages
    assert by[("dense", False, False)]["conv_flops_forward"] == by[("dense", True, False)]["conv_flops_forward"]
    emulated = by[("mae-emulated", False, False)]["conv_flops_forward"]
    assert emulated > by[("dense", False, False)]["conv_flops_forward"]
    assert by[("mae", False, False)]["conv_flops_forward"] < 0.8 * emulated


def test_failure_is_recorded_and_next_section_runs(smoke: dict) -> None:
    ft = smoke["sections"]["finetune"]
    assert ft["status"] == "error" and "planted failure" in ft["error"] and "Traceback" in ft["traceback"]
    pred = smoke["sections"]["predict"]
    assert pred["status"] == "ok"
    assert pred["windows"] == 1 * 2 * 1  # 32x40x32 in 32^3 windows at half overlap
    off, on = pred["runs"]
    assert (off["tta"], off["forwards"], on["tta"], on["forwards"]) == (False, 2, True, 16)


def test_tiny_budget_skips_every_section(tmp_path: Path) -> None:
    res = _run(tmp_path, "--budget-s", "0.001", "--sections", "pretrain", "predict")
    assert res["sections"]["pretrain"] == {"status": "skipped", "reason": "budget"}
    assert res["sections"]["predict"] == {"status": "skipped", "reason": "budget"}
    assert all(t["status"] == "not measured" for t in res["targets"])


def test_conv_flop_formula() -> None:
    gc = _load_script()
    conv = nn.Conv3d(4, 6, kernel_size=(3, 1, 3), groups=2, padding=(1, 0, 1))
    up = nn.ConvTranspose3d(6, 4, kernel_size=2, stride=2)
    x = torch.zeros(2, 4, 5, 6, 7)
    with gc.count_conv_flops() as rec:
        y = up(conv(x))
        # a functional conv (as the block-sparse cells run theirs) counts as well: 2*3*5*6*7 outputs x 4 x 1
        nn.functional.conv3d(y[:, :, :5, :6, :7], torch.zeros(3, 4, 1, 1, 1))
    # conv: each of 2*6*5*6*7 outputs sums 4/2 channels x 9 taps; transposed: each of the 2*6*5*6*7
    # inputs goes to 4 channels x 8 taps
    assert rec["calls"] == 3
    assert rec["first"]["flops"] == 2 * (2 * 6 * 5 * 6 * 7) * 2 * 9
    assert rec["first"]["in_channels"] == 4 and rec["first"]["out_channels"] == 6 and rec["first"]["groups"] == 2
    assert rec["flops"] == (2 * (2 * 6 * 5 * 6 * 7) * 2 * 9 + 2 * (2 * 6 * 5 * 6 * 7) * 4 * 8
                            + 2 * (2 * 3 * 5 * 6 * 7) * 4)
    assert tuple(y.shape) == (2, 4, 10, 12, 14)
