"""Supervised fine-tuning: the nnU-Net training recipe plus the S3D transfer recipe.

From scratch: Dice + CE with deep supervision, SGD (Nesterov, momentum 0.99, wd 3e-5), PolyLR from
1e-2, foreground oversampling of 1/3, spatial + intensity augmentation, gradient clipping at 12
(all nnU-Net defaults).
With pre-trained weights (S3D paper, Sec. 5 and Tab. 3): transfer the encoder (and stem), train the
decoder only during a linear LR warm-up, then warm up the whole network, then PolyLR, with the peak
LR lowered to 1e-3. For datasets with more input channels than the pre-training, the stem's input
weights are replicated across channels and divided by C (S3D, Tab. 8) and the stem stays frozen
during the decoder warm-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from s3d import __version__
from s3d.checkpoint import save_model
from s3d.device import resolve_device
from s3d.env import rank, world_size
from s3d.errors import S3DError
from s3d.nn.losses import DeepSupervisionLoss, DiceCELoss
from s3d.train.cache import default_cache_dir, preprocessed_folder  # noqa: F401 - default_cache_dir re-exported
from s3d.train.loop import Phase, TrainConfig, check_lr, train
from s3d.train.run_folder import begin_run, run_lock, settings_from_saved, write_settings

SETTINGS_FILE = "finetune.json"

SPLIT_SEED = 12345  # nnU-Net also uses a fixed seed (12345) for its 5-fold split
SUBSET_SEED = 0


@dataclass
class FinetuneConfig:
    """Everything `s3d finetune` decides; saved in the run's config.json."""

    arch: str = "resenc-s"
    patch_size: tuple[int, int, int] | None = None  # None: planned from the data
    batch_size: int = 2
    steps: int = 1000
    val_every: int = 250
    fold: int = 0
    num_folds: int = 5
    val_fraction: float | None = None  # overrides folds when set
    train_cases: int | None = None  # low-data regime: use only N labeled training cases
    seed: int = 0
    lr: float | None = None  # None: 1e-2 from scratch, 1e-3 with pre-trained weights (S3D)
    warmup_steps: tuple[int, int] | None = None  # (decoder-only, whole network); None: 5% + 5% of steps
    weights: str | None = None
    from_scratch: bool = False  # with weights: their network config and spacing, random initialisation
    deep_supervision: bool = True
    oversample_foreground: float = 1 / 3
    spacing: tuple[float, float, float] | str | None = None  # None: median, or the weights' spacing
    device: str = "auto"
    amp: str = "auto"
    checkpoint_every: int = 250
    tta_validation: bool = False
    extra: dict = field(default_factory=dict)


