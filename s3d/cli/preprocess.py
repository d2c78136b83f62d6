"""`s3d preprocess`: validate a dataset, then crop, normalise and resample it (s3d.data.preprocess)."""

from __future__ import annotations

from pathlib import Path

import click

from s3d.cli.options import curation_config, curation_options, patch_size_option
from s3d.errors import S3DError, one_line
from s3d.files import refuse_inputs


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
            if args[i] == "--spacing" and nums and _is_number(nums[0]):
                # exactly three numbers: a fourth (or a missing third) would silently become an INPUT
                count = 0
                while i + 1 + count < len(args) and _is_number(args[i + 1 + count]):
                    count += 1
                if count != 3:
                    given = " ".join(args[i + 1: i + 1 + count])
                    raise click.UsageError(f"--spacing takes 'median' or three numbers (X Y Z mm), got {count}: "
                                           f"{given}", ctx=ctx)
                out.append("--spacing=" + ",".join(nums))
                i += 4
            else:
                out.append(args[i])
                i += 1
        return super().parse_args(ctx, out)


def _no_fov(f: click.decorators.FC) -> click.decorators.FC:
    return curation_options(f, fov=False)


@click.command(cls=_SpacingCommand)
@click.argument("paths", nargs=-1, required=True, metavar="INPUT... OUTPUT", type=click.Path(path_type=Path))
@click.option("--spacing", default="median", show_default=True, metavar="X Y Z|median",
              help="Target voxel spacing in mm per array axis, e.g. `--spacing 1 1 1`, or `median`: the dataset's "
                   "median spacing (nnU-Net rule: a very anisotropic axis gets the 10th percentile instead). "
                   "With --corpus, `median` means 1 1 1 (S3D), since no machine sees the whole corpus.")
@click.option("--norm", type=click.Choice(["auto", "zscore", "ct", "none"]), default="auto", show_default=True,
              help="Intensity normalisation of every channel. auto: `ct` for channels named CT in dataset.json, "
                   "else `zscore`. zscore: per image (x - mean) / std (over the nonzero region only when "
                   "cropping to it removes > 25% of the median case, as nnU-Net). ct: clip to the dataset "
                   "foreground's 0.5-99.5 percentiles, then z-score with the foreground mean and std. none: unchanged. "
                   "--corpus always z-scores each image.")
@click.option("--corpus", is_flag=True,
              help="INPUTs are a pre-training corpus: folders (searched recursively), text files of image paths "
                   "or nnssl pretrain_data.json files; every file is one volume, and a file that would poison "
                   "pre-training is skipped with its reason (OUTPUT/report*.json) instead of stopping the run. "
                   "Implied by several INPUTs or an INPUT that is a file.")
@click.option("--part", type=click.IntRange(min=0), default=0, show_default=True,
              help="--corpus: preprocess only part K (0..N-1) of the files, e.g. one part per machine; every part "
                   "writes into its own or a shared OUTPUT and training reads the union.")
@click.option("--parts", type=click.IntRange(min=1), default=1, show_default=True,
              help="--corpus: the number N of parts the files are split into (by a hash of each file's id, so "
                   "every machine computes the same split).")
@patch_size_option(None, "The blosc2 chunks are laid out for reading patches of this size; any patch size "
                         "reads correctly later. Default: S3D's 160 160 160 with --corpus, else 128 128 128.")
@_no_fov
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes (one case each at a time; each holds a few copies of one volume in memory).")
@click.option("--overwrite", is_flag=True,
              help="Redo every case, and accept an OUTPUT made with other settings. Default: finished cases "
                   "made with the same settings are kept (an interrupted run resumes).")
