"""Pre-trained weights by name: a registry, Hub download, safe conversion of nnssl pickles, export.

`resolve_weights(spec)` turns a registry name, a Hub repo id, a local folder or a local file into a
state dict (s3d = dynamic-network-architectures key names, without DNA's duplicate keys) plus the
config that `s3d finetune` needs (network, spacing, normalisation, patch size).

Trust model: only safetensors are ever loaded from the Hub as they are. The official OpenMind
checkpoints are PyTorch pickles (nnssl's `checkpoint_final.pth`); those are opened exactly once with
`torch.load(weights_only=True)` (never `weights_only=False`), converted to `model.safetensors` +
`config.json` in a conversion cache next to the Hugging Face cache, and read from there afterwards.

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
from collections.abc import Mapping
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


@dataclass(frozen=True)
class WeightsEntry:
    """One named set of pre-trained weights on the Hugging Face Hub."""

    name: str
    repo_id: str
    revision: str  # tag, branch or full commit sha; "main" until the publisher tags a release
    files: tuple[str, ...]  # files[0] holds the tensors
    format: str  # "nnssl-pth" | "s3d-safetensors"
    method: str
    arch: str | None = "resenc-l"  # ResEncConfig preset the tensors must match (None: take them as they are)
    in_channels: int = 1
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm, s3d (i, j, k) order
    normalization: str = "zscore"
    patch_size: tuple[int, int, int] = (160, 160, 160)
    license: str = "cc-by-4.0"
    citation: str = ""
    sha256: str | None = None  # of files[0]; checked when set
    description: str = ""
    pretraining_data: str = ""

    def card(self) -> str:
        """Model-card text shown by `s3d weights info`."""
        lines = [
            f"{self.name}: {self.description}",
            f"  Hub:           https://huggingface.co/{self.repo_id} (revision {self.revision})",
            f"  files:         {', '.join(self.files)} ({self.format})",
            f"  method:        {self.method}",
            f"  architecture:  {self.arch or 'as stored'}, {self.in_channels} input channel(s)",
            f"  preprocessing: spacing {' x '.join(f'{s:g}' for s in self.spacing)} mm, "
            f"{self.normalization} normalisation, patch {' x '.join(str(p) for p in self.patch_size)}",
            f"  data:          {self.pretraining_data or 'unknown'}",
            f"  licence:       {self.license}",
        ]
        if self.sha256:
            lines.append(f"  sha256:        {self.sha256}")
        if self.citation:
            lines += ["  citation:", *("    " + c for c in self.citation.splitlines())]
        return "\n".join(lines)


def _openmind(method_id: str, method: str, description: str, extra_citation: str = "") -> WeightsEntry:
    return WeightsEntry(
        name=f"openmind-resencl-{method_id.lower()}",
        repo_id=f"MIC-DKFZ/ResEncL-OpenMind-{method_id}",
        revision="main",
        files=(NNSSL_FILE, "adaptation_plan.json"),
        format="nnssl-pth",
        method=method,
        arch="resenc-l",
        license="cc-by-4.0",
        citation=CITATION_OPENMIND + ("\n" + extra_citation if extra_citation else ""),
        description=description,
        pretraining_data="OpenMind dataset (public 3D brain MRI collected from OpenNeuro), 1 mm isotropic, z-score",
    )


# The OpenMind benchmark's ResEnc-L checkpoints (Wald et al., arXiv 2412.17041), collection
# https://huggingface.co/collections/MIC-DKFZ/openmind-models-6819c21c7fe6f0aaaab7dadf (linked from
# MIC-DKFZ/nnssl documentation/openmind.md). Facts used here, from the model cards and published files:
# - repos first published as AnonRes/ResEncL-OpenMind-<METHOD>, now MIC-DKFZ/... (the Hub redirects the
#   old ids); seen: MAE, S3D, VoCo, SimCLR, VF, SwinUNETR. No ResEnc-L Models Genesis repo was found.
# - files: checkpoint_final.pth (nnssl: {"network_weights", "nnssl_adaptation_plan", ...}; re-saved by
#   the authors "to allow weights_only=True loading"), adaptation_plan.json, a dummy config.json, README.md.
# - licence cc-by-4.0 (model card front matter).
# - adaptation_plan.json: architecture_plans.arch_class_name "ResEncL"; pretrain_plan.configurations
#   .onemmiso: spacing [1, 1, 1], normalization_schemes ["ZScoreNormalization"], use_mask_for_norm [false];
#   pretrain_num_input_channels 1; recommended_downstream_patchsize; key_to_encoder "encoder.stages",
#   key_to_stem "encoder.stem", keys_to_in_proj ["encoder.stem.convs.0.conv", "...all_modules.0"].
REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        _openmind("MAE", "MAE (dense masked autoencoder)",
                  "ResEnc-L pre-trained with a dense MAE (the nnssl BaseMAE trainer) on OpenMind."),
        _openmind("S3D", "S3D / Spark3D (sparse masked autoencoder)",
                  "ResEnc-L pre-trained with S3D, the sparse-convolution MAE of Wald et al. 2024, on OpenMind.",
                  CITATION_S3D),
        _openmind("VoCo", "VoCo (volume contrast)",
                  "ResEnc-L encoder pre-trained with Volume Contrast (VoCo) on OpenMind (encoder tensors only)."),
        _openmind("SimCLR", "SimCLR (contrastive)", "ResEnc-L pre-trained with SimCLR on OpenMind."),
        _openmind("VF", "VolumeFusion", "ResEnc-L pre-trained with VolumeFusion (VF) on OpenMind."),
        _openmind("SwinUNETR", "SwinUNETR pre-training (inpainting, rotation, contrast)",
                  "ResEnc-L pre-trained with the SwinUNETR pretext tasks on OpenMind."),
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


def convert_nnssl_checkpoint(ckpt: Mapping, entry: WeightsEntry | None = None, source: dict | None = None
                             ) -> tuple[dict[str, torch.Tensor], dict]:
    """nnssl `checkpoint_final.pth` content -> (s3d state dict, s3d config dict).

    Keeps `encoder.*` and `decoder.*` tensors under their DNA names minus the duplicates; everything else
    (projection heads of contrastive methods, optimiser leftovers) is dropped and counted in the config.
    Spacing / normalisation / patch come from `nnssl_adaptation_plan`, falling back to the registry entry.
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
    arch_name = (plan.get("architecture_plans") or {}).get("arch_class_name")
    if arch_name is not None and "resenc" not in str(arch_name).lower():
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
    spacing = _to_s3d_axes(spacing, plan) or (list(entry.spacing) if entry else None)
    schemes = conf.get("normalization_schemes")
    if schemes:
        normalization = [_NORM_NAMES.get(s, s) for s in schemes]
    else:
        normalization = [entry.normalization] * network.get("in_channels", 1) if entry else ["zscore"]
    patch = _to_s3d_axes(plan.get("recommended_downstream_patchsize") or conf.get("patch_size"), plan)
    patch = patch or (list(entry.patch_size) if entry else None)

    config = {
        "s3d_version": __version__,
        "kind": "pretrain",
        "method": entry.method if entry else str(ckpt.get("trainer_name") or "nnssl"),
        "network": network,
        "plan": {"target_spacing": [float(s) for s in spacing] if spacing else None,
                 "normalization": normalization},
        "patch_size": [int(p) for p in patch] if patch else None,
        "license": entry.license if entry else None,
        "source": {"format": "nnssl-pth", **(source or {}), "dropped_keys": len(dropped)},
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


def _from_pickle(obj: Any, path: Path, entry: WeightsEntry | None, source: dict) -> tuple[dict, dict]:
    if isinstance(obj, Mapping) and "network_weights" in obj:
        return convert_nnssl_checkpoint(obj, entry, source)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = drop_dna_duplicates(_strip_wrappers(obj))
        return sd, {"kind": "pretrain", "network": _normalise_network(infer_network_config(sd)), "source": source}
    raise S3DError(f"{path}: neither an nnssl checkpoint (network_weights) nor a state dict of tensors")


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
        raise S3DError(f"weights '{label}': Hub repo {repo_id} not found (or private: log in with "
                       "`hf auth login`); check the name with `s3d weights list`") from None
    except RevisionNotFoundError:
        raise S3DError(f"weights '{label}': revision '{rev}' not found in Hub repo {repo_id}: use an existing "
                       "tag, branch or full commit sha") from None
    except LocalEntryNotFoundError:
        if missing_ok and local_only:
            return None
        if env_offline:
            raise S3DError(f"weights '{label}' are not in the cache at {cache} and HF_HUB_OFFLINE is set: run "
                           f"`s3d weights download {label}` on a machine with internet and copy the cache") from None
        if local_only:
            raise S3DError(f"weights '{label}' are not in the cache at {cache} and only local files were "
                           f"allowed: run `s3d weights download {label}` first") from None
        raise S3DError(f"weights '{label}': cannot reach the Hub and {repo_id}/{filename} is not in the cache at "
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
    # hf_hub_download returns <cache>/models--owner--name/snapshots/<commit sha>/<file>
    sha = path.parent.name
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else hashlib.sha256(str(path.resolve()).encode()).hexdigest()


def _load_or_convert(pth: Path, repo_id: str, entry: WeightsEntry | None, cache: Path, label: str
                     ) -> ResolvedWeights:
    """A Hub nnssl pickle: convert once into <cache>/s3d-converted/<owner>--<name>--<sha>/, then reuse."""
    from s3d.checkpoint import read_json, save_model

    sha = _snapshot_sha(pth)
    target = cache / CONVERTED_DIR / f"{repo_id.replace('/', '--')}--{sha}"
    desc = f"{label} ({repo_id}@{sha[:12]}, converted from {pth.name})"
    if (target / CONFIG_FILE).exists() and (target / MODEL_FILE).exists():
        return ResolvedWeights(config=read_json(target / CONFIG_FILE), source=desc, path=target / MODEL_FILE)
    digest = _sha256(pth)
    if entry is not None and entry.sha256 and digest != entry.sha256.lower():
        raise S3DError(f"weights '{label}': {pth} has sha256 {digest}, the registry expects {entry.sha256}; "
                       "delete it from the cache and download again")
    source = {"repo_id": repo_id, "revision": sha, "filename": pth.name, "sha256": digest}
    sd, config = _from_pickle(load_pickle_weights_only(pth), pth, entry, source)
    # Written in a private folder and renamed, so a concurrent or killed conversion never leaves a half one.
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, sd, config)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return ResolvedWeights(config=read_json(target / CONFIG_FILE), source=desc, path=target / MODEL_FILE)


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
    from s3d.checkpoint import read_json

    check_hub_names(repo_id, revision, label)

    def fetch(name: str, missing_ok: bool = False) -> Path | None:
        return _hub_file(repo_id, name, revision, cache, local_only, label, env_offline, missing_ok)

    fmt = entry.format if entry else None
    if fmt == "nnssl-pth":
        return _load_or_convert(fetch(entry.files[0]), repo_id, entry, cache, label)
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


def _resolve_local(path: Path) -> ResolvedWeights:
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
        config = {"kind": "pretrain", "network": _normalise_network(infer_network_config(sd)),
                  "source": {"format": "safetensors", "path": str(path)}}
        return ResolvedWeights(config=config, source=f"{path} (config inferred from tensor shapes)", path=path,
                               _state_dict=sd)
    if suffix in (".pth", ".pt"):
        sd, config = _from_pickle(load_pickle_weights_only(path), path, None, {"path": str(path)})
        return ResolvedWeights(config=config, source=f"{path} (converted in memory)", _state_dict=sd)
    raise S3DError(f"{path}: unsupported weights file (expected a folder, .safetensors, .pth or .pt)")


_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


def resolve_weights(spec: str, cache_dir: str | Path | None = None, local_files_only: bool | None = None
                    ) -> ResolvedWeights:
    """Find pre-trained weights and their config.

    `spec` is tried, in this order, as:
      1. a local path that exists: a folder with config.json + model.safetensors (an s3d run or export; a
         folder with an nnssl checkpoint_final.pth also works), a .safetensors file (config.json beside it,
         else the network is inferred from tensor shapes), or a .pth/.pt file (torch.load weights_only=True);
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
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local(path)
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


def model_card(config: dict, *, tensors: str, num_params: int, metrics: dict | None, license: str,
               title: str) -> str:
    """README.md for the Hub: YAML front matter, architecture, pre-training, preprocessing, metrics, citations."""
    net = config.get("network") or {}
    plan = config.get("plan") or {}
    kind = config.get("kind", "pretrain")
    tags = ["medical", "3d", "s3d", "residual-encoder-unet",
            "self-supervised-learning" if kind == "pretrain" else "image-segmentation"]
    out = ["---", f"license: {license}", "library_name: s3d", "tags:", *(f"- {t}" for t in tags), "---", "",
           f"# {title}", ""]
    if kind == "pretrain":
        out.append(f"Self-supervised pre-trained Residual Encoder U-Net ({config.get('method', 'unknown method')}), "
                   "made with s3d, for fine-tuning with `s3d finetune --weights`.")
    else:
        out.append("Residual Encoder U-Net segmentation model made with s3d (`s3d predict -m`).")
    out += ["", "## Architecture", "",
            "Residual Encoder U-Net (nnU-Net ResEnc, tensor names of dynamic-network-architectures without "
            "its duplicate `all_modules` / `decoder.encoder` keys).", "",
            f"- input channels: {net.get('in_channels', '?')}",
            f"- features per stage: {_fmt(net.get('features', '?'))}",
            f"- residual blocks per stage: {_fmt(net.get('blocks', '?'))}",
            f"- strides: {_fmt(net.get('strides', '?'))}",
            f"- kernel sizes: {_fmt(net.get('kernel_sizes', '?'))}",
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
            "## Licence", "", f"{license}. Check the licences of the data these weights were trained on.", "",
            "## Citation", "", "```bibtex", CITATION_S3D, "", CITATION_SIMTROT, "```", ""]
    return "\n".join(out)


def export_run(run_dir: str | Path, out_dir: str | Path, *, encoder_only: bool = False, license: str = "other",
               title: str | None = None) -> Path:
    """Write `out_dir/{model.safetensors, config.json, README.md}`, ready for `hf upload OWNER/NAME out_dir`.

    The tensors are the run's model as stored (encoder + decoder: a fine-tuned model must stay usable by
    `s3d predict`, and a pre-trained decoder can be fine-tuned too); `encoder_only=True` keeps just the
    `encoder.stem.*` / `encoder.stages.*` tensors that `s3d finetune --weights` transfers.
    """
    from s3d.checkpoint import load_model, save_model
    from s3d.files import prepare_output_dir

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    prepare_output_dir(out_dir, inputs=(run_dir,), what="export folder", inside_inputs_ok=True)
    sd, config = load_model(run_dir)
    from s3d.model_check import check_config

    check_config(config, str(run_dir / CONFIG_FILE))
    if encoder_only:
        sd = encoder_state_dict(sd)
        if not sd:
            raise S3DError(f"{run_dir}: no encoder.stem / encoder.stages tensors to export")
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
