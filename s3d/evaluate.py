"""Evaluate a folder of predicted segmentations against a folder of references (`s3d evaluate`).

The summary mirrors nnU-Net's `summary.json` (metric_per_case / mean / foreground_mean), with NSD and
HD95 added; `s3d.metrics` documents the metrics and the empty-mask policy. Undefined values are None
in the returned dict and null in the JSON, so it never holds NaN or Infinity.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s3d.errors import S3DError
from s3d.files import json_safe

__all__ = ["evaluate_folders", "write_summary", "resolve_labels", "merge_summaries", "METRIC_KEYS"]

# Per-label numbers averaged into "mean" / "foreground_mean" (nnU-Net's keys plus NSD/HD95/volumes).
METRIC_KEYS = ("Dice", "NSD", "HD95", "IoU", "TP", "FP", "FN", "n_ref", "n_pred", "volume_ref_mm3",
               "volume_pred_mm3")
CSV_COLUMNS = ("reference_file", "prediction_file", "label", "name", "Dice", "NSD", "HD95", "hd95_undefined",
               "IoU", "TP", "FP", "FN", "n_ref", "n_pred", "volume_ref_mm3", "volume_pred_mm3")
# Two grids are "the same" when shapes agree and affines agree to this (mm), as nnU-Net's
# verify_dataset_integrity tolerates header round-off.
AFFINE_ATOL = 1e-4


def _suffixes() -> tuple[str, ...]:
    from s3d.data.io import IMAGE_SUFFIXES

    return tuple(IMAGE_SUFFIXES)


def _label_files(folder: Path) -> dict[str, Path]:
    suffixes = _suffixes()
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.endswith(suffixes)}


def resolve_labels(labels: dict[str, int] | Sequence[int] | None, ref_dir: str | Path) -> dict[int, str] | None:
    """{value: name} of the foreground labels to evaluate; None means "union of the references' values".

    A dict is dataset.json-style (name -> value, background 0 dropped); a list gives values (named by
    their number). None looks for dataset.json in REF_DIR, then in its parent (nnU-Net raw layout:
    DATASET/labelsTr).
    """
    ref_dir = Path(ref_dir)
    source = "labels"
    if labels is None:
        for candidate in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
            if candidate.is_file():
                try:
                    labels = json.loads(candidate.read_text())["labels"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise S3DError(f"{candidate}: cannot read its 'labels' ({type(e).__name__}: {e})") from None
                source = str(candidate)
                break
        else:
            return None
    if isinstance(labels, dict):
        out: dict[int, str] = {}
        for name, value in labels.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise S3DError(f"{source}: label {name!r} has value {value!r}; only integer labels are supported "
                               "(region lists are not)")
            if int(value) != 0:
                out[int(value)] = str(name)
        if not out:
            raise S3DError(f"{source}: no foreground label (every label is background 0)")
        return dict(sorted(out.items()))
    values = sorted({int(v) for v in labels})
    if not values or any(v <= 0 for v in values):
        raise S3DError(f"{source}: labels must be positive integers, got {list(labels)}")
    return {v: str(v) for v in values}


def _evaluate_pair(args: tuple[str, str, list[int] | None, float]) -> dict[str, Any]:
    """One case (runs in a worker process): its metrics, or {"error": one line} when it cannot be
    scored, so that one bad file does not hide the problems of the others."""
    try:
        return _score_pair(*args)
    except S3DError as e:
        return {"error": str(e)}


def _score_pair(ref_path: str, pred_path: str, labels: list[int] | None, tolerance: float) -> dict[str, Any]:
    """Read both label maps, check the grid, compute metrics."""
    from s3d.data.io import read_label
    from s3d.metrics import evaluate_case

    ref, ref_geo = read_label(ref_path)
    pred, pred_geo = read_label(pred_path)
    if tuple(ref.shape) != tuple(pred.shape):
        raise S3DError(f"{pred_path}: shape {tuple(pred.shape)} differs from its reference {ref_path} "
                       f"{tuple(ref.shape)}")
    diff = float(np.max(np.abs(np.asarray(ref_geo.affine, float) - np.asarray(pred_geo.affine, float))))
    if not diff <= AFFINE_ATOL:
        raise S3DError(f"{pred_path}: affine differs from its reference {ref_path} by up to {diff:.3g} "
                       f"(> {AFFINE_ATOL}); resample the prediction onto the reference grid")
    present = None
    if labels is None:
        present = sorted(int(v) for v in np.union1d(np.unique(ref), np.unique(pred)) if v != 0)
        ref_values = [int(v) for v in np.unique(ref) if v != 0]
    metrics = evaluate_case(ref, pred, labels if labels is not None else present, ref_geo.spacing, tolerance)
    out = {"reference_file": str(ref_path), "prediction_file": str(pred_path), "metrics": metrics,
           "voxel_mm3": float(np.prod(ref_geo.spacing))}
    if labels is None:
        out["ref_values"] = ref_values
    return out


def _empty_label_metrics() -> dict[str, Any]:
    # Label absent from both maps: nothing to read (see the policy in s3d.metrics).
    return {"TP": 0, "FP": 0, "FN": 0, "n_ref": 0, "n_pred": 0, "volume_ref_mm3": 0.0, "volume_pred_mm3": 0.0,
            "Dice": math.nan, "IoU": math.nan, "NSD": math.nan, "HD95": math.nan, "hd95_undefined": False}


def _mean_over(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in METRIC_KEYS:
        vals = [float(r[key]) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[key] = float(np.mean(vals)) if vals else math.nan
    out["n_cases"] = len(records)
    out["n_hd95_undefined"] = sum(bool(r.get("hd95_undefined")) for r in records)
    return out


def evaluate_folders(ref_dir: str | Path, pred_dir: str | Path,
                     labels: dict[str, int] | Sequence[int] | None = None, nsd_tolerance: float = 1.0,
                     jobs: int = 1, output: str | Path | None = None, progress: bool = True,
                     names: Sequence[str] | None = None) -> dict[str, Any]:
    """Dice, NSD (at `nsd_tolerance` mm) and HD95 of every prediction against its reference.

    Cases are matched by file name: each label file in `ref_dir` needs a file of the same name in
    `pred_dir` on the same grid (shape, and affine within 1e-4), else S3DError naming the files.
    `labels`: see `resolve_labels`. `jobs` worker processes read and score cases in parallel.
    When `output` (a .json path) is given, writes it and a CSV of the same stem (`write_summary`).
    `names`: score only the reference files with these names (file names, or case ids without the
    file ending), e.g. the validation cases of one fold in a dataset's labelsTr.

    Returns {"metric_per_case": [{"reference_file", "prediction_file", "metrics": {"1": {...}}}],
    "mean": {"1": {...}}, "foreground_mean": {...}, "labels": {"1": name}, ...}, JSON-safe (None
    where a value is undefined).
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    if not ref_dir.is_dir():
        raise S3DError(f"{ref_dir}: reference folder not found")
    if not pred_dir.is_dir():
        raise S3DError(f"{pred_dir}: prediction folder not found")
    tolerance = float(nsd_tolerance)
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise S3DError(f"--nsd-tolerance: must be a finite number of mm >= 0, got {nsd_tolerance}")
    label_names = resolve_labels(labels, ref_dir)
    refs = _label_files(ref_dir)
    if not refs:
        raise S3DError(f"{ref_dir}: no label files ({', '.join(_suffixes())})")
    if names is not None:
        refs = _select(refs, names, ref_dir)
    preds = _label_files(pred_dir)
    problems = [f"{pred_dir / name}: prediction missing for reference {refs[name]}" for name in refs
                if name not in preds]

    label_list = None if label_names is None else list(label_names)
    tasks = [(str(refs[n]), str(preds[n]), label_list, tolerance) for n in refs if n in preds]
    results = _run(tasks, max(1, int(jobs)), progress)
    problems += [r["error"] for r in results if "error" in r]
    if problems:
        # A mean over the cases that could be read would look complete and not be: no summary at all,
        # but every problem, one line each, before the one that fails the call.
        from tqdm import tqdm

        from s3d.errors import one_line

        if len(problems) > 1:
            for problem in problems:
                tqdm.write(f"s3d: error: {one_line(problem)}", file=sys.stderr)
        raise S3DError(f"{problems[0]} ({len(problems)} of {len(refs)} cases could not be scored"
                       f"{', all listed above' if len(problems) > 1 else ''}; no summary written)")

    if label_names is None:
        found = sorted({v for r in results for v in r.pop("ref_values")})
        label_names = {v: str(v) for v in found}
    keys = [str(v) for v in label_names]
    per_case = []
    for r in results:
        metrics = {k: r["metrics"].get(k) or _empty_label_metrics() for k in keys}
        per_case.append({"reference_file": r["reference_file"], "prediction_file": r["prediction_file"],
                         "metrics": metrics})
    summary = _summarise(per_case, {str(v): n for v, n in label_names.items()}, tolerance)
    summary["reference_dir"] = str(ref_dir)
    summary["prediction_dir"] = str(pred_dir)
    if output is not None:
        write_summary(summary, output)
    return summary


