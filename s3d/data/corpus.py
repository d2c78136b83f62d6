"""The images of a pre-training corpus: from folders, text files of paths and nnssl pretrain_data.json.

Listing a corpus touches no image file (no reading, no stat beyond what a directory walk does), so
it stays fast for 100k images; files that turn out missing or broken are skipped later, by the
preprocessing step, with their reason (s3d.data.curation).

Every image gets a `case_id` that names its preprocessed files: unique in the corpus (also when
compared case-insensitively, for macOS/Windows disks), made of [A-Za-z0-9._-] only, and the same
on every machine and run, so `--part K --parts N` over several machines (`split_part`) writes one
consistent store and a rerun finds what is already done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from s3d.data.io import IMAGE_SUFFIXES
from s3d.errors import S3DError

# Folders that hold label maps, not images, in nnU-Net's raw layout; never pre-training input.
LABEL_FOLDERS = ("labelsTr", "labelsTs")
# The image folders of an nnU-Net raw dataset (nnU-Net v2 documentation/dataset_format.md).
NNUNET_IMAGE_FOLDERS = ("imagesTr", "imagesTs")
# Case ids name files (CASE.npz, CASE.json): stay well below the usual 255-byte name limit.
MAX_ID_LENGTH = 150
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SEP = "__"


class _Entry(NamedTuple):
    base_id: str  # the id before making it unique
    path: str  # absolute, normalised
    anatomy_mask: str | None
    anonymization_mask: str | None
    stable: str  # the path as its source writes it: the same on every machine


@dataclass(frozen=True)
class CorpusImage:
    """One pre-training image (a 3-D volume file) and its optional nnssl masks."""

    case_id: str  # unique in the corpus, [A-Za-z0-9._-], no leading dot, deterministic
    path: Path
    anatomy_mask: Path | None = None  # nnssl associated_masks.anatomy_mask: 1 = inside the anatomy
    anonymization_mask: Path | None = None  # nnssl associated_masks.anonymization_mask: 1 = defaced voxels


# ------------------------------------------------------------------------------------------ ids
def _strip_suffix(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return name


def _safe(part: str) -> str:
    part = _UNSAFE.sub("_", part).lstrip(".")
    return part or "_"


def _make_id(parts: Iterable[str]) -> str:
    """'sub-01', 'ses 1', 'T1w.nii.gz' -> 'sub-01__ses_1__T1w' (image suffix dropped from the last)."""
    parts = [str(p) for p in parts if str(p) not in ("", ".", "..")]
    if parts:
        parts[-1] = _strip_suffix(parts[-1])
    return _SEP.join(_safe(p) for p in parts) or "image"


def _short_hash(text: str, n: int) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def _unique_ids(entries: Sequence[_Entry]) -> list[CorpusImage]:
    """Give every id that collides (case-insensitively) a short hash; shorten over-long ids.

    The hash is of the entry's `stable` key (its path as written in its source, e.g. relative to
    the folder, or nnssl's `$VAR/...`), so ids agree between machines that mount the data at other
    places; only entries whose stable keys are equal too fall back to the absolute path. Every
    member of a collision group gets a suffix, not all but the first, so no id depends on the order
    in which sources or files were listed.
    """
    ids = []
    for e in entries:
        base = e.base_id
        if len(base) > MAX_ID_LENGTH:
            base = f"{base[:MAX_ID_LENGTH - 9]}-{_short_hash(base, 8)}"
        ids.append(base)
    length = 8
    while True:
        groups: dict[str, list[int]] = {}
        for i, case_id in enumerate(ids):
            groups.setdefault(case_id.lower(), []).append(i)
        clashes = [members for members in groups.values() if len(members) > 1]
        if not clashes:
            break
        if length > 64:  # after the full 40-digit sha1: entries are distinct absolute paths
            raise AssertionError("case ids stay ambiguous")
        for members in clashes:
            stable = [entries[i].stable for i in members]
            distinct = len(set(stable)) == len(stable)
            for i in members:
                key = entries[i].stable if distinct else f"{entries[i].stable}\0{entries[i].path}"
                ids[i] = f"{ids[i]}-{_short_hash(key, length)}"
        length *= 2
    return [CorpusImage(case_id, Path(e.path), _opt_path(e.anatomy_mask), _opt_path(e.anonymization_mask))
            for case_id, e in zip(ids, entries, strict=True)]


def _opt_path(path: str | None) -> Path | None:
    return None if path is None else Path(path)


# ------------------------------------------------------------------------------------------ folders
# Paths are handled as strings until the end: pathlib objects cost ~10 us each, which is most of
# the time for a 100k-image list.
def _norm(path: str, base: str) -> str:
    """`path` absolute (relative ones from `base`, itself absolute) and normalised, no disk access."""
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(dirpath, name) of the image files under `root`, recursively, following folder links once.

    Hidden files and folders are skipped, and so are label folders; a folder that is an nnU-Net raw
    dataset (dataset.json + imagesTr/imagesTs) contributes only its image folders.
    """
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)  # one stat per folder, not per file: a link cycle is not re-entered
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if "dataset.json" in filenames and any(d in dirnames for d in NNUNET_IMAGE_FOLDERS):
            dirnames[:] = sorted(d for d in dirnames if d in NNUNET_IMAGE_FOLDERS)
            continue  # an nnU-Net dataset holds nothing but dataset.json at its top
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in LABEL_FOLDERS)
        for name in sorted(filenames):
            if _is_image(name):
                yield dirpath, name


