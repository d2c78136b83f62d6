"""`s3d demo`: fine-tune, predict and evaluate on the real hippocampus MRIs bundled with s3d."""

from __future__ import annotations

from pathlib import Path

import click

from s3d.cli.options import device_option
from s3d.demo import DEFAULT_OUTPUT, DEFAULT_STEPS


@click.command()
@click.option("-o", "--output", type=click.Path(file_okay=True, path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True,
              help="Folder for the run, the held-out images and labels, the predictions and summary.json. "
                   "Must be empty or absent (see --overwrite).")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True,
              help="Fine-tuning steps, each a batch of 2 patches of 40x56x40 voxels (1 mm). About 2-5 minutes "
                   "on 2 CPU cores at the default (bf16 on CPUs that have it, else fp32); fewer steps leave "
                   "the held-out Dice near 0.")
@click.option("--overwrite", is_flag=True,
              help="Delete OUTPUT first if an earlier `s3d demo` wrote it (other folders are never deleted).")
@device_option
def demo(output: Path, steps: int, overwrite: bool, device: str) -> None:
    """Fine-tune on 18 real hippocampus MRIs shipped with s3d, predict the 6 held-out ones, print Dice/NSD.

    The 24 cases are Medical Segmentation Decathlon Task04 (Vanderbilt University Medical Center,
    CC BY-SA 4.0; attribution in s3d/assets/Dataset004_Hippocampus/). A small Residual Encoder U-Net
    (resenc-s) is trained from scratch; the 6 held-out cases are never seen in training, and their
    predictions are written on exactly their input voxel grid.
    """
    from s3d.demo import run_demo

    res = run_demo(output, steps=steps, device=device, overwrite=overwrite, echo=click.echo)
    names = res.metrics["labels"]
    click.echo("")
    click.echo(f"Held-out cases ({len(res.heldout_cases)}, never trained on): {', '.join(res.heldout_cases)}")
    click.echo(f"{'label':<12}{'Dice':>8}{'NSD@1mm':>10}")
    for value, name in names.items():
        m = res.metrics["mean"][value]
        click.echo(f"{name:<12}{_num(m['Dice']):>8}{_num(m['NSD']):>10}")
    fg = res.metrics["foreground_mean"]
    click.echo(f"{'mean':<12}{_num(fg['Dice']):>8}{_num(fg['NSD']):>10}")
    click.echo("")
    click.echo(f"model:        {res.run}   (s3d predict -i IMAGES -o OUT -m {res.run})")
    click.echo(f"predictions:  {res.predictions}")
    click.echo(f"scores:       {res.summary} (per case: {res.summary.with_suffix('.csv')})")
    click.echo("Next: your own nnU-Net dataset with `s3d finetune DATASET RUN` (s3d finetune --help).")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