def _select(refs: dict[str, Path], names: Sequence[str], ref_dir: Path) -> dict[str, Path]:
    by_case = {}
    for file_name in refs:
        for suffix in _suffixes():
            if file_name.endswith(suffix):
                by_case[file_name[: -len(suffix)]] = file_name
    picked, missing = {}, []
    for name in names:
        file_name = name if name in refs else by_case.get(name)
        if file_name is None:
            missing.append(name)
        else:
            picked[file_name] = refs[file_name]
    if missing:
        raise S3DError(f"{ref_dir}: no reference for case {missing[0]} ({len(missing)} of {len(names)} missing)")
    return dict(sorted(picked.items()))


def _summarise(per_case: list[dict[str, Any]], labels: dict[str, str], tolerance: float) -> dict[str, Any]:
    keys = list(labels)
    mean = {k: _mean_over([c["metrics"][k] for c in per_case]) for k in keys}
    foreground = {}
    for key in METRIC_KEYS:
        vals = [mean[k][key] for k in keys if mean[k][key] is not None and math.isfinite(mean[k][key])]
        foreground[key] = float(np.mean(vals)) if vals else math.nan
    return json_safe({
        "metric_per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground,
        "labels": labels,
        "nsd_tolerance_mm": tolerance,
        "hd95_percentile": 95,
    })


