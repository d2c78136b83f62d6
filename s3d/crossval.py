"""Cross-validation: the folds of the fixed 5-fold split trained one after another, as nnU-Net does.

RUN/
  crossval.json            the settings of the whole run (written once; `--resume` reuses them)
  fold_K/                  a complete `s3d finetune` run folder (model, state, logs) per fold
  fold_K/validation/       its validation cases predicted on their original grid (TTA), summary.json
  crossval/summary.json    all out-of-fold predictions scored together (and summary.csv)
  postprocessing.json      the postprocessing decided on them (s3d.postprocess), applied by predict

A fold counts as finished when its exported weights are those of its last step and its validation
summary exists; a `--resume` skips finished folds, predicts the validation cases of a fold whose
training finished but whose prediction did not, and continues the unfinished fold from its state.
The training settings are those saved in crossval.json when the run started; the folds are the ones
asked for now, so folds can be added to a run one command at a time (`--resume --folds 3`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from s3d.errors import S3DError
from s3d.files import read_json, write_json

SETTINGS_FILE = "crossval.json"
FOLD_PATTERN = re.compile(r"^fold_(\d+)$")
VALIDATION_DIR = "validation"
CROSSVAL_DIR = "crossval"


def fold_dir(run: str | Path, fold: int) -> Path:
    return Path(run) / f"fold_{fold}"


def fold_dirs(run: str | Path) -> dict[int, Path]:
    """The fold_K folders present in `run`, by K."""
    run = Path(run)
    if not run.is_dir():
        return {}
    out = {}
    for p in run.iterdir():
        m = FOLD_PATTERN.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def fold_is_trained(folder: str | Path) -> bool:
    """Whether the model exported in `folder` is the one of the run's last step."""
    config = Path(folder) / "config.json"
    if not config.is_file() or not (Path(folder) / "model.safetensors").is_file():
        return False
    try:
        c = read_json(config)
        return int(c["step"]) >= int(c["train"]["steps"])
    except (S3DError, KeyError, TypeError, ValueError):
        return False


def finished_folds(run: str | Path) -> dict[int, Path]:
    """The folds of `run` whose training is complete, by K (what `s3d predict -m RUN` ensembles)."""
    return {k: p for k, p in fold_dirs(run).items() if fold_is_trained(p)}


def parse_folds(values: Sequence[str] | str, num_folds: int = 5) -> list[int]:
    """`--folds` values: "all", or fold numbers (separated by spaces or commas) -> sorted unique folds."""
    if isinstance(values, str):
        values = [values]
    tokens = [t for v in values for t in re.split(r"[,\s]+", str(v).strip()) if t]
    if tokens == ["all"]:
        return list(range(num_folds))
    folds = []
    for t in tokens:
        if not t.isdigit() or not 0 <= int(t) < num_folds:
            raise S3DError(f"--folds {' '.join(tokens)}: expected 'all' or fold numbers in 0..{num_folds - 1}, "
                           f"got {t!r}")
        folds.append(int(t))
    if not folds:
        raise S3DError(f"--folds: expected 'all' or fold numbers in 0..{num_folds - 1}")
    return sorted(set(folds))


def _raw_dataset(dataset: Path) -> Any:  # noqa: ANN401 - s3d.data.dataset.Dataset
    from s3d.data.dataset import find_dataset

    if (dataset / "plan.json").exists():
        raise S3DError(f"{dataset}: --folds needs the raw nnU-Net dataset (imagesTr/, labelsTr/), not a preprocessed "
                       "folder: each fold's validation cases are predicted and scored on their original grid")
    ds = find_dataset(dataset)
    if not any(c.label is not None for c in ds.cases):
        raise S3DError(f"{dataset}: no labels found (labelsTr/); cross-validation needs a labeled nnU-Net dataset")
    return ds


def _check_new_run(run: Path) -> None:
    """A start without --resume must not overwrite trained folds (nor a single-fold run in RUN itself)."""
    from s3d.checkpoint import STATE_FILE, has_training_state

    if has_training_state(run):
        raise S3DError(f"{run}: holds a single-fold run already ({STATE_FILE}); pick a new folder for --folds")
    for k, p in fold_dirs(run).items():
        if has_training_state(p):
            raise S3DError(f"{run}: holds fold {k} already ({p.name}/{STATE_FILE}); pass --resume to continue the "
                           "run or pick a new folder")


