"""Paired comparison (bootstrap intervals, win rates, `s3d evaluate REF A B`) and the connected-component
postprocessing with its nnU-Net-style decision, on arrays built so that the right answer is known."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from s3d.compare import bootstrap_means, compare_summaries, paired_bootstrap, per_case_values
from s3d.postprocess import (
    PostprocessingDecision,
    apply_postprocessing,
    determine_postprocessing,
    keep_largest_component,
)


def test_the_interval_covers_a_known_paired_difference_and_excludes_zero():
    rng = np.random.default_rng(1)
    # cases differ a lot (0.5-0.9), the methods by 0.02 on every case plus small noise: the unpaired
    # spread would hide the difference, the paired interval must not
    base = rng.uniform(0.5, 0.9, 60)
    a, b = base + 0.02 + rng.normal(0, 0.01, 60), base
    r = paired_bootstrap(a, b, seed=0)
    assert r["ci_low"] < 0.02 < r["ci_high"]
    assert r["ci_low"] > 0
    assert r["mean_diff"] == pytest.approx(np.mean(a - b))
    assert r["win_rate"] > 0.9 and r["win_rate"] + r["tie_rate"] + r["loss_rate"] == pytest.approx(1)
    # seeded: the same call gives the same interval; the reversed pair mirrors it
    assert paired_bootstrap(a, b, seed=0) == r
    rev = paired_bootstrap(b, a, seed=0)
    assert rev["ci_low"] == pytest.approx(-r["ci_high"]) and rev["ci_high"] == pytest.approx(-r["ci_low"])
    # no true difference: the interval straddles 0
    null = paired_bootstrap(base + rng.normal(0, 0.01, 60), base, seed=3)
    assert null["ci_low"] < 0 < null["ci_high"]


def test_the_vectorised_bootstrap_matches_a_plain_loop():
    values = np.array([0.71, 0.64, 0.9, 0.55, 0.82, 0.77, 0.6])
    n, resamples = len(values), 2500  # more than one block of draws
    rng = np.random.default_rng(7)
    loop = []
    for _ in range(resamples):
        u = rng.random(n)
        picked = [values[min(int(x * n), n - 1)] for x in u]
        loop.append(sum(picked) / n)
    np.testing.assert_allclose(bootstrap_means(values, resamples, seed=7), loop, rtol=0, atol=1e-12)
    # the percentile interval by hand (linear interpolation between order statistics)
    s = sorted(loop)

    def pct(q: float) -> float:
        pos = q / 100 * (len(s) - 1)
        lo = int(np.floor(pos))
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)

    r = paired_bootstrap(values, np.zeros(n), n_resamples=resamples, seed=7)
    assert r["ci_low"] == pytest.approx(pct(2.5), abs=1e-12)
    assert r["ci_high"] == pytest.approx(pct(97.5), abs=1e-12)


def test_undefined_cases_are_left_out_of_the_pairing():
    r = paired_bootstrap([0.5, None, 0.7, float("nan")], [0.4, 0.3, None, 0.2], n_resamples=100)
    assert r["n_cases"] == 1 and r["mean_diff"] == pytest.approx(0.1)
    assert paired_bootstrap([None], [0.1], n_resamples=100)["mean_diff"] is None


def _summary(values: dict[str, list[float | None]]) -> dict:
    return {"metric_per_case": [{"reference_file": f"/ref/{c}.nii.gz", "prediction_file": f"/p/{c}.nii.gz",
                                 "metrics": {str(i + 1): {"Dice": v, "NSD": v} for i, v in enumerate(vals)}}
                                for c, vals in values.items()]}


def test_compare_summaries_pairs_cases_by_name_and_refuses_other_cases():
    a = _summary({"c1": [0.8, 0.6], "c2": [0.9, None], "c3": [0.5, 0.5]})
    b = _summary({"c3": [0.4, 0.4], "c1": [0.7, 0.5], "c2": [0.8, None]})
    assert per_case_values(a)["c2.nii.gz"] == pytest.approx(0.9)
    r = compare_summaries({"A": a, "B": b}, n_resamples=200)
    (pair,) = r["pairs"]
    assert pair["Dice"]["mean_diff"] == pytest.approx(0.1) and pair["Dice"]["win_rate"] == 1.0
    assert r["methods"]["A"]["Dice"] == pytest.approx((0.7 + 0.9 + 0.5) / 3)
    from s3d.errors import S3DError

    with pytest.raises(S3DError, match="scores other cases"):
        compare_summaries({"A": a, "B": _summary({"c1": [0.1, 0.1]})}, n_resamples=10)


def _write(path, arr, spacing=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))


def _blob(shape=(24, 24, 24)) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[4:12, 4:14, 4:12] = 1
    seg[12:16, 4:14, 4:12] = 2  # touches label 1: one foreground object with two labels
    return seg


def test_evaluate_with_several_prediction_folders_compares_them(tmp_path, capsys):
    from s3d.cli import main

    ref, good, bad = tmp_path / "ref", tmp_path / "runs" / "good", tmp_path / "runs" / "bad"
    for d in (ref, good, bad):
        d.mkdir(parents=True)
    for i in range(5):
        seg = _blob()
        _write(ref / f"c{i}.nii.gz", seg)
        _write(good / f"c{i}.nii.gz", seg)
        worse = seg.copy()
        worse[4 : 6 + i] = 0  # a few slices lost, differently per case
        _write(bad / f"c{i}.nii.gz", worse)
    main(["evaluate", str(ref), str(good), str(bad), "--resamples", "500"])
    out = capsys.readouterr().out
    assert "good | bad" in out and "100/0/0%" in out
    result = json.loads((tmp_path / "runs" / "comparison.json").read_text())
    (pair,) = result["pairs"]
    assert pair["a"] == "good" and pair["Dice"]["ci_low"] > 0 and result["n_resamples"] == 500
    assert (tmp_path / "runs" / "comparison.md").is_file()
    assert json.loads((good / "summary.json").read_text())["foreground_mean"]["Dice"] == pytest.approx(1.0)


def test_largest_component_removes_a_planted_island_and_the_decision_accepts_it(tmp_path):
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    refs.mkdir()
    preds.mkdir()
    pairs = []
    for i in range(3):
        seg = _blob()
        pred = seg.copy()
        pred[20:23, 20:23, 18 + i : 21 + i] = 1  # a false-positive island away from the object
        _write(refs / f"c{i}.nii.gz", seg)
        _write(preds / f"c{i}.nii.gz", pred)
        pairs.append((refs / f"c{i}.nii.gz", preds / f"c{i}.nii.gz"))
    decision = determine_postprocessing(pairs, [1, 2], progress=False)
    assert decision.largest_foreground
    assert decision.dice_after["foreground_mean"] > decision.dice_before["foreground_mean"]
    pred = nib.load(str(pairs[0][1])).get_fdata().astype(np.uint8)
    np.testing.assert_array_equal(apply_postprocessing(pred, decision), _blob())
    # the decision survives its JSON round trip
    again = PostprocessingDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again.same_rule(decision)


def test_the_decision_rejects_postprocessing_that_would_remove_true_objects(tmp_path):
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    refs.mkdir()
    preds.mkdir()
    pairs = []
    for i in range(3):
        seg = _blob()
        seg[18:22, 18:22, 16:22] = 1  # a second, real object of label 1 (say the other side)
        pred = seg.copy()
        pred[18:20, 18:22, 16:22] = 0  # predicted partly: still the smaller component
        _write(refs / f"c{i}.nii.gz", seg)
        _write(preds / f"c{i}.nii.gz", pred)
        pairs.append((refs / f"c{i}.nii.gz", preds / f"c{i}.nii.gz"))
    decision = determine_postprocessing(pairs, [1, 2], progress=False)
    assert not decision.largest_foreground and decision.largest_per_label == []
    assert not decision.changes_anything
    assert decision.tried["largest_foreground"]["accepted"] is False
    pred = nib.load(str(pairs[0][1])).get_fdata().astype(np.uint8)
    np.testing.assert_array_equal(apply_postprocessing(pred, decision), pred)


def test_components_are_26_connected():
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touching at a corner only
    mask[4, 4, 4] = True  # not touching
    kept = keep_largest_component(mask)
    assert kept[1, 1, 1] and kept[2, 2, 2] and not kept[4, 4, 4]
