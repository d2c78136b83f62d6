"""Options shared by several commands, so their names, defaults and help read the same everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import click

_FOLD_NUMBERS = re.compile(r"\d+(,\d+)*")


def join_fold_numbers(args: list[str]) -> list[str]:
    """`--folds 0 2 4` as `--folds=0 2 4`: the fold numbers that follow --folds joined into its one value.
    A token that is not a number (the next option, DATASET, OUTPUT) ends the list; `--` ends the options."""
    joined: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            return [*joined, token, *args[i:]]
        if token == "--folds" and i < len(args):
            token = f"--folds={args[i]}"
            i += 1
        if token.startswith("--folds="):
            values = [token]
            while i < len(args) and _FOLD_NUMBERS.fullmatch(args[i]):
                values.append(args[i])
                i += 1
            token = " ".join(values)
        joined.append(token)
    return joined


class FoldsCommand(click.Command):
    """A command whose --folds takes one value or several: `--folds all`, `--folds 0 2 4`, `--folds 0,2,4`.
    click's options have a fixed number of values (nargs=-1 is for arguments only), so the fold numbers
    are joined before click parses, through its public parse_args rather than its private parser."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, join_fold_numbers(args))


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to compute: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
)
seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Random seed (sampling, init).")
resume_option = click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in OUTPUT from its last complete checkpoint, with the settings saved when it "
    "started (options given now, except --device, are ignored). Without it, a folder that holds a run "
    "is refused.",
)
steps_option = click.option(
    "--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Total optimizer steps."
)


def patch_size_option(default: tuple[int, int, int] | None, extra: str = "") -> click.decorators.FC:
    return click.option(
        "--patch-size",
        nargs=3,
        type=click.IntRange(min=8),
        default=default,
        show_default=default is not None,
        help=f"Training patch size in voxels (X Y Z). {extra}".strip(),
    )

amp_option = click.option(
    "--amp", type=click.Choice(["auto", "off", "bf16", "fp16"]), default="auto", show_default=True,
    help="Mixed precision: auto uses bf16 autocast on CUDA and full precision (fp32) on CPU. bf16 on a CPU with "
         "AMX or AVX512-BF16 (recent Xeons) is ~2.5x faster; on other CPUs it is slower than fp32.",
)
jobs_option = click.option(
    "-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True,
    help="Processes for preprocessing raw image folders (done once, then cached).",
)
cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where preprocessed raw folders are cached. Default: $S3D_CACHE/preprocessed or ~/.cache/s3d/preprocessed.",
)
workers_option = click.option(
    "--workers", type=click.IntRange(min=0), default=None,
    help="DataLoader processes that cut training patches from the preprocessed store (0: in the training "
         "process). Default: the cores available to this process, divided among the torchrun processes on "
         "this machine, minus one, at most 8.",
)


def curation_options(f: click.decorators.FC, fov: bool = True) -> click.decorators.FC:
    """--min-slices, --min-voxels, --max-spacing (and --min-fov-fraction): which corpus files are skipped."""
    from s3d.data.curation import CurationConfig

    d = CurationConfig()
    opts = [
        click.option("--min-slices", type=click.IntRange(min=1), default=d.min_slices, show_default=True,
                     help="Corpus: skip a file with fewer voxels than this along any axis, on its own grid or after "
                          "resampling to the target spacing (localizer / scout-like series)."),
        click.option("--min-voxels", type=click.IntRange(min=1), default=d.min_voxels, show_default=True,
                     help="Corpus: skip a file with fewer voxels than this in all, on its own grid or after "
                          "resampling to the target spacing."),
        click.option("--max-spacing", type=click.FloatRange(min=0, min_open=True), default=d.max_spacing,
                     show_default=True,
                     help="Corpus: skip a file whose voxel spacing is coarser than this (mm) along any axis."),
    ]
    if fov:
        opts.append(click.option(
            "--min-fov-fraction", type=click.FloatRange(min=0), default=d.min_fov_fraction, show_default=True,
            help="Leave out a volume that is smaller than this fraction of --patch-size along two or more axes "
                 "after resampling (0: keep all; padding fills the rest)."))
    for opt in reversed(opts):
        f = opt(f)
    return f


def curation_config(min_slices: int, min_voxels: int, max_spacing: float,  # noqa: ANN201 - CurationConfig
                    min_fov_fraction: float | None = None):
    from s3d.data.curation import CurationConfig

    extra = {} if min_fov_fraction is None else {"min_fov_fraction": min_fov_fraction}
    return CurationConfig(min_slices=min_slices, min_voxels=min_voxels, max_spacing=max_spacing, **extra)
