"""Self-supervised pre-training objectives behind `s3d pretrain --method`.

Each method is an objective module (`forward(batch) -> (loss, logs)`) run by the one training loop:
- `mae`: S3D / Spark3D (Wald et al. 2024, Sec. 4): sparse ResEnc encoder on a block-masked input,
  mask tokens + densification, ResEnc decoder, L2 on masked voxels only.
- `simtrot`: SimTROT (Hu et al., Sec. 3.2-3.3): token-level NT-Xent between a masked view and a
  rotated view whose feature map is restored, same-position tokens of other volumes weighted by w.
- `btrot`: the BYOL variant: online encoder + projector + predictor, EMA target, rotate-and-restore.
Every method's encoder is the segmentation network's encoder under the same names (ResEnc `encoder.*`,
Swin UNETR `swinViT.*`, see `s3d.nn.networks`), so `s3d finetune --weights RUN` transfers it by name.

On Swin UNETR (`--arch swin-unetr[-s]`, SimTROT's own setting) the tokens are the last encoder stage's patch
embeddings (`s3d.nn.swin_unetr.encoder_tokens`), view A is masked at the patch-embedding grid
(`patch_grid_mask`) and view B's token grid is restored exactly, because patch embedding and merging do not
overlap. `mae` does not apply there: masking a hierarchical transformer needs SimMIM-style mask tokens.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from s3d import __version__
from s3d.checkpoint import save_model, write_json
from s3d.env import rank, world_size
from s3d.errors import S3DError
from s3d.nn.contrastive import HEAD_NORMS
from s3d.train.loop import TrainConfig, check_lr, train
from s3d.train.run_folder import begin_run, run_lock, settings_from_saved, write_settings

SETTINGS_FILE = "pretrain.json"

METHODS = ("mae", "simtrot", "btrot")


# Peak learning rates of the one optimiser s3d.train.loop runs (SGD, Nesterov momentum 0.99, weight decay 3e-5,
# PolyLR), which both papers pre-train with:
# - ResEnc: 1e-2, S3D's pre-training setting (Wald et al. 2024, arXiv 2410.23132: nnU-Net's SGD recipe);
# - Swin UNETR: 1e-4, SimTROT (Hu et al., Sec. 4.2 "Optimizer": SGD, learning rate 0.0001, Nesterov momentum
#   0.99). SimTROT states no weight decay; s3d keeps nnU-Net's 3e-5.
RESENC_PRETRAIN_LR = 1e-2
SWIN_PRETRAIN_LR = 1e-4


def default_lr(arch: str) -> float:
    """The pre-training peak learning rate of `arch` when --lr is not given (see the constants above)."""
    from s3d.nn.networks import is_swin

    return SWIN_PRETRAIN_LR if is_swin(arch) else RESENC_PRETRAIN_LR


def check_method_arch(method: str, arch: str) -> None:
    """S3DError when `method` cannot pre-train `arch` (before anything is written)."""
    from s3d.nn.networks import is_swin

    if method == "mae" and is_swin(arch):
        raise S3DError(f"--method mae --arch {arch}: not applicable to a hierarchical transformer without "
                       "SimMIM-style masking; use --method simtrot or btrot")


@dataclass
class PretrainConfig:
    method: str = "mae"
    arch: str = "resenc-l"
    patch_size: tuple[int, int, int] = (160, 160, 160)  # S3D paper: 160^3 at 1 mm
    batch_size: int = 2
    steps: int = 1000
    lr: float | None = None  # None: default_lr(arch), resolved on construction
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # S3D pre-training spacing
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    checkpoint_every: int = 250
    preview_every: int = 250
    augment: bool = True
    # mae
    # S3D's final model (Spark3D) masks a ratio drawn per sample from U[0.6, 0.9]: "Due to the highly similar
    # performance, we choose to proceed with a dynamic masking ratio over the static masking ratio" (Wald et al.
    # 2024, section 4, Tab. 2b: 60%, 75% and 60-90% perform equally well). "0.75" stays available.
    mask_ratio: str = "0.6-0.9"
    mask_block: tuple[int, int, int] | None = None  # None: patch / bottleneck (32 for 160^3, S3D)
    # high-resolution stages computed on the visible cells only (s3d.nn.cells): the masked dense emulation's
    # results for 0.53-0.61x of a dense step's time (ResEnc-L, CPU; benchmarks/README.md); False: the emulation
    block_sparse: bool = True
    # simtrot / btrot
    temperature: float = 0.5  # SimTROT tau
    same_position_weight: float = 5.0  # SimTROT w
    token_stage: int = -1  # encoder stage whose voxels are the tokens; -1 = bottleneck
    view_mask_ratio: float = 0.75  # SimTROT masking of view A
    ema_decay: float = 0.99  # BYOL target
    flip_views: bool = False  # SimTROT: rotations x mirror flips (48 ops) instead of the 24 rotations
    proj_dim: int = 128
    # norm inside the projection/prediction MLPs: "layer" (per token) or "batch" (over all tokens of the
    # batch); "auto": batch for btrot (BYOL's heads), layer otherwise (see s3d.nn.contrastive.ProjectionHead)
    head_norm: str = "auto"

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = default_lr(self.arch)
        if self.head_norm == "auto":
            self.head_norm = "batch" if self.method == "btrot" else "layer"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def check(self, n_stages: int) -> None:
        """S3DError naming the option whose value cannot train (before anything is written)."""
        def bad(option: str, value: object, rule: str) -> S3DError:
            return S3DError(f"{option} {value}: {rule}")

        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise bad("--temperature", self.temperature, "must be a positive number (SimTROT tau, e.g. 0.5)")
        if not (math.isfinite(self.same_position_weight) and self.same_position_weight > 0):
            raise bad("--same-position-weight", self.same_position_weight, "must be a positive number (SimTROT w)")
        if not 0 <= self.ema_decay <= 1:
            raise bad("--ema-decay", self.ema_decay, "must be in [0, 1] (BYOL target momentum, e.g. 0.99)")
        if self.head_norm not in HEAD_NORMS:
            raise bad("--head-norm", self.head_norm, f"choose one of {', '.join(HEAD_NORMS)}")
        if not 0 <= self.view_mask_ratio < 1:
            raise bad("--view-mask-ratio", self.view_mask_ratio, "must be in [0, 1)")
        if not -n_stages <= self.token_stage < n_stages:
            raise bad("--token-stage", self.token_stage, f"the network has {n_stages} stages (0..{n_stages - 1}, "
                      "or -1 for the bottleneck)")


class MAEObjective(nn.Module):
    """S3D masked image modelling. forward({"image": (B,1,X,Y,Z)}) -> (masked L2, logs)."""

    def __init__(self, net_cfg, patch_size, mask_ratio, block_size, augmenter=None,  # noqa: ANN001
                 block_sparse: bool = True) -> None:
        super().__init__()
        from s3d.nn.mae import MAEModel, MaskedMSELoss

        self.model = MAEModel(net_cfg)
        self.model.block_sparse = bool(block_sparse)
        self.model.block_size = tuple(int(b) for b in block_size)
        self.loss = MaskedMSELoss()
        self.patch_size = tuple(patch_size)
        self.mask_ratio = mask_ratio
        self.block_size = tuple(block_size)
        self.augmenter = augmenter
        self.last: dict[str, torch.Tensor] = {}

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        from s3d.nn.masking import random_block_mask

        x, valid = batch["image"], batch.get("valid")
        if self.augmenter is not None:
            with torch.no_grad():
                # the padding mask moves with the image (nearest), like a label map
                x, valid = self.augmenter(x, valid.long() if valid is not None else None)
        mask = random_block_mask(x.shape[0], self.patch_size, self.block_size, self.mask_ratio, device=x.device)
        recon = self.model(x, mask)
        loss = self.loss(recon, x, mask, valid)
        self.last = {"image": x[:1].detach(), "mask": mask[:1].detach(), "recon": recon[:1].detach()}
        return loss, {"visible": float(mask.mean())}

    def preview(self) -> list[np.ndarray] | None:
        if not self.last:
            return None
        x, m, r = (self.last[k][0, 0].float().cpu().numpy() for k in ("image", "mask", "recon"))
        return [x, x * m, r, np.where(m > 0, x, r)]


class _TokenObjective(nn.Module):
    """Shared by SimTROT and B-TROT: views, encoder, token stage, collapse monitor."""

    def __init__(self, net_cfg, patch_size, cfg: PretrainConfig, augmenter=None) -> None:  # noqa: ANN001
        super().__init__()
        from s3d.nn.swin_unetr import SwinUNETRConfig, SwinViT

        if len(set(patch_size)) != 1:
            raise S3DError(f"--patch-size {patch_size}: {cfg.method} rotates views by 90 degrees, so the patch "
                           "must be cubic (e.g. 64 64 64)")
        # the segmentation network's name for the encoder, which the exported tensors carry
        self.encoder_prefix = "encoder."
        self.swin_patch: tuple[int, int, int] | None = None
        if isinstance(net_cfg, SwinUNETRConfig):
            self.encoder = SwinViT(net_cfg)
            self.encoder_prefix = "swinViT."
            # hidden states: patch embedding, then each of the 4 stages (after its merging); -1 is
            # encoder_tokens, the last stage's patch embeddings (SimTROT Sec. 3.1)
            self.stage = cfg.token_stage % _swin_token_stages()
            self.channels = net_cfg.feature_size << self.stage
            # SimTROT Sec. 3.2: view A is masked at the patch-embedding grid
            self.swin_patch = net_cfg.patch_size
            self.view_mask_patch = net_cfg.patch_size
        else:
            from s3d.nn.resenc import ResEncEncoder

            self.encoder = ResEncEncoder(net_cfg)
            n_stages = len(net_cfg.features)
            self.stage = cfg.token_stage % n_stages
            self.channels = net_cfg.features[self.stage]
            total_stride = np.prod([np.array(s) for s in net_cfg.strides[: self.stage + 1]], axis=0)
            # masking cells half a token wide: a token's receptive field always keeps visible voxels
            self.view_mask_patch = tuple(int(max(1, s // 2)) for s in total_stride)
        self.cfg = cfg
        self.augmenter = augmenter
        self.last: dict[str, torch.Tensor] = {}

    def views(self, x: torch.Tensor) -> dict:
        from s3d.data.views import TextureAugConfig, make_views

        if self.augmenter is not None:
            with torch.no_grad():
                x, _ = self.augmenter(x)
        with torch.no_grad():
            swin = self.swin_patch is not None
            v = make_views(x, TextureAugConfig(), mask_ratio=0.0 if swin else self.cfg.view_mask_ratio,
                           mask_patch=self.view_mask_patch, allow_flip=self.cfg.flip_views)
            if swin and self.cfg.view_mask_ratio > 0:
                from s3d.nn.swin_unetr import mask_patches, patch_grid_mask

                # whole embedding patches, so that every patch embedding sees its patch entirely or not at all
                v["mask"] = patch_grid_mask(x.shape[0], x.shape[2:], self.swin_patch, self.cfg.view_mask_ratio,
                                            device=x.device).to(x.dtype)
                v["view_a"] = mask_patches(v["view_a"], v["mask"])
        self.last = {"image": x[:1].detach(), "view_a": v["view_a"][:1].detach(), "view_b": v["view_b"][:1].detach()}
        return v

    def tokens(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # ResEncEncoder returns one map per stage, SwinViT its 5 hidden states (the last = encoder_tokens)
        return encoder(x)[self.stage]

    def preview(self) -> list[np.ndarray] | None:
        if not self.last:
            return None
        return [self.last[k][0, 0].float().cpu().numpy() for k in ("image", "view_a", "view_b")]


class SimTROTObjective(_TokenObjective):
    """forward({"image": (B,1,X,Y,Z)}) -> (weighted token NT-Xent, logs incl. collapse monitor)."""

    def __init__(self, net_cfg, patch_size, cfg: PretrainConfig, augmenter=None) -> None:  # noqa: ANN001
        super().__init__(net_cfg, patch_size, cfg, augmenter)
        from s3d.nn.contrastive import ProjectionHead, TokenContrastiveLoss

        self.head = ProjectionHead(self.channels, out_channels=cfg.proj_dim, norm=cfg.head_norm)
        self.loss = TokenContrastiveLoss(cfg.temperature, cfg.same_position_weight)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        from s3d.nn.contrastive import restore_batch

        x = batch["image"]
        if x.shape[0] < 2 and self.cfg.same_position_weight != 1:
            raise S3DError("--batch-size must be >= 2 for simtrot: the same-position weight w compares "
                           "tokens of different volumes in a batch")
        v = self.views(x)
        ta = self.tokens(self.encoder, v["view_a"])
        za = self.head(ta)
        zb = self.head(restore_batch(self.tokens(self.encoder, v["view_b"]), v["ops"]))
        loss = self.loss(za, zb)
        return loss, _collapse_logs(za, ta)


class BTROTObjective(_TokenObjective):
    """BYOL with rotate-and-restore: symmetrised normalised MSE between the online prediction of one
    view and the EMA target projection of the other."""

    def __init__(self, net_cfg, patch_size, cfg: PretrainConfig, augmenter=None) -> None:  # noqa: ANN001
        super().__init__(net_cfg, patch_size, cfg, augmenter)
        from s3d.nn.contrastive import BYOLTokenLoss, PredictionHead, ProjectionHead

        self.head = ProjectionHead(self.channels, out_channels=cfg.proj_dim, norm=cfg.head_norm)
        self.predictor = PredictionHead(cfg.proj_dim, out_channels=cfg.proj_dim, norm=cfg.head_norm)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        self.loss = BYOLTokenLoss()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        from s3d.nn.contrastive import restore_batch

        v = self.views(batch["image"])
        ops = v["ops"]
        tokens_a = self.tokens(self.encoder, v["view_a"])
        online_a = self.head(tokens_a)
        online_b = self.head(restore_batch(self.tokens(self.encoder, v["view_b"]), ops))
        with torch.no_grad():
            target_a = self.target_head(self.tokens(self.target_encoder, v["view_a"]))
            target_b = self.target_head(restore_batch(self.tokens(self.target_encoder, v["view_b"]), ops))
        loss = 0.5 * (self.loss(self.predictor(online_a), target_b) + self.loss(self.predictor(online_b), target_a))
        return loss, _collapse_logs(online_a, tokens_a)

    def after_step(self, step: int) -> None:
        from s3d.nn.contrastive import ema_update

        ema_update(self.target_encoder, self.encoder, self.cfg.ema_decay)
        ema_update(self.target_head, self.head, self.cfg.ema_decay)


def _collapse_logs(projected: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """The collapse monitor of the projections (token_std, ...) and of the encoder tokens they come from
    (enc_token_std, ...): a head with batch statistics centres its output by construction, so only the
    encoder's tokens say whether the representation that fine-tuning inherits has collapsed."""
    from s3d.nn.contrastive import collapse_stats

    logs = {k: float(v) for k, v in collapse_stats(projected.detach()).items()}
    logs |= {f"enc_{k}": float(v) for k, v in collapse_stats(tokens.detach()).items()}
    return logs