def split_cases(case_ids: list[str], cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of sorted case ids, then the optional low-data subset.

    The subset is drawn from one fixed permutation, so N=5 ⊂ N=10 ⊂ N=25 and every seed of the same
    N sees the same cases (seeds then measure training noise, not case selection).
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise S3DError(f"need at least 2 labeled cases to hold one out for validation, found {len(ids)}")
    perm = [ids[i] for i in np.random.RandomState(SPLIT_SEED).permutation(len(ids))]
    if cfg.val_fraction is not None:
        if not 0 < cfg.val_fraction < 1:
            raise S3DError(f"--val-fraction {cfg.val_fraction}: must be between 0 and 1")
        n_val = max(1, round(len(ids) * cfg.val_fraction))
        val = perm[:n_val]
    else:
        if not 0 <= cfg.fold < cfg.num_folds:
            raise S3DError(f"--fold {cfg.fold}: must be in 0..{cfg.num_folds - 1}")
        val = perm[cfg.fold :: cfg.num_folds]
    train_ids = [c for c in perm if c not in set(val)]
    if cfg.train_cases is not None:
        if not 1 <= cfg.train_cases <= len(train_ids):
            raise S3DError(f"--train-cases {cfg.train_cases}: the training split has {len(train_ids)} cases")
        order = np.random.RandomState(SUBSET_SEED).permutation(len(train_ids))
        train_ids = [train_ids[i] for i in sorted(order[: cfg.train_cases])]
    return sorted(train_ids), sorted(val)


def prepare_data(dataset: Path, spacing, jobs: int = 1, cache_dir: Path | None = None) -> Path:  # noqa: ANN001
    """A preprocessed folder for the labeled `dataset` (see `s3d.train.cache.preprocessed_folder`)."""
    return preprocessed_folder(dataset, spacing, require_labels=True, jobs=jobs, cache_dir=cache_dir)


class SegmentationObjective(nn.Module):
    """forward(batch) -> (loss, logs): augment on the batch's device, Dice+CE over DS outputs."""

    def __init__(self, network: nn.Module, augmenter=None) -> None:  # noqa: ANN001 - s3d.data.augment.Augmenter
        super().__init__()
        self.network = network
        self.augmenter = augmenter
        self.loss = DeepSupervisionLoss(DiceCELoss())

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        image, seg = batch["image"], batch["seg"]
        if self.augmenter is not None:
            with torch.no_grad():
                image, seg = self.augmenter(image, seg)
        return self.loss(self.network(image), seg), {}


def transfer_encoder(network: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "pre-trained weights"
                     ) -> dict:
    """Load the encoder tensors of a pre-trained state dict into `network`: `encoder.*` for ResEnc, `swinViT.*`
    for Swin UNETR (what token pre-training trains; `s3d.nn.networks` explains the choice).

    The stem's first conv is replicated across input channels (divided by C) when the dataset has
    more channels than the pre-training had (S3D Tab. 8). Returns a report of what matched.
    `source` (the --weights spec) starts every error message.
    """
    from s3d.nn.networks import encoder_prefixes

    prefixes = encoder_prefixes(network)
    own = network.state_dict()
    enc = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    if not enc:
        what = "a Swin UNETR" if prefixes == ("swinViT.",) else "a ResEnc"
        raise S3DError(f"{source}: holds no {prefixes[0]}* tensors: not {what} encoder checkpoint")
    loaded, replicated, mismatched = {}, [], []
    for k, v in enc.items():
        if k not in own:
            mismatched.append(f"{k} (not in this network)")
            continue
        target = own[k]
        if v.shape == target.shape:
            loaded[k] = v
        elif v.ndim == 5 and v.shape[1] == 1 and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            loaded[k] = v.repeat(1, target.shape[1], 1, 1, 1) / target.shape[1]
            replicated.append(k)
        else:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target.shape)}")
    if mismatched:
        raise S3DError(
            f"{source}: pre-trained encoder does not fit --arch: {len(mismatched)} tensors differ, e.g. "
            f"{mismatched[0]}"
        )
    missing = [k for k in own if k.startswith(prefixes) and k not in loaded]
    network.load_state_dict(loaded, strict=False)
    return {
        "encoder_tensors_loaded": len(loaded),
        "encoder_tensors_in_network": sum(k.startswith(prefixes) for k in own),
        "encoder_tensors_missing": missing,
        "stem_replicated": replicated,
    }


def _param_groups(objective: SegmentationObjective) -> dict[str, list[nn.Parameter]]:
    from s3d.nn.networks import encoder_module

    net = objective.network
    enc = [p for p in encoder_module(net).parameters() if p.requires_grad]
    enc_ids = {id(p) for p in enc}
    return {"encoder": enc, "decoder": [p for p in net.parameters() if p.requires_grad and id(p) not in enc_ids]}


