"""Segment a folder of images with a trained model, writing each result on its input's exact grid.

Per case: read channels -> the model's Plan forward (crop, normalise, resample) -> sliding window
with Gaussian weighting and mirroring TTA -> the Plan backward (resample probabilities to the
cropped grid, paste into the full grid, argmax) -> the run's postprocessing -> write with the
input's header. Several networks (the folds of a cross-validation run, several runs) are an
ensemble: their softmax probabilities are averaged before the argmax.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from s3d.errors import S3DError, one_line
from s3d.postprocess import PostprocessingDecision


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
    from s3d.nn.networks import inference_network, network_config_from_dict

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
    net_cfg = network_config_from_dict(config["network"])
    # inference needs the full-resolution output only (the network still holds any deep-supervision heads)
    with torch.device("meta"):  # shapes only: a config describing a huge network allocates nothing
        check_tensors(inference_network(net_cfg), state, tensor_source)
    network = inference_network(net_cfg)
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
    full = predict_probabilities([predictor], images, geometry, step_size=step_size, tta=tta,
                                 batch_size=batch_size)
    seg = _argmax(full)
    return seg, (full if return_probabilities else None)


def _argmax(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(0).astype(np.uint8 if probs.shape[0] <= 256 else np.uint16)


def predict_probabilities(
    predictors: Sequence[Predictor],
    images: np.ndarray,
    geometry,  # noqa: ANN001 - s3d.data.io.Geometry
    *,
    step_size: float = 0.5,
    tta: bool = True,
    batch_size: int = 2,
) -> np.ndarray:
    """Softmax probabilities (K,i,j,k) float32 on the original grid, averaged over `predictors`.

    The image is preprocessed once per distinct plan (the folds of one run share one), the members'
    softmax is averaged on that grid, and each plan's mean is restored to the original grid once;
    restoring is linear, so this equals averaging every member's restored probabilities.
    """
    from s3d.data.preprocess import Plan, preprocess_case, restore_probabilities
    from s3d.infer import sliding_window_predict

    groups: dict[str, list[Predictor]] = {}
    for p in predictors:
        groups.setdefault(json.dumps(p.config["plan"], sort_keys=True), []).append(p)
    plans = {key: Plan.from_dict(members[0].config["plan"]) for key, members in groups.items()}
    for key, members in groups.items():  # every member is checked before the first is run
        for p in members:
            check_prediction_memory(p, images.shape[-3:], geometry, plans[key].target_spacing)
    total: np.ndarray | None = None
    for key, members in groups.items():
        data, _, props = preprocess_case(images, geometry, plans[key])
        data = torch.from_numpy(np.ascontiguousarray(data))
        acc = None
        for p in members:
            logits = sliding_window_predict(p.network, data, p.patch_size, p.num_classes, step_size=step_size,
                                            mirror_axes=(0, 1, 2) if tta else None, batch_size=batch_size,
                                            device=p.device, autocast=p.amp)
            probs = torch.softmax(logits.float(), 0)
            acc = probs if acc is None else acc + probs
        full = np.asarray(restore_probabilities(acc / len(members), props), dtype=np.float32)
        weighted = full * np.float32(len(members) / len(predictors)) if len(groups) > 1 else full
        total = weighted if total is None else total + weighted
    assert total is not None
    return total.astype(np.float32, copy=False)


@dataclass
class Ensemble:
    """The networks `s3d predict` averages, and the postprocessing it applies after the argmax."""

    members: list[Predictor]
    sources: list[str]  # the model folder (or weights name) of each member
    postprocessing: PostprocessingDecision | None = None
    postprocessing_note: str = ""  # why none is applied, when the models disagree

    @property
    def num_channels(self) -> int:
        return self.members[0].num_channels

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes


def model_folders(model: str | Path, folds: Sequence[int] | None = None) -> list[str | Path]:
    """The model folders behind one `-m` argument: a cross-validation run (fold_K/ folders) gives its
    finished folds (all, or `folds`); anything else is itself (a model folder or a weights name)."""
    from s3d.crossval import finished_folds, fold_dirs

    path = Path(model)
    if not path.is_dir() or (path / "config.json").exists():
        if folds:
            raise S3DError(f"{model}: --folds needs a cross-validation run folder (with fold_K/ folders)")
        return [model]
    present = fold_dirs(path)
    if not present:
        return [model]  # load_predictor names what is missing
    done = finished_folds(path)
    if folds:
        missing = [k for k in folds if k not in done]
        if missing:
            state = "not trained" if missing[0] not in present else "not finished"
            raise S3DError(f"{path / f'fold_{missing[0]}'}: fold {missing[0]} is {state} (finished folds: "
                           f"{', '.join(map(str, sorted(done))) or 'none'})")
        return [done[k] for k in folds]
    if not done:
        raise S3DError(f"{path}: no finished fold yet (fold folders: {', '.join(p.name for p in present.values())})")
    return [done[k] for k in sorted(done)]


def _labels_of(config: dict) -> dict:
    return dict(config.get("labels") or config.get("plan", {}).get("labels") or {})


def load_ensemble(models: Sequence[str | Path] | str | Path, folds: Sequence[int] | None = None,
                  device: str = "auto", amp: str = "auto", postprocessing: bool = True) -> Ensemble:
    """Every network of `models` (each a model folder, a cross-validation run or a weights name; see
    `model_folders`) as one ensemble. Runs can be ensembled when their labels and input channels match;
    otherwise S3DError naming the run that differs. The postprocessing is the runs' decision
    (`postprocessing.json`) when they all made the same one; None with `postprocessing=False`."""
    from s3d.postprocess import POSTPROCESSING_FILE, load_decision

    if isinstance(models, (str, Path)):
        models = [models]
    if not models:
        raise S3DError("-m/--model: give at least one model")
    members, sources, decisions = [], [], []
    for model in models:
        for folder in model_folders(model, folds):
            members.append(load_predictor(folder, device, amp))
            sources.append(str(folder))
        if postprocessing:
            path = Path(model)
            candidates = [path / POSTPROCESSING_FILE]
            if path.is_dir() and path.name.startswith("fold_"):
                candidates.append(path.parent / POSTPROCESSING_FILE)  # a fold of a run uses the run's decision
            decision = next((d for d in map(load_decision, candidates) if d is not None), None)
            decisions.append((str(model), decision))
    first, first_labels = members[0], _labels_of(members[0].config)
    for p, src in zip(members[1:], sources[1:], strict=True):
        labels = _labels_of(p.config)
        if labels != first_labels:
            raise S3DError(f"{src}: labels {labels} differ from {sources[0]}'s {first_labels}; only models of the "
                           "same labels can be ensembled")
        if p.num_channels != first.num_channels:
            raise S3DError(f"{src}: takes {p.num_channels} input channel(s), {sources[0]} takes "
                           f"{first.num_channels}; only models of the same inputs can be ensembled")
    ensemble = Ensemble(members, sources)
    if decisions:
        found = [d for _, d in decisions if d is not None]
        if len(found) == len(decisions) and all(d.same_rule(found[0]) for d in found):
            ensemble.postprocessing = found[0]
        elif found:
            ensemble.postprocessing_note = ("the models' postprocessing decisions differ (or some have none): "
                                            "none applied")
    return ensemble


def predict_cases(
    cases: Sequence,  # s3d.data.dataset.Case
    output_dir: str | Path,
    ensemble: Ensemble,
    *,
    step_size: float = 0.5,
    tta: bool = True,
    save_probabilities: bool = False,
    continue_: bool = False,
    batch_size: int = 2,
    desc: str = "predict",
) -> list[Path]:
    """Predict `cases` into `output_dir/CASE<ending>` with the ensemble (and its postprocessing).

    A case that cannot be read (corrupt, not 3-D, wrong grid between channels) is reported on one
    line and skipped; the other cases are still predicted, and the call then fails naming how many
    cases were bad, so a script notices.
    """
    from s3d.data.io import read_channels, write_image, write_segmentation
    from s3d.postprocess import apply_postprocessing

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if save_probabilities:
        prob_dir = output_dir / PROBABILITIES_DIR
        if prob_dir.exists() and not prob_dir.is_dir():
            raise S3DError(f"{prob_dir}: exists and is not a folder; --save-probabilities writes its files there "
                           "(move it away or pick another output folder)")
        prob_dir.mkdir(exist_ok=True)
    written, failed = [], []
    for case in tqdm(cases, desc=desc, unit="case"):
        ending = _ending(case.images[0])
        out = output_dir / f"{case.case_id}{ending}"
        if continue_ and out.exists():
            problem = _unfinished(case, out, ensemble.num_classes if save_probabilities else 0, output_dir)
            if problem is None:
                written.append(out)
                continue
            tqdm.write(f"s3d: note: {problem}; predicting case {case.case_id} again", file=sys.stderr)
        try:
            images, geometry = read_channels(case.images)
            probs = predict_probabilities(ensemble.members, images, geometry, step_size=step_size, tta=tta,
                                          batch_size=batch_size)
        except S3DError as e:
            tqdm.write(f"s3d: error: {one_line(e)}", file=sys.stderr)
            failed.append(case.case_id)
            continue
        seg = apply_postprocessing(_argmax(probs), ensemble.postprocessing)
        if save_probabilities:
            # one file per class keeps every file on the input's 3-D grid and header
            for k in range(probs.shape[0]):
                write_image(probs[k], geometry, probability_path(output_dir, case.case_id, k, ending))
        # last: its presence means the probabilities above are complete too (what --continue relies on)
        write_segmentation(seg, geometry, out)
        written.append(out)
    if failed:
        raise S3DError(f"{len(failed)} of {len(cases)} cases could not be predicted ({', '.join(failed[:5])}"
                       f"{', ...' if len(failed) > 5 else ''}); see the messages above")
    return written


def predict_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    model: str | Path | Sequence[str | Path],
    *,
    step_size: float = 0.5,
    tta: bool = True,
    save_probabilities: bool = False,
    continue_: bool = False,
    device: str = "auto",
    batch_size: int = 2,
    amp: str = "auto",
    folds: Sequence[int] | None = None,
    postprocessing: bool = True,
) -> list[Path]:
    """Predict every case of `input_dir` into `output_dir/CASE<ending>`; returns the written files.

    `model`: one or several model folders, cross-validation runs or weights names; several networks
    are ensembled by averaging their softmax probabilities (`load_ensemble`). `folds`: which folds of
    a cross-validation run (default: every finished fold). `postprocessing`: apply the runs'
    postprocessing decision (`postprocessing.json`). Unreadable cases: see `predict_cases`.
    """
    from s3d.data.dataset import find_images
    from s3d.data.io import memory_budget
    from s3d.files import prepare_output_dir

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not 0 < step_size <= 1:  # also NaN, which click's FloatRange lets through
        raise S3DError(f"--step-size {step_size}: must be in (0, 1] (a fraction of the patch; nnU-Net 0.5)")
    memory_budget()  # a malformed S3D_MAX_IMAGE_BYTES is said once, not once per case
    if not input_dir.is_dir():
        raise S3DError(f"{input_dir}: not a folder")
    prepare_output_dir(output_dir, inputs=(input_dir,), inside_inputs_ok=True)
    ensemble = load_ensemble(model, folds, device, amp, postprocessing=postprocessing)
    if ensemble.postprocessing_note:
        tqdm.write(f"s3d: note: {ensemble.postprocessing_note}", file=sys.stderr)
    cases = find_images(input_dir, num_channels=ensemble.num_channels)
    if not cases:
        raise S3DError(f"{input_dir}: no images found")
    return predict_cases(cases, output_dir, ensemble, step_size=step_size, tta=tta,
                         save_probabilities=save_probabilities, continue_=continue_, batch_size=batch_size)


# Probability maps live in their own folder: beside the segmentations, case X's CASE_prob01 file
# would be case X_prob01's segmentation. Inside it every name is CASE + "_prob" + the class number
# (>= 2 digits) + the ending, so the trailing digits give the class and the rest the case: no two
# (case, class) pairs share a name.
PROBABILITIES_DIR = "probabilities"


def probability_path(output_dir: str | Path, case_id: str, k: int, ending: str = ".nii.gz") -> Path:
    """Where `s3d predict --save-probabilities` writes the probability map of class `k` of a case."""
    return Path(output_dir) / PROBABILITIES_DIR / f"{case_id}_prob{k:02d}{ending}"


def _unfinished(case, out: Path, num_probabilities: int, output_dir: Path) -> str | None:  # noqa: ANN001 - Case
    """Why an existing output of `case` (its segmentation `out`, and `num_probabilities` probability maps)
    is not a finished one, or None. Outputs are written atomically, but a file copied in, left by an
    older s3d or cut short by a full disk must be redone, not kept."""
    from s3d.data.io import output_problem, read_header

    try:
        shape = read_header(case.images[0]).spatial_shape
    except S3DError:
        return f"{case.images[0]}: cannot read its header"  # predicting it again reports the problem
    if shape is None:
        return f"{case.images[0]}: not a 3-D image"
    ending = _ending(case.images[0])
    paths = [out] + [probability_path(output_dir, case.case_id, k, ending) for k in range(num_probabilities)]
    for path in paths:
        if not path.exists():
            return f"{path}: missing (an earlier run without --save-probabilities, or killed)"
        problem = output_problem(path, shape)
        if problem is not None:
            return f"{path}: incomplete output of an earlier run ({problem})"
    return None


def _ending(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.endswith(suffix):
            return ".nii.gz" if suffix in (".mhd", ".nhdr") else suffix
    return ".nii.gz"