def _swin_token_stages() -> int:
    from s3d.nn.swin_unetr import NUM_STAGES

    return NUM_STAGES + 1


def network_config(cfg: PretrainConfig):  # noqa: ANN201 - s3d.nn.networks.NetworkConfig
    """The paper's fixed ResEnc-L for `resenc-l` (S3D, Sec. 3); other ResEnc presets are planned from the
    patch. Swin UNETR presets are fixed topologies (SimTROT Sec. 4.2) whose input must tile the token grid."""
    from s3d.nn.networks import arch_names, check_patch_size, is_swin, preset
    from s3d.nn.resenc import PRESETS, plan_network

    if is_swin(cfg.arch):
        net = preset(cfg.arch)
        net.in_channels, net.num_classes, net.deep_supervision = 1, 1, False
        check_patch_size(cfg.patch_size, net)
        return net
    if cfg.arch not in PRESETS:
        raise S3DError(f"--arch {cfg.arch}: unknown, choose one of {', '.join(arch_names())}")
    net = plan_network(cfg.patch_size, cfg.spacing, preset=cfg.arch, in_channels=1, num_classes=1)
    net.deep_supervision = False
    total = np.prod(np.array(net.strides), axis=0)
    bad = [p for p, s in zip(cfg.patch_size, total, strict=True) if p % s]
    if bad:
        raise S3DError(f"--patch-size {cfg.patch_size}: must be divisible by the network's total stride "
                       f"{tuple(int(s) for s in total)}")
    return net


