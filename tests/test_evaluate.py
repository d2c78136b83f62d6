"""`s3d evaluate` / evaluate_folders on real hippocampus labels written to a temporary folder."""

from __future__ import annotations

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest

from s3d import metrics as M
from s3d.errors import S3DError
from s3d.evaluate import evaluate_folders

CASES = ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz", "hippocampus_004.nii.gz")


def _no_constants(token: str):
    raise AssertionError(f"JSON holds the non-standard token {token}")


def _shift(seg: np.ndarray, offsets: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros_like(seg)
    src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offsets, seg.shape, strict=True))
    dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offsets, seg.shape, strict=True))
    out[dst] = seg[src]
    return out


def _save(arr: np.ndarray, affine: np.ndarray, path) -> None:
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))


@pytest.fixture()
def folders(hippocampus_dir, tmp_path):
    """DATASET/labelsTr (3 references, case 0 re-written at 1 x 1 x 2.5 mm) and preds/ (perturbed)."""
    ref_dir, pred_dir = tmp_path / "ds" / "labelsTr", tmp_path / "preds"
    ref_dir.mkdir(parents=True)
    pred_dir.mkdir()
    shutil.copy(hippocampus_dir / "dataset.json", tmp_path / "ds" / "dataset.json")
    expected = {}
    for i, name in enumerate(CASES):
        img = nib.load(hippocampus_dir / "labelsTr" / name)
        ref = np.asarray(img.dataobj).astype(np.int16)
        affine = img.affine.copy()
        if i == 0:
            affine[:3, 2] *= 2.5
        if i == 0:
            pred = _shift(ref, (1, 0, -1))
        elif i == 1:
            pred = _shift(ref, (0, 2, 0))
        else:
            pred = np.where(ref == 2, 0, ref)  # posterior missing: Dice 0, HD95 undefined
        _save(ref, affine, ref_dir / name)
        _save(pred, affine, pred_dir / name)
        spacing = tuple(float(np.linalg.norm(affine[:3, a])) for a in range(3))
        expected[name] = M.evaluate_case(ref, pred, [1, 2], spacing, 1.0)
    return ref_dir, pred_dir, expected


def test_summary_matches_metrics_and_files_are_clean(folders, tmp_path):
    ref_dir, pred_dir, expected = folders
    out = tmp_path / "out" / "summary.json"
    summary = evaluate_folders(ref_dir, pred_dir, None, nsd_tolerance=1.0, output=out, progress=False)

    assert summary["labels"] == {"1": "anterior", "2": "posterior"}  # from DATASET/dataset.json
    assert [c["reference_file"].split("/")[-1] for c in summary["metric_per_case"]] == list(CASES)
    for case in summary["metric_per_case"]:
        name = case["prediction_file"].split("/")[-1]
        for label in ("1", "2"):
            got, want = case["metrics"][label], expected[name][label]
            for key in ("Dice", "NSD", "HD95", "TP", "FP", "FN", "n_ref", "n_pred", "volume_ref_mm3"):
                if math.isnan(want[key]):
                    assert got[key] is None, (name, label, key)
                else:
                    assert got[key] == pytest.approx(want[key], abs=1e-9), (name, label, key)
    # case 0 is anisotropic: its volumes use 2.5 mm^3 voxels
    first = summary["metric_per_case"][0]["metrics"]["1"]
    assert first["volume_ref_mm3"] == pytest.approx(first["n_ref"] * 2.5)
    third = summary["metric_per_case"][2]["metrics"]["2"]
    assert third["Dice"] == 0.0 and third["NSD"] == 0.0 and third["HD95"] is None and third["hd95_undefined"]

    for label in ("1", "2"):
        cases = [c["metrics"][label] for c in summary["metric_per_case"]]
        for key in ("Dice", "NSD"):
            assert summary["mean"][label][key] == pytest.approx(np.mean([c[key] for c in cases]))
        hd = [c["HD95"] for c in cases if c["HD95"] is not None]
        assert summary["mean"][label]["HD95"] == pytest.approx(np.mean(hd))
    assert summary["mean"]["2"]["n_hd95_undefined"] == 1
    assert summary["foreground_mean"]["Dice"] == pytest.approx(
        (summary["mean"]["1"]["Dice"] + summary["mean"]["2"]["Dice"]) / 2)

    text = out.read_text()
    assert json.loads(text, parse_constant=_no_constants) == summary
    assert "Infinity" not in text and "NaN" not in text
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == 6 and {r["label"] for r in rows} == {"1", "2"}
    row = next(r for r in rows if r["label"] == "2" and r["prediction_file"].endswith(CASES[2]))
    assert row["HD95"] == "" and row["hd95_undefined"] == "true" and float(row["Dice"]) == 0.0
    assert not list(out.parent.glob("*.tmp*"))


