"""Preprocessing a pre-training corpus into the store: curated, resumable, splittable over machines.

Unlike a labeled dataset (s3d.data.preprocess.preprocess_dataset, which refuses to start while any
case is broken), a corpus of 100k clinical volumes always holds some files that would poison
pre-training or crash a reader. Each such file is skipped with its reason (s3d.data.curation) and
the run goes on. The plan is fixed up front (target spacing, z-score per image), not fingerprinted
from the whole corpus, so that `--part K --parts N` on N machines writes one consistent store.

Store layout (out_dir): plan.json and store.json first (every part checks it agrees with them),
then cases/CASE.* per volume (s3d.data.store.write_case; CASE.json last), cases/CASE.skip.json for
a skipped file (so a rerun does not read it again unless it changed), and report.json /
report-part-K-of-N.json (K counts from 0) listing every skipped file of that run with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s3d.data.corpus import CorpusImage, split_part
from s3d.data.curation import CurationConfig
from s3d.data.preprocess import (
    Plan,
    _map,
    case_is_current,
    preprocess_case,
    remove_old_store,
    resample_label,
    source_stamp,
    write_store_marker,
)
from s3d.errors import S3DError
from s3d.files import prepare_output_dir, read_json, write_json

# S3D pre-training (Wald et al. 2024, Sec. 3): every image resampled to 1 x 1 x 1 mm, z-scored.
CORPUS_SPACING = (1.0, 1.0, 1.0)
# S3D pre-trains on 160^3 patches; the store's chunks are laid out for that unless told otherwise.
CORPUS_LAYOUT_PATCH = (160, 160, 160)


def corpus_plan(spacing: Sequence[float] = CORPUS_SPACING) -> Plan:
    """The plan of a pre-training store: one channel, z-score over the whole image, no labels."""
    return Plan(target_spacing=tuple(float(s) for s in spacing), normalization=["zscore"], ct_stats=[None],
                channel_names={0: "image"}, labels={}, use_nonzero_mask=[False])


@dataclass
class CorpusReport:
    """What one preprocess_corpus run did; `skipped` rows are {"case_id", "path", "reason"}."""

    total: int = 0
    written: int = 0
    up_to_date: int = 0
    skipped: list[dict] = field(default_factory=list)
    part: int = 0
    parts: int = 1
    path: Path | None = None  # the report file

    def summary(self) -> str:
        where = f" (--part {self.part} of --parts {self.parts})" if self.parts > 1 else ""
        line = (f"{self.total} volume(s){where}: {self.written} preprocessed, {self.up_to_date} already up to date, "
                f"{len(self.skipped)} skipped")
        if self.skipped:
            reasons: dict[str, int] = {}
            for row in self.skipped:
                reasons[_reason_kind(row["reason"])] = reasons.get(_reason_kind(row["reason"]), 0) + 1
            top = ", ".join(f"{n} {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
            line += f" ({top}; every file and reason in {self.path})"
        return line


def _reason_kind(reason: str) -> str:
    """The short kind of a skip reason, for the summary line ("constant image", "truncated"...)."""
    return reason.split(" (")[0].split(":")[0][:48]


def _loss_mask(image: CorpusImage, geometry, props: dict) -> np.ndarray | None:  # noqa: ANN001 - Geometry
    """(X,Y,Z) uint8 on the preprocessed grid: 1 inside the anatomy mask and outside the
    anonymisation (defacing) mask; None when the image has neither. nnssl's MAE trainer drops the
    anonymised voxels from the reconstruction loss the same way ((1 - mask) * (1 - anon))."""
    from s3d.data.io import read_label, same_grid

    keep = None
    for path, inside in ((image.anatomy_mask, True), (image.anonymization_mask, False)):
        if path is None:
            continue
        values, g = read_label(path)
        diff = same_grid(g, geometry)
        if diff is not None:
            raise S3DError(f"{path}: mask is not on the grid of its image {image.path.name}: {diff}")
        m = (values > 0) if inside else (values == 0)
        keep = m if keep is None else keep & m
    if keep is None:
        return None
    (x0, x1), (y0, y1), (z0, z1) = props["bbox"]
    cropped = np.ascontiguousarray(keep[x0:x1, y0:y1, z0:z1], dtype=np.int16)
    out = resample_label(cropped, props["spacing"], props["target_spacing"], new_shape=props["shape_after_resample"])
    return np.ascontiguousarray(np.asarray(out) > 0, dtype=np.uint8)


def _corpus_one(args: tuple) -> tuple[str, str, str | None]:
    """(case_id, "written" | "up_to_date" | "skipped", reason) for one corpus image (worker)."""
    image, cases_dir, plan_dict, digest, patch_size, curation_dict, overwrite = args
    from s3d.data.curation import check_file
    from s3d.data.store import case_paths, write_case

    paths = case_paths(cases_dir, image.case_id)
    skip_file = cases_dir / f"{image.case_id}.skip.json"
    stamp = source_stamp([image.path])
    if not overwrite:
        if case_is_current(paths["meta"], digest):
            return image.case_id, "up_to_date", None
        if skip_file.is_file():
            try:
                old = json.loads(skip_file.read_text())
                if old.get("stamp") == stamp and old.get("curation") == curation_dict:
                    return image.case_id, "skipped", old["reason"]
            except (OSError, ValueError, KeyError):
                pass
    cfg = CurationConfig.from_dict(curation_dict)
    reason = None
    try:
        if stamp[0][1] is None:  # no size: stat failed
            reason = f"{image.path}: file not found"
        else:
            plan = Plan.from_dict(plan_dict)
            reason, data, geometry = check_file(image.path, cfg, plan.target_spacing)
        if reason is None:
            out, _, props = preprocess_case(data[None], geometry, plan)
            del data
            props.pop("class_locations")
            loss_mask = _loss_mask(image, geometry, props)
            props.update(case_id=image.case_id, shape=list(out.shape[1:]), has_seg=False, num_channels=1,
                         plan_digest=digest, class_location_labels=[], source=str(image.path))
            write_case(cases_dir, image.case_id, out, props, patch_size, loss_mask=loss_mask)
            skip_file.unlink(missing_ok=True)
            return image.case_id, "written", None
    except S3DError as e:
        reason = str(e)
    except MemoryError:
        reason = f"{image.path}: does not fit in memory"
    except Exception as e:  # noqa: BLE001 - one bad file must not end a run over 100k files
        reason = f"{image.path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    reason = " ".join(str(reason).split())
    # the path has its own field in the report; readers' messages start with it
    reason = reason.removeprefix(f"{image.path}: ") or reason
    write_json(skip_file, {"path": str(image.path), "reason": reason, "stamp": stamp, "curation": curation_dict},
               indent=None)
    return image.case_id, "skipped", reason


def _agree(path: Path, content: dict, what: str) -> None:
    """Write `content` to `path`, or check that the file already there (another part) says the same."""
    if path.is_file():
        old = read_json(path)
        if old != content:
            raise S3DError(f"{path}: the store was made with another {what}; use another output folder or "
                           "--overwrite")
        return
    write_json(path, content, indent=1)


def preprocess_corpus(
    images: Sequence[CorpusImage],
    out_dir: str | Path,
    plan: Plan | None = None,
    *,
    jobs: int = 1,
    part: int = 0,
    parts: int = 1,
    patch_size: Sequence[int] = CORPUS_LAYOUT_PATCH,
    curation: CurationConfig | None = None,
    overwrite: bool = False,
) -> CorpusReport:
    """Preprocess part `part` of `parts` of `images` into the store `out_dir` (layout in the module
    docstring) with `jobs` processes; finished cases are kept unless overwrite. Returns the report
    (also written as JSON); skipped files never raise."""
    out_dir = Path(out_dir)
    plan = plan or corpus_plan()
    curation = curation or CurationConfig()
    mine = split_part(images, part, parts)
    cases_dir = prepare_output_dir(out_dir / "cases", what="output folder")
    remove_old_store(out_dir)
    if overwrite:
        (out_dir / "plan.json").unlink(missing_ok=True)
    _agree(out_dir / "plan.json", plan.to_dict(), "plan (spacing / normalisation)")
    if not (out_dir / "store.json").is_file():
        write_store_marker(out_dir, patch_size)
    digest = plan.digest()
    work = [(img, cases_dir, plan.to_dict(), digest, tuple(patch_size), curation.to_dict(), overwrite) for img in mine]
    report = CorpusReport(total=len(mine), part=part, parts=parts)
    by_id = {img.case_id: img for img in mine}
    for case_id, status, reason in _map(_corpus_one, work, jobs, "preprocess corpus"):
        if status == "written":
            report.written += 1
        elif status == "up_to_date":
            report.up_to_date += 1
        else:
            report.skipped.append({"case_id": case_id, "path": str(by_id[case_id].path), "reason": reason})
    report.skipped.sort(key=lambda r: r["case_id"])
    report.path = out_dir / ("report.json" if parts == 1 else f"report-part-{part}-of-{parts}.json")
    write_json(report.path, {"total": report.total, "written": report.written, "up_to_date": report.up_to_date,
                             "skipped": report.skipped, "part": part, "parts": parts,
                             "curation": curation.to_dict()}, indent=1)
    return report