def make_objective(cfg: PretrainConfig, net_cfg, augmenter=None) -> tuple[nn.Module, dict]:  # noqa: ANN001
    """The objective `s3d pretrain --method cfg.method` trains, and the settings it adds to config.json
    (benchmarks build theirs here too, so that they measure what training runs)."""
    check_method_arch(cfg.method, cfg.arch)
    if cfg.method == "mae":
        from s3d.nn.masking import default_block_size, parse_mask_ratio

        block = tuple(cfg.mask_block) if cfg.mask_block else default_block_size(cfg.patch_size, net_cfg)
        ratio = parse_mask_ratio(cfg.mask_ratio)
        return (MAEObjective(net_cfg, cfg.patch_size, ratio, block, augmenter, cfg.block_sparse),
                {"mask_block": list(block), "mask_ratio": cfg.mask_ratio})
    if cfg.method == "simtrot":
        if cfg.batch_size < 2:
            raise S3DError("--batch-size must be >= 2 for simtrot: the same-position weight w compares tokens "
                           "of different volumes in a batch")
        return SimTROTObjective(net_cfg, cfg.patch_size, cfg, augmenter), {}
    if cfg.method == "btrot":
        return BTROTObjective(net_cfg, cfg.patch_size, cfg, augmenter), {}
    raise S3DError(f"--method {cfg.method}: choose one of {', '.join(METHODS)}")