def crossval_finetune(dataset: str | Path, run: str | Path, cfg: Any, folds: Sequence[int], *,  # noqa: ANN401
                      resume: bool = False, jobs: int = 1, cache_dir: Path | None = None,
                      workers: int | None = None, tta: bool = True, step_size: float = 0.5,
                      batch_size: int = 2) -> dict[str, Any]:
    """Train `folds` of the fixed 5-fold split into RUN/fold_K (cfg: s3d.train.finetune.FinetuneConfig,
    whose `fold` is replaced), predict and score each fold's validation cases, then score all out-of-fold
    predictions together and decide the postprocessing. Returns {"folds": {K: summary path},
    "crossval": summary or None, "postprocessing": decision dict or None}."""
    from s3d.env import world_size
    from s3d.files import prepare_output_dir
    from s3d.train.finetune import FinetuneConfig, settings_json
    from s3d.train.run_folder import run_lock, settings_from_saved

    dataset = Path(dataset)
    if world_size() > 1:
        # every rank would predict and score the same validation cases into the same files
        raise S3DError("--folds runs in one process; start it without torchrun (train one fold per torchrun job "
                       "with --fold K instead)")
    if cfg.val_fraction is not None:
        raise S3DError("--folds and --val-fraction exclude each other: cross-validation uses the fixed 5-fold split")
    folds = [int(k) for k in folds]
    for k in folds:
        if not 0 <= k < cfg.num_folds:
            raise S3DError(f"--folds: fold {k} is not in 0..{cfg.num_folds - 1}")
    run = prepare_output_dir(run, inputs=(dataset,), what="run folder")
    ds = _raw_dataset(dataset)
    with run_lock(run):
        settings = run / SETTINGS_FILE
        if resume and settings.exists():
            saved = read_json(settings)
            if not isinstance(saved, dict) or not isinstance(saved.get("finetune"), dict):
                raise S3DError(f"{settings}: not a cross-validation settings object; was it edited?")
            cfg = settings_from_saved(FinetuneConfig, saved["finetune"], settings, device=cfg.device)
            # the folds are what to do now, not how to train: `--resume --folds 3` adds fold 3 to the run
            all_folds = sorted({int(k) for k in saved.get("folds", [])} | set(folds))
            if all_folds != saved.get("folds"):
                write_json(settings, {**saved, "folds": all_folds})
            tqdm.write(f"--resume: folds {', '.join(map(str, folds))} with the settings in {settings} (other options "
                       "given now, except --device and --folds, are ignored)")
        else:
            if not resume:
                _check_new_run(run)
            settings_dict = {"folds": folds, "finetune": settings_json(cfg)}
            write_json(settings, settings_dict)
        summaries = {}
        for k in folds:
            summaries[k] = _run_fold(dataset, ds, run, replace(cfg, fold=k), resume=resume, jobs=jobs,
                                     cache_dir=cache_dir, workers=workers, tta=tta, step_size=step_size,
                                     batch_size=batch_size)
        result = crossval_summary(run, dataset)
    result["folds"] = {k: str(p) for k, p in summaries.items()}
    return result


def _run_fold(dataset: Path, ds: Any, run: Path, cfg: Any, *, resume: bool, jobs: int,  # noqa: ANN401
              cache_dir: Path | None, workers: int | None, tta: bool, step_size: float, batch_size: int) -> Path:
    from s3d.train.finetune import finetune

    folder = fold_dir(run, cfg.fold)
    summary = folder / VALIDATION_DIR / "summary.json"
    if fold_is_trained(folder) and summary.is_file():
        tqdm.write(f"fold {cfg.fold}: finished earlier ({summary}); not retrained")
        return summary
    if not fold_is_trained(folder):
        tqdm.write(f"fold {cfg.fold} of {cfg.num_folds}: training into {folder}")
        # without --resume no fold holds a state (checked before the first fold), so `resume` passes through
        finetune(dataset, folder, cfg, resume=resume, jobs=jobs, cache_dir=cache_dir, workers=workers)
    predict_validation(ds, folder, tta=tta, step_size=step_size, batch_size=batch_size, device=cfg.device,
                       amp=cfg.amp)
    return summary


