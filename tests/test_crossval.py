"""Cross-validation on real hippocampus scans (6 cases, 2 folds, 3 steps, 32^3 patches): a fold killed
mid-training resumes without retraining the finished one, the out-of-fold results and the postprocessing
decision are written, and `s3d predict` ensembles folds and runs (and refuses runs of other labels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import nibabel as nib
import numpy as np
import pytest
from helpers import hippocampus_subset, kill_when_paused

from s3d.cli import main

N_CASES = 6
STEPS = 3
COMMON = ["--steps", str(STEPS), "--patch-size", "32", "32", "32", "--device", "cpu", "--workers", "0",
          "--val-every", "0", "--checkpoint-every", "1", "--no-tta", "-j", "1"]


@pytest.fixture(scope="module")
def trained(hippocampus_dir, tmp_path_factory) -> dict:
    """Folds 0 and 1, killed (SIGKILL) while fold 1 saves its step-2 state, then resumed."""
    tmp = tmp_path_factory.mktemp("crossval")
    ds = hippocampus_subset(hippocampus_dir, tmp / "ds", N_CASES)
    run, cache, flag = tmp / "run", tmp / "cache", tmp / "paused"
    args = ["finetune", str(ds), str(run), "--folds", "0", "1", *COMMON, "--cache-dir", str(cache)]
    # fold 0 saves states at steps 1, 2 and 3; the 5th save is fold 1's at step 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "S3D_PAUSE_AT": f"state-written:5:{flag}"}
    proc = subprocess.Popen([sys.executable, "-m", "s3d", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    kill_when_paused(proc, flag, timeout=240)
    fold0 = run / "fold_0"
    assert (fold0 / "validation" / "summary.json").is_file()
    assert not (run / "crossval" / "summary.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in fold0.iterdir() if p.is_file()}
    return {"ds": ds, "run": run, "args": args, "stamps": stamps, "tmp": tmp}


def test_a_killed_fold_resumes_and_the_finished_fold_is_not_retrained(trained, capsys):
    run = trained["run"]
    with pytest.raises(SystemExit) as refused:
        main(trained["args"])  # without --resume a run with trained folds is refused, untouched
    assert refused.value.code == 2
    assert "pass --resume" in capsys.readouterr().err
    main([*trained["args"], "--resume"])
    out = capsys.readouterr().out
    assert "fold 0: finished earlier" in out
    assert "at step 1/3" in out  # fold 1 continues from its last complete state
    fold0 = run / "fold_0"
    assert {p.name: p.stat().st_mtime_ns for p in fold0.iterdir() if p.is_file()} == trained["stamps"]
    for k in (0, 1):
        assert json.loads((run / f"fold_{k}" / "config.json").read_text())["step"] == STEPS
    # every case of the 6 is validated exactly once over the 5-fold split; folds 0 and 1 hold 3 of them
    val = {k: json.loads((run / f"fold_{k}" / "config.json").read_text())["data"]["val_cases"] for k in (0, 1)}
    assert not set(val[0]) & set(val[1])
    cv = json.loads((run / "crossval" / "summary.json").read_text())
    names = sorted(Path(c["reference_file"]).name for c in cv["metric_per_case"])
    assert names == sorted(f"{c}.nii.gz" for c in val[0] + val[1])
    assert set(cv["mean"]) == {"1", "2"} and {"Dice", "NSD", "HD95"} <= set(cv["foreground_mean"])
    decision = json.loads((run / "postprocessing.json").read_text())
    assert decision["n_cases"] == len(names) and decision["folds"] == [0, 1]
    # a second --resume finds everything finished and trains nothing
    main([*trained["args"], "--resume"])
    assert capsys.readouterr().out.count("finished earlier") == 2


def _one_case_input(trained) -> Path:
    images = trained["tmp"] / "images"
    if not images.exists():
        images.mkdir()
        src = sorted((trained["ds"] / "imagesTr").iterdir())[0]
        shutil.copy(src, images)
    return images


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def _probs(folder: Path) -> np.ndarray:
    files = sorted((folder / "probabilities").glob("*_prob*.nii.gz"))
    return np.stack([nib.load(str(f)).get_fdata(dtype=np.float32) for f in files])


def _seg(folder: Path) -> np.ndarray:
    (path,) = folder.glob("*.nii.gz")
    return nib.load(str(path)).get_fdata().astype(np.uint8)


def test_an_ensemble_of_identical_folds_equals_one_fold_and_folds_are_averaged(trained, monkeypatch):
    import s3d.data.preprocess as preprocess
    from s3d.data.io import read_channels
    from s3d.predict import load_predictor, predict_probabilities

    run, tmp = trained["run"], trained["tmp"]
    images = _one_case_input(trained)
    data, geometry = read_channels(sorted(images.iterdir()))
    single = {k: predict_probabilities([load_predictor(run / f"fold_{k}", "cpu")], data, geometry, tta=False)
              for k in (0, 1)}
    twins = tmp / "twins"
    for k in (0, 3):
        _copy_model(run / "fold_0", twins / f"fold_{k}")
    common = ["--no-tta", "--device", "cpu", "--save-probabilities", "--no-postprocessing", "-i", str(images)]
    main(["predict", *common, "-o", str(tmp / "twins_pred"), "-m", str(twins)])
    np.testing.assert_allclose(_probs(tmp / "twins_pred"), single[0], atol=1e-6)
    np.testing.assert_array_equal(_seg(tmp / "twins_pred"), single[0].argmax(0))

    calls = []
    original = preprocess.preprocess_case
    monkeypatch.setattr(preprocess, "preprocess_case", lambda *a, **k: calls.append(1) or original(*a, **k))
    main(["predict", *common, "-o", str(tmp / "both"), "-m", str(run), "--folds", "0", "1"])
    assert len(calls) == 1  # two networks, one preprocessing of the case
    np.testing.assert_allclose(_probs(tmp / "both"), (single[0] + single[1]) / 2, atol=1e-5)

    # runs preprocessed differently (another spacing) are each preprocessed once and averaged on the
    # original grid: the mean of what each predicts alone
    coarse = _copy_model(run / "fold_1", tmp / "coarse")
    config = json.loads((coarse / "config.json").read_text())
    config["plan"]["target_spacing"] = [1.3 * s for s in config["plan"]["target_spacing"]]
    (coarse / "config.json").write_text(json.dumps(config))
    other = load_predictor(coarse, "cpu")
    alone = predict_probabilities([other], data, geometry, tta=False)
    calls.clear()
    mixed = predict_probabilities([load_predictor(run / "fold_0", "cpu"), other], data, geometry, tta=False)
    assert len(calls) == 2
    np.testing.assert_allclose(mixed, (single[0] + alone) / 2, atol=1e-5)


def test_predict_applies_the_runs_postprocessing_unless_told_not_to(trained):
    from s3d.postprocess import PostprocessingDecision, apply_postprocessing

    run, tmp = trained["run"], trained["tmp"]
    pp_run = tmp / "pp_run"
    _copy_model(run / "fold_0", pp_run / "fold_0")
    decision = PostprocessingDecision(largest_foreground=True, largest_per_label=[1, 2], labels=[1, 2])
    (pp_run / "postprocessing.json").write_text(json.dumps(decision.to_dict()))
    main(["predict", "--no-tta", "--device", "cpu", "-i", str(_one_case_input(trained)), "-m", str(pp_run),
          "-o", str(tmp / "pp"), "--save-probabilities"])
    raw = _probs(tmp / "pp").argmax(0)  # what --no-postprocessing writes
    np.testing.assert_array_equal(_seg(tmp / "pp"), apply_postprocessing(raw, decision))


def test_ensembling_runs_with_other_labels_fails_with_one_line(trained, capsys):
    run, tmp = trained["run"], trained["tmp"]
    other = _copy_model(run / "fold_0", tmp / "other_labels")
    config = json.loads((other / "config.json").read_text())
    config["labels"] = {"background": 0, "left": 1, "right": 2}
    config["plan"]["labels"] = config["labels"]
    (other / "config.json").write_text(json.dumps(config))
    out = tmp / "refused"
    with pytest.raises(SystemExit) as e:
        main(["predict", "-i", str(_one_case_input(trained)), "-o", str(out), "-m", str(run), "-m", str(other),
              "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labels" in err and "other_labels" in err
    assert not any(out.glob("*.nii.gz"))


def test_folds_takes_all_a_list_or_commas(tmp_path):
    from s3d.cli.finetune import finetune
    from s3d.crossval import parse_folds
    from s3d.errors import S3DError

    ctx = finetune.make_context("finetune", [str(tmp_path), "RUN", "--folds", "0", "2", "4", "--steps", "5"])
    assert ctx.params["folds"] == "0 2 4" and ctx.params["steps"] == 5 and ctx.params["output"] == Path("RUN")
    assert parse_folds(ctx.params["folds"]) == [0, 2, 4]
    ctx = finetune.make_context("finetune", ["--folds", "all", str(tmp_path), "RUN"])
    assert ctx.params["folds"] == "all" and ctx.params["dataset"] == tmp_path
    assert parse_folds("all") == [0, 1, 2, 3, 4] and parse_folds("3,1") == [1, 3]
    with pytest.raises(S3DError, match="--folds"):
        parse_folds("5")
    ctx = finetune.make_context("finetune", ["--folds=1", "3", str(tmp_path), "RUN"])
    assert ctx.params["folds"] == "1 3" and ctx.params["dataset"] == tmp_path


def test_predict_takes_the_same_fold_lists_and_a_double_dash_ends_them(tmp_path):
    from s3d.cli.options import join_fold_numbers
    from s3d.cli.predict import predict

    ctx = predict.make_context("predict", ["-i", str(tmp_path), "-o", "OUT", "-m", "RUN", "--folds", "0,2", "4",
                                           "--no-tta"])
    assert ctx.params["folds"] == "0,2 4" and ctx.params["no_tta"] and ctx.params["models"] == ("RUN",)
    # after `--` a number is an argument, never a fold; a lone trailing --folds is left for click to refuse
    assert join_fold_numbers(["--folds", "1", "--", "2"]) == ["--folds=1", "--", "2"]
    assert join_fold_numbers(["DS", "--folds"]) == ["DS", "--folds"]
    with pytest.raises(click.UsageError, match="--folds"):
        predict.make_context("predict", ["-i", str(tmp_path), "-o", "OUT", "-m", "RUN", "--folds"])
