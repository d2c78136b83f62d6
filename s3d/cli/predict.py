"""`s3d predict`: thin wrapper over s3d.predict.predict_folder."""

from __future__ import annotations

from pathlib import Path

import click

from s3d.cli.options import FoldsCommand, amp_option, device_option


@click.command(cls=FoldsCommand)
@click.option("-i", "--input", "input_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of images: plain files (one channel each) or nnU-Net CASE_0000 channel files. "
                   "Never modified.")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for CASE.nii.gz segmentations, written on exactly each input's grid and header.")
@click.option("-m", "--model", "--weights", "models", required=True, multiple=True,
              help="A run folder of `s3d finetune` (model.safetensors + config.json), a cross-validation run "
                   "(`s3d finetune --folds`: its finished folds are ensembled), or segmentation weights by "
                   "registry name or Hub repo owner/name[@rev] (downloaded to the Hugging Face cache). Repeat "
                   "(-m A -m B) to ensemble several runs with the same labels and input channels: their softmax "
                   "probabilities are averaged.")
@click.option("--folds", default=None, metavar="K [K ...]",
              help="Which folds of a cross-validation run to ensemble (e.g. `--folds 0 2 4` or `0,2,4`); each "
                   "must be finished. Default: every finished fold.")
@click.option("--no-postprocessing", is_flag=True,
              help="Skip the postprocessing that cross-validation chose (postprocessing.json of the run: keep "
                   "the largest connected component); the plain argmax is written.")
@click.option("--step-size", type=click.FloatRange(0.05, 1.0), default=0.5, show_default=True,
              help="Sliding-window step as a fraction of the patch size (smaller: more overlap, slower).")
@click.option("--no-tta", is_flag=True, help="Disable mirroring test-time augmentation (8x faster, slightly worse).")
@click.option("--save-probabilities", is_flag=True,
              help="Also write OUTPUT/probabilities/CASE_probNN files: per-class softmax probabilities on the "
                   "input grid (float32); of an ensemble, its averaged probabilities.")
@click.option("--continue", "continue_", is_flag=True,
              help="Skip cases whose outputs exist and are complete (and on the input's grid); incomplete ones, "
                   "e.g. from a killed run, are predicted again.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Sliding windows per network forward.")
@device_option
@amp_option
def predict(input_dir: Path, output_dir: Path, models: tuple[str, ...], folds: str | None, no_postprocessing: bool,
            step_size: float, no_tta: bool, save_probabilities: bool, continue_: bool, batch_size: int, device: str,
            amp: str) -> None:
    """Segment every image in INPUT with MODEL; write OUTPUT/CASE.nii.gz on the input's grid.

    Each case is read and preprocessed once, however many networks predict it.
    """
    from s3d.predict import predict_folder

    fold_list = None
    if folds is not None:
        from s3d.crossval import parse_folds

        fold_list = parse_folds(folds)
    written = predict_folder(input_dir, output_dir, list(models), step_size=step_size, tta=not no_tta,
                             save_probabilities=save_probabilities, continue_=continue_, device=device,
                             batch_size=batch_size, amp=amp, folds=fold_list, postprocessing=not no_postprocessing)
    click.echo(f"{len(written)} segmentations in {output_dir}")
