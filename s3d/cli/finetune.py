"""`s3d finetune`: thin wrapper over s3d.train.finetune.finetune."""

from __future__ import annotations

import os
from pathlib import Path

import click

from s3d.cli.options import (
    FoldsCommand,
    amp_option,
    cache_dir_option,
    device_option,
    jobs_option,
    patch_size_option,
    resume_option,
    seed_option,
    steps_option,
    workers_option,
)


@click.command(cls=FoldsCommand)
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", default="resenc-s", show_default=True,
              help="Network preset: resenc-s, resenc-m, resenc-l (stages/strides planned from the patch size and "
                   "spacing), or swin-unetr (Swin UNETR as in SimTROT: feature size 48, window 7) / swin-unetr-s "
                   "(CPU-sized: feature size 12, window 4), fixed topologies. Ignored with --weights (the weights "
                   "fix the network).")
@patch_size_option(None, "Default: the median preprocessed image shape (capped at 128), made divisible "
                         "by the network's total stride; for swin-unetr 128^3, swin-unetr-s 64^3 (or the "
                         "pre-training patch with --weights). Swin UNETR needs multiples of 32 voxels per axis.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True, help="Patches per step.")
@steps_option
@click.option("--val-every", type=click.IntRange(min=0), default=250, show_default=True,
              help="Validate (sliding-window Dice on the validation cases) every N steps; 0: only at the end.")
@click.option("--fold", type=click.IntRange(min=0), default=0, show_default=True,
              help="Validation fold of a fixed 5-fold split of the labeled cases (one run in OUTPUT).")
@click.option("--folds", default=None, metavar="all|K [K ...]",
              help="Cross-validation: train these folds of the fixed 5-fold split one after another into "
                   "OUTPUT/fold_K (`all`: 0-4). After each fold its validation cases are predicted on their "
                   "original grid into OUTPUT/fold_K/validation/ and scored; then OUTPUT/crossval/summary.json "
                   "scores all out-of-fold predictions and OUTPUT/postprocessing.json records the "
                   "postprocessing `s3d predict -m OUTPUT` applies. With --resume, finished folds are not "
                   "retrained and the unfinished one continues. Needs the raw dataset.")
@click.option("--no-tta", is_flag=True,
              help="With --folds: predict the validation cases without mirroring (8x faster, slightly worse).")
@click.option("--val-fraction", type=float, default=None,
              help="Instead of folds: hold out this fraction (0-1) of the labeled cases for validation.")
@click.option("--train-cases", type=click.IntRange(min=1), default=None,
              help="Use only N of the training cases (low-data regime; nested: 5 of them are in any 10).")
@seed_option
@device_option
@resume_option
@click.option("--weights", default=None,
              help="Pre-trained encoder: a registry name (see `s3d weights list`), a Hub repo owner/name[@rev], "
                   "or a local folder/file. Enables the S3D recipe: decoder warm-up, full warm-up, peak LR 1e-3.")
@click.option("--from-scratch", is_flag=True,
              help="Random initialisation (the baseline); with --weights, keep that network's config but not "
                   "its values.")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate. Default: 1e-2 from scratch, 1e-3 with --weights (S3D paper, tuned for "
                   "1000 epochs; with a few thousand steps or fewer, e.g. on a CPU, 1e-2 learns faster).")
@click.option("--warmup-steps", nargs=2, type=click.IntRange(min=0), default=None,
              help="With --weights: steps of decoder-only warm-up and of whole-network warm-up "
                   "(default: 5% and 5% of --steps, S3D's recipe; 0 0: none, the whole network at the peak "
                   "learning rate from the first step, as SimTROT fine-tunes).")
@click.option("--spacing", nargs=3, type=float, default=None,
              help="Target spacing in mm (X Y Z) when preprocessing a raw dataset. Default: the dataset median, "
                   "or the pre-training spacing with --weights (1 1 1 for S3D/OpenMind).")
@click.option("--no-deep-supervision", is_flag=True, help="Train on the full-resolution output only.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=250, show_default=True,
              help="Save weights and the resumable state every N steps.")
@amp_option
@workers_option
@jobs_option
@cache_dir_option
def finetune(dataset: Path, output: Path, arch: str, patch_size, batch_size: int, steps: int, val_every: int,
             fold: int, folds: str | None, no_tta: bool, val_fraction, train_cases, seed: int, device: str,
             resume: bool, weights, from_scratch: bool,
             lr, warmup_steps, spacing, no_deep_supervision: bool, checkpoint_every: int, amp: str, workers,
             jobs: int, cache_dir) -> None:
    """Train a segmentation network on DATASET and write it to OUTPUT.

    DATASET is an nnU-Net raw dataset folder (dataset.json, imagesTr/, labelsTr/), preprocessed on the
    fly into a cache, or the output of `s3d preprocess`. OUTPUT receives model.safetensors and
    config.json (all that `s3d predict` needs), the resumable state, log.csv and validation.jsonl;
    with --folds, one such folder per fold (OUTPUT/fold_K) plus the cross-validation results.
    """
    from s3d.train.finetune import FinetuneConfig
    from s3d.train.finetune import finetune as run

    cfg = FinetuneConfig(
        arch=arch, patch_size=tuple(patch_size) if patch_size else None, batch_size=batch_size, steps=steps,
        val_every=val_every, fold=fold, val_fraction=val_fraction, train_cases=train_cases, seed=seed,
        lr=lr, warmup_steps=tuple(warmup_steps) if warmup_steps else None, weights=weights, from_scratch=from_scratch,
        deep_supervision=not no_deep_supervision, spacing=tuple(spacing) if spacing else None, device=device,
        amp=amp, checkpoint_every=checkpoint_every,
    )
    if folds is not None:
        from s3d.crossval import crossval_finetune, parse_folds

        result = crossval_finetune(dataset, output, cfg, parse_folds(folds), resume=resume, jobs=jobs,
                                   cache_dir=cache_dir, workers=workers, tta=not no_tta)
        if result.get("summary_path"):
            click.echo(f"cross-validation summary in {result['summary_path']} (predict the ensemble of the folds "
                       f"with: s3d predict -i IMAGES -o OUT -m {output})")
        return
    out = run(dataset, output, cfg, resume=resume, jobs=jobs, cache_dir=cache_dir, workers=workers)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, once rather than once per rank
        click.echo(f"model written to {out} (predict with: s3d predict -i IMAGES -o OUT -m {out})")