def _from_folder(root: Path) -> Iterator[_Entry]:
    top = os.path.normpath(os.path.abspath(root))
    label = os.path.basename(top)
    for dirpath, name in _walk(top):
        rel = os.path.relpath(dirpath, top) if dirpath != top else ""
        parts = [*(rel.split(os.sep) if rel else []), name]
        yield _Entry(_make_id(parts), os.path.join(dirpath, name), None, None, "/".join([label, *parts]))


# ------------------------------------------------------------------------------------------ text lists
def _from_text(list_file: Path) -> Iterator[_Entry]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise S3DError(f"{list_file}: not a text file of image paths (not UTF-8 at byte {e.start}); "
                       "pass folders, text files of paths or an nnssl pretrain_data.json") from e
    except OSError as e:
        raise S3DError(f"{list_file}: cannot read: {e.strerror or e}") from e
    base = os.path.dirname(os.path.abspath(list_file))
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        written = os.path.expanduser(entry)
        # the id comes from the path as written (not resolved), so it is the same on every machine
        yield _Entry(_make_id(written.replace("\\", "/").split("/")), _norm(written, base), None, None,
                     f"{list_file.name}:{entry}")


# ------------------------------------------------------------------------------------------ nnssl
def _resolve_nnssl(value: object, json_file: Path, base: str, where: str) -> str | None:
    """nnssl's resolve_relative_paths: a first component `$NAME` is the environment variable NAME."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise S3DError(f"{json_file}: {where} must be a path string, got {value!r}")
    if value.startswith("$"):
        first, sep, rest = value.partition("/")
        env = os.environ.get(first[1:])
        if not env:
            state = "is empty" if env == "" else "is not set"
            raise S3DError(f"{json_file}: environment variable {first[1:]} (used by {where} {value!r}) {state}")
        value = env.rstrip("/") + sep + rest
    return _norm(value, base)


def _field(obj: object, key: str, kind: type, json_file: Path, where: str) -> dict | list:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        what = "an object" if kind is dict else "a list"
        raise S3DError(f"{json_file}: not an nnssl pretrain_data.json: {where} needs {key!r} as {what} "
                       "(collection -> datasets -> subjects -> sessions -> images)")
    return obj[key]


def _from_nnssl(json_file: Path) -> Iterator[_Entry]:
    try:
        with open(json_file, encoding="utf-8") as f:
            collection = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise S3DError(f"{json_file}: not valid JSON: {' '.join(str(e).split())}") from e
    except OSError as e:
        raise S3DError(f"{json_file}: cannot read: {e.strerror or e}") from e
    if isinstance(collection, dict) and "datasets" not in collection and "channel_names" in collection:
        raise S3DError(f"{json_file}: is an nnU-Net dataset.json, not an nnssl pretrain_data.json; "
                       "pass its dataset folder instead")
    base = os.path.dirname(os.path.abspath(json_file))
    for ds_key, dataset in _field(collection, "datasets", dict, json_file, "the collection").items():
        ds_where = f"datasets/{ds_key}"
        subjects = _field(dataset, "subjects", dict, json_file, ds_where)
        ds_name = str(dataset.get("dataset_index", ds_key))
        for subj_key, subject in subjects.items():
            subj_where = f"{ds_where}/subjects/{subj_key}"
            for sess_key, session in _field(subject, "sessions", dict, json_file, subj_where).items():
                sess_where = f"{subj_where}/sessions/{sess_key}"
                for n, image in enumerate(_field(session, "images", list, json_file, sess_where)):
                    where = f"{sess_where}/images/{n}"
                    if not isinstance(image, dict) or "image_path" not in image:
                        raise S3DError(f"{json_file}: not an nnssl pretrain_data.json: {where} needs 'image_path'")
                    written = image["image_path"]
                    path = _resolve_nnssl(written, json_file, base, f"{where} image_path")
                    masks = image.get("associated_masks") or {}
                    if not isinstance(masks, dict):
                        raise S3DError(f"{json_file}: {where} associated_masks must be an object or null")
                    anat = _resolve_nnssl(masks.get("anatomy_mask"), json_file, base, f"{where} anatomy_mask")
                    anon = _resolve_nnssl(masks.get("anonymization_mask"), json_file, base,
                                          f"{where} anonymization_mask")
                    # nnssl's get_unique_id (collection__dataset__subject__session__name) without the
                    # collection, which only repeats itself across the images of one json
                    name = str(image.get("name") or written.rsplit("/", 1)[-1])
                    yield _Entry(_make_id([ds_name, str(subj_key), str(sess_key), name]), path, anat, anon,
                                 f"{json_file.name}:{written}")


# ------------------------------------------------------------------------------------------ public
def find_corpus(sources: Sequence[str | Path]) -> list[CorpusImage]:
    """Every image of `sources`, sorted by case_id; the same file listed twice counts once.

    Each source is one of: a folder (searched recursively for IMAGE_SUFFIXES files, hidden entries
    and labelsTr/labelsTs skipped; an nnU-Net raw dataset folder gives only imagesTr/imagesTs);
    an nnssl pretrain_data.json (any *.json file; `$NAME/...` paths use environment variable NAME,
    other relative paths are relative to the json's folder); a single image file; or a text file
    of image paths (one a line, blank lines and `#` lines ignored, relative to the text file's
    folder). Paths come back absolute and normalised (links not resolved). Files listed by a text
    file or json are not checked to exist here.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise S3DError("find_corpus: no sources given (folders, text files of paths or pretrain_data.json)")
    found: dict[str, _Entry] = {}
    for src in sources:
        src = Path(src)
        if src.is_dir():
            entries: Iterable[_Entry] = _from_folder(src)
        elif not src.exists():
            raise S3DError(f"{src}: not found (expected a folder, a text file of paths or a pretrain_data.json)")
        elif src.name.lower().endswith(".json"):
            entries = _from_nnssl(src)
        elif _is_image(src.name):
            entries = [_Entry(_make_id([src.name]), os.path.normpath(os.path.abspath(src)), None, None, src.name)]
        else:
            entries = _from_text(src)
        for entry in entries:
            old = found.get(entry.path)
            # of two listings of one file keep the smallest: independent of the source order
            if old is None or _order(entry) < _order(old):
                found[entry.path] = entry
    images = _unique_ids(sorted(found.values(), key=lambda e: e.path))
    return sorted(images, key=lambda im: im.case_id)


def _order(e: _Entry) -> tuple[str, ...]:
    return e.base_id, e.stable, str(e.anatomy_mask), str(e.anonymization_mask)


def _part_of(case_id: str, parts: int) -> int:
    return zlib.crc32(case_id.encode("utf-8")) % parts


def split_part(images: Sequence[CorpusImage], part: int, parts: int) -> list[CorpusImage]:
    """The images of part `part` (0 .. parts-1) of `parts`, chosen by a stable hash of case_id.

    Every machine computes the same split whatever order it listed the files in; over all parts
    every image is in exactly one. The input order is kept.
    """
    try:
        part, parts = int(part), int(parts)
    except (TypeError, ValueError) as e:
        raise S3DError(f"--part/--parts must be integers, got {part!r} / {parts!r}") from e
    if parts < 1:
        raise S3DError(f"--parts must be >= 1, got {parts}")
    if not 0 <= part < parts:
        raise S3DError(f"--part must be in 0..{parts - 1} for --parts {parts}, got {part}")
    if parts == 1:
        return list(images)
    return [im for im in images if _part_of(im.case_id, parts) == part]