def merge_summaries(summaries: Sequence[dict[str, Any]], output: str | Path | None = None) -> dict[str, Any]:
    """One summary over the cases of several (e.g. the folds of a cross-validation), with the means
    computed over all their cases as `evaluate_folders` computes them; the label sets and NSD
    tolerances must agree. Written to `output` (and its CSV) when given."""
    if not summaries:
        raise S3DError("no summaries to merge")
    labels, tolerance = summaries[0]["labels"], summaries[0]["nsd_tolerance_mm"]
    for s in summaries[1:]:
        if s["labels"] != labels or s["nsd_tolerance_mm"] != tolerance:
            raise S3DError(f"summaries of {s.get('prediction_dir')} and {summaries[0].get('prediction_dir')} use "
                           "different labels or NSD tolerances; they cannot be merged")
    per_case = sorted((c for s in summaries for c in s["metric_per_case"]),
                      key=lambda c: Path(c["reference_file"]).name)
    seen: set[str] = set()
    for c in per_case:
        name = Path(c["reference_file"]).name
        if name in seen:
            raise S3DError(f"case {name} is in more than one of the summaries to merge")
        seen.add(name)
    summary = _summarise(per_case, labels, tolerance)
    summary["prediction_dirs"] = [s.get("prediction_dir") for s in summaries]
    if output is not None:
        write_summary(summary, output)
    return summary


def _run(tasks: list[tuple], jobs: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI), so errors stay on one line there.
    bar = tqdm(total=len(tasks), desc="evaluate", unit="case", disable=None if progress else True, leave=False)
    try:
        if jobs == 1 or len(tasks) == 1:
            out = []
            for t in tasks:
                out.append(_evaluate_pair(t))
                bar.update()
            return out
        # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child would inherit locked.
        from s3d.messages import active, install_in_worker

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(jobs, len(tasks)), initializer=install_in_worker, initargs=(active(),)) as pool:
            out = []
            for r in pool.imap(_evaluate_pair, tasks):
                out.append(r)
                bar.update()
            return out
    finally:
        bar.close()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def check_summary_path(output: str | Path) -> None:
    """S3DError unless `output` is a .json path that is new or holds an earlier summary: `-o` pointed at
    a label file or a dataset.json once replaced it with the summary."""
    output = Path(output)
    if output.suffix.lower() != ".json":
        raise S3DError(f"{output}: the summary is a .json file (give -o SUMMARY.json)")
    for path in (output, output.with_suffix(".csv")):
        if path.is_dir():
            raise S3DError(f"{path}: is a folder; give -o a file name")
    if output.exists():
        try:
            earlier = json.loads(output.read_text())
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "metric_per_case" in earlier):
            raise S3DError(f"{output}: exists and is not an earlier evaluation summary; not overwriting it")


def write_summary(summary: dict[str, Any], output: str | Path) -> tuple[Path, Path]:
    """Write `summary` as JSON to `output` and a CSV (one row per case and label) beside it; atomic."""
    from s3d.data.io import atomic_path

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    csv_path = output.with_suffix(".csv")
    if csv_path == output:
        raise S3DError(f"{output}: the summary must not be a .csv file (the CSV goes next to it)")
    check_summary_path(output)
    text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
    with atomic_path(output) as tmp:
        Path(tmp).write_text(text + "\n")
    names = summary.get("labels", {})
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for case in summary["metric_per_case"]:
            for label, m in case["metrics"].items():
                row = {"reference_file": case["reference_file"], "prediction_file": case["prediction_file"],
                       "label": label, "name": names.get(label, label), **m}
                writer.writerow([_fmt(row.get(c)) for c in CSV_COLUMNS])
        f.flush()
        os.fsync(f.fileno())
    return output, csv_path
