"""Paired comparison of methods scored on the same cases (`s3d evaluate REF PRED_A PRED_B ...`).

Two methods evaluated on the same cases differ by a per-case difference; its mean, with a bootstrap
95% interval over cases, says whether one is better beyond the case-to-case noise, which the two
means and their spreads alone cannot (most of that spread is shared: hard cases are hard for both).
The bootstrap resamples cases with replacement, seeded, so a rerun gives the same interval.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s3d.errors import S3DError

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK = 1000  # resamples drawn at once: bounds memory at _CHUNK x cases numbers


def bootstrap_means(values: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of `values`.

    Resample r takes the indices floor(u * n) of n uniform numbers u drawn from
    numpy.random.default_rng(seed), resample after resample: drawn in blocks, the stream (and so the
    result) is the one of a plain loop over resamples.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        k = min(_CHUNK, n_resamples - start)
        idx = np.minimum((rng.random((k, n)) * n).astype(np.int64), n - 1)
        out[start : start + k] = values[idx].mean(axis=1)
    return out


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean of a - b over paired cases with a percentile bootstrap interval, and the per-case win rate.

    Cases where either value is undefined (NaN/None) are left out of the pairing. Returns
    {"n_cases", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "confidence", "n_resamples",
    "seed", "win_rate", "tie_rate", "loss_rate"} (win: a > b on that case).
    """
    x = np.array([math.nan if v is None else float(v) for v in a])
    y = np.array([math.nan if v is None else float(v) for v in b])
    if x.shape != y.shape:
        raise S3DError(f"paired comparison needs the same cases for both methods ({len(x)} vs {len(y)} values)")
    if not 0 < confidence < 1:
        raise S3DError(f"confidence {confidence}: must be between 0 and 1")
    if n_resamples < 1:
        raise S3DError(f"n_resamples {n_resamples}: must be at least 1")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    d = x - y
    out: dict[str, Any] = {"n_cases": int(len(d)), "confidence": confidence, "n_resamples": n_resamples,
                           "seed": seed}
    if len(d) == 0:
        return out | {k: None for k in ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "win_rate",
                                        "tie_rate", "loss_rate")}
    means = bootstrap_means(d, n_resamples, seed)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return out | {"mean_a": float(x.mean()), "mean_b": float(y.mean()), "mean_diff": float(d.mean()),
                  "ci_low": float(lo), "ci_high": float(hi), "win_rate": float(np.mean(d > 0)),
                  "tie_rate": float(np.mean(d == 0)), "loss_rate": float(np.mean(d < 0))}


def per_case_values(summary: Mapping[str, Any], metric: str = "Dice") -> dict[str, float]:
    """{case file name: mean of `metric` over the case's labels} from an evaluation summary; labels
    whose value is undefined there (empty in reference and prediction) are left out of the case's
    mean, and a case with none defined is NaN."""
    out = {}
    for case in summary["metric_per_case"]:
        vals = [m.get(metric) for m in case["metrics"].values()]
        vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
        out[Path(case["reference_file"]).name] = float(np.mean(vals)) if vals else math.nan
    return out


