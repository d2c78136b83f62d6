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
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Summary JSON to write; a CSV (one row per case and label) goes next to it with the same "
                   "name and .csv. Default: PRED_DIR/summary.json (and PRED_DIR/summary.csv).")
@click.option("--nsd-tolerance", type=click.FloatRange(min=0.0), default=1.0, show_default=True, metavar="MM",
              help="Tolerance of the normalised surface Dice, in mm: surface points of one mask within this "
                   "distance of the other mask's surface count as matched.")
@click.option("--labels", callback=_parse_labels, default=None, metavar="1,2",
              help="Comma-separated label values to evaluate. Default: the labels of dataset.json in REF_DIR "
                   "or its parent folder, else every non-zero value found in the references.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes reading and scoring cases in parallel.")
def evaluate(ref_dir: Path, pred_dir: Path, output: Path | None, nsd_tolerance: float, labels: list[int] | None,
             jobs: int) -> None:
    """Score the segmentations in PRED_DIR against the references in REF_DIR.

    Files are matched by name and must share the reference's grid. Per label: Dice, NSD (normalised
    surface Dice at --nsd-tolerance mm) and HD95 (95th-percentile Hausdorff distance, mm), computed as
    DeepMind's surface-distance package does. A label empty in both files is left out of the means; empty
    in just one scores Dice 0, NSD 0 and an undefined (null) HD95.
    """
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
