r"""s3d vs nnU-Net v2 prediction on CPU with the same network and weights: wall time and label agreement.

The s3d model is exported into an nnU-Net v2 results folder (dataset.json, plans.json reproducing s3d's
preprocessing, fold_0/checkpoint_final.pth holding the DNA ``ResidualEncoderUNet`` state dict); then
`s3d.predict.predict_folder` and `nnUNetv2_predict -device cpu` segment the same cases, each in a fresh
process timed end to end, and the two label maps are compared voxel by voxel.

nnU-Net lives in its own virtual environment. A plain `pip install nnunetv2` upgrades torch to a CUDA build
and pulls torchvision (through timm, which inference does not import), so install torch first and nnU-Net's
own requirements with torch pinned, then nnunetv2 and dynamic-network-architectures without dependencies:

    python -m venv /work/nnunet-venv && V=/work/nnunet-venv/bin && $V/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt && $V/pip install -c /tmp/c.txt "acvl-utils>=0.2.6,<0.3" tqdm scipy \
        "batchgenerators>=0.25.1" numpy scikit-learn scikit-image SimpleITK pandas graphviz tifffile requests \
        nibabel matplotlib seaborn imagecodecs yacs "batchgeneratorsv2>=0.3.2" einops "blosc2>=3.3.2"
    $V/pip install --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
    python benchmarks/nnunet_compare.py --model runs/hippo_accept --images VAL_IMAGES --out /tmp/nnunet_cmp \
        --limit 10 --threads 1 [--no-tta] [--repeat 3]

Axis order: s3d reads NIfTI with nibabel, (i, j, k); nnU-Net reads it with SimpleITK, (k, j, i). The
exported plans set transpose_forward = transpose_backward = [2, 1, 0], so nnU-Net's network sees the
(i, j, k) order s3d trained on, and plans' spacing / patch size are in s3d's order unchanged.

Known differences by design (they can flip the argmax of near-tie voxels only):
- nnU-Net accumulates window logits and Gaussian weights in float16, s3d in float32;
- nnU-Net's Gaussian is centred on voxel patch // 2, s3d's on (patch - 1) / 2 (half a voxel apart on
  even patch axes);
- when a case is resampled: s3d interpolates images with Keys cubic convolution (nnU-Net: cubic B-spline)
  and resamples probabilities back (nnU-Net: logits). Cases already at the target spacing skip both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PLANS_NAME = "nnUNetResEncUNetPlans"
TRAINER = "nnUNetTrainer"
CONFIGURATION = "3d_fullres"
DNA_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# s3d plan normalisation -> nnU-Net normalisation class (nnunetv2.preprocessing.normalization)
NORMALIZATION = {"zscore": "ZScoreNormalization", "ct": "CTNormalization", "none": "NoNormalization"}
# nnU-Net's fixed anisotropy rule (nnunetv2.configuration.ANISO_THRESHOLD); plans cannot change it
NNUNET_ANISO_THRESHOLD = 3.0
# SimpleITK order (k, j, i) -> nibabel order (i, j, k); the permutation is its own inverse
TRANSPOSE = [2, 1, 0]

# Runs in a fresh interpreter of the s3d venv, so s3d pays its process start and imports like nnU-Net does.
# predict_folder looks load_predictor up in its module at call time: wrapping it there times the model load.
_S3D_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[5]))
import s3d.predict as sp
t1 = time.perf_counter()
loads = []
_load = sp.load_predictor
def _timed_load(*a, **k):
    t = time.perf_counter()
    p = _load(*a, **k)
    loads.append(time.perf_counter() - t)
    return p
sp.load_predictor = _timed_load
sp.predict_folder(sys.argv[1], sys.argv[2], sys.argv[3], tta=sys.argv[4] == "1", device="cpu",
                  step_size=float(sys.argv[6]), amp=sys.argv[7])
t2 = time.perf_counter()
print("S3D_TIMES " + json.dumps({"import_s": t1 - t0, "load_s": sum(loads), "predict_folder_s": t2 - t1,
                                 "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


# ------------------------------------------------------------------------------------------- export
def nnunet_architecture(net: dict) -> dict:
    """plans.json 'architecture' for an s3d network config (ResEncConfig.to_dict()): the kwargs nnU-Net's
    ResEnc planner writes, with s3d's topology (tests/test_resenc.py build_dna is the same mapping)."""
    return {
        "network_class_name": DNA_CLASS,
        "arch_kwargs": {
            "n_stages": len(net["features"]),
            "features_per_stage": [int(f) for f in net["features"]],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[int(a) for a in k] for k in net["kernel_sizes"]],
            "strides": [[int(a) for a in s] for s in net["strides"]],
            "n_blocks_per_stage": [int(b) for b in net["blocks"]],
            "n_conv_per_stage_decoder": [int(c) for c in net["decoder_convs"]],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def build_dna(architecture: dict, in_channels: int, num_classes: int) -> Any:  # noqa: ANN401 - DNA nn.Module
    """The DNA network exactly as nnU-Net's get_network_from_plans builds it from `architecture`, so the
    network verified here is the one nnU-Net will instantiate from plans.json."""
    import pydoc

    try:
        cls = pydoc.locate(architecture["network_class_name"])
    except pydoc.ErrorDuringImport as e:
        raise SystemExit(f"cannot import {architecture['network_class_name']}: {e}") from e
    if cls is None:
        raise SystemExit("dynamic-network-architectures is not installed in this venv; it is needed to verify "
                         "the export (pip install dynamic-network-architectures)")
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    return cls(input_channels=in_channels, num_classes=num_classes, deep_supervision=False, **kwargs)


def nnunet_plans(config: dict, dataset_name: str) -> dict:
    """plans.json replaying s3d's preprocessing (crop to nonzero, normalise, resample) for this model."""
    plan, patch = config["plan"], [int(p) for p in config["patch_size"]]
    spacing = [float(s) for s in plan["target_spacing"]]
    n = len(plan["normalization"])
    schemes = []
    for c, scheme in enumerate(plan["normalization"]):
        if scheme not in NORMALIZATION:
            raise SystemExit(f"s3d plan channel {c}: normalisation {scheme!r} has no nnU-Net counterpart")
        schemes.append(NORMALIZATION[scheme])
    # nnU-Net indexes these by channel for every scheme; only CTNormalization reads them
    intensity = {}
    for c in range(n):
        st = (plan.get("ct_stats") or [None] * n)[c] or {"mean": 0.0, "std": 1.0, "p005": 0.0, "p995": 0.0}
        intensity[str(c)] = {"mean": float(st["mean"]), "std": float(st["std"]), "median": float(st["mean"]),
                             "min": float(st["p005"]), "max": float(st["p995"]),
                             "percentile_00_5": float(st["p005"]), "percentile_99_5": float(st["p995"])}
    # the orders s3d uses (s3d.data.preprocess / restore_probabilities): images 3, labels and
    # probabilities 1, nearest along an anisotropic axis; nnU-Net decides that axis with the same rule
    resampling = "resample_data_or_seg_to_shape"
    configuration = {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": patch,
        "spacing": spacing,
        "normalization_schemes": schemes,
        "use_mask_for_norm": [bool(b) for b in (plan.get("use_nonzero_mask") or [False] * n)],
        "resampling_fn_data": resampling,
        "resampling_fn_seg": resampling,
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": resampling,
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": nnunet_architecture(config["network"]),
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": patch,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": TRANSPOSE,
        "transpose_backward": TRANSPOSE,
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "s3d benchmarks/nnunet_compare.py export",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity,
    }


def export_to_nnunet(model: Path, results: Path, dataset_id: int) -> tuple[str, Path, dict]:
    """Write OUT/nnUNet_results/DatasetXXX_S3DExport/<trainer>__<plans>__3d_fullres/ for the s3d model.

    Returns (dataset name, trainer folder, facts about the check). Raises SystemExit when the DNA network
    does not reproduce s3d's outputs: a benchmark on a wrong export would compare two different models.
    """
    import torch

    from s3d.checkpoint import load_model
    from s3d.nn.resenc import ResEncConfig, ResEncUNet, convert_dna_state_dict

    state, config = load_model(model)
    if config.get("kind") != "segmentation":
        raise SystemExit(f"{model}: holds {config.get('kind')} weights, not a segmentation model")
    plan = config["plan"]
    if abs(float(plan.get("anisotropy_threshold", NNUNET_ANISO_THRESHOLD)) - NNUNET_ANISO_THRESHOLD) > 1e-9:
        print(f"warning: s3d plan anisotropy threshold {plan['anisotropy_threshold']} != nnU-Net's fixed "
              f"{NNUNET_ANISO_THRESHOLD}; resampled cases may differ")
    net_cfg = ResEncConfig.from_dict(config["network"])
    net_cfg.deep_supervision = False  # inference uses the full-resolution head only, as nnU-Net's predictor
    s3d_net = ResEncUNet(net_cfg)
    s3d_net.load_state_dict(state, strict=True)
    s3d_net.eval()

    dataset_name = f"Dataset{dataset_id:03d}_S3DExport"
    plans = nnunet_plans(config, dataset_name)
    arch = plans["configurations"][CONFIGURATION]["architecture"]
    dna = build_dna(arch, net_cfg.in_channels, net_cfg.num_classes)
    # s3d keys are DNA's minus its aliases (every conv/norm is registered twice, and the decoder holds the
    # encoder): loading non-strictly fills the shared Parameters, so the aliases must be all that is missing
    res = dna.load_state_dict(state, strict=False)
    bad_missing = [k for k in res.missing_keys if ".all_modules." not in k and not k.startswith("decoder.encoder.")]
    if res.unexpected_keys or bad_missing:
        raise SystemExit(f"s3d -> DNA state dict mismatch: unexpected {res.unexpected_keys[:5]}, "
                         f"missing non-alias {bad_missing[:5]}")
    dna.eval()
    full = dna.state_dict()
    back = convert_dna_state_dict(full)
    if set(back) != set(state) or any(not torch.equal(back[k], state[k]) for k in state):
        raise SystemExit("DNA state dict does not convert back to the s3d weights")

    # same outputs on a random patch-sized input; float32 CPU kernels agree to ~1e-5
    x = torch.randn(1, net_cfg.in_channels, *config["patch_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = s3d_net(x), dna(x)
    diff = float((ref - out).abs().max())
    scale = float(ref.abs().max())
    if not diff <= 1e-4 * max(1.0, scale):
        raise SystemExit(f"DNA forward differs from s3d forward: max |diff| {diff:.3g} (logit scale {scale:.3g})")

    labels = {str(k): int(v) for k, v in (config.get("labels") or plan["labels"]).items()}
    if sorted(labels.values()) != list(range(net_cfg.num_classes)):
        raise SystemExit(f"labels {labels} are not 0..{net_cfg.num_classes - 1}: nnU-Net needs consecutive labels")
    dataset_json = {
        "channel_names": {str(k): str(v) for k, v in plan["channel_names"].items()},
        "labels": labels,
        "numTraining": len((config.get("data") or {}).get("train_cases") or []),
        "file_ending": ".nii.gz",
        "s3d_model": str(model.resolve()),
    }
    ds_dir = results / dataset_name
    if ds_dir.exists():
        shutil.rmtree(ds_dir)  # ours from an earlier run: a stale checkpoint must not survive
    trainer_dir = ds_dir / f"{TRAINER}__{PLANS_NAME}__{CONFIGURATION}"
    (trainer_dir / "fold_0").mkdir(parents=True)
    (trainer_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    (trainer_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    # What nnUNetPredictor.initialize_from_trained_model_folder reads: network_weights, trainer_name,
    # init_args['configuration'] and inference_allowed_mirroring_axes; the rest mirrors nnUNetTrainer's
    # checkpoint for tools that look. Full DNA state dict (aliases included): nnU-Net loads it strictly.
    checkpoint = {
        "network_weights": {k: v.detach().cpu() for k, v in full.items()},
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": int(config.get("step", 0)),
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json,
                      "device": "cpu"},
        "trainer_name": TRAINER,
        # axes of the transposed array: all three, as s3d's mirroring TTA
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, trainer_dir / "fold_0" / "checkpoint_final.pth")
    facts = {"dataset": dataset_name, "trainer_dir": str(trainer_dir), "forward_max_abs_diff": diff,
             "forward_logit_scale": scale, "alias_keys": len(res.missing_keys), "s3d_keys": len(state)}
    return dataset_name, trainer_dir, facts


# ------------------------------------------------------------------------------------------- runs
def select_cases(images: Path, limit: int | None, dest: Path) -> tuple[list[str], int]:
    """Symlink the first `limit` cases (sorted by id, all channel files) into dest; (case ids, channels).
    Cases are grouped by s3d's own reader (`find_images`), so both tools see exactly what s3d predicts."""
    from s3d.data.dataset import find_images
    from s3d.errors import S3DError

    try:
        found = find_images(images)
    except S3DError as e:
        raise SystemExit(str(e)) from None
    if not found:
        raise SystemExit(f"{images}: no images")
    for case in found:
        for k, p in enumerate(case.images):
            if p.name != f"{case.case_id}_{k:04d}.nii.gz":
                raise SystemExit(f"{p}: nnU-Net needs CASE_XXXX.nii.gz names (dataset.json has one file_ending)")
    chosen = found[:limit] if limit else found
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for case in chosen:
        for p in case.images:
            (dest / p.name).symlink_to(p.resolve())
    return [c.case_id for c in chosen], len(chosen[0].images)


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """Environment that caps every thread pool of a child at `threads`. nnU-Net's CLI sets torch to
    cpu_count() threads on CPU, but its sliding window and export use min(that, nnUNet_def_n_proc)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "nnUNet_def_n_proc"):
        env[var] = str(threads)
    env.update(extra)
    return env


def _timed_run(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the child and the processes it waited for, stdout); the log keeps both streams."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); log {log}\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def run_s3d(inp: Path, out: Path, model: Path, tta: bool, threads: int, step: float, log: Path,
            amp: str = "off") -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-c", _S3D_CHILD, str(inp), str(out), str(model.resolve()), "1" if tta else "0",
           str(threads), str(step), amp]
    # cwd = the repo so `import s3d` finds this checkout even without an editable install
    wall, cpu, stdout = _timed_run(cmd, thread_env(threads), log, REPO)
    times = next(json.loads(line[len("S3D_TIMES "):]) for line in stdout.splitlines() if line.startswith("S3D_TIMES "))
    return {"wall_s": wall, "cpu_s": cpu, **times}


def run_nnunet(inp: Path, out: Path, dataset: str, root: Path, nnunet_bin: Path, tta: bool, threads: int,
               step: float, log: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(nnunet_bin / "nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", dataset, "-c", CONFIGURATION,
           "-f", "0", "-tr", TRAINER, "-p", PLANS_NAME, "-device", "cpu", "-npp", "1", "-nps", "1",
           "-step_size", str(step), "--disable_progress_bar"]
    if not tta:
        cmd.append("--disable_tta")
    # nnUNet_raw / nnUNet_preprocessed are only looked at, never needed for prediction: empty folders
    env = thread_env(threads, nnUNet_results=str(root / "nnUNet_results"), nnUNet_raw=str(root / "nnUNet_raw"),
                     nnUNet_preprocessed=str(root / "nnUNet_preprocessed"))
    wall, cpu, _ = _timed_run(cmd, env, log, root)
    return {"wall_s": wall, "cpu_s": cpu}


# ---------------------------------------------------------------------------------------- compare
def compare(s3d_dir: Path, nn_dir: Path, cases: list[str], labels: dict[str, int]) -> list[dict]:
    """Per case: same grid (shape, affine), fraction of identical voxels and per-class Dice of the two maps."""
    import nibabel as nib
    import numpy as np

    rows = []
    for case in cases:
        a_img, b_img = nib.load(s3d_dir / f"{case}.nii.gz"), nib.load(nn_dir / f"{case}.nii.gz")
        a = np.asanyarray(a_img.dataobj).astype(np.int32)
        b = np.asanyarray(b_img.dataobj).astype(np.int32)
        row: dict[str, Any] = {"case": case, "shape_s3d": list(a.shape), "shape_nnunet": list(b.shape),
                               "same_shape": a.shape == b.shape,
                               "affine_max_abs_diff": float(np.abs(a_img.affine - b_img.affine).max())}
        # ITK writes the affine through float32 quaternions: allow float32 rounding, not a grid shift
        row["same_affine"] = row["affine_max_abs_diff"] < 1e-3
        if row["same_shape"]:
            row["voxel_agreement"] = float((a == b).mean())
            row["voxels_differing"] = int((a != b).sum())
            dice = {}
            for name, v in labels.items():
                if v == 0:
                    continue
                sa, sb = a == v, b == v
                denom = int(sa.sum() + sb.sum())
                dice[name] = 1.0 if denom == 0 else 2.0 * int((sa & sb).sum()) / denom
            row["dice"] = dice
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- main
def _nnunet_versions(nnunet_bin: Path) -> dict:
    # importlib.metadata reads the dist-info only: no torch import, so this costs ~0.1 s
    code = ("import json; from importlib.metadata import version as v; "
            "print(json.dumps({p: v(p) for p in ('nnunetv2', 'torch', 'dynamic_network_architectures')}))")
    proc = subprocess.run([str(nnunet_bin / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="s3d segmentation run (model.safetensors + config.json)")
    ap.add_argument("--images", type=Path, required=True, help="folder of CASE_0000.nii.gz images")
    ap.add_argument("--out", type=Path, required=True, help="working folder (export, predictions, compare.json)")
    ap.add_argument("--nnunet-bin", type=Path, default=Path("/work/nnunet-venv/bin"),
                    help="bin folder of the venv that has nnunetv2")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="mirroring TTA in both")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads for both predictors")
    ap.add_argument("--limit", type=int, default=None, help="first N cases only")
    ap.add_argument("--step-size", type=float, default=0.5, help="sliding-window step (fraction of the patch)")
    ap.add_argument("--repeat", type=int, default=1, help="run both N times (alternating); report the fastest")
    ap.add_argument("--dataset-id", type=int, default=999, help="nnU-Net dataset id of the export")
    ap.add_argument("--s3d-amp", default="off", choices=["off", "bf16"],
                    help="s3d's autocast (nnU-Net runs fp32 on CPU); bf16 trades identical labels for speed")
    args = ap.parse_args()
    if not (args.nnunet_bin / "nnUNetv2_predict").exists():
        raise SystemExit(f"{args.nnunet_bin}/nnUNetv2_predict not found; install nnunetv2 there or pass --nnunet-bin")

    # before torch is imported: the export's verification forward is the only torch work in this process
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "logs"):
        (out / sub).mkdir(exist_ok=True)

    dataset, trainer_dir, export = export_to_nnunet(args.model, out / "nnUNet_results", args.dataset_id)
    print(f"exported {args.model} -> {trainer_dir} (s3d vs DNA forward: max |diff| "
          f"{export['forward_max_abs_diff']:.2e} at logit scale {export['forward_logit_scale']:.1f})")
    inp = out / "input"
    cases, channels = select_cases(args.images.resolve(), args.limit, inp)

    runs: list[dict] = []
    for r in range(max(1, args.repeat)):
        # alternate the order so neither side always runs with a warmer page cache
        order = ("s3d", "nnunet") if r % 2 == 0 else ("nnunet", "s3d")
        res: dict[str, dict] = {}
        for who in order:
            log = out / "logs" / f"{who}_run{r}.log"
            if who == "s3d":
                res[who] = run_s3d(inp, out / "s3d", args.model, args.tta, args.threads, args.step_size, log,
                                   args.s3d_amp)
            else:
                res[who] = run_nnunet(inp, out / "nnunet", dataset, out, args.nnunet_bin, args.tta, args.threads,
                                      args.step_size, log)
            print(f"run {r} {who:<6}: {res[who]['wall_s']:.2f} s wall, {res[who]['cpu_s']:.2f} s CPU")
        runs.append(res)

    labels = {str(k): int(v) for k, v in json.loads((trainer_dir / "dataset.json").read_text())["labels"].items()}
    rows = compare(out / "s3d", out / "nnunet", cases, labels)
    s3d_best = min(r["s3d"]["wall_s"] for r in runs)
    nn_best = min(r["nnunet"]["wall_s"] for r in runs)
    agree = [r["voxel_agreement"] for r in rows if "voxel_agreement" in r]
    fg_dice = [d for r in rows for d in r.get("dice", {}).values()]
    summary = {
        "cases": len(cases),
        "channels": channels,
        "tta": args.tta,
        "threads": args.threads,
        "step_size": args.step_size,
        "s3d_amp": args.s3d_amp,
        "s3d_wall_s": s3d_best,
        "nnunet_wall_s": nn_best,
        "speedup": nn_best / s3d_best,
        "min_voxel_agreement": min(agree) if agree else None,
        "mean_voxel_agreement": sum(agree) / len(agree) if agree else None,
        "min_dice": min(fg_dice) if fg_dice else None,
        "all_same_grid": all(r["same_shape"] and r["same_affine"] for r in rows),
    }
    report = {
        "summary": summary,
        "export": export,
        "versions": {"s3d_venv": {"torch": torch.__version__, "python": sys.version.split()[0]},
                     "nnunet_venv": _nnunet_versions(args.nnunet_bin)},
        "load_average": os.getloadavg(),
        "runs": runs,
        "cases": rows,
        "model": str(args.model.resolve()),
        "images": str(args.images.resolve()),
    }
    (out / "compare.json").write_text(json.dumps(report, indent=1))

    best = min(runs, key=lambda r: r["s3d"]["wall_s"])["s3d"]
    print()
    print("| cases | TTA | threads | s3d s | nnU-Net s | speed-up | min / mean voxel agreement | min Dice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {len(cases)} | {'on' if args.tta else 'off'} | {args.threads} | {s3d_best:.2f} | {nn_best:.2f} | "
          f"{summary['speedup']:.2f}x | {summary['min_voxel_agreement']:.6f} / {summary['mean_voxel_agreement']:.6f} "
          f"| {summary['min_dice']:.4f} |")
    print()
    print(f"s3d split: import {best['import_s']:.2f} s, model load {best['load_s']:.2f} s, predict_folder "
          f"{best['predict_folder_s']:.2f} s (incl. load); load average {os.getloadavg()[0]:.2f}; "
          f"{out / 'compare.json'}")
    if not summary["all_same_grid"]:
        print("WARNING: some outputs differ in shape or affine; see compare.json")


if __name__ == "__main__":
    main()