def schedule(cfg: FinetuneConfig, pretrained: bool) -> list[Phase]:
    if not pretrained:
        return [Phase("poly", cfg.steps)]
    w1, w2 = cfg.warmup_steps or (max(1, cfg.steps // 20), max(1, cfg.steps // 20))
    if w1 + w2 >= cfg.steps:
        raise S3DError(f"warm-up steps {w1}+{w2} leave nothing of --steps {cfg.steps}")
    if min(w1, w2) < 0:
        raise S3DError(f"warm-up steps {w1}+{w2}: must not be negative")
    # (0, 0): no warm-up, the pre-trained network trains whole from the first step (SimTROT's fine-tuning,
    # nnFormer's recipe, has none)
    phases = [Phase("warmup", w1, frozen=("encoder",)), Phase("warmup", w2), Phase("poly", cfg.steps - w1 - w2)]
    return [p for p in phases if p.steps > 0]


def finetune(dataset: str | Path, output: str | Path, cfg: FinetuneConfig, *, resume: bool = False,
             jobs: int = 1, cache_dir: Path | None = None, workers: int | None = None) -> Path:
    """Train a segmentation network on `dataset` and write it to `output` (model.safetensors +
    config.json, the resumable state, log.csv and validation.jsonl). Returns `output`.
    workers: DataLoader processes cutting patches (None: s3d.data.loader.default_workers(); 0: in
    this process)."""
    from s3d.files import prepare_output_dir

    output = prepare_output_dir(output, inputs=(dataset,), what="run folder")
    with run_lock(output):
        return _finetune(Path(dataset), output, cfg, resume=resume, jobs=jobs, cache_dir=cache_dir,
                         workers=workers)


def _finetune(dataset: Path, output: Path, cfg: FinetuneConfig, *, resume: bool, jobs: int,
              cache_dir: Path | None, workers: int | None) -> Path:
    from s3d.data.augment import Augmenter
    from s3d.data.loader import default_workers, make_loader
    from s3d.data.preprocess import Plan, load_preprocessed
    from s3d.data.sampling import PatchDataset
    from s3d.nn import networks as nets
    from s3d.nn.resenc import PRESETS, adjust_patch_size, plan_network
    from s3d.nn.swin_unetr import SwinUNETRConfig

    workers = default_workers() if workers is None else workers
    saved = begin_run(output, SETTINGS_FILE, resume)
    if saved is not None:
        cfg = settings_from_saved(FinetuneConfig, saved, output / SETTINGS_FILE, device=cfg.device)
        cfg.patch_size = tuple(cfg.patch_size) if cfg.patch_size else None
        tqdm.write(f"--resume: continuing with the settings in {output / SETTINGS_FILE} (other options given now, "
                   "except --device, are ignored)")
    if cfg.lr is not None:
        check_lr(cfg.lr)
    resolve_device(cfg.device)  # before hours of preprocessing, not after
    if not cfg.weights:  # likewise an unknown --arch or a patch off Swin UNETR's token grid
        arch_cfg = nets.preset(cfg.arch)
        if cfg.patch_size and nets.is_swin(arch_cfg):
            nets.check_patch_size(cfg.patch_size, arch_cfg)

    pretrained_sd, pretrained_cfg = None, None
    if cfg.weights:
        from s3d.hub import resolve_weights
        from s3d.model_check import check_config

        resolved = resolve_weights(cfg.weights)
        pretrained_cfg = check_config(resolved.config, resolved.source)
        pretrained_sd = resolved.state_dict
        if cfg.spacing is None:
            cfg.spacing = tuple(pretrained_cfg.get("plan", {}).get("target_spacing") or
                                pretrained_cfg.get("spacing") or (1.0, 1.0, 1.0))
    data_dir = prepare_data(dataset, cfg.spacing, jobs=jobs, cache_dir=cache_dir)
    plan, cases = load_preprocessed(data_dir)
    assert isinstance(plan, Plan)
    labeled = [c for c in cases if c.has_seg]
    train_ids, val_ids = split_cases([c.case_id for c in labeled], cfg)
    by_id = {c.case_id: c for c in labeled}
    in_channels = len(plan.channel_names)
    num_classes = max(plan.labels.values()) + 1

    if pretrained_cfg is not None:
        net_cfg = nets.with_task(nets.network_config_from_dict(pretrained_cfg["network"]), in_channels,
                                 num_classes, cfg.deep_supervision)
        if isinstance(net_cfg, SwinUNETRConfig):
            # Swin UNETR's patch is never rounded up (see check_patch_size); a pre-training patch already fits
            patch = tuple(cfg.patch_size or pretrained_cfg.get("patch_size") or nets.SWIN_DEFAULT_PATCH["swin-unetr-s"])
            nets.check_patch_size(patch, net_cfg, "--patch-size" if cfg.patch_size else f"{cfg.weights}: patch_size")
        else:
            patch = tuple(cfg.patch_size or pretrained_cfg.get("patch_size") or _median_patch(cases, net_cfg))
            patch = adjust_patch_size(patch, net_cfg)
    elif nets.is_swin(cfg.arch):
        # a fixed topology (SimTROT Sec. 4.2); the patch is --patch-size or the preset's default, not planned
        net_cfg = nets.with_task(nets.preset(cfg.arch), in_channels, num_classes, cfg.deep_supervision)
        patch = tuple(cfg.patch_size) if cfg.patch_size else nets.SWIN_DEFAULT_PATCH[cfg.arch]
        nets.check_patch_size(patch, net_cfg)
    else:
        if cfg.arch not in PRESETS:
            raise S3DError(f"--arch {cfg.arch}: unknown, choose one of {', '.join(nets.arch_names())}")
        patch = tuple(cfg.patch_size) if cfg.patch_size else None
        if patch is None:
            patch = _median_patch(cases)
        net_cfg = plan_network(patch, plan.target_spacing, preset=cfg.arch, in_channels=in_channels,
                               num_classes=num_classes)
        net_cfg.deep_supervision = cfg.deep_supervision
        patch = adjust_patch_size(patch, net_cfg)
    cfg.patch_size = tuple(int(p) for p in patch)

    torch.manual_seed(cfg.seed)
    network = nets.build_network(net_cfg)
    transfer_report = None
    if cfg.from_scratch:
        pretrained_sd = None  # the baseline: same network and preprocessing as the weights, random init
    if pretrained_sd is not None:
        transfer_report = transfer_encoder(network, pretrained_sd, source=cfg.weights)
        tqdm.write(
            f"loaded pre-trained encoder from {cfg.weights}: {transfer_report['encoder_tensors_loaded']}/"
            f"{transfer_report['encoder_tensors_in_network']} tensors"
            + (f", stem replicated over {in_channels} channels" if transfer_report["stem_replicated"] else "")
        )
    lr = cfg.lr if cfg.lr is not None else (1e-3 if pretrained_sd is not None else 1e-2)
    check_lr(lr)
    train_cfg = TrainConfig(steps=cfg.steps, lr=lr, phases=schedule(cfg, pretrained_sd is not None),
                            checkpoint_every=cfg.checkpoint_every, val_every=cfg.val_every,
                            device=cfg.device, amp=cfg.amp, seed=cfg.seed)

    output.mkdir(parents=True, exist_ok=True)
    run_config = {
        "s3d_version": __version__,
        "kind": "segmentation",
        "network": net_cfg.to_dict(),
        "plan": plan.to_dict(),
        "patch_size": list(cfg.patch_size),
        "labels": plan.labels,
        "channel_names": {str(k): v for k, v in plan.channel_names.items()},
        "finetune": settings_json(cfg),
        "train": train_cfg.to_dict(),
        "data": {"preprocessed": str(data_dir), "train_cases": train_ids, "val_cases": val_ids},
        "transfer": transfer_report,
    }
    if saved is None:
        write_settings(output, SETTINGS_FILE, settings_json(cfg))

    def make_batches(start_step: int):
        ds = PatchDataset([by_id[i] for i in train_ids], cfg.patch_size, cfg.batch_size,
                          oversample_foreground=cfg.oversample_foreground, seed=cfg.seed, start_step=start_step,
                          rank=rank(), world_size=world_size())
        return make_loader(ds, workers, resolve_device(cfg.device))

    def export(objective: SegmentationObjective, step: int) -> None:
        save_model(output, objective.network.state_dict(), {**run_config, "step": step})

    val_cases = [by_id[i] for i in val_ids]

    def validate(objective: SegmentationObjective, step: int) -> dict[str, float]:
        return validation_dice(objective.network, val_cases, cfg.patch_size, plan.labels,
                               tta=cfg.tta_validation)

    objective = SegmentationObjective(network, Augmenter.for_segmentation(cfg.patch_size))
    train(objective, make_batches, train_cfg, output, param_groups=_param_groups, export=export,
          validate=validate if val_cases else None, resume=resume, desc="finetune")
    return output


def validation_dice(network: nn.Module, cases: list, patch_size, labels: dict[str, int], tta: bool = False
                    ) -> dict[str, float]:
    """Sliding-window Dice per label on the preprocessed validation cases (nnU-Net-style online check;
    `s3d predict` + `s3d evaluate` give the final numbers on the original grid)."""
    from s3d.infer import sliding_window_predict

    device = next(network.parameters()).device
    fg = {name: v for name, v in labels.items() if v != 0}
    inter = {n: 0.0 for n in fg}
    total = {n: 0.0 for n in fg}
    per_case = {n: [] for n in fg}
    for case in cases:
        data, seg = case.load()
        logits = sliding_window_predict(network, torch.from_numpy(data), patch_size, max(labels.values()) + 1,
                                        mirror_axes=(0, 1, 2) if tta else None, device=device)
        pred = logits.argmax(0).numpy()
        for name, v in fg.items():
            p, r = pred == v, seg == v
            i, s = float((p & r).sum()), float(p.sum() + r.sum())
            inter[name] += i
            total[name] += s
            if s > 0:
                per_case[name].append(2 * i / s)
    out = {f"dice_{n}": float(np.mean(per_case[n])) if per_case[n] else float("nan") for n in fg}
    out["dice_mean"] = float(np.nanmean([out[f"dice_{n}"] for n in fg]))
    return out


def _median_patch(cases: list, net_cfg=None) -> tuple[int, int, int]:  # noqa: ANN001
    """nnU-Net starts from the median image shape; capped at 128 per axis to stay CPU-friendly."""
    shapes = np.array([c.shape for c in cases])
    med = np.median(shapes, axis=0)
    return tuple(int(min(128, max(16, m))) for m in med)


def settings_json(cfg: FinetuneConfig) -> dict:
    """`cfg` as the JSON object saved in a run's settings (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