def prepare_corpus(sources: list[Path], cfg: PretrainConfig, *, jobs: int = 1, cache_dir: Path | None = None,
                   curation=None) -> tuple[list, list[dict]]:  # noqa: ANN001 - CurationConfig
    """The store cases to pre-train on, and the volumes left out because they are smaller than the
    patch ({"case_id", "path", "reason"}).

    A source that is a store (`s3d preprocess` output, has plan.json) is used as it is, finished or
    still being written by other parts. Every other source (folders searched recursively, text
    files of paths, nnssl pretrain_data.json) is curated and preprocessed once into the cache at
    cfg.spacing; a rerun only does what is missing (a new file, an interrupted run).
    """
    from s3d.data.corpus import find_corpus
    from s3d.data.corpus_preprocess import corpus_plan, preprocess_corpus
    from s3d.data.curation import CurationConfig, fov_reason
    from s3d.data.preprocess import load_preprocessed
    from s3d.train.cache import cache_folder

    curation = curation or CurationConfig()
    stores = [s for s in sources if (s / "plan.json").is_file()]
    raw = [s for s in sources if s not in stores]
    if raw:
        images = find_corpus(raw)
        if not images:
            raise S3DError("no images found in " + ", ".join(str(r) for r in raw))
        out = cache_folder(raw[0].name if len(raw) == 1 else "corpus",
                           [*sorted(str(r.resolve()) for r in raw), str(tuple(cfg.spacing)), "corpus"], cache_dir)
        tqdm.write(f"preprocessing {len(images)} image(s) into {out}")
        report = preprocess_corpus(images, out, corpus_plan(cfg.spacing), jobs=jobs, patch_size=cfg.patch_size,
                                   curation=curation)
        tqdm.write(report.summary())
        stores.append(out)
    cases, small = [], []
    for store in stores:
        plan, found = load_preprocessed(store)
        if not np.allclose(plan.target_spacing, cfg.spacing):
            sp = " ".join(f"{s:g}" for s in plan.target_spacing)
            raise S3DError(f"{store}: preprocessed at spacing {sp} mm, not --spacing "
                           f"{' '.join(f'{s:g}' for s in cfg.spacing)}; pass --spacing {sp}")
        for case in found:
            reason = fov_reason(case.shape, cfg.patch_size, curation.min_fov_fraction)
            if reason is None:
                cases.append(case)
            else:
                small.append({"case_id": case.case_id, "path": str(case.path), "reason": reason})
    if not cases:
        raise S3DError(f"no volume left to pre-train on ({len(small)} smaller than --patch-size "
                       f"{' '.join(str(p) for p in cfg.patch_size)}; lower it or --min-fov-fraction)")
    return cases, small


