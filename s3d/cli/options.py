"""Options shared by several commands, so their names, defaults and help read the same everywhere."""

from __future__ import annotations

from pathlib import Path

import click

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
    help="Continue the run in OUTPUT from its last checkpoint (same settings as when it started).",
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
