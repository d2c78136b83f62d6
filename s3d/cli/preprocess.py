"""`s3d preprocess`: validate a dataset, then crop, normalise and resample it (s3d.data.preprocess)."""

from __future__ import annotations

from pathlib import Path

import click

from s3d.errors import S3DError


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class _SpacingCommand(click.Command):
    """Lets `--spacing X Y Z` and `--spacing median` share one option: click options take a fixed
    number of values, so three numbers after --spacing are joined into one "X,Y,Z" value first."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out, i = [], 0
        while i < len(args):
            if args[i] == "--":  # everything after it is positional
                out += args[i:]
                break
            nums = args[i + 1: i + 4]
            if args[i] == "--spacing" and len(nums) == 3 and all(_is_number(t) for t in nums):
                out.append("--spacing=" + ",".join(nums))
                i += 4
            else:
                out.append(args[i])
                i += 1
        return super().parse_args(ctx, out)


@click.command(cls=_SpacingCommand)
@click.argument("input_dir", metavar="INPUT", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--spacing", default="median", show_default=True, metavar="X Y Z|median",
              help="Target voxel spacing in mm per array axis, e.g. `--spacing 1 1 1`, or `median`: the dataset's "
                   "median spacing (nnU-Net rule: a very anisotropic axis gets the 10th percentile instead).")
@click.option("--norm", type=click.Choice(["auto", "zscore", "ct", "none"]), default="auto", show_default=True,
              help="Intensity normalisation of every channel. auto: `ct` for channels named CT in dataset.json, "
                   "else `zscore`. zscore: per image (x - mean) / std (over the nonzero region only when "
                   "cropping to it removes > 25% of the median case, as nnU-Net). ct: clip to the dataset "
                   "foreground's 0.5-99.5 percentiles, then z-score with the foreground mean and std. none: unchanged.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes (one case each at a time; each holds a few copies of one volume in memory).")
@click.option("--overwrite", is_flag=True,
              help="Redo every case, and accept an OUTPUT made with other settings. Default: finished cases "
                   "made with the same settings are kept (an interrupted run resumes).")
def preprocess(input_dir: Path, output: Path, spacing: str, norm: str, jobs: int, overwrite: bool) -> None:
    """Validate INPUT, then crop, normalise and resample every case into OUTPUT.

    INPUT is an nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) or a plain folder of
    images (unlabeled, e.g. for pre-training; CASE_0000, CASE_0001... files are channels of one
    case). Every problem found in INPUT is printed on its own line and nothing is written
    (exit code 2). OUTPUT receives plan.json, fingerprint.json, dataset.json and
    cases/CASE.npz + cases/CASE.json; `s3d finetune` and `s3d pretrain` accept it as their data.
    """
    from s3d.cli import UserError
    from s3d.data.dataset import find_dataset
    from s3d.data.preprocess import DatasetProblems, check_dataset, plan_dataset, preprocess_dataset

    try:
        if output.resolve() == input_dir.resolve() or input_dir.resolve() in output.resolve().parents:
            raise S3DError(f"{output}: output folder must not be INPUT or inside it")
        ds = find_dataset(input_dir)
        try:
            check_dataset(ds, jobs)
        except DatasetProblems as e:
            for line in e.problems:
                click.echo(f"s3d: error: {line}", err=True)
            click.echo(f"s3d: error: {input_dir}: {len(e.problems)} problem(s); nothing was written", err=True)
            # SystemExit, not click's Exit: `s3d.cli.main` runs click with standalone_mode=False, where
            # an Exit's code would be returned and dropped
            raise SystemExit(2) from None
        plan, fingerprint = plan_dataset(ds, spacing=spacing, norm=None if norm == "auto" else norm, jobs=jobs,
                                         validate=False)
        written = len(preprocess_dataset(ds, output, plan, jobs=jobs, overwrite=overwrite,
                                         fingerprint=fingerprint, validate=False))
    except S3DError as e:
        raise UserError(str(e)) from None
    sp = " x ".join(f"{s:g}" for s in plan.target_spacing)
    done = f"{written} case(s) preprocessed" if written else "nothing to do"
    if written < len(ds.cases):
        done += f", {len(ds.cases) - written} already up to date"
    click.echo(f"{done} in {output} (spacing {sp} mm, normalisation {', '.join(plan.normalization)})")