def preprocess(paths: tuple[Path, ...], spacing: str, norm: str, corpus: bool, part: int,
               parts: int, patch_size, min_slices: int, min_voxels: int, max_spacing: float, jobs: int,
               overwrite: bool) -> None:
    """Validate INPUT, then crop, normalise and resample every case into OUTPUT.

    INPUT is an nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) or a plain folder of
    images (CASE_0000, CASE_0001... files are channels of one case). Every problem found in INPUT
    is printed on its own line and nothing is written (exit code 2). With --corpus (pre-training),
    bad files are skipped instead and listed with their reasons. OUTPUT receives plan.json,
    store.json, dataset.json and cases/ (one chunked, compressed blosc2 array per case: a
    training patch reads only the blocks it needs); `s3d finetune` and `s3d pretrain` accept it as
    their data.
    """
    from s3d.cli import UserError
    from s3d.data.corpus_preprocess import CORPUS_LAYOUT_PATCH
    from s3d.data.preprocess import DEFAULT_LAYOUT_PATCH

    if len(paths) < 2:
        raise UserError("give INPUT and OUTPUT (several INPUTs with --corpus)")
    *inputs, output = paths
    for i in inputs:
        if not i.exists():
            raise UserError(f"{i}: not found")
    try:
        refuse_inputs(output, tuple(inputs))  # nothing is created before the inputs are validated
    except S3DError as e:
        raise UserError(str(e)) from None
    corpus = corpus or len(inputs) > 1 or any(i.is_file() for i in inputs)
    layout_patch = tuple(patch_size) if patch_size else (CORPUS_LAYOUT_PATCH if corpus else DEFAULT_LAYOUT_PATCH)
    try:
        if corpus:
            _preprocess_corpus(inputs, output, spacing, norm, part, parts, layout_patch,
                               curation_config(min_slices, min_voxels, max_spacing), jobs, overwrite)
        else:
            if parts != 1 or part != 0:
                raise S3DError("--part/--parts split a pre-training corpus (--corpus); a labeled dataset is "
                               "planned from all its cases at once")
            _preprocess_dataset(inputs[0], output, spacing, norm, layout_patch, jobs, overwrite)
    except S3DError as e:
        raise UserError(str(e)) from None


def _preprocess_corpus(inputs: list[Path], output: Path, spacing: str, norm: str, part: int, parts: int,
                       patch_size: tuple[int, ...], curation, jobs: int, overwrite: bool) -> None:  # noqa: ANN001
    from s3d.data.corpus import find_corpus
    from s3d.data.corpus_preprocess import CORPUS_SPACING, corpus_plan, preprocess_corpus
    from s3d.data.preprocess import _parse_spacing

    if norm not in ("auto", "zscore"):
        raise S3DError(f"--norm {norm}: a corpus is z-scored per image (ct needs statistics of the whole corpus)")
    if part >= parts:
        raise S3DError(f"--part {part}: must be below --parts {parts} (parts count from 0)")
    target = _parse_spacing(spacing)
    plan = corpus_plan(CORPUS_SPACING if target == "median" else target)
    images = find_corpus(inputs)
    if not images:
        raise S3DError("no images found in " + ", ".join(str(i) for i in inputs))
    report = preprocess_corpus(images, output, plan, jobs=jobs, part=part, parts=parts, patch_size=patch_size,
                               curation=curation, overwrite=overwrite)
    sp = " x ".join(f"{s:g}" for s in plan.target_spacing)
    click.echo(f"{report.summary()}; store {output} (spacing {sp} mm, z-score)")


def _preprocess_dataset(input_dir: Path, output: Path, spacing: str, norm: str, patch_size: tuple[int, ...],
                        jobs: int, overwrite: bool) -> None:
    from s3d.data.dataset import find_dataset
    from s3d.data.preprocess import DatasetProblems, check_dataset, plan_dataset, preprocess_dataset

    if not input_dir.is_dir():
        raise S3DError(f"{input_dir}: not a folder")
    ds = find_dataset(input_dir)
    try:
        check_dataset(ds, jobs)
    except DatasetProblems as e:
        for line in e.problems:
            click.echo(f"s3d: error: {one_line(line)}", err=True)
        click.echo(f"s3d: error: {one_line(input_dir)}: {len(e.problems)} problem(s); nothing was written", err=True)
        # SystemExit, not click's Exit: `s3d.cli.main` runs click with standalone_mode=False, where
        # an Exit's code would be returned and dropped
        raise SystemExit(2) from None
    plan, fingerprint = plan_dataset(ds, spacing=spacing, norm=None if norm == "auto" else norm, jobs=jobs,
                                     validate=False)
    written = len(preprocess_dataset(ds, output, plan, jobs=jobs, overwrite=overwrite, fingerprint=fingerprint,
                                     validate=False, patch_size=patch_size))
    sp = " x ".join(f"{s:g}" for s in plan.target_spacing)
    done = f"{written} case(s) preprocessed" if written else "nothing to do"
    if written < len(ds.cases):
        done += f", {len(ds.cases) - written} already up to date"
    click.echo(f"{done} in {output} (spacing {sp} mm, normalisation {', '.join(plan.normalization)})")
