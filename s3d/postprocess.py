"""Keep-the-largest-connected-component postprocessing, decided on out-of-fold predictions.

The rule is nnU-Net's (v2, `determine_postprocessing`): first try keeping only the largest connected
component of all foreground labels taken together; accept it when the mean foreground Dice over the
cross-validation cases rises and no label's mean Dice falls. Then, on top of what was accepted, try
each label on its own (its smaller components become background); accept a label when its mean Dice
rises. The decision is written to `RUN/postprocessing.json` and replayed by `s3d predict`.

Components are 26-connected (scipy.ndimage with a full 3x3x3 structure), as nnU-Net's labelling with
full connectivity; a deliberate choice so that diagonal neighbours stay one object.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from s3d.errors import S3DError

POSTPROCESSING_FILE = "postprocessing.json"
_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass
class PostprocessingDecision:
    """What `s3d predict` applies after the argmax; the Dice numbers are the evidence for it."""

    largest_foreground: bool = False
    largest_per_label: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    n_cases: int = 0
    dice_before: dict[str, float | None] = field(default_factory=dict)  # per label and "foreground_mean"
    dice_after: dict[str, float | None] = field(default_factory=dict)
    tried: dict[str, dict] = field(default_factory=dict)  # each candidate: its Dice and whether accepted

    @property
    def changes_anything(self) -> bool:
        return self.largest_foreground or bool(self.largest_per_label)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "postprocessing") -> PostprocessingDecision:
        try:
            return cls(largest_foreground=bool(d["largest_foreground"]),
                       largest_per_label=[int(v) for v in d.get("largest_per_label", [])],
                       labels=[int(v) for v in d.get("labels", [])], n_cases=int(d.get("n_cases", 0)),
                       dice_before=dict(d.get("dice_before", {})), dice_after=dict(d.get("dice_after", {})),
                       tried=dict(d.get("tried", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise S3DError(f"{source}: not a postprocessing decision ({type(e).__name__}: {e})") from None

    def same_rule(self, other: PostprocessingDecision) -> bool:
        return (self.largest_foreground == other.largest_foreground
                and sorted(self.largest_per_label) == sorted(other.largest_per_label))

    def describe(self) -> str:
        parts = []
        if self.largest_foreground:
            parts.append("largest foreground component")
        if self.largest_per_label:
            parts.append("largest component of label(s) " + ", ".join(map(str, self.largest_per_label)))
        return "keep the " + " and the ".join(parts) if parts else "none"


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """`mask` (bool) with every connected component but the largest removed (26-connectivity)."""
    from scipy import ndimage

    labelled, n = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    if n <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def _keep_largest_of(seg: np.ndarray, values: Sequence[int] | None) -> np.ndarray:
    """seg with the voxels outside the largest component of `values` (None: all foreground) set to 0."""
    mask = seg > 0 if values is None else np.isin(seg, list(values))
    if not mask.any():
        return seg
    out = seg.copy()
    out[mask & ~keep_largest_component(mask)] = 0
    return out


def apply_postprocessing(seg: np.ndarray, decision: PostprocessingDecision | None) -> np.ndarray:
    """The segmentation after the decision's rules, in the order they were decided."""
    if decision is None or not decision.changes_anything:
        return seg
    if decision.largest_foreground:
        seg = _keep_largest_of(seg, None)
    for value in decision.largest_per_label:
        seg = _keep_largest_of(seg, [value])
    return seg


def _dice_per_label(ref: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    from s3d.metrics import dice

    return np.array([dice(ref == v, pred == v) for v in labels], dtype=np.float64)


def _case_rows(ref: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-label Dice of one case for every candidate: the raw argmax, foreground-LCC, and per label
    its own LCC applied to either of the two (only that label's column changes)."""
    fg = _keep_largest_of(pred, None)
    rows = {"base": _dice_per_label(ref, pred, labels), "fg": _dice_per_label(ref, fg, labels)}
    rows["base_label"] = np.array([_dice_per_label(ref, _keep_largest_of(pred, [v]), [v])[0] for v in labels])
    rows["fg_label"] = np.array([_dice_per_label(ref, _keep_largest_of(fg, [v]), [v])[0] for v in labels])
    return rows


def _nanmean(a: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # a label empty everywhere: NaN, as evaluate
        return np.nanmean(a, axis=axis)


def _scores(label_means: np.ndarray, labels: Sequence[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {str(v): (None if np.isnan(m) else float(m))
                                    for v, m in zip(labels, label_means, strict=True)}
    fg = _nanmean(label_means)
    out["foreground_mean"] = None if np.isnan(fg) else float(fg)
    return out


def decide_from_rows(rows: dict[str, np.ndarray], labels: Sequence[int]) -> PostprocessingDecision:
    """The decision from per-case Dice tables (cases x labels) of the four candidates (`_case_rows`)."""
    labels = [int(v) for v in labels]
    means = {k: _nanmean(v, axis=0) for k, v in rows.items()}
    base, fg = means["base"], means["fg"]
    base_fg, fg_fg = _nanmean(base), _nanmean(fg)
    # nnU-Net: the foreground rule must raise the foreground mean and must not cost any label Dice
    fg_ok = bool(fg_fg > base_fg and np.all((fg >= base) | np.isnan(base)))
    tried = {"largest_foreground": {"dice_before": _scores(base, labels), "dice_after": _scores(fg, labels),
                                    "accepted": fg_ok}}
    current = fg.copy() if fg_ok else base.copy()
    own = means["fg_label"] if fg_ok else means["base_label"]
    per_label = []
    for i, v in enumerate(labels):
        ok = bool(own[i] > current[i])
        tried[f"largest_label_{v}"] = {"dice_before": None if np.isnan(current[i]) else float(current[i]),
                                       "dice_after": None if np.isnan(own[i]) else float(own[i]), "accepted": ok}
        if ok:
            per_label.append(v)
            current[i] = own[i]
    n_cases = len(next(iter(rows.values())))
    return PostprocessingDecision(largest_foreground=fg_ok, largest_per_label=per_label, labels=labels,
                                  n_cases=n_cases, dice_before=_scores(base, labels),
                                  dice_after=_scores(current, labels), tried=tried)


def determine_postprocessing(pairs: Sequence[tuple[Path, Path]], labels: Sequence[int],
                             progress: bool = True) -> PostprocessingDecision:
    """Decide from (reference file, out-of-fold prediction file) pairs; every file is read once."""
    from tqdm.auto import tqdm

    from s3d.data.io import read_label

    if not pairs:
        raise S3DError("no out-of-fold predictions to decide the postprocessing from")
    labels = [int(v) for v in labels]
    collected: dict[str, list[np.ndarray]] = {}
    for ref_path, pred_path in tqdm(pairs, desc="postprocessing", unit="case", disable=None if progress else True,
                                    leave=False):
        ref, _ = read_label(ref_path)
        pred, _ = read_label(pred_path)
        if ref.shape != pred.shape:
            raise S3DError(f"{pred_path}: shape {pred.shape} differs from its reference {ref_path} {ref.shape}")
        for k, v in _case_rows(ref, pred, labels).items():
            collected.setdefault(k, []).append(v)
    return decide_from_rows({k: np.stack(v) for k, v in collected.items()}, labels)


def load_decision(path: str | Path) -> PostprocessingDecision | None:
    """The decision saved at `path`, None when there is no such file."""
    from s3d.files import read_json

    path = Path(path)
    if not path.is_file():
        return None
    d = read_json(path)
    if not isinstance(d, dict):
        raise S3DError(f"{path}: not a postprocessing decision (a JSON object)")
    return PostprocessingDecision.from_dict(d, str(path))