def compare_summaries(summaries: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ("Dice", "NSD"),
                      n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
                      ) -> dict[str, Any]:
    """Per method the mean of each metric (over cases, of the per-case mean over labels) and, for every
    pair of methods (A, B), the paired A - B statistics of `paired_bootstrap`. All summaries must score
    the same reference cases."""
    names = list(summaries)
    if len(names) < 2:
        raise S3DError(f"a comparison needs at least two methods, got {len(names)}")
    values = {m: {name: per_case_values(summaries[name], m) for name in names} for m in metrics}
    cases = sorted(values[metrics[0]][names[0]])
    for name in names[1:]:
        other = sorted(values[metrics[0]][name])
        if other != cases:
            missing = sorted(set(cases) ^ set(other))
            raise S3DError(f"{name}: scores other cases than {names[0]} (e.g. {missing[0]}); compare predictions "
                           "of the same references")
    methods = {}
    for name in names:
        methods[name] = {}
        for m in metrics:
            v = np.array([values[m][name][c] for c in cases])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=RuntimeWarning)
                mean = float(np.nanmean(v)) if np.isfinite(v).any() else None
            methods[name][m] = mean
    pairs = []
    for a, b in itertools.combinations(names, 2):
        entry: dict[str, Any] = {"a": a, "b": b}
        for m in metrics:
            entry[m] = paired_bootstrap([values[m][a][c] for c in cases], [values[m][b][c] for c in cases],
                                        n_resamples=n_resamples, seed=seed, confidence=confidence)
        pairs.append(entry)
    per_case = {c: {name: {m: values[m][name][c] for m in metrics} for name in names} for c in cases}
    return {"methods": methods, "pairs": pairs, "metrics": list(metrics), "n_cases": len(cases),
            "n_resamples": n_resamples, "seed": seed, "confidence": confidence, "per_case": per_case}


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_comparison(result: Mapping[str, Any]) -> str:
    """A plain-text table (also valid Markdown) of a `compare_summaries` result."""
    metrics = result["metrics"]
    conf = f"{100 * result['confidence']:g}%"
    lines = ["| method | " + " | ".join(f"mean {m}" for m in metrics) + " |",
             "| --- |" + " ---: |" * len(metrics)]
    for name, means in result["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_f(means[m], ".4f") for m in metrics) + " |")
    lines += ["", f"Paired differences A - B over {result['n_cases']} cases ({conf} bootstrap interval, "
              f"{result['n_resamples']} resamples, seed {result['seed']}; win: A better on a case):", "",
              "| A | B | " + " | ".join(f"{m} A-B [{conf} CI] | {m} win/tie/loss" for m in metrics) + " |",
              "| --- | --- |" + " ---: | ---: |" * len(metrics)]
    for p in result["pairs"]:
        cells = []
        for m in metrics:
            s = p[m]
            cells.append(f"{_f(s['mean_diff'], '+.4f')} [{_f(s['ci_low'], '+.4f')}, {_f(s['ci_high'], '+.4f')}]")
            cells.append("-" if s["win_rate"] is None else
                         f"{100 * s['win_rate']:.0f}/{100 * s['tie_rate']:.0f}/{100 * s['loss_rate']:.0f}%")
        lines.append(f"| {p['a']} | {p['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_names(pred_dirs: Sequence[str | Path]) -> list[str]:
    """Short unique names for prediction folders: the last path components that tell them apart."""
    parts = [Path(p).resolve().parts for p in pred_dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise S3DError(f"the same prediction folder is given twice: {pred_dirs}")


def default_comparison_path(pred_dirs: Sequence[str | Path]) -> Path:
    """comparison.json in the deepest folder that holds every prediction folder."""
    import os

    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in pred_dirs]))
    if any(Path(p).resolve() == common for p in pred_dirs):
        common = common.parent
    return common / "comparison.json"


def compare_folders(ref_dir: str | Path, pred_dirs: Sequence[str | Path], *,
                    labels: dict[str, int] | Sequence[int] | None = None, nsd_tolerance: float = 1.0, jobs: int = 1,
                    summary_outputs: Sequence[str | Path | None] | None = None, output: str | Path | None = None,
                    n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Evaluate every prediction folder against `ref_dir` (writing each summary where
    `summary_outputs` says, default PRED/summary.json) and compare them pairwise; with `output`, write
    the comparison JSON there and the table as Markdown beside it (.md)."""
    from s3d.evaluate import check_summary_path, evaluate_folders
    from s3d.files import write_json

    pred_dirs = [Path(p) for p in pred_dirs]
    names = method_names(pred_dirs)
    summary_outputs = list(summary_outputs) if summary_outputs is not None else [p / "summary.json" for p in pred_dirs]
    for s in summary_outputs:
        if s is not None:
            check_summary_path(s)
    if output is not None:
        output = Path(output)
        if output.suffix.lower() != ".json":
            raise S3DError(f"{output}: the comparison is a .json file (give -o COMPARISON.json)")
        if output.exists():
            from s3d.files import read_json

            try:
                earlier = read_json(output)
            except S3DError:
                earlier = None
            if not (isinstance(earlier, dict) and "pairs" in earlier):
                raise S3DError(f"{output}: exists and is not an earlier comparison; not overwriting it")
    summaries = {}
    for name, pred, out in zip(names, pred_dirs, summary_outputs, strict=True):
        summaries[name] = evaluate_folders(ref_dir, pred, labels, nsd_tolerance=nsd_tolerance, jobs=jobs, output=out)
    result = compare_summaries(summaries, n_resamples=n_resamples, seed=seed)
    result["prediction_dirs"] = {n: str(p) for n, p in zip(names, pred_dirs, strict=True)}
    result["reference_dir"] = str(ref_dir)
    result["nsd_tolerance_mm"] = float(nsd_tolerance)
    if output is not None:
        from s3d.files import atomic_path

        output.parent.mkdir(parents=True, exist_ok=True)
        write_json(output, result)
        with atomic_path(output.with_suffix(".md")) as tmp:
            tmp.write_text(format_comparison(result) + "\n")
    return result
