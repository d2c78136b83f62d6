"""`s3d evaluate`: thin wrapper over s3d.evaluate.evaluate_folders."""

from __future__ import annotations

from pathlib import Path

import click


def _parse_labels(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        labels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated label values like 1,2, got {value!r}") from None
    if not labels or any(v <= 0 for v in labels):
        raise click.BadParameter(f"expected positive label values like 1,2, got {value!r}")
    return labels


def _cell(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@click.command()
@click.argument("ref_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("pred_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="One PRED_DIR: the summary JSON to write; a CSV (one row per case and label) goes next to it "
                   "with the same name and .csv. Default: PRED_DIR/summary.json (and .csv). Several PRED_DIRs: "
                   "the comparison JSON (its table goes next to it as .md); each PRED_DIR still gets its "
                   "summary.json. Default: comparison.json in the folder that holds the PRED_DIRs.")
@click.option("--nsd-tolerance", type=click.FloatRange(min=0.0), default=1.0, show_default=True, metavar="MM",
              help="Tolerance of the normalised surface Dice, in mm: surface points of one mask within this "
                   "distance of the other mask's surface count as matched.")
@click.option("--labels", callback=_parse_labels, default=None, metavar="1,2",
              help="Comma-separated label values to evaluate. Default: the labels of dataset.json in REF_DIR "
                   "or its parent folder, else every non-zero value found in the references.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes reading and scoring cases in parallel.")
@click.option("--resamples", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="Several PRED_DIRs: bootstrap resamples (of the cases, with replacement) for the 95% interval "
                   "of each paired difference.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Several PRED_DIRs: seed of the bootstrap, so that a rerun gives the same intervals.")
def evaluate(ref_dir: Path, pred_dirs: tuple[Path, ...], output: Path | None, nsd_tolerance: float,
             labels: list[int] | None, jobs: int, resamples: int, seed: int) -> None:
    """Score the segmentations in PRED_DIR against the references in REF_DIR; with several PRED_DIRs
    (one per method), compare them case by case.

    Files are matched by name and must share the reference's grid. Per label: Dice, NSD (normalised
    surface Dice at --nsd-tolerance mm) and HD95 (95th-percentile Hausdorff distance, mm), computed as
    DeepMind's surface-distance package does. A label empty in both files is left out of the means; empty
    in just one scores Dice 0, NSD 0 and an undefined (null) HD95.

    Several PRED_DIRs: per method the mean Dice and NSD over cases (of each case's mean over labels),
    and for every pair A, B the mean paired difference A - B with a 95% percentile-bootstrap interval
    over cases and the share of cases where A is better (win), equal (tie) or worse (loss).
    """
    if len(pred_dirs) > 1:
        _compare(ref_dir, pred_dirs, output, nsd_tolerance, labels, jobs, resamples, seed)
        return
    pred_dir = pred_dirs[0]
    from s3d.evaluate import evaluate_folders

    output = output if output is not None else pred_dir / "summary.json"
    from s3d.evaluate import check_summary_path
    from s3d.files import prepare_output_dir

    check_summary_path(output)  # before the cases are scored, not after
    prepare_output_dir(output.parent, what="folder of the summary")
    summary = evaluate_folders(ref_dir, pred_dir, labels, nsd_tolerance=nsd_tolerance, jobs=jobs, output=output)
    rows = [(f"{value} {name}" if name != value else value, summary["mean"][value])
            for value, name in summary["labels"].items()]
    rows.append(("foreground mean", summary["foreground_mean"]))
    width = max(12, *(len(r[0]) for r in rows))
    nsd_head = f"NSD@{nsd_tolerance:g}mm"
    click.echo(f"{'label':<{width}}  {'Dice':>7}  {nsd_head:>10}  {'HD95 mm':>8}  {'cases':>5}")
    for title, m in rows:
        cases = str(m.get("n_cases", "")) if "n_cases" in m else ""
        click.echo(f"{title:<{width}}  {_cell(m['Dice'], 4):>7}  {_cell(m['NSD'], 4):>10}  "
                   f"{_cell(m['HD95'], 2):>8}  {cases:>5}")
    undefined = sum(summary["mean"][v]["n_hd95_undefined"] for v in summary["labels"])
    if undefined:
        click.echo(f"{undefined} label(s) empty in exactly one of reference/prediction: HD95 undefined there "
                   "(null, left out of the HD95 mean).")
    click.echo(f"{len(summary['metric_per_case'])} cases; wrote {output} and {output.with_suffix('.csv')}")


def _compare(ref_dir: Path, pred_dirs: tuple[Path, ...], output: Path | None, nsd_tolerance: float,
             labels: list[int] | None, jobs: int, resamples: int, seed: int) -> None:
    from s3d.compare import compare_folders, default_comparison_path, format_comparison
    from s3d.files import prepare_output_dir

    output = output if output is not None else default_comparison_path(pred_dirs)
    prepare_output_dir(output.parent, what="folder of the comparison")
    result = compare_folders(ref_dir, pred_dirs, labels=labels, nsd_tolerance=nsd_tolerance, jobs=jobs,
                             output=output, n_resamples=resamples, seed=seed)
    click.echo(format_comparison(result))
    click.echo(f"{result['n_cases']} cases; wrote {output} and {output.with_suffix('.md')} (each method's "
               "summary.json in its folder)")
