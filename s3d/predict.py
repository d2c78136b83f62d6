"""Segment a folder of images with a trained model, writing each result on its input's exact grid.

Per case: read channels -> the model's Plan forward (crop, normalise, resample) -> sliding window
with Gaussian weighting and mirroring TTA -> the Plan backward (resample probabilities to the
cropped grid, paste into the full grid, argmax) -> write with the input's header.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from s3d.errors import S3DError, one_line


@dataclass
class Predictor:
    network: torch.nn.Module
    config: dict
    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype of the network's forward, None = full precision

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.config["patch_size"])

    @property
    def num_channels(self) -> int:
        return int(self.config["network"]["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.config["network"]["num_classes"])


def load_predictor(model: str | Path, device: str = "auto", amp: str = "auto") -> Predictor:
    """A segmentation model from a run folder (model.safetensors + config.json) or a weights name.

    `amp`: "auto" (bf16 autocast on CUDA, full precision on CPU), "off", "bf16" or "fp16"; on CPUs
    with AMX / AVX512-BF16, "bf16" runs the network ~2.5x faster (see benchmarks/README.md).
    """
    from s3d.checkpoint import CONFIG_FILE, MODEL_FILE, load_model
    from s3d.device import amp_dtype, resolve_device
    from s3d.model_check import check_config, check_tensors
    from s3d.nn.resenc import ResEncConfig, ResEncUNet

    path = Path(model)
    if path.is_dir():
        state, config = load_model(path)
        config_source, tensor_source = str(path / CONFIG_FILE), str(path / MODEL_FILE)
    else:
        from s3d.hub import resolve_weights

        resolved = resolve_weights(str(model))
        config_source = tensor_source = resolved.source
        config = resolved.config
        check_config(config, config_source, kind="segmentation")  # before the tensors are fetched
        state = resolved.state_dict
    check_config(config, config_source, kind="segmentation")
    net_cfg = ResEncConfig.from_dict(config["network"])
    net_cfg.deep_supervision = False  # inference needs the full-resolution output only
    with torch.device("meta"):  # shapes only: a config describing a huge network allocates nothing
        check_tensors(ResEncUNet(net_cfg), state, tensor_source)
    network = ResEncUNet(net_cfg)
    network.load_state_dict(state)
    dev = resolve_device(device)
    network.to(dev).eval()
    return Predictor(network, config, dev, amp_dtype(amp, dev))


def prediction_bytes(predictor: Predictor, shape: tuple[int, ...], spacing, target_spacing  # noqa: ANN001
                     ) -> tuple[int, tuple[int, int, int]]:
    """Upper bound of the bytes predicting one image of `shape` at `spacing` takes, and the grid it is
    resampled to: the image, logits, weights and softmax on that grid plus the probabilities pasted
    back on the original grid, all float32 (the crop to the nonzero region can only make it smaller)."""
    from s3d.data.resample import shape_for_spacing

    grid = shape_for_spacing(tuple(int(s) for s in shape), spacing, target_spacing)
    padded = [max(g, p) for g, p in zip(grid, predictor.patch_size, strict=True)]
    c, k = predictor.num_channels, predictor.num_classes
    new_voxels, old_voxels = int(np.prod(padded, dtype=np.float64)), int(np.prod(shape, dtype=np.float64))
    return 4 * (new_voxels * (c + 2 * k + 1) + old_voxels * (c + k)), grid


def check_prediction_memory(predictor: Predictor, shape: tuple[int, ...], geometry, target_spacing  # noqa: ANN001
                            ) -> None:
    """S3DError naming the image when predicting it would take more than `io.memory_budget()`: a model
    config with a tiny spacing (or a huge image) fails on one line before anything is allocated."""
    from s3d.data.io import memory_budget

    need, grid = prediction_bytes(predictor, shape, geometry.spacing, target_spacing)
    budget = memory_budget()
    if need > budget:
        spacing = " x ".join(f"{s:g}" for s in target_spacing)
        raise S3DError(f"{getattr(geometry, 'source', 'image')}: predicting it at the model's spacing {spacing} mm "
                       f"means a {tuple(grid)} grid, about {need / 2**30:.3g} GiB, more than the memory budget "
                       f"{budget / 2**30:.3g} GiB (S3D_MAX_IMAGE_BYTES)")


def predict_case(
    predictor: Predictor,
    images: np.ndarray,
    geometry,  # noqa: ANN001 - s3d.data.io.Geometry
    *,
    step_size: float = 0.5,
    tta: bool = True,
    batch_size: int = 2,
    return_probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """images (C,i,j,k) on their original grid -> (segmentation (i,j,k) uint8/uint16, probabilities
    (K,i,j,k) float32 or None), both on the original grid."""
    from s3d.data.preprocess import Plan, preprocess_case, restore_probabilities
    from s3d.infer import sliding_window_predict

    plan = Plan.from_dict(predictor.config["plan"])
    check_prediction_memory(predictor, images.shape[-3:], geometry, plan.target_spacing)
    data, _, props = preprocess_case(images, geometry, plan)
    logits = sliding_window_predict(
        predictor.network,
        torch.from_numpy(np.ascontiguousarray(data)),
        predictor.patch_size,
        predictor.num_classes,
        step_size=step_size,
        mirror_axes=(0, 1, 2) if tta else None,
        batch_size=batch_size,
        device=predictor.device,
        autocast=predictor.amp,
    )
    probs = torch.softmax(logits.float(), 0)
    full = restore_probabilities(probs, props)
    full = np.asarray(full)
    seg = full.argmax(0)
    seg = seg.astype(np.uint8 if predictor.num_classes <= 256 else np.uint16)
    return seg, (full.astype(np.float32) if return_probabilities else None)


def predict_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    model: str | Path,
    *,
    step_size: float = 0.5,
    tta: bool = True,
    save_probabilities: bool = False,
    continue_: bool = False,
    device: str = "auto",
    batch_size: int = 2,
    amp: str = "auto",
) -> list[Path]:
    """Predict every case of `input_dir` into `output_dir/CASE<ending>`; returns the written files.

    A case that cannot be read (corrupt, not 3-D, wrong grid between channels) is reported on one
    line and skipped; the other cases are still predicted, and the call then fails naming how many
    cases were bad, so a script notices.
    """
    from s3d.data.dataset import find_images
    from s3d.data.io import memory_budget, read_channels, write_image, write_segmentation
    from s3d.files import prepare_output_dir

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not 0 < step_size <= 1:  # also NaN, which click's FloatRange lets through
        raise S3DError(f"--step-size {step_size}: must be in (0, 1] (a fraction of the patch; nnU-Net 0.5)")
    memory_budget()  # a malformed S3D_MAX_IMAGE_BYTES is said once, not once per case
    if not input_dir.is_dir():
        raise S3DError(f"{input_dir}: not a folder")
    prepare_output_dir(output_dir, inputs=(input_dir,), inside_inputs_ok=True)
    predictor = load_predictor(model, device, amp)
    cases = find_images(input_dir, num_channels=predictor.num_channels)
    if not cases:
        raise S3DError(f"{input_dir}: no images found")
    written, failed = [], []
    for case in tqdm(cases, desc="predict", unit="case"):
        ending = _ending(case.images[0])
        out = output_dir / f"{case.case_id}{ending}"
        if continue_ and out.exists():
            written.append(out)
            continue
        try:
            images, geometry = read_channels(case.images)
            seg, probs = predict_case(predictor, images, geometry, step_size=step_size, tta=tta,
                                      batch_size=batch_size, return_probabilities=save_probabilities)
        except S3DError as e:
            tqdm.write(f"s3d: error: {one_line(e)}", file=sys.stderr)
            failed.append(case.case_id)
            continue
        if probs is not None:
            # one file per class keeps every file on the input's 3-D grid and header
            for k in range(probs.shape[0]):
                write_image(probs[k], geometry, output_dir / f"{case.case_id}_prob{k:02d}{ending}")
        write_segmentation(seg, geometry, out)
        written.append(out)
    if failed:
        raise S3DError(f"{len(failed)} of {len(cases)} cases could not be predicted ({', '.join(failed[:5])}"
                       f"{', ...' if len(failed) > 5 else ''}); see the messages above")
    return written


def _ending(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.endswith(suffix):
            return ".nii.gz" if suffix in (".mhd", ".nhdr") else suffix
    return ".nii.gz"
