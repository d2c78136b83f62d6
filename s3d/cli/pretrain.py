"""`s3d pretrain`: thin wrapper over s3d.train.pretrain.pretrain."""

from __future__ import annotations

import os
from pathlib import Path

import click

from s3d.cli.options import (
    amp_option,
    cache_dir_option,
    curation_config,
    curation_options,
    device_option,
    jobs_option,
    patch_size_option,
    resume_option,
    seed_option,
    steps_option,
    workers_option,
)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["mae", "simtrot", "btrot"]), default="mae", show_default=True,
              help="mae: S3D sparse masked autoencoder; simtrot: token contrastive (SimCLR) with rotate-and-restore; "
                   "btrot: its BYOL variant.")
@click.option("--arch", default="resenc-l", show_default=True,
              help="Encoder preset: resenc-l (the S3D paper's network), resenc-m, resenc-s (CPU-sized), "
                   "swin-unetr (SimTROT's Swin UNETR, feature size 48, window 7) or swin-unetr-s (CPU-sized: "
                   "feature size 12, window 4). Swin UNETR takes simtrot/btrot only, and a cubic --patch-size "
                   "in voxels that is a multiple of 32 (its token grid stride), at least 64 (128 in SimTROT).")
@patch_size_option((160, 160, 160), "S3D uses 160^3 at 1 mm; try 64 64 64 on a CPU.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Patches per step (simtrot needs >= 2).")
@steps_option
@click.option("--lr", type=float, default=None,
              help="Peak learning rate of SGD (Nesterov momentum 0.99, weight decay 3e-5, PolyLR). Default: 1e-2 "
                   "for resenc-* (S3D, Wald et al. 2024), 1e-4 for swin-unetr* (SimTROT Sec. 4.2).")
@click.option("--spacing", nargs=3, type=float, default=(1.0, 1.0, 1.0), show_default=True,
              help="Voxel spacing in mm that raw image folders are resampled to (S3D: 1 1 1).")
@click.option("--mask-ratio", default=None,
              help="mae: fraction of masked blocks, dynamic per sample (default 0.6-0.9, S3D's final model) or "
                   "fixed (e.g. 0.75). simtrot/btrot: fraction of masked cells in view A (fixed, default 0.75).")
@click.option("--mask-block", nargs=3, type=click.IntRange(min=1), default=None,
              help="mae: masked cube edge in voxels (X Y Z). Default: patch / bottleneck size, i.e. 32 for "
                   "160^3 with resenc-l (S3D); must be a multiple of the network's total stride.")
@click.option("--block-sparse/--no-block-sparse", default=True, show_default=True,
              help="mae: compute the high-resolution stages (mask cells >= 4 voxels per axis there) on the "
                   "visible cells only, with the same results as the masked dense emulation that "
                   "--no-block-sparse runs on every stage (ResEnc-L on CPU: 0.53-0.61x of a dense step's time).")
@click.option("--temperature", type=float, default=0.5, show_default=True, help="simtrot: softmax temperature tau.")
@click.option("--same-position-weight", type=float, default=5.0, show_default=True,
              help="simtrot: weight w on same-position tokens of other volumes in the denominator (1 = plain NT-Xent).")
@click.option("--token-stage", type=int, default=-1, show_default=True,
              help="simtrot/btrot: encoder stage whose feature-map voxels are the tokens (-1: bottleneck).")
@click.option("--ema-decay", type=float, default=0.99, show_default=True, help="btrot: EMA decay of the target.")
@click.option("--flip-views", is_flag=True,
              help="simtrot/btrot: draw view B's transform from the 48 rotations x mirror flips instead of the "
                   "24 proper rotations.")
@click.option("--no-augment", is_flag=True,
              help="Disable the minor spatial augmentation (scaling, rotation, mirroring) that is on by default.")
@seed_option
@device_option
@resume_option
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=250, show_default=True,
              help="Save weights, state and a preview PNG (input, masked input, reconstruction) every N steps.")
@amp_option
@workers_option
@jobs_option
@cache_dir_option
@curation_options
def pretrain(paths: tuple[Path, ...], method: str, arch: str, patch_size, batch_size: int, steps: int,
             lr: float | None,
             spacing, mask_ratio: str | None, mask_block, block_sparse: bool, temperature: float,
             same_position_weight: float,
             token_stage: int, ema_decay: float, flip_views: bool, no_augment: bool, seed: int, device: str,
             resume: bool,
             checkpoint_every: int, amp: str, workers, jobs: int, cache_dir, min_slices: int, min_voxels: int,
             max_spacing: float, min_fov_fraction: float) -> None:
    """Pre-train an encoder without labels: s3d pretrain DATA... OUTPUT.

    DATA: folders of images (searched recursively; NIfTI/NRRD/MHA; nnU-Net datasets give their
    imagesTr/imagesTs), text files with one image path per line, nnssl pretrain_data.json files, or
    stores written by `s3d preprocess --corpus` (used as they are, even while other parts are still
    being written). Raw sources are curated (files that would poison training are skipped, with
    their reason in the store's report.json) and preprocessed once into the cache. Each channel is a
    separate sample. OUTPUT receives model.safetensors (encoder.* keys; swinViT.* for Swin UNETR) +
    config.json, which `s3d finetune --weights OUTPUT` accepts. Multi-GPU / multi-node: preprocess first, then
    `torchrun --nproc-per-node N -m s3d pretrain STORE OUTPUT ...`.
    """
    from s3d.errors import S3DError
    from s3d.train.pretrain import PretrainConfig
    from s3d.train.pretrain import pretrain as run

    if len(paths) < 2:
        raise S3DError("give at least one DATA folder and the OUTPUT folder")
    *data, output = paths
    for d in data:
        if not d.exists():
            raise S3DError(f"{d}: not found")
    if mask_ratio is None:
        # the default depends on the method: S3D's dynamic U[0.6, 0.9] for mae, SimTROT's fixed 75% for view A
        mask_ratio = PretrainConfig.mask_ratio if method == "mae" else "0.75"
    if method != "mae":
        try:
            float(mask_ratio)
        except ValueError:
            raise S3DError(f"--mask-ratio {mask_ratio}: {method} takes a fixed ratio such as 0.75") from None
    cfg = PretrainConfig(
        method=method, arch=arch, patch_size=tuple(patch_size), batch_size=batch_size, steps=steps, lr=lr,
        spacing=tuple(spacing), seed=seed, device=device, amp=amp, checkpoint_every=checkpoint_every,
        preview_every=checkpoint_every, augment=not no_augment, mask_ratio=mask_ratio,
        mask_block=tuple(mask_block) if mask_block else None, block_sparse=block_sparse, temperature=temperature,
        same_position_weight=same_position_weight, token_stage=token_stage,
        view_mask_ratio=float(mask_ratio) if method != "mae" else 0.75, ema_decay=ema_decay,
        flip_views=flip_views,
    )
    out = run(data, output, cfg, resume=resume, jobs=jobs, cache_dir=cache_dir, workers=workers,
              curation=curation_config(min_slices, min_voxels, max_spacing, min_fov_fraction))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, once rather than once per rank
        click.echo(f"pre-trained weights in {out} (fine-tune with: s3d finetune DATASET RUN --weights {out})")