def pretrain(data: list[str | Path], output: str | Path, cfg: PretrainConfig, *, resume: bool = False,
             jobs: int = 1, cache_dir: Path | None = None, workers: int | None = None,
             curation=None) -> Path:  # noqa: ANN001 - s3d.data.curation.CurationConfig
    """Pre-train an encoder with `cfg.method` on every image of `data` (see prepare_corpus) and write
    `output` (model.safetensors with `encoder.*` keys + config.json, state, log.csv, preview PNGs,
    skipped_for_patch.json). workers: DataLoader processes (None: s3d.data.loader.default_workers())."""
    from s3d.files import prepare_output_dir

    if cfg.method not in METHODS:
        raise S3DError(f"--method {cfg.method}: choose one of {', '.join(METHODS)}")
    check_method_arch(cfg.method, cfg.arch)
    if not resume:  # a bad --arch / --patch-size fails before the run folder exists (resume: saved settings)
        network_config(cfg)
    output = prepare_output_dir(output, inputs=tuple(data), what="run folder")
    with run_lock(output):
        return _pretrain(data, output, cfg, resume=resume, jobs=jobs, cache_dir=cache_dir, workers=workers,
                         curation=curation)


def _pretrain(data: list[str | Path], output: Path, cfg: PretrainConfig, *, resume: bool, jobs: int,
              cache_dir: Path | None, workers: int | None, curation) -> Path:  # noqa: ANN001
    from s3d.data.augment import Augmenter
    from s3d.data.loader import default_workers, make_loader
    from s3d.data.sampling import PatchDataset
    from s3d.device import resolve_device
    from s3d.nn.swin_unetr import SwinUNETRConfig

    saved = begin_run(output, SETTINGS_FILE, resume)
    if saved is not None:
        # runs saved before head_norm existed trained per-token LayerNorm heads (their state holds those)
        saved.setdefault("head_norm", "layer")
        cfg = settings_from_saved(PretrainConfig, saved, output / SETTINGS_FILE, device=cfg.device)
        cfg.patch_size, cfg.spacing = tuple(cfg.patch_size), tuple(cfg.spacing)
        cfg.mask_block = tuple(cfg.mask_block) if cfg.mask_block else None
        if cfg.method not in METHODS:
            raise S3DError(f"{output / SETTINGS_FILE}: method {cfg.method!r} is not one of {', '.join(METHODS)}")
        tqdm.write(f"--resume: continuing with the settings in {output / SETTINGS_FILE} (other options given now, "
                   "except --device, are ignored)")
    check_method_arch(cfg.method, cfg.arch)
    net_cfg = network_config(cfg)
    cfg.check(_swin_token_stages() if isinstance(net_cfg, SwinUNETRConfig) else net_cfg.n_stages)
    check_lr(cfg.lr)
    resolve_device(cfg.device)  # a GPU that is not there fails now, before the settings are written
    sources = [Path(d) for d in data]
    if world_size() > 1 and not all((s / "plan.json").is_file() for s in sources):
        raise S3DError("under torchrun, preprocess first (`s3d preprocess SOURCES... STORE --corpus`, one machine "
                       "or --part K --parts N on several) and pre-train on STORE, so that ranks do not race")
    from s3d.data.curation import CurationConfig

    curation = curation or CurationConfig()
    cases, small = prepare_corpus(sources, cfg, jobs=jobs, cache_dir=cache_dir, curation=curation)
    num_cases = len(cases)
    # the compact table every loader worker gets; the case objects are not needed after this
    dataset = PatchDataset(cases, cfg.patch_size, cfg.batch_size, oversample_foreground=0.0, seed=cfg.seed,
                           rank=rank(), world_size=world_size(),
                           channels_as_samples=True, with_valid_mask=cfg.method == "mae")
    del cases
    workers = default_workers() if workers is None else workers
    augmenter = Augmenter.for_pretraining(cfg.patch_size) if cfg.augment else None

    torch.manual_seed(cfg.seed)
    objective, extra = make_objective(cfg, net_cfg, augmenter)

    run_config = {
        "s3d_version": __version__,
        "kind": "pretrain",
        "method": cfg.method,
        "network": net_cfg.to_dict(),
        "plan": {"target_spacing": list(cfg.spacing), "normalization": ["zscore"]},
        "patch_size": list(cfg.patch_size),
        "pretrain": cfg.to_dict(),
        "data": {"sources": [str(d) for d in data], "num_cases": num_cases, "skipped_for_patch": len(small),
                 "curation": curation.to_dict()},
        **extra,
    }
    output.mkdir(parents=True, exist_ok=True)
    if saved is None:
        write_settings(output, SETTINGS_FILE, cfg.to_dict())
    write_json(output / "skipped_for_patch.json", small, indent=1)
    if small and rank() == 0:
        tqdm.write(f"{num_cases} volume(s) to pre-train on; {len(small)} left out as smaller than the patch "
                   f"(listed in {output / 'skipped_for_patch.json'})")
    train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, checkpoint_every=cfg.checkpoint_every, device=cfg.device,
                            amp=cfg.amp, seed=cfg.seed)

    def make_batches(start_step: int):
        return make_loader(dataset.from_step(start_step), workers, resolve_device(cfg.device))

    def export(obj: nn.Module, step: int) -> None:
        state = {k: v for k, v in obj.state_dict().items()
                 if not k.startswith(("target_", "loss."))}
        # The encoder under the segmentation network's names, whatever the method's module layout.
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
        prefix = getattr(obj, "encoder_prefix", "encoder.")
        if prefix != "encoder.":
            state = {(prefix + k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in state.items()}
        save_model(output, state, {**run_config, "step": step})
        images = obj.preview()
        if images is not None and (step % cfg.preview_every == 0 or step == cfg.steps):
            from s3d.viz import panel, write_png

            write_png(output / f"preview_step{step:07d}.png", panel(images))

    train(objective, make_batches, train_cfg, output, export=export, resume=resume, desc=f"pretrain {cfg.method}")
    return output