def test_labels_argument_and_union_default(folders, tmp_path):
    ref_dir, pred_dir, _ = folders
    only2 = evaluate_folders(ref_dir, pred_dir, [2], progress=False)
    assert list(only2["mean"]) == ["2"] and only2["labels"] == {"2": "2"}
    named = evaluate_folders(ref_dir, pred_dir, {"background": 0, "posterior": 2}, progress=False)
    assert named["labels"] == {"2": "posterior"}
    (tmp_path / "ds" / "dataset.json").unlink()
    union = evaluate_folders(ref_dir, pred_dir, None, progress=False)
    assert union["labels"] == {"1": "1", "2": "2"}
    assert union["mean"]["2"]["Dice"] == pytest.approx(only2["mean"]["2"]["Dice"])


def test_parallel_jobs_give_the_same_summary(folders):
    ref_dir, pred_dir, _ = folders
    one = evaluate_folders(ref_dir, pred_dir, None, progress=False)
    two = evaluate_folders(ref_dir, pred_dir, None, jobs=2, progress=False)
    assert one == two


def test_missing_prediction_is_named(folders):
    ref_dir, pred_dir, _ = folders
    (pred_dir / CASES[1]).unlink()
    with pytest.raises(S3DError, match=CASES[1]) as e:
        evaluate_folders(ref_dir, pred_dir, None, progress=False)
    assert "\n" not in str(e.value)


def test_cli_writes_summary_and_csv(folders, capsys):
    from s3d.cli import main

    ref_dir, pred_dir, _ = folders
    main(["evaluate", str(ref_dir), str(pred_dir), "--nsd-tolerance", "2", "-j", "1"])
    out = capsys.readouterr().out
    assert "anterior" in out and "posterior" in out and "NSD@2mm" in out
    summary = json.loads((pred_dir / "summary.json").read_text(), parse_constant=_no_constants)
    assert summary["nsd_tolerance_mm"] == 2.0 and len(summary["metric_per_case"]) == 3
    assert (pred_dir / "summary.csv").read_text().count("\n") == 7  # header + 3 cases x 2 labels
    # the summary files in PRED_DIR are not label files: a second run still sees 3 cases
    main(["evaluate", str(ref_dir), str(pred_dir), "--labels", "1", "-o", str(pred_dir / "again.json")])
    assert list(json.loads((pred_dir / "again.json").read_text())["mean"]) == ["1"]


def test_cli_mismatched_grid_exits_2_naming_both_files(folders, capsys):
    from s3d.cli import main

    ref_dir, pred_dir, _ = folders
    img = nib.load(pred_dir / CASES[1])
    affine = img.affine.copy()
    affine[:3, 3] += 0.5  # half a voxel off: same shape, other grid
    _save(np.asarray(img.dataobj), affine, pred_dir / CASES[1])
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(ref_dir), str(pred_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(pred_dir / CASES[1]) in err and str(ref_dir / CASES[1]) in err


def test_cli_help_explains_options():
    from click.testing import CliRunner

    from s3d.cli.evaluate import evaluate

    text = CliRunner().invoke(evaluate, ["--help"]).output
    for needle in ("--nsd-tolerance", "mm", "default: 1.0", "--labels", "dataset.json", "--jobs", "summary.json"):
        assert needle in text, needle


def test_every_bad_prediction_is_named_and_no_partial_summary_is_written(folders, capsys):
    """One bad file used to hide the others' problems; a mean over the readable ones would look complete."""
    from s3d.cli import main

    ref_dir, pred_dir, _ = folders
    (pred_dir / CASES[0]).write_bytes(b"\x1f\x8b\x08\x00 not a volume")
    (pred_dir / CASES[2]).unlink()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(ref_dir), str(pred_dir)])
    assert e.value.code == 2
    out = capsys.readouterr()
    said = (out.out + out.err).splitlines()
    assert any(str(pred_dir / CASES[0]) in ln and "cannot read" in ln for ln in said)
    assert any(str(pred_dir / CASES[2]) in ln and "prediction missing" in ln for ln in said)
    assert "2 of 3 cases could not be scored, all listed above; no summary written" in out.err
    assert not (pred_dir / "summary.json").exists() and not (pred_dir / "summary.csv").exists()


def test_parallel_workers_show_header_fixes_as_s3d_warnings(hippocampus_dir, tmp_path):
    """`s3d evaluate -j 2` reads in spawned processes, which start without the CLI's message handling;
    nibabel's header fix-ups must still reach the user as one `s3d: warning: FILE: ...` line each, not as
    nibabel's bare log line."""
    import subprocess
    import sys

    refs, preds = tmp_path / "refs", tmp_path / "preds"
    refs.mkdir()
    preds.mkdir()
    for name in CASES:
        img = nib.load(hippocampus_dir / "labelsTr" / name)
        seg = np.asarray(img.dataobj).astype(np.uint8)
        broken = nib.Nifti1Image(seg, img.affine)
        broken.header["pixdim"][1] = 0  # a defective spacing nibabel repairs and logs
        nib.save(broken, str(refs / name))
        _save(seg, img.affine, preds / name)
    res = subprocess.run([sys.executable, "-m", "s3d", "evaluate", str(refs), str(preds), "-j", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "pixdim" in ln]
    assert lines, res.stderr
    for line in lines:
        assert line.startswith("s3d: warning: ") and "(nibabel)" in line, line
    assert {ln.split(": ")[2].split("/")[-1] for ln in lines} == set(CASES)