def predict_validation(ds: Any, folder: Path, *, tta: bool = True, step_size: float = 0.5,  # noqa: ANN401
                       batch_size: int = 2, device: str = "auto", amp: str = "auto") -> dict[str, Any]:
    """Predict the validation cases of the fold in `folder` (as listed in its config.json) on their
    original grid into folder/validation/ (no postprocessing: it is decided from these) and score
    them into folder/validation/summary.json. Cases predicted before a kill are not predicted again."""
    from s3d.evaluate import evaluate_folders
    from s3d.predict import load_ensemble, predict_cases

    config = read_json(folder / "config.json")
    val_ids = list(config.get("data", {}).get("val_cases") or [])
    if not val_ids:
        raise S3DError(f"{folder / 'config.json'}: lists no validation cases")
    by_id = {c.case_id: c for c in ds.cases}
    missing = [c for c in val_ids if c not in by_id or by_id[c].label is None]
    if missing:
        raise S3DError(f"{ds.root}: validation case {missing[0]} of {folder.name} is not in the dataset (or has no "
                       "label); was the dataset changed after training?")
    out = folder / VALIDATION_DIR
    ensemble = load_ensemble(folder, device=device, amp=amp, postprocessing=False)
    predict_cases([by_id[c] for c in val_ids], out, ensemble, step_size=step_size, tta=tta, continue_=True,
                  batch_size=batch_size, desc=f"validate {folder.name}")
    label_dir = Path(by_id[val_ids[0]].label).parent
    summary = evaluate_folders(label_dir, out, ds.labels, output=out / "summary.json", names=val_ids,
                               progress=False)
    tqdm.write(f"{folder.name}: validation Dice {summary['foreground_mean']['Dice']} over {len(val_ids)} cases")
    return summary


def crossval_summary(run: str | Path, dataset: str | Path | None = None) -> dict[str, Any]:
    """Merge the validation summaries of every finished fold of `run` into RUN/crossval/summary.json
    and decide the postprocessing on those out-of-fold predictions (RUN/postprocessing.json)."""
    from s3d.evaluate import merge_summaries
    from s3d.postprocess import POSTPROCESSING_FILE, determine_postprocessing

    run = Path(run)
    fold_summaries = {k: p / VALIDATION_DIR / "summary.json" for k, p in finished_folds(run).items()}
    fold_summaries = {k: s for k, s in fold_summaries.items() if s.is_file()}
    if not fold_summaries:
        return {"crossval": None, "postprocessing": None}
    summaries = [read_json(s) for s in fold_summaries.values()]
    out = run / CROSSVAL_DIR / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = merge_summaries(summaries, output=out)
    merged["folds"] = sorted(fold_summaries)
    pairs = [(Path(c["reference_file"]), Path(c["prediction_file"])) for c in merged["metric_per_case"]]
    labels = [int(v) for v in merged["labels"]]
    decision = determine_postprocessing(pairs, labels, progress=False)
    record = decision.to_dict() | {"folds": sorted(fold_summaries),
                                   "source": "out-of-fold predictions of " + ", ".join(
                                       f"fold_{k}" for k in sorted(fold_summaries))}
    write_json(run / POSTPROCESSING_FILE, record)
    tqdm.write(f"cross-validation over folds {', '.join(map(str, sorted(fold_summaries)))}: "
               f"{len(pairs)} cases, mean Dice {merged['foreground_mean']['Dice']}; postprocessing: "
               f"{decision.describe()} (Dice {decision.dice_before.get('foreground_mean')} -> "
               f"{decision.dice_after.get('foreground_mean')}); wrote {out} and {run / POSTPROCESSING_FILE}")
    return {"crossval": merged, "postprocessing": record, "summary_path": str(out)}

