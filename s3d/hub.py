"""Pre-trained weights by name: a registry, Hub download, safe conversion of nnssl pickles, export.

`resolve_weights(spec)` turns a registry name, a Hub repo id, a local folder or a local file into a
state dict (s3d = dynamic-network-architectures key names, without DNA's duplicate keys) plus the
config that `s3d finetune` needs (network, spacing, normalisation, patch size).

Trust model: only safetensors are ever loaded from the Hub as they are. The official OpenMind
checkpoints are PyTorch pickles (nnssl's `checkpoint_final.pth`); those are opened exactly once with
`torch.load(weights_only=True)` (never `weights_only=False`), converted to `model.safetensors` +
`config.json` in a conversion cache next to the Hugging Face cache, and read from there afterwards.

Aliases: a registry entry may record other Hub ids of the same weights (the OpenMind checkpoints were first
published as AnonRes/ResEncL-OpenMind-*); when the Hub says the registry id does not exist, or offline the cache
lacks it, each alias is tried in turn and the one that answered is recorded in the converted config
(`source.repo_id`, with `source.registry_repo_id` and `source.alias`).

Revision pinning: registry entries say `revision="main"` until the publishers tag releases. For a
reproducible run, resolve `owner/name@<full commit sha>` (the sha of a download is printed by
`s3d weights download` and recorded in the converted config under `source.revision`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from s3d.errors import S3DError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NNSSL_FILE = "checkpoint_final.pth"
CONVERTED_DIR = "s3d-converted"
FORMATS = ("nnssl-pth", "s3d-safetensors")

# Residual Encoder U-Net "L" as nnU-Net ResEnc presets / nnssl's ResEncL build it (Isensee et al. 2024,
# arXiv 2404.09556; S3D paper Sec. 4): used only when s3d.nn.resenc is not importable.
_RESENC_L = {
    "in_channels": 1,
    "num_classes": 1,
    "features": [32, 64, 128, 256, 320, 320],
    "blocks": [1, 3, 4, 6, 6, 6],
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "kernel_sizes": [[3, 3, 3]] * 6,
    "decoder_convs": [1, 1, 1, 1, 1],
    "deep_supervision": False,
}
_ARCH_KEYS = ("features", "blocks", "kernel_sizes", "strides", "decoder_convs")

CITATION_S3D = """@article{wald2024revisiting,
  title   = {Revisiting MAE pre-training for 3D medical image segmentation},
  author  = {Wald, Tassilo and Ulrich, Constantin and Lukyanenko, Stanislav and Goncharov, Andrei and
             Paderno, Alberto and others and Maier-Hein, Klaus},
  journal = {arXiv preprint arXiv:2410.23132},
  year    = {2024}
}"""
CITATION_SIMTROT = """@article{hu2024enhancing,
  title   = {Enhancing 3D Transformer Segmentation Model for Medical Image with Token-level
             Representation Learning},
  author  = {Hu, Xinrong and Zeng, Dewen and Wu, Yawen and Li, Xueyang and Shi, Yiyu},
  journal = {arXiv preprint arXiv:2408.05889},
  year    = {2024}
}"""
CITATION_OPENMIND = """@article{wald2024openmind,
  title   = {An OpenMind for 3D medical vision self-supervised learning},
  author  = {Wald, Tassilo and Ulrich, Constantin and Suprijadi, Jonathan and Ziegler, Sebastian and
             Nohel, Michal and Peretzke, Robin and others and Maier-Hein, Klaus H.},
  journal = {arXiv preprint arXiv:2412.17041},
  year    = {2024}
}"""


CITATION_MISSING_PIECE = """@inproceedings{eckstein2025missing,
  title     = {The Missing Piece: A Case for Pre-Training in 3D Medical Object Detection},
  author    = {Eckstein, Katharina and Ulrich, Constantin and Baumgartner, Michael and K{\\"a}chele, Jessica and
               Bounias, Dimitrios and Wald, Tassilo and Floca, Ralf and Maier-Hein, Klaus H.},
  booktitle = {Medical Image Computing and Computer Assisted Intervention -- MICCAI 2025},
  series    = {LNCS},
  volume    = {15963},
  year      = {2025},
  doi       = {10.1007/978-3-032-04965-0_58},
  note      = {arXiv:2509.15947}
}"""
# Only the arXiv id was seen (the model card's tags); the title was not, so no BibTeX is made up for it.
CITATION_NNFOUNDATION = "nnFoundation (MIC-DKFZ), arXiv:2609.26924: see the model card for the full reference."

DEFAULT_LICENSE = "cc-by-4.0"
# A licence that asks more than attribution is flagged by `s3d weights list/info`: users fine-tune these weights
# and publish the results, and a ShareAlike licence then binds what they publish.
LICENSE_NOTES = {
    "cc-by-sa-4.0": "ShareAlike: a model fine-tuned from these weights is an adaptation and must be shared under "
                    "CC BY-SA 4.0 (or a compatible licence), with attribution",
}
PLAN_PATCH = "from the plan (recommended_downstream_patchsize, known after download)"
PLAN_SPACING = "from the plan (known after download)"
SEEN = "seen in stored public pages, to be checked when the Hub is reachable"


@dataclass(frozen=True)
class WeightsEntry:
    """One named set of pre-trained weights on the Hugging Face Hub.

    spacing / normalization / patch_size are fallbacks: the checkpoint's own adaptation plan wins when it has
    them. `patch_size=None` means the plan's `recommended_downstream_patchsize`, unknown until download.
    """

    name: str
    repo_id: str
    revision: str  # tag, branch or full commit sha; "main" until the publisher tags a release
    files: tuple[str, ...]  # files[0] holds the tensors (a path inside the repo); files[1] the plan, if any
    format: str  # "nnssl-pth" | "s3d-safetensors"
    method: str
    arch: str | None = "resenc-l"  # ResEncConfig preset the tensors must match (None: take them as they are)
    in_channels: int = 1
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)  # mm, s3d (i, j, k) order; None: from the plan
    normalization: str = "zscore"
    patch_size: tuple[int, int, int] | None = None
    license: str = DEFAULT_LICENSE
    citation: str = ""
    sha256: str | None = None  # of files[0]; checked when set
    description: str = ""
    pretraining_data: str = ""
    aliases: tuple[str, ...] = ()  # other Hub ids of these weights, tried in order when repo_id does not exist
    data_summary: str = ""  # a few words for the `s3d weights list` table
    sources: tuple[str, ...] = ()  # where the facts of this entry come from, and what is unconfirmed

    def license_label(self) -> str:
        """The licence id, marked "(!)" when it asks more than cc-by-4.0 does."""
        return self.license if self.license == DEFAULT_LICENSE else f"{self.license} (!)"

    def license_note(self) -> str | None:
        if self.license == DEFAULT_LICENSE:
            return None
        return f"{self.license}: " + LICENSE_NOTES.get(
            self.license, f"not {DEFAULT_LICENSE}: read the licence on the model card before use")

    def patch_text(self) -> str:
        return " x ".join(str(p) for p in self.patch_size) if self.patch_size else PLAN_PATCH

    def card(self) -> str:
        """Model-card text shown by `s3d weights info`."""
        spacing = f"{' x '.join(f'{s:g}' for s in self.spacing)} mm" if self.spacing else PLAN_SPACING
        lines = [
            f"{self.name}: {self.description}",
            f"  Hub:           https://huggingface.co/{self.repo_id} (revision {self.revision})",
        ]
        if self.aliases:
            lines.append(f"  also as:       {', '.join(self.aliases)} (tried when the Hub says {self.repo_id} "
                         "does not exist)")
        lines += [
            f"  files:         {', '.join(self.files)} ({self.format})",
            f"  method:        {self.method}",
            f"  architecture:  {self.arch or 'as stored (read off the tensor shapes)'}, "
            f"{self.in_channels} input channel(s)",
            f"  preprocessing: spacing {spacing}, {self.normalization} normalisation unless the plan says otherwise",
            f"  patch:         {self.patch_text()}",
            f"  data:          {self.pretraining_data or 'unknown'}",
            f"  licence:       {self.license_label()}",
        ]
        note = self.license_note()
        if note:
            lines.append(f"  (!) {note}")
        if self.sha256:
            lines.append(f"  sha256:        {self.sha256}")
        if self.sources:
            lines += ["  sources:", *(textwrap.fill(s, 118, initial_indent="    - ", subsequent_indent="      ")
                                      for s in self.sources)]
        if self.citation:
            lines += ["  citation:", *("    " + c for c in self.citation.splitlines())]
        return "\n".join(lines)


_OPENMIND_DATA = "OpenMind: public 3D brain MRI from OpenNeuro (114,570 volumes), 1 mm isotropic, z-score"
# Facts common to the OpenMind ResEnc-L repos (Wald et al., arXiv 2412.17041). The collection
# https://huggingface.co/collections/MIC-DKFZ/openmind-models-6819c21c7fe6f0aaaab7dadf is linked from the readme
# of MIC-DKFZ/nnssl; its guide is documentation/Getting_started_OpenMind.md (nnssl commit 70448644).
_OPENMIND_SOURCES = (
    f"licence cc-by-4.0, dataset AnonRes/OpenMind, nnssl as pre-training code: model-card front matter ({SEEN})",
    "files checkpoint_final.pth, adaptation_plan.json, a dummy config.json, README.md: issue 14 and the Hub file "
    f"views ({SEEN})",
    "checkpoint dict (network_weights, nnssl_adaptation_plan, init_args, trainer_name, optimizer_state, "
    "grad_scaler_state, logging, current_epoch): nnssl AbstractTrainer.save_checkpoint (commit 70448644)",
    "plan: arch_class_name ResEncL, configuration onemmiso, spacing [1, 1, 1], ZScoreNormalization: "
    f"adaptation_plan.json of AnonRes/ResEncL-OpenMind-SimCLR ({SEEN}); the patch is read from each plan",
    "volume count: ssl3d-challenge.dkfz.de",
)


def _openmind(method_id: str, method: str, description: str, seen: str, extra_citation: str = "",
              extra_sources: tuple[str, ...] = ()) -> WeightsEntry:
    return WeightsEntry(
        name=f"openmind-resencl-{method_id.lower()}",
        repo_id=f"MIC-DKFZ/ResEncL-OpenMind-{method_id}",
        revision="main",
        files=(NNSSL_FILE, "adaptation_plan.json"),
        format="nnssl-pth",
        method=method,
        arch="resenc-l",
        license=DEFAULT_LICENSE,
        citation=CITATION_OPENMIND + ("\n" + extra_citation if extra_citation else ""),
        description=description,
        pretraining_data=_OPENMIND_DATA,
        aliases=(f"AnonRes/ResEncL-OpenMind-{method_id}",),
        data_summary="OpenMind (brain MRI)",
        sources=(seen, *extra_sources, *_OPENMIND_SOURCES),
    )


_MISSING_PIECE_DATA = ("CT-RATE (chest CT; the dataset itself is cc-by-nc-sa-4.0) + ABCD Study (brain MRI). "
                       "Normalisation: the plan's; nnssl has no CT scheme, so per-image z-score is expected")
# "The Missing Piece" (Eckstein et al., MICCAI 2025) ResEnc-L backbones. What was seen: the model card of
# MIC-DKFZ/ResEncL-MissingPiece-S3D (family table: MAE, MG, S3D, VoCo, MultiTalent; "pre-trained ... on CT-RATE +
# ABCD Study"), the Hub page of ResEncL-MissingPiece-MAE (licence cc-by-4.0, dataset tag ibrahimhamamci/CT-RATE)
# and the MIC-DKFZ organisation page listing all five. Normalisation: nnssl (commit 70448644) defines only
# ZScoreNormalization, NoNormalization, RescaleTo01 and RGBTo01 (preprocessing/normalization/
# normalization_schemes.py) and its planner always writes ZScoreNormalization, so these CT weights most likely
# saw per-image z-score, not nnU-Net's CTNormalization; s3d takes whatever each checkpoint's plan says.
_MISSING_PIECE_SOURCES = (
    f"repo ids, methods, CT-RATE + ABCD: model card of MIC-DKFZ/ResEncL-MissingPiece-S3D ({SEEN})",
    f"licence cc-by-4.0: Hub page of ResEncL-MissingPiece-MAE ({SEEN}); the other four not seen, assumed the same",
    "files checkpoint_final.pth + adaptation_plan.json: NOT confirmed (the nnssl layout of the OpenMind repos is "
    "assumed); a different layout fails with 'has no file'",
    "normalisation: nnssl code has no CT scheme (commit 70448644); the checkpoint plan itself was not seen",
    "CT-RATE licence cc-by-nc-sa-4.0: Hub page of the ibrahimhamamci/CT-RATE dataset",
)


def _missing_piece(method_id: str, method: str, description: str, data: str = _MISSING_PIECE_DATA,
                   summary: str = "CT-RATE CT + ABCD MRI", extra_sources: tuple[str, ...] = ()
                   ) -> WeightsEntry:
    return WeightsEntry(
        name=f"missingpiece-resencl-{method_id.lower()}",
        repo_id=f"MIC-DKFZ/ResEncL-MissingPiece-{method_id}",
        revision="main",
        files=(NNSSL_FILE, "adaptation_plan.json"),
        format="nnssl-pth",
        method=method,
        arch="resenc-l",
        spacing=None,
        license=DEFAULT_LICENSE,
        citation=CITATION_MISSING_PIECE,
        description=description,
        pretraining_data=data,
        data_summary=summary,
        sources=(*extra_sources, *_MISSING_PIECE_SOURCES),
    )


SSL3D_REPO = "MIC-DKFZ/SSL3D-checkpoints"
_TEAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def ssl3d_team_entry(team: str, method: str, description: str = "", extra_sources: tuple[str, ...] = ()
                     ) -> WeightsEntry:
    """Registry entry for one team's ResEnc-L checkpoint in MIC-DKFZ/SSL3D-checkpoints.

    The repo holds `<track>/<team>/<team>_<model>.pth`; this names `ResEnc-L/<team>/<team>_ResEncL.pth`. Teams not
    in the registry can be added with `register(ssl3d_team_entry("Team", "method"))`.
    """
    if not _TEAM_RE.match(team) or ".." in team:
        raise S3DError(f"SSL3D team {team!r}: not a folder name of letters, digits, '_', '-', '.'")
    return WeightsEntry(
        name=f"ssl3d-resencl-{team.lower().replace('_', '-')}",
        repo_id=SSL3D_REPO,
        revision="main",
        files=(f"ResEnc-L/{team}/{team}_ResEncL.pth",),
        format="nnssl-pth",
        method=method,
        arch="resenc-l",
        # The challenge fixed 160^3 for every downstream task (nnssl documentation/Getting_started_OpenMind.md);
        # a plan inside the checkpoint still wins.
        patch_size=(160, 160, 160),
        license=DEFAULT_LICENSE,
        citation=CITATION_OPENMIND,
        description=description or f"SSL3D challenge 2025 submission of team {team}: ResEnc-L, {method}.",
        pretraining_data="OpenMind (brain MRI), the challenge's only pre-training data",
        data_summary="OpenMind (brain MRI)",
        sources=(
            *extra_sources,
            f"layout <track>/<team>/<team>_<model>.pth, licence cc-by-4.0, OpenMind data, team and method: model "
            f"card of {SSL3D_REPO} ({SEEN})",
            "checkpoint dict: NOT confirmed; the challenge asked for nnssl's save_checkpoint layout "
            "(network_weights + nnssl_adaptation_plan, nnssl Getting_started_OpenMind.md) and the card says "
            "'encoder checkpoints', so the decoder may be missing (s3d then transfers the encoder only)",
            "patch 160^3: the challenge's fixed downstream patch (nnssl Getting_started_OpenMind.md)",
        ),
    )


# Teams whose files were seen in the SSL3D-checkpoints card. The card's table was cut off in the stored copy after
# a fourth ResEnc-L team whose name begins "Isik"; that team and the rest are not registered here (names unknown).
_SSL3D_TEAMS = (
    ("Datamen", "VoxCon", "code: github pwesp/voxcon; submitted as Datamen_resencl_weights_2025-08-23-02-18.pth"),
    ("DKFZ_MAE", "MAE (organisers' baseline, nnssl BaseMAE)",
     "submitted as DKFZ_MAE_DKFZ_BaseMAEResEncL_Openmind_checkpoint_final_2025-09-08-16-33.pth"),
    ("HiLab", "Vox-MSD (voxel-wise multi-scale self-distillation)",
     "paper: Zhou et al. 2025, IEEE J. Biomed. Health Inform. (Vox-MMSD); submitted as "
     "HiLab_Test_submission_ResEncL_2025-08-14-09-23.pth"),
)

REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        _openmind("MAE", "MAE (dense masked autoencoder)",
                  "ResEnc-L pre-trained with a dense MAE (the nnssl BaseMAE trainer) on OpenMind.",
                  f"ids: MIC-DKFZ/ResEncL-OpenMind-MAE (its model card) and AnonRes/ResEncL-OpenMind-MAE (README "
                  f"at commit c225c00) both {SEEN}"),
        _openmind("S3D", "S3D / Spark3D (sparse masked autoencoder)",
                  "ResEnc-L pre-trained with S3D, the sparse-convolution MAE of Wald et al. 2024, on OpenMind.",
                  "ids: seen only as AnonRes/ResEncL-OpenMind-S3D (issue 14); the MIC-DKFZ id is NOT confirmed",
                  CITATION_S3D),
        _openmind("VoCo", "VoCo (volume contrast)",
                  "ResEnc-L encoder pre-trained with Volume Contrast (VoCo) on OpenMind (encoder tensors only).",
                  f"ids: MIC-DKFZ/ResEncL-OpenMind-VoCo on the MIC-DKFZ organisation page ({SEEN}); "
                  "AnonRes/ResEncL-OpenMind-VoCo redirects to it (issue 14)"),
        _openmind("SimCLR", "SimCLR (contrastive)", "ResEnc-L pre-trained with SimCLR on OpenMind.",
                  f"ids: seen as AnonRes/ResEncL-OpenMind-SimCLR ({SEEN}); the MIC-DKFZ id is NOT confirmed",
                  extra_sources=("pre-training patch 192 x 192 x 64 (configurations.onemmiso.patch_size of its "
                                 "adaptation_plan.json), so no OpenMind patch is assumed",)),
        _openmind("VF", "VolumeFusion", "ResEnc-L pre-trained with VolumeFusion (VF) on OpenMind.",
                  f"ids: seen as AnonRes/ResEncL-OpenMind-VF (README at 86d1d46, {SEEN}); the MIC-DKFZ id is NOT "
                  "confirmed"),
        _openmind("SwinUNETR", "SwinUNETR pre-training (inpainting, rotation, contrast)",
                  "ResEnc-L pre-trained with the SwinUNETR pretext tasks on OpenMind.",
                  f"ids: seen as AnonRes/ResEncL-OpenMind-SwinUNETR (discussion #1, {SEEN}); the MIC-DKFZ id is NOT "
                  "confirmed"),
        WeightsEntry(
            name="nnfoundation-cnn",
            repo_id="MIC-DKFZ/nnFoundationCNN",
            revision="main",
            files=(NNSSL_FILE, "adaptation_plan.json"),
            format="nnssl-pth",
            method="MAE (nnssl; nnFoundation)",
            # Conflicting hints on the topology (see sources), so the tensors decide rather than the ResEnc-L preset.
            arch=None,
            spacing=None,
            license="cc-by-sa-4.0",
            citation=CITATION_NNFOUNDATION,
            description="nnFoundation CNN: a Residual Encoder U-Net foundation model pre-trained with nnssl.",
            pretraining_data="not confirmed: a third-party note says 2.1M CT/MRI/PET volumes, no fixed spacing, "
                             "z-score; check the model card",
            data_summary="CT/MRI/PET? unconfirmed",
            sources=(
                f"licence cc-by-sa-4.0, tags nnssl / arXiv 2609.26924, files checkpoint_final.pth (410 MB), "
                f"adaptation_plan.json, config.json (69 B), README.md, a banner image, commit 8edba04: Hub file "
                f"view of MIC-DKFZ/nnFoundationCNN ({SEEN})",
                "topology: issue 14 says ResEnc-L and 410 MB of fp32 fits ResEnc-L's ~102M parameters, but a "
                "public nnssl trainer named nnFoundationCNN_trainer builds features 64..640, blocks 2,5,6,10,10,12 "
                "with a 192^3 recommended patch: NOT resolved, so the network is read off the tensors",
                "pre-training data and normalisation: NOT confirmed (the model card text was not seen)",
            ),
        ),
        _missing_piece("MAE", "MAE (dense masked autoencoder)",
                       "ResEnc-L pre-trained with a dense MAE on CT-RATE + ABCD (The Missing Piece, MICCAI 2025)."),
        _missing_piece("MG", "Models Genesis (restoration of transformed volumes)",
                       "ResEnc-L pre-trained with Models Genesis on CT-RATE + ABCD (The Missing Piece, MICCAI 2025)."),
        _missing_piece("S3D", "S3D / Spark3D (sparse masked autoencoder)",
                       "ResEnc-L pre-trained with S3D on CT-RATE + ABCD (The Missing Piece, MICCAI 2025)."),
        _missing_piece("VoCo", "VoCo (volume contrast)",
                       "ResEnc-L pre-trained with VoCo on CT-RATE + ABCD (The Missing Piece, MICCAI 2025)."),
        _missing_piece(
            "MultiTalent", "MultiTalent (supervised multi-dataset segmentation)",
            "ResEnc-L pre-trained with MultiTalent, a supervised method (The Missing Piece, MICCAI 2025).",
            data="not confirmed: the card of its sibling RetinaUNet-MissingPiece-MultiTalent says 65 public "
                 "segmentation datasets of mixed modalities (issue 14 says CT-RATE + ABCD for the whole family)",
            summary="65 seg. sets? unconfirmed",
            extra_sources=("MultiTalent is supervised, so CT-RATE + ABCD (unlabelled) is unlikely to be its data: "
                           "NOT confirmed",)),
        *(ssl3d_team_entry(team, method, extra_sources=(note,)) for team, method, note in _SSL3D_TEAMS),
    )
}


def register(entry: WeightsEntry) -> None:
    """Add (or replace) a registry entry; the format must be one s3d can read."""
    if entry.format not in FORMATS:
        raise S3DError(f"weights '{entry.name}': unknown format {entry.format!r} (expected {' or '.join(FORMATS)})")
    REGISTRY[entry.name] = entry


@dataclass
class ResolvedWeights:
    """What `resolve_weights` found: tensors (loaded on first use when `path` is set), config, origin."""

    config: dict
    source: str
    path: Path | None = None  # model.safetensors, when the tensors are in one
    _state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._state_dict is None:
            from s3d.checkpoint import load_tensors

            if self.path is None:
                raise S3DError(f"{self.source}: no tensors were resolved")
            self._state_dict = load_tensors(self.path)
        return self._state_dict


# ----------------------------------------------------------------------------------------------------------
# state-dict helpers


def encoder_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `encoder.stem.*` and `encoder.stages.*` tensors, names unchanged (what fine-tuning transfers)."""
    return {k: v for k, v in sd.items() if k.startswith(("encoder.stem.", "encoder.stages."))}


def drop_dna_duplicates(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove dynamic-network-architectures' aliases: `...all_modules.*` (the conv/norm registered a second
    time in a Sequential) and `decoder.encoder.*` (the decoder keeps a reference to the encoder)."""
    try:
        from s3d.nn.resenc import convert_dna_state_dict
    except ImportError:
        convert_dna_state_dict = None
    if convert_dna_state_dict is not None:
        sd = convert_dna_state_dict(dict(sd))
    out = {k: v for k, v in sd.items() if ".all_modules." not in k and not k.startswith("decoder.encoder.")}
    return out


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") prefixes appear in checkpoints saved mid-training.
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def infer_network_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """ResEncConfig fields read off tensor shapes of a (DNA / s3d) Residual Encoder U-Net state dict.

    Features, blocks and kernel sizes come from the encoder convs; strides of stages >= 1 from the decoder's
    transposed convs (kernel == stride in nnU-Net's decoder), else the nnU-Net default 2; stage 0 is stride 1.
    """
    stages = _indices(sd, "encoder.stages.")
    stem = sd.get("encoder.stem.convs.0.conv.weight")
    if not stages or stem is None:
        raise S3DError("tensors are not a Residual Encoder U-Net (no encoder.stem / encoder.stages.* keys)")
    features, blocks, kernels = [], [], []
    for s in stages:
        nb = _indices(sd, f"encoder.stages.{s}.blocks.")
        w = sd[f"encoder.stages.{s}.blocks.{nb[-1]}.conv2.conv.weight"]
        features.append(int(w.shape[0]))
        blocks.append(len(nb))
        kernels.append([int(k) for k in w.shape[2:]])
    n = len(stages)
    transp = _indices(sd, "decoder.transpconvs.")
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    if len(transp) == n - 1:
        for i in transp:
            strides[n - 1 - i] = [int(k) for k in sd[f"decoder.transpconvs.{i}.weight"].shape[2:]]
    dec = _indices(sd, "decoder.stages.")
    decoder_convs = [len(_indices(sd, f"decoder.stages.{i}.convs.")) for i in dec] if dec else [1] * (n - 1)
    seg = _indices(sd, "decoder.seg_layers.")
    num_classes = int(sd[f"decoder.seg_layers.{seg[-1]}.weight"].shape[0]) if seg else 1
    return {"in_channels": int(stem.shape[1]), "num_classes": num_classes, "features": features, "blocks": blocks,
            "strides": strides, "kernel_sizes": kernels, "decoder_convs": decoder_convs, "deep_supervision": False}


def preset_network(name: str) -> dict:
    """A ResEncConfig preset as a dict (s3d.nn.resenc when present; ResEnc-L built in otherwise)."""
    try:
        from s3d.nn.resenc import PRESETS
    except ImportError:
        PRESETS = None
    if PRESETS is not None:
        if name not in PRESETS:
            raise S3DError(f"unknown network preset {name!r} (known: {', '.join(PRESETS)})")
        return PRESETS[name].to_dict()
    if name != "resenc-l":
        raise S3DError(f"unknown network preset {name!r}")
    return json.loads(json.dumps(_RESENC_L))


def _arch_of(d: Mapping) -> dict:
    def norm(v: Any) -> Any:
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: norm(d[k]) for k in _ARCH_KEYS if k in d}


def _normalise_network(d: dict) -> dict:
    try:
        from s3d.nn.resenc import ResEncConfig
    except ImportError:
        return d
    return ResEncConfig.from_dict(d).to_dict()


# ----------------------------------------------------------------------------------------------------------
# nnssl conversion

_NORM_NAMES = {"ZScoreNormalization": "zscore", "CTNormalization": "ct", "NoNormalization": "none"}


def _plan_configuration(plan: Mapping) -> dict:
    configs = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    return dict(next(iter(configs.values()))) if configs else {}


def _to_s3d_axes(values: Any, plan: Mapping) -> list | None:
    """nnU-Net/nnssl lists are in transposed SimpleITK (z, y, x) order; s3d uses nibabel (i, j, k) = (x, y, z)."""
    if values is None:
        return None
    values = list(values)
    back = (plan.get("pretrain_plan") or {}).get("transpose_backward")
    if back and len(back) == len(values):
        values = [values[b] for b in back]
    return values[::-1]


def convert_nnssl_checkpoint(ckpt: Mapping, entry: WeightsEntry | None = None, source: dict | None = None,
                             plan_fallback: Mapping | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """nnssl `checkpoint_final.pth` content -> (s3d state dict, s3d config dict).

    Keeps `encoder.*` and `decoder.*` tensors under their DNA names minus the duplicates; everything else
    (projection heads of contrastive methods, optimiser leftovers) is dropped and counted in the config.
    Spacing / normalisation / patch come from `nnssl_adaptation_plan` (else `plan_fallback`, the repo's
    adaptation_plan.json), falling back to the registry entry; the patch is the plan's
    `recommended_downstream_patchsize`, else the configuration's pre-training patch.
    """
    from s3d import __version__

    if "network_weights" not in ckpt:
        raise S3DError("not an nnssl checkpoint: no 'network_weights' entry")
    raw = _strip_wrappers(ckpt["network_weights"])
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise S3DError(f"nnssl checkpoint: network_weights[{bad[0]!r}] is not a tensor")
    kept = drop_dna_duplicates({k: v for k, v in raw.items() if k.startswith(("encoder.", "decoder."))})
    dropped = sorted(k for k in raw if not k.startswith(("encoder.", "decoder.")))
    plan = ckpt.get("nnssl_adaptation_plan") or {}
    plan_from = "checkpoint" if plan else None
    if not plan and plan_fallback:
        plan, plan_from = plan_fallback, "adaptation_plan.json"
    if not isinstance(plan, Mapping):
        raise S3DError(f"nnssl checkpoint: the adaptation plan is a {type(plan).__name__}, not an object")
    arch_name = (plan.get("architecture_plans") or {}).get("arch_class_name")
    # nnssl names its ResEnc-L preset "ResEncL" and the generic dynamic one "ResidualEncoderUNet" (adaptation_plan.py
    # ARCHITECTURE_PRESETS, commit 70448644); the nnFoundationCNN trainer uses the latter.
    if arch_name is not None and not any(a in str(arch_name).lower() for a in ("resenc", "residualencoderunet")):
        raise S3DError(f"nnssl checkpoint holds a {arch_name} network; s3d builds Residual Encoder U-Nets only")
    network = infer_network_config(kept)
    if entry is not None and entry.arch is not None:
        preset = preset_network(entry.arch)
        # Strides are only visible in the decoder's transposed convs; encoder-only uploads (VoCo) lack them.
        keys = ("features", "blocks", "kernel_sizes") + (("strides",) if any(k.startswith("decoder.") for k in kept)
                                                          else ())
        want, got = _arch_of(preset), _arch_of(network)
        if any(want.get(k) != got.get(k) for k in keys):
            raise S3DError(f"weights '{entry.name}': tensors do not match preset {entry.arch} "
                           f"(features {network['features']}, blocks {network['blocks']})")
        network = {**preset, "in_channels": network["in_channels"], "num_classes": network["num_classes"]}
    network = _normalise_network(network)

    conf = _plan_configuration(plan)
    spacing = conf.get("spacing") or (plan.get("pretrain_plan") or {}).get("original_median_spacing_after_transp")
    spacing = _to_s3d_axes(spacing, plan) or (list(entry.spacing) if entry and entry.spacing else None)
    schemes = conf.get("normalization_schemes")
    if schemes:
        normalization = [_NORM_NAMES.get(s, s) for s in schemes]
    else:
        normalization = [entry.normalization] * network.get("in_channels", 1) if entry else ["zscore"]
    patch = _to_s3d_axes(plan.get("recommended_downstream_patchsize") or conf.get("patch_size"), plan)
    patch = patch or (list(entry.patch_size) if entry and entry.patch_size else None)

    config = {
        "s3d_version": __version__,
        "kind": "pretrain",
        "method": entry.method if entry else str(ckpt.get("trainer_name") or "nnssl"),
        "network": network,
        "plan": {"target_spacing": [float(s) for s in spacing] if spacing else None,
                 "normalization": normalization},
        "patch_size": [int(p) for p in patch] if patch else None,
        "license": entry.license if entry else None,
        "source": {"format": "nnssl-pth", **(source or {}), "dropped_keys": len(dropped), "plan_from": plan_from},
        "nnssl_adaptation_plan": _jsonable(plan),
        "citations": _jsonable(ckpt.get("citations")),
    }
    return kept, config


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def load_pickle_weights_only(path: Path) -> Any:
    """`torch.load(..., weights_only=True)`: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise S3DError(f"{path}: file not found") from None
    except Exception as e:  # torch raises UnpicklingError / RuntimeError with multi-line text
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise S3DError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({first}); s3d never unpickles "
            "arbitrary objects: re-save it with only tensors and plain types in an environment you trust"
        ) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _from_pickle(obj: Any, path: Path, entry: WeightsEntry | None, source: dict,
                 plan_loader: Callable[[], Mapping | None] | None = None) -> tuple[dict, dict]:
    if isinstance(obj, Mapping) and "network_weights" in obj:
        fallback = plan_loader() if plan_loader is not None and not obj.get("nnssl_adaptation_plan") else None
        return convert_nnssl_checkpoint(obj, entry, source, fallback)
    # MONAI research-contributions' trainers save {"epoch", "best_acc", "state_dict"}; others use "model"
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if is_monai_swin(obj):
            return convert_monai_swin(obj, source)
        sd = drop_dna_duplicates(_strip_wrappers(obj))
        return sd, {"kind": "pretrain", "network": _normalise_network(infer_network_config(sd)), "source": source}
    raise S3DError(f"{path}: neither an nnssl checkpoint (network_weights) nor a state dict of tensors "
                   "(a Residual Encoder U-Net or MONAI's Swin UNETR)")


# ----------------------------------------------------------------------------------------------------------
# MONAI Swin UNETR

MONAI_SWIN_FORMAT = "monai-swin-unetr"


def is_monai_swin(sd: Mapping[str, Any]) -> bool:
    """A MONAI ``SwinUNETR`` state dict (``swinViT.*``) or its bare self-supervised encoder (``patch_embed.*``,
    ``layersN.*``, as in ``model_swinvit.pt``), with or without DDP / torch.compile prefixes."""
    return any(k.startswith(("swinViT.patch_embed.", "patch_embed.proj.")) for k in _strip_wrappers(sd))


def infer_swin_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """SwinUNETRConfig fields read off the tensor shapes of an s3d / MONAI Swin UNETR state dict.

    The patch embedding gives in_channels, feature_size and patch_size; the block count of each stage its
    depth; the relative-position table, (2w - 1)^3 x heads, the heads and the (cubic) window.
    """
    from s3d.nn.swin_unetr import NUM_STAGES, SwinUNETRConfig

    embed = sd.get("swinViT.patch_embed.proj.weight")
    if embed is None or embed.ndim != 5:
        raise S3DError("tensors are not a 3-D Swin UNETR (no 5-D swinViT.patch_embed.proj.weight)")
    if any(re.match(r"swinViT\.layers\dc\.", k) for k in sd):
        # MONAI's use_v2 adds a residual conv block per stage, which s3d's Swin UNETR does not have
        raise S3DError("MONAI SwinUNETR(use_v2=True) weights (swinViT.layersNc.*) are not supported")
    depths, heads, windows = [], [], set()
    for s in range(1, NUM_STAGES + 1):
        blocks = _indices(sd, f"swinViT.layers{s}.0.blocks.")
        table = sd.get(f"swinViT.layers{s}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None or table.ndim != 2:
            raise S3DError(f"Swin UNETR tensors lack encoder stage {s} (swinViT.layers{s}.0.blocks.*)")
        side = round(table.shape[0] ** (1 / 3))
        if side ** 3 != table.shape[0] or side % 2 == 0:
            raise S3DError(f"swinViT.layers{s}: relative-position table of {table.shape[0]} rows is not a cubic "
                           "window's (2w - 1)^3")
        depths.append(len(blocks))
        heads.append(int(table.shape[1]))
        windows.add((side + 1) // 2)
    if len(windows) != 1:
        raise S3DError(f"Swin UNETR stages use different windows {sorted(windows)}")
    head = sd.get("out.conv.conv.weight")
    cfg = SwinUNETRConfig(in_channels=int(embed.shape[1]), num_classes=int(head.shape[0]) if head is not None else 1,
                          feature_size=int(embed.shape[0]), depths=tuple(depths), num_heads=tuple(heads),
                          window_size=(windows.pop(),) * 3, patch_size=tuple(int(k) for k in embed.shape[2:]))
    return cfg.to_dict()


def convert_monai_swin(sd: Mapping[str, torch.Tensor], source: dict) -> tuple[dict, dict]:
    """MONAI SwinUNETR / SSL-encoder tensors -> (s3d state dict, pre-training config with the matching network)."""
    from s3d.nn.swin_unetr import convert_monai_state_dict

    out = convert_monai_state_dict(sd)
    encoder_only = not any(not k.startswith("swinViT.") for k in out)
    return out, {"kind": "pretrain", "network": infer_swin_config(out),
                 "source": {"format": MONAI_SWIN_FORMAT, **source, "encoder_only": encoder_only,
                            "dropped_keys": len(sd) - len(out)}}


# ----------------------------------------------------------------------------------------------------------
# Hub access


def _env_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    # read the environment at call time (huggingface_hub reads it once, at import)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser().resolve()
    if os.environ.get("HF_HOME"):
        return (Path(os.environ["HF_HOME"]) / "hub").expanduser().resolve()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


class _RepoUnavailable(S3DError):
    """The Hub says the repo does not exist, or (offline / unreachable) the cache does not hold it: the cue to try
    a registry entry's alias."""


def _repo_in_cache(cache: Path, repo_id: str) -> bool:
    from huggingface_hub.file_download import repo_folder_name

    return (cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots").is_dir()


def _hub_file(repo_id: str, filename: str, revision: str | None, cache: Path, local_only: bool, label: str,
              env_offline: bool, missing_ok: bool = False) -> Path | None:
    """hf_hub_download with the Hub's errors turned into one-line S3DErrors saying what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from s3d import __version__

    rev = revision or "main"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=rev, cache_dir=str(cache),
                                    local_files_only=local_only, library_name="s3d", library_version=__version__))
    except GatedRepoError:
        raise S3DError(f"weights '{label}': Hub repo {repo_id} is gated: accept its conditions at "
                       f"https://huggingface.co/{repo_id} and log in with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise _RepoUnavailable(f"weights '{label}': Hub repo {repo_id} not found (or private: log in with "
                       "`hf auth login`); check the name with `s3d weights list`") from None
    except RevisionNotFoundError:
        raise S3DError(f"weights '{label}': revision '{rev}' not found in Hub repo {repo_id}: use an existing "
                       "tag, branch or full commit sha") from None
    except LocalEntryNotFoundError:
        if missing_ok and local_only:
            return None
        # A repo the cache holds but without this file is reported as it is; only a repo it lacks altogether is the
        # "does not exist here" that lets an alias answer.
        unavailable = S3DError if _repo_in_cache(cache, repo_id) else _RepoUnavailable
        if env_offline:
            raise unavailable(
                f"weights '{label}' are not in the cache at {cache} and HF_HUB_OFFLINE is set: run "
                f"`s3d weights download {label}` on a machine with internet and copy the cache") from None
        if local_only:
            raise unavailable(f"weights '{label}' are not in the cache at {cache} and only local files were "
                              f"allowed: run `s3d weights download {label}` first") from None
        raise unavailable(
            f"weights '{label}': cannot reach the Hub and {repo_id}/{filename} is not in the cache at "
            f"{cache}: check the connection, or run `s3d weights download {label}` where there is "
            "internet and copy the cache") from None
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise S3DError(f"weights '{label}': Hub repo {repo_id} has no file {filename} at revision '{rev}'") from None
    except HfHubHTTPError as e:
        raise S3DError(f"weights '{label}': Hub request for {repo_id}/{filename} failed: {_one_line(e)}") from None
    except ValueError as e:  # invalid repo id / revision strings (HFValidationError)
        raise S3DError(f"weights '{label}': {_one_line(e)}") from None


def _snapshot_sha(path: Path) -> str:
    # hf_hub_download returns <cache>/models--owner--name/snapshots/<commit sha>/<path in the repo>, and that path
    # can have folders (SSL3D-checkpoints: ResEnc-L/<team>/<team>_ResEncL.pth)
    for folder in path.parents:
        if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
            return folder.name
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()


def _converted_name(repo_id: str, sha: str, filename: str) -> str:
    name = f"{repo_id.replace('/', '--')}--{sha}"
    if filename != NNSSL_FILE:  # one repo, several checkpoints (one per SSL3D team): one folder each
        name += "--" + re.sub(r"[^A-Za-z0-9_.-]+", "-", filename.rsplit(".", 1)[0]).strip("-.")
    return name


def _load_or_convert(pth: Path, repo_id: str, entry: WeightsEntry | None, cache: Path, label: str,
                     filename: str | None = None, plan_loader: Callable[[], Mapping | None] | None = None,
                     origin: dict | None = None) -> ResolvedWeights:
    """A Hub nnssl pickle: convert once into <cache>/s3d-converted/<owner>--<name>--<sha>[--<file>]/, then reuse.

    `origin` (which registry id / alias answered) goes into the converted config's `source`.
    """
    from s3d.checkpoint import read_json

    filename = filename or pth.name
    sha = _snapshot_sha(pth)
    target = cache / CONVERTED_DIR / _converted_name(repo_id, sha, filename)
    desc = f"{label} ({repo_id}@{sha[:12]}, converted from {filename})"
    if (target / CONFIG_FILE).exists() and (target / MODEL_FILE).exists():
        return ResolvedWeights(config=read_json(target / CONFIG_FILE), source=desc, path=target / MODEL_FILE)
    digest = _sha256(pth)
    if entry is not None and entry.sha256 and digest != entry.sha256.lower():
        raise S3DError(f"weights '{label}': {pth} has sha256 {digest}, the registry expects {entry.sha256}; "
                       "delete it from the cache and download again")
    source = {"repo_id": repo_id, "revision": sha, "filename": filename, "sha256": digest, **(origin or {})}
    sd, config = _from_pickle(load_pickle_weights_only(pth), pth, entry, source, plan_loader)
    _save_converted(target, sd, config)
    return ResolvedWeights(config=read_json(target / CONFIG_FILE), source=desc, path=target / MODEL_FILE)


def _save_converted(target: Path, sd: dict, config: dict) -> None:
    from s3d.checkpoint import save_model

    # Written in a private folder and renamed, so a concurrent or killed conversion never leaves a half one.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, sd, config)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


# The Hub's repo id rule (huggingface_hub validate_repo_id): owner/name of letters, digits, "-", "_", ".",
# no "--" or "..", at most 96 characters.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94})?/[A-Za-z0-9][\w.-]{0,95}$")
# git's ref-name rules (git check-ref-format) that matter for a path: no "..", "//", "@{", control
# characters, spaces or any of ~^:?*[\ ; no leading or trailing "/" or ".", no ".lock" ending.
_BAD_REV_RE = re.compile(r"\.\.|//|@\{|[\x00-\x20\x7f~^:?*\[\\]|^[/.]|[/.]$|\.lock$|/\.")


def check_hub_names(repo_id: str, revision: str | None, label: str) -> None:
    """S3DError unless `repo_id` and `revision` follow the Hub's and git's naming rules: they become
    paths inside the Hub cache, so `../` in either would read files outside it."""
    if not _HUB_ID_RE.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        raise S3DError(f"weights {label!r}: {repo_id!r} is not a valid Hub repo id (owner/name of letters, digits, "
                       "'-', '_', '.')")
    if revision is not None and (not revision or len(revision) > 255 or _BAD_REV_RE.search(revision)):
        raise S3DError(f"weights {label!r}: revision {revision!r} is not a valid git revision (a branch, tag or "
                       "commit sha)")


def _resolve_hub(repo_id: str, revision: str | None, entry: WeightsEntry | None, label: str,
                 cache: Path, local_only: bool, env_offline: bool) -> ResolvedWeights:
    """The registry id first, then each recorded alias, but only while the Hub says the repo does not exist (or,
    offline, the cache lacks it): a repo that exists and fails otherwise is reported as it is."""
    candidates = (repo_id, *(entry.aliases if entry and repo_id == entry.repo_id else ()))
    for rid in candidates:
        check_hub_names(rid, revision, label)
    first: _RepoUnavailable | None = None
    for rid in candidates:
        origin = {"registry_repo_id": repo_id, "alias": rid != repo_id} if entry else None
        try:
            return _resolve_hub_repo(rid, revision, entry, label, cache, local_only, env_offline, origin)
        except _RepoUnavailable as e:
            first = first or e
    if len(candidates) > 1:
        raise S3DError(f"{first} (tried {', '.join(candidates)})") from None
    raise first


def _resolve_hub_repo(repo_id: str, revision: str | None, entry: WeightsEntry | None, label: str, cache: Path,
                      local_only: bool, env_offline: bool, origin: dict | None) -> ResolvedWeights:
    from s3d.checkpoint import read_json

    def fetch(name: str, missing_ok: bool = False) -> Path | None:
        return _hub_file(repo_id, name, revision, cache, local_only, label, env_offline, missing_ok)

    fmt = entry.format if entry else None
    if fmt == "nnssl-pth":
        pth = fetch(entry.files[0])

        def plan_loader() -> Mapping | None:
            # Only when the checkpoint carries no plan; a failure here must not look like a missing repo.
            if len(entry.files) < 2 or not entry.files[1].endswith(".json"):
                return None
            try:
                path = fetch(entry.files[1], missing_ok=True)
                plan = read_json(path) if path is not None else None
            except S3DError:
                return None
            return plan if isinstance(plan, Mapping) else None

        return _load_or_convert(pth, repo_id, entry, cache, label, entry.files[0], plan_loader, origin)
    model = fetch(entry.files[0] if entry else MODEL_FILE, missing_ok=entry is None)
    if model is None:
        pth = fetch(NNSSL_FILE, missing_ok=True)
        if pth is None:
            if local_only:
                fetch(MODEL_FILE)  # raises the "not in the cache" message
            raise S3DError(f"weights '{label}': Hub repo {repo_id} has neither {MODEL_FILE} nor {NNSSL_FILE}")
        return _load_or_convert(pth, repo_id, None, cache, label)
    config_name = entry.files[1] if entry and len(entry.files) > 1 else CONFIG_FILE
    config = read_json(fetch(config_name))
    if entry is not None and entry.sha256 and _sha256(model) != entry.sha256.lower():
        raise S3DError(f"weights '{label}': {model} does not have the registry's sha256; delete it and download again")
    return ResolvedWeights(config=config, source=f"{label} ({repo_id}@{_snapshot_sha(model)[:12]})", path=model)


# ----------------------------------------------------------------------------------------------------------
# local files


def _resolve_local(path: Path, cache_dir: str | Path | None = None) -> ResolvedWeights:
    from s3d.checkpoint import load_tensors, read_json

    if path.is_dir():
        if (path / MODEL_FILE).exists():
            if not (path / CONFIG_FILE).exists():
                raise S3DError(f"{path}: has {MODEL_FILE} but no {CONFIG_FILE}")
            return ResolvedWeights(config=read_json(path / CONFIG_FILE), source=str(path), path=path / MODEL_FILE)
        if (path / NNSSL_FILE).exists():
            return _resolve_local(path / NNSSL_FILE)
        raise S3DError(f"{path}: not a weights folder (needs {MODEL_FILE} + {CONFIG_FILE}, or {NNSSL_FILE})")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        beside = path.with_name(CONFIG_FILE)
        if beside.exists():
            return ResolvedWeights(config=read_json(beside), source=str(path), path=path)
        sd = load_tensors(path)
        source = {"format": "safetensors", "path": str(path)}
        if is_monai_swin(sd):
            # s3d's Swin UNETR keys are MONAI's, so a bare Swin file (s3d's own, or MONAI weights saved as
            # safetensors) is read exactly as a MONAI .pt is
            sd, config = convert_monai_swin(sd, source)
        else:
            config = {"kind": "pretrain", "network": _normalise_network(infer_network_config(sd)), "source": source}
        return ResolvedWeights(config=config, source=f"{path} (config inferred from tensor shapes)", path=path,
                               _state_dict=sd)
    if suffix in (".pth", ".pt"):
        return _resolve_local_pickle(path, cache_dir)
    raise S3DError(f"{path}: unsupported weights file (expected a folder, .safetensors, .pth or .pt)")


def _resolve_local_pickle(path: Path, cache_dir: str | Path | None) -> ResolvedWeights:
    """A local .pth / .pt. MONAI Swin UNETR weights are converted once into <cache>/s3d-converted/local--<sha256>--
    <name>/ (keyed by content, so an edited file converts again) and read from there afterwards; other pickles
    (nnssl, ResEnc state dicts) are converted in memory as before."""
    from s3d.checkpoint import read_json

    digest = _sha256(path)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "weights"
    target = _cache_root(cache_dir) / CONVERTED_DIR / f"local--{digest[:16]}--{name}"
    desc = f"{path} (converted into {target})"
    if (target / CONFIG_FILE).exists() and (target / MODEL_FILE).exists():
        return ResolvedWeights(config=read_json(target / CONFIG_FILE), source=desc, path=target / MODEL_FILE)
    sd, config = _from_pickle(load_pickle_weights_only(path), path, None, {"path": str(path), "sha256": digest})
    if config.get("source", {}).get("format") != MONAI_SWIN_FORMAT:
        return ResolvedWeights(config=config, source=f"{path} (converted in memory)", _state_dict=sd)
    _save_converted(target, sd, config)
    return ResolvedWeights(config=read_json(target / CONFIG_FILE), source=desc, path=target / MODEL_FILE)


_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


def resolve_weights(spec: str, cache_dir: str | Path | None = None, local_files_only: bool | None = None
                    ) -> ResolvedWeights:
    """Find pre-trained weights and their config.

    `spec` is tried, in this order, as:
      1. a local path that exists: a folder with config.json + model.safetensors (an s3d run or export; a
         folder with an nnssl checkpoint_final.pth also works), a .safetensors file (config.json beside it,
         else the network is inferred from tensor shapes), or a .pth/.pt file (torch.load weights_only=True:
         an nnssl checkpoint, a ResEnc state dict, or MONAI Swin UNETR weights, which are converted once into
         `<cache_dir>/s3d-converted/`);
      2. a registry name (`s3d weights list`), optionally `NAME@REVISION`;
      3. a Hub repo id `owner/name` or `owner/name@REVISION` (also https://huggingface.co/owner/name): its
         model.safetensors + config.json, else its nnssl checkpoint_final.pth.
    Hub files go through `huggingface_hub.hf_hub_download` into `cache_dir` (default: the HF cache).
    `local_files_only=None` means "only if HF_HUB_OFFLINE is set"; nnssl pickles are converted once into
    `<cache_dir>/s3d-converted/` and read from there afterwards.
    """
    spec = str(spec).strip()
    if not spec:
        raise S3DError("weights: empty name (give a registry name, owner/name or a path)")
    try:
        return _resolve(spec, cache_dir, local_files_only)
    except S3DError as e:
        raise _naming(e, spec) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # odd tensors or configs fail deep in the conversion; the user needs to know which weights
        raise S3DError(f"{spec}: cannot be used as weights ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _naming(e: S3DError, spec: str) -> S3DError:
    """`e` as is when its message names the weights (the file, the spec or its registry entry), else
    prefixed with the spec: the conversion helpers judge tensors and plans without knowing their file."""
    message = str(e)
    starts = {f"{spec}:", f"{Path(spec).expanduser()}", f"weights '{spec}'", f"weights {spec!r}"}
    entry = REGISTRY.get(spec.partition("@")[0]) or REGISTRY.get(spec.partition("@")[0].lower())
    if entry is not None:
        starts.add(f"weights '{entry.name}'")
    if message.startswith(tuple(starts)):
        return e
    return S3DError(f"{spec}: {message}")


def _resolve(spec: str, cache_dir: str | Path | None, local_files_only: bool | None) -> ResolvedWeights:
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local(path, cache_dir)
    env_offline = _env_offline()
    local_only = env_offline if local_files_only is None else bool(local_files_only)
    name, _, revision = spec.partition("@")
    entry = REGISTRY.get(name) or REGISTRY.get(name.lower())
    if entry is not None:
        if entry.format not in FORMATS:
            raise S3DError(f"weights '{entry.name}': unknown format {entry.format!r}")
        return _resolve_hub(entry.repo_id, revision or entry.revision, entry, spec, _cache_root(cache_dir),
                            local_only, env_offline)
    hub = re.sub(r"^(https?://huggingface\.co/|hf://)", "", spec).rstrip("/")
    m = _REPO_RE.match(hub)
    if m is not None:
        return _resolve_hub(m.group("repo"), m.group("rev"), None, spec, _cache_root(cache_dir), local_only,
                            env_offline)
    raise S3DError(f"weights '{spec}': not an existing file or folder, a registry name (see `s3d weights list`) "
                   "or a Hub repo id owner/name[@revision]")


# ----------------------------------------------------------------------------------------------------------
# export


def _atomic_text(path: Path, text: str) -> None:
    from s3d.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _public_config(config: dict) -> dict:
    """Config without local absolute paths (folder names stay): an export is meant to be published."""
    config = json.loads(json.dumps(config))
    data = config.get("data")
    if isinstance(data, dict):
        for k, v in list(data.items()):
            if isinstance(v, str) and os.sep in v:
                data[k] = Path(v).name
            elif isinstance(v, list):
                data[k] = [Path(x).name if isinstance(x, str) and os.sep in x else x for x in v]
    ft = config.get("finetune")
    if isinstance(ft, dict) and isinstance(ft.get("weights"), str) and Path(ft["weights"]).is_absolute():
        ft["weights"] = Path(ft["weights"]).name
    return config


def _last_metrics(run_dir: Path) -> dict | None:
    log = run_dir / "validation.jsonl"
    if not log.exists():
        return None
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " x ".join(_fmt(x) for x in v) if all(not isinstance(x, (list, tuple)) for x in v) else \
            ", ".join("(" + _fmt(x) + ")" for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


# A front-matter value stays a bare word only when YAML reads that word back as the same string (Hub
# licence ids: cc-by-4.0, apache-2.0, other); anything else is a double-quoted JSON string, which is also
# a valid YAML scalar, so a colon, a quote, a newline or a "---" cannot end the front matter early.
_YAML_PLAIN = re.compile(r"^[a-z][a-z0-9.+-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _yaml_scalar(value: str) -> str:
    if _YAML_PLAIN.match(value) and value not in _YAML_WORDS:
        return value
    return json.dumps(value)  # ASCII only: YAML 1.1 also breaks lines at U+0085, U+2028, U+2029


def _markdown_line(text: str) -> str:
    """`text` on one line: a title or licence with a newline must not start a new Markdown block."""
    return " ".join(str(text).split())


def model_card(config: dict, *, tensors: str, num_params: int, metrics: dict | None, license: str,
               title: str) -> str:
    """README.md for the Hub: YAML front matter, architecture, pre-training, preprocessing, metrics, citations."""
    net = config.get("network") or {}
    plan = config.get("plan") or {}
    kind = config.get("kind", "pretrain")
    swin = net.get("arch") == "swin-unetr"
    arch_name = "Swin UNETR" if swin else "Residual Encoder U-Net"
    tags = ["medical", "3d", "s3d", "swin-unetr" if swin else "residual-encoder-unet",
            "self-supervised-learning" if kind == "pretrain" else "image-segmentation"]
    out = ["---", f"license: {_yaml_scalar(license)}", "library_name: s3d", "tags:", *(f"- {t}" for t in tags),
           "---", "", f"# {_markdown_line(title)}", ""]
    if kind == "pretrain":
        out.append(f"Self-supervised pre-trained {arch_name} ({config.get('method', 'unknown method')}), "
                   "made with s3d, for fine-tuning with `s3d finetune --weights`.")
    else:
        out.append(f"{arch_name} segmentation model made with s3d (`s3d predict -m`).")
    if swin:  # tensor names and hyper-parameters of MONAI's SwinUNETR (s3d.nn.swin_unetr)
        about = "Swin UNETR (Hatamizadeh et al. 2022), tensor names of MONAI's SwinUNETR."
        lines = [f"- feature size: {net.get('feature_size', '?')}",
                 f"- depths / heads per stage: {_fmt(net.get('depths', '?'))} / {_fmt(net.get('num_heads', '?'))}",
                 f"- window / patch size: {_fmt(net.get('window_size', '?'))} / {_fmt(net.get('patch_size', '?'))}"]
    else:
        about = ("Residual Encoder U-Net (nnU-Net ResEnc, tensor names of dynamic-network-architectures without "
                 "its duplicate `all_modules` / `decoder.encoder` keys).")
        lines = [f"- features per stage: {_fmt(net.get('features', '?'))}",
                 f"- residual blocks per stage: {_fmt(net.get('blocks', '?'))}",
                 f"- strides: {_fmt(net.get('strides', '?'))}",
                 f"- kernel sizes: {_fmt(net.get('kernel_sizes', '?'))}"]
    out += ["", "## Architecture", "", about, "", f"- input channels: {net.get('in_channels', '?')}", *lines,
            f"- tensors in this upload: {tensors} ({num_params:,} values)", ""]
    out += ["## Pre-training" if kind == "pretrain" else "## Training", ""]
    out.append(f"- method: {config.get('method', kind)}")
    data = config.get("data") or {}
    if data:
        out.append(f"- data: {json.dumps(data)}")
    for key in ("step", "mask_ratio", "mask_block"):
        if key in config:
            out.append(f"- {key.replace('_', ' ')}: {_fmt(config[key])}")
    if config.get("patch_size"):
        out.append(f"- patch size: {_fmt(config['patch_size'])}")
    out += ["", "## Preprocessing", "",
            f"- voxel spacing: {_fmt(plan.get('target_spacing', '?'))} mm (array axis order)",
            f"- normalisation per channel: {', '.join(map(str, plan.get('normalization') or ['?']))}"]
    if config.get("labels"):
        out.append(f"- labels: {json.dumps(config['labels'])}")
    out += ["", "## Metrics", ""]
    if metrics:
        out += [f"- {k}: {_fmt(v)}" for k, v in metrics.items() if v is not None]
        out.append("")
        out.append("Last online validation of the run (sliding-window Dice on held-out preprocessed cases).")
    else:
        out.append("None recorded with this run.")
    usage = ("s3d finetune DATASET RUN --weights OWNER/NAME" if kind == "pretrain" else
             "hf download OWNER/NAME --local-dir model && s3d predict -i IMAGES -o OUT -m model")
    out += ["", "## Usage", "", "```bash", usage, "```", "",
            "## Licence", "", f"{_markdown_line(license)}. Check the licences of the data these weights were "
            "trained on.", "",
            "## Citation", "", "```bibtex", CITATION_S3D, "", CITATION_SIMTROT, "```", ""]
    return "\n".join(out)


def export_run(run_dir: str | Path, out_dir: str | Path, *, encoder_only: bool = False, license: str = "other",
               title: str | None = None) -> Path:
    """Write `out_dir/{model.safetensors, config.json, README.md}`, ready for `hf upload OWNER/NAME out_dir`.

    The tensors are the run's model as stored (encoder + decoder: a fine-tuned model must stay usable by
    `s3d predict`, and a pre-trained decoder can be fine-tuned too); `encoder_only=True` keeps just the
    `encoder.stem.*` / `encoder.stages.*` tensors that `s3d finetune --weights` transfers (`swinViT.*` for a
    Swin UNETR run, see `s3d.nn.networks`).
    """
    from s3d.checkpoint import load_model, save_model
    from s3d.files import prepare_output_dir

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    prepare_output_dir(out_dir, inputs=(run_dir,), what="export folder", inside_inputs_ok=True)
    sd, config = load_model(run_dir)
    from s3d.model_check import check_config

    check_config(config, str(run_dir / CONFIG_FILE))
    if encoder_only:
        from s3d.nn.networks import encoder_prefixes, network_config_from_dict

        prefixes = encoder_prefixes(network_config_from_dict(config["network"]))
        resenc = prefixes == ("encoder.",)
        sd = encoder_state_dict(sd) if resenc else {k: v for k, v in sd.items() if k.startswith(prefixes)}
        if not sd:
            what = "encoder.stem / encoder.stages" if resenc else " / ".join(p + "*" for p in prefixes)
            raise S3DError(f"{run_dir}: no {what} tensors to export")
    from s3d import __version__

    config = _public_config(config)
    config["export"] = {"s3d_version": __version__, "tensors": "encoder" if encoder_only else "full",
                        "source_run": run_dir.resolve().name, "license": license}
    save_model(out_dir, sd, config)
    card = model_card(config, tensors="encoder only" if encoder_only else "full model as stored",
                      num_params=sum(int(v.numel()) for v in sd.values()), metrics=_last_metrics(run_dir),
                      license=license, title=title or run_dir.resolve().name)
    _atomic_text(out_dir / "README.md", card)
    return out_dir
