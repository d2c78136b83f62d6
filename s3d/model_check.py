"""A model folder (or Hub download) is checked before it is used: config.json against the schema s3d
writes, then every tensor against the network that config describes. Whatever is wrong is reported
on one line naming the file, instead of a KeyError or a 100-line load_state_dict traceback."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from s3d.errors import S3DError

KINDS = ("segmentation", "pretrain")


def _fail(source: str, problem: str) -> S3DError:
    return S3DError(f"{source}: {problem}")


def _positive_ints(value: Any, n: int) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def check_config(config: Any, source: str, kind: str | None = None) -> dict:
    """`config` (parsed config.json) if it is one s3d can use; S3DError naming `source` otherwise.

    kind: "segmentation" also requires what predict needs (plan, patch_size, labels) and checks that
    they agree with the network; None accepts either kind and checks what is present."""
    from s3d.data.preprocess import NORMALIZATIONS, Plan
    from s3d.nn.networks import network_config_from_dict

    if not isinstance(config, dict):
        raise _fail(source, f"not a model config (a JSON object), but a {type(config).__name__}")
    got = config.get("kind", "pretrain" if kind is None else None)
    if got not in KINDS:
        raise _fail(source, f"kind {got!r} is not one of {', '.join(KINDS)}")
    if kind is not None and got != kind:
        raise _fail(source, f"holds {got} weights, not a {kind} model"
                    + (" (fine-tune it first with `s3d finetune DATASET OUT --weights ...`)"
                       if kind == "segmentation" else ""))
    network = config.get("network")
    if not isinstance(network, dict):
        raise _fail(source, "no 'network' object (the ResEnc or Swin UNETR topology the tensors belong to)")
    try:
        net = network_config_from_dict(network)
    except (TypeError, ValueError) as e:  # NetworkConfigError is a ValueError
        raise _fail(source, f"network: {' '.join(str(e).split())}") from None

    plan = config.get("plan")
    if plan is not None or got == "segmentation":
        if not isinstance(plan, dict):
            raise _fail(source, "no 'plan' object (how images are preprocessed for this model)")
        spacing = plan.get("target_spacing")
        if not (isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                for s in spacing)):
            raise _fail(source, f"plan: target_spacing {spacing!r} needs three positive numbers (mm)")
    if got != "segmentation":
        return config
    try:
        parsed = Plan.from_dict(plan)
    except KeyError as e:
        raise _fail(source, f"plan: missing {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise _fail(source, f"plan: {' '.join(str(e).split())}") from None
    bad = [n for n in parsed.normalization if n not in NORMALIZATIONS]
    if bad:
        raise _fail(source, f"plan: normalization {bad[0]!r} is not one of {', '.join(NORMALIZATIONS)}")
    for c, scheme in enumerate(parsed.normalization):
        stats = parsed.ct_stats[c] if c < len(parsed.ct_stats) else None
        if scheme == "ct" and not (isinstance(stats, dict) and all(
                isinstance(stats.get(k), (int, float)) for k in ("mean", "std", "p005", "p995"))):
            raise _fail(source, f"plan: channel {c} is CT-normalised but ct_stats[{c}] lacks mean, std, p005, p995")
    if len(parsed.normalization) != net.in_channels:
        raise _fail(source, f"plan normalises {len(parsed.normalization)} channel(s) but the network takes "
                            f"in_channels {net.in_channels}")
    if not _positive_ints(config.get("patch_size"), 3):
        raise _fail(source, f"patch_size {config.get('patch_size')!r} needs three positive integers")
    from s3d.nn.swin_unetr import SwinUNETRConfig, check_input_size

    if isinstance(net, SwinUNETRConfig):
        try:  # predict tiles the image with this patch; Swin UNETR refuses anything off its token grid
            check_input_size(config["patch_size"], net)
        except ValueError as e:
            raise _fail(source, f"patch_size: {' '.join(str(e).split())}") from None
    labels = config.get("labels", parsed.labels)
    if not isinstance(labels, dict) or not labels or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels.values()):
        raise _fail(source, f"labels {labels!r} need to be a {{name: value}} object of integers >= 0")
    if max(labels.values()) + 1 != net.num_classes:
        raise _fail(source, f"labels go up to {max(labels.values())} but the network has num_classes "
                            f"{net.num_classes}")
    return config


def tensor_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """How `state` differs from the keys and shapes of `expected` (counts and a first example), None when
    it does not."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if reshaped:
        k = reshaped[0]
        example = f"{k} is {tuple(state[k].shape)}, the config's network needs {tuple(expected[k].shape)}"
    elif missing:
        example = f"{missing[0]} is missing"
    elif unexpected:
        example = f"{unexpected[0]} is not in the config's network"
    else:
        return None
    return f"{len(reshaped)} reshaped, {len(missing)} missing, {len(unexpected)} unexpected; e.g. {example}"


def check_tensors(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """S3DError naming `source` unless `state` holds exactly `network`'s tensors, in its shapes (the
    network may live on the meta device), all finite."""
    mismatch = tensor_mismatch(network.state_dict(), state)
    if mismatch:
        raise _fail(source, f"tensors do not match its config.json ({mismatch})")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise _fail(source, f"{len(broken)} tensor(s) hold NaN or inf, e.g. {broken[0]} (a diverged or damaged "
                            "model would segment everything as background)")
