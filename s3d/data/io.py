"""Reading and writing 3-D medical images in voxel index order (i, j, k) with a RAS+ affine.

NIfTI goes through nibabel (so qform/sform codes and the rest of the header survive a round
trip); NRRD / MetaImage go through SimpleITK, whose LPS geometry is converted to nibabel's RAS+
affine. Every problem with a file raises `S3DError` with one line naming the file.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.volumeutils import array_to_file

from s3d.errors import S3DError
from s3d.files import atomic_path  # noqa: F401 - part of this module's API (docs/design.md)

# The file being read or written, for whoever reports a library's messages: nibabel logs "pixdim[1,2,3]
# should be non-zero; setting 0 dims to 1" without naming the file (the CLI adds it, s3d.cli.main).
# A ContextVar, so that threads and nested reads each see their own file.
_CURRENT_FILE: ContextVar[str | None] = ContextVar("s3d_current_file", default=None)


def current_file() -> str | None:
    """The image file s3d.data.io is reading or writing in this thread now, or None."""
    return _CURRENT_FILE.get()


@contextlib.contextmanager
def _working_on(path: str | Path) -> Iterator[None]:
    token = _CURRENT_FILE.set(str(path))
    try:
        yield
    finally:
        _CURRENT_FILE.reset(token)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ITK_SUFFIXES = (".nrrd", ".mha", ".mhd", ".nhdr")
# ITK stores world coordinates in LPS, nibabel in RAS: the two differ by flipping x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_T = TypeVar("_T")


@dataclass(eq=False)
class Geometry:
    """The voxel grid of an image: enough to write a result onto exactly the same grid."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    source: str = ""

    def to_dict(self) -> dict:
        """JSON-safe form; the NIfTI header travels as base64 of its raw bytes so codes survive."""
        header = None
        if self.header is not None:
            header = {
                "class": type(self.header).__name__,
                "bytes": base64.b64encode(self.header.binaryblock).decode("ascii"),
            }
        return {
            "shape": [int(s) for s in self.shape],
            "spacing": [float(s) for s in self.spacing],
            "affine": [[float(v) for v in row] for row in np.asarray(self.affine, dtype=np.float64)],
            "header": header,
            "source": str(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        header = None
        if d.get("header") is not None:
            header_cls = nib.Nifti2Header if d["header"].get("class") == "Nifti2Header" else nib.Nifti1Header
            # nibabel guesses the byte order from sizeof_hdr inside the block, as it does for files
            header = header_cls(binaryblock=base64.b64decode(d["header"]["bytes"]), check=False)
        return cls(
            shape=tuple(int(s) for s in d["shape"]),
            spacing=tuple(float(s) for s in d["spacing"]),
            affine=np.asarray(d["affine"], dtype=np.float64).reshape(4, 4),
            header=header,
            source=str(d.get("source", "")),
        )

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit axis directions (columns) in RAS+."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def origin(self) -> np.ndarray:
        """World RAS+ position of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return "".join(path.suffixes[-2:]).lower()


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 200:
        msg = msg[:200] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _spatial_shape(path: Path, shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    dims = list(shape)
    # a trailing singleton 4th (or 5th...) dimension is how many tools store a plain volume
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise S3DError(f"{path}: is {len(dims)}-D (shape {shape}): s3d needs one 3-D volume per file/channel")
    return dims[0], dims[1], dims[2]


def _affine_spacing(affine: np.ndarray, ndim: int = 3) -> np.ndarray:
    """Voxel size in mm of the first `ndim` (<= 3) axes: the lengths of the affine's columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :ndim] ** 2).sum(axis=0))


def _geometry(path: Path, shape: tuple[int, int, int], affine: np.ndarray,
              header: nib.Nifti1Header | None) -> Geometry:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise S3DError(f"{path}: the voxel-to-world affine / spacing is not finite")
    spacing = _affine_spacing(affine)
    if not (spacing > 0).all():
        raise S3DError(f"{path}: voxel spacing {tuple(float(s) for s in spacing)} is not positive")
    return Geometry(shape=shape, spacing=tuple(float(s) for s in spacing), affine=affine, header=header,
                    source=str(path))


class _Raw:
    """Voxels as stored (native dtype, possibly big-endian) plus the scaling to apply to them."""

    def __init__(self, data: np.ndarray, slope: float, inter: float, geometry: Geometry) -> None:
        self.data = data
        self.slope = slope
        self.inter = inter
        self.geometry = geometry

    @property
    def scaled(self) -> bool:
        return self.slope != 1.0 or self.inter != 0.0

    def as_float32(self) -> np.ndarray:
        """float32 voxels with the scaling applied; S3DError for complex or NaN/inf voxels, which
        every command rejects rather than silently turning them into a wrong answer (a NaN image
        z-scores to all-NaN and predicts as background; a cast drops the imaginary part)."""
        source = self.geometry.source
        if np.iscomplexobj(self.data):
            raise S3DError(f"{source}: complex voxels ({self.data.dtype}); store the magnitude image")
        # one cast from the stored dtype; scaling in float32 avoids a float64 copy of big volumes
        out = np.asarray(self.data, dtype=np.float32, order="C")
        if self.scaled and not out.flags.writeable:
            out = out.copy()
        if self.slope != 1.0:
            out *= np.float32(self.slope)
        if self.inter != 0.0:
            out += np.float32(self.inter)
        if np.issubdtype(self.data.dtype, np.floating) or self.scaled:
            bad = count_nonfinite(out)
            if bad:
                raise S3DError(f"{source}: {bad} NaN/inf voxels (of {out.size}); s3d does not guess values, "
                               "fix the image")
        return out


def count_nonfinite(data: np.ndarray, chunk: int = 1 << 22) -> int:
    """NaN/inf voxels of `data`, counted in chunks so that a 1 GB volume needs no 1 GB mask."""
    if not np.issubdtype(data.dtype, np.inexact):
        return 0
    flat = data.reshape(-1)
    return sum(int(c.size - np.count_nonzero(np.isfinite(c))) for c in (flat[i:i + chunk]
                                                                       for i in range(0, flat.size, chunk)))


def _load_nibabel(path: Path) -> _Raw:
    with np.errstate(invalid="ignore", over="ignore"):  # a broken geometry is reported by _geometry()
        img = nib.load(str(path), mmap=False)
        affine = img.affine
    shape = _spatial_shape(path, img.shape)
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    geometry = _geometry(path, shape, affine, header)
    slope, inter = 1.0, 0.0
    if nib.is_proxy(img.dataobj):
        data = img.dataobj.get_unscaled()
        # nibabel already maps NIfTI's "no scaling" values (0 / NaN slope) to 1 / 0
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    else:
        data = np.asanyarray(img.dataobj)
    if data.size != int(np.prod(img.shape)):
        raise S3DError(f"{path}: holds {data.size} voxels, header says shape {img.shape}")
    return _Raw(data.reshape(shape), slope, inter, geometry)


def _sitk_reader(path: Path):  # -> SimpleITK.ImageFileReader, imported lazily like everywhere here
    """A SimpleITK reader that has read the header of `path` (size, spacing, pixel type), no voxels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _load_sitk(path: Path) -> _Raw:
    import SimpleITK as sitk

    reader = _sitk_reader(path)
    if reader.GetNumberOfComponents() != 1:
        raise S3DError(f"{path}: has {reader.GetNumberOfComponents()} components per voxel; "
                       "s3d needs one 3-D scalar volume per file/channel")
    size = reader.GetSize()
    ndim = reader.GetDimension()
    shape = _spatial_shape(path, size)
    img = reader.Execute()
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:3]
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    affine = np.eye(4)
    # physical LPS point = origin + D diag(spacing) (x, y, z); x, y, z are our (i, j, k) after the transpose
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    geometry = _geometry(path, shape, affine, None)
    view = sitk.GetArrayViewFromImage(img)  # (..., z, y, x)
    view = view.reshape(shape[::-1])
    # keep the array owned by numpy: the view dies with `img`
    data = np.ascontiguousarray(view.transpose(2, 1, 0))
    return _Raw(data, 1.0, 0.0, geometry)


def _dispatch(path: str | Path, with_nibabel: Callable[[Path], _T], with_sitk: Callable[[Path], _T],
              failure: str) -> _T:
    """Run the nibabel or the SimpleITK reader that fits the file name; any failure is an S3DError.

    `failure` is the message after "PATH: ", with `{}` where the reader's one-line error goes.
    """
    path = Path(path)
    if not path.exists():
        raise S3DError(f"{path}: file not found")
    if path.is_dir():
        raise S3DError(f"{path}: is a folder, expected an image file")
    suffix = _suffix(path)
    try:
        with _working_on(path):
            if suffix in _ITK_SUFFIXES:
                return with_sitk(path)
            try:
                return with_nibabel(path)
            except ImageFileError:
                if suffix in _NIFTI_SUFFIXES:
                    raise
                return with_sitk(path)
    except S3DError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure becomes a one-line user error
        raise S3DError(f"{path}: " + failure.format(_one_line(e))) from e


# deflate (gzip, zlib: .nii.gz, compressed .mha/.mhd/.nrrd) cannot compress better than about 1032:1
# (RFC 1951: at most 258 bytes from one 2-bit-minimum code); a header that declares more voxel bytes
# than that for its file is corrupt or hostile, however small the file.
MAX_DEFLATE_RATIO = 1032


def memory_budget() -> int:
    """Bytes one image may take once read (stored voxels + the float32 copy): $S3D_MAX_IMAGE_BYTES,
    else half of this machine's memory, so that a hostile header fails with a message instead of
    a MemoryError (or the OOM killer) halfway through a folder."""
    env = os.environ.get("S3D_MAX_IMAGE_BYTES")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 1):
            raise S3DError(f"S3D_MAX_IMAGE_BYTES={env!r}: expected a positive number of bytes (e.g. 64e9)")
        return int(value)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): a laptop-sized default
        return 8 << 30


def check_declared_size(h: ImageHeader) -> None:
    """S3DError when the header declares voxels the file cannot hold or this machine cannot hold,
    before a single voxel is read."""
    if h.truncated:
        raise S3DError(f"{h.path}: truncated: {h.file_bytes} bytes on disk, the header declares "
                       f"{h.data_offset + h.data_bytes}")
    deflate = h.path.name.lower().endswith((".gz", ".mha", ".mhd", ".nrrd", ".nhdr"))
    if h.compressed and deflate and 0 < h.file_bytes and h.data_bytes > MAX_DEFLATE_RATIO * h.file_bytes:
        raise S3DError(f"{h.path}: corrupt header: declares shape {tuple(h.shape)} ({h.data_bytes / 2**30:.3g} GiB "
                       f"of voxels) in a {h.file_bytes}-byte compressed file")
    voxels = h.data_bytes // max(1, h.dtype.itemsize)
    needed = h.data_bytes + 4 * voxels
    budget = memory_budget()
    if needed > budget:
        raise S3DError(f"{h.path}: declares shape {tuple(h.shape)}, {needed / 2**30:.3g} GiB once read, more than "
                       f"the memory budget of {budget / 2**30:.3g} GiB (set S3D_MAX_IMAGE_BYTES to allow more)")


def _load(path: str | Path) -> _Raw:
    try:
        header = read_header(path)
    except S3DError:
        header = None  # the full read below reports the problem in its own words
    if header is not None:
        check_declared_size(header)
    return _dispatch(path, _load_nibabel, _load_sitk, "cannot read image (truncated or corrupt?): {}")


@dataclass(frozen=True)
class ImageHeader:
    """What an image file declares about itself, read without its voxels (see `read_header`)."""

    path: Path
    shape: tuple[int, ...]  # the full stored shape, every dimension, in (i, j, k, ...) order
    # (i, j, k) when the file holds one 3-D volume (trailing singleton dims dropped), else None
    spatial_shape: tuple[int, int, int] | None
    spacing: tuple[float, ...]  # mm per spatial axis (up to 3), in the order of `shape`
    dtype: np.dtype  # voxel type as stored (may be big-endian, complex or a structured RGB type)
    # bytes in the file that holds the voxels (the file itself, or the .raw/.zraw of a .mhd/.nhdr);
    # -1 when the voxels are spread over several files and nobody counted them
    file_bytes: int
    data_bytes: int  # declared voxel count * bytes per voxel (all components)
    compressed: bool  # voxels not stored raw (gzip, bzip2, ASCII): file size says nothing about them
    components: int = 1  # values per voxel: 3 for RGB, N for vector images
    data_offset: int = 0  # where the voxels start in that file (NIfTI vox_offset, header length)

    @property
    def truncated(self) -> bool:
        """An uncompressed file that is shorter than its header says (an interrupted copy)."""
        return (not self.compressed and self.file_bytes >= 0
                and self.file_bytes < self.data_offset + self.data_bytes)


def _header_nibabel(path: Path) -> ImageHeader:
    with np.errstate(invalid="ignore", over="ignore"):  # a broken affine is for the caller to judge
        img = nib.load(str(path))  # nibabel reads the header only; voxels stay on disk until asked for
        affine = np.asarray(img.affine, dtype=np.float64)
    hdr = img.header
    shape = tuple(int(s) for s in hdr.get_data_shape())
    dtype = np.dtype(hdr.get_data_dtype())
    # NIfTI RGB24 / RGBA32 are structured dtypes: one field per colour component
    components = len(dtype.names) if dtype.names else 1
    image_file = Path(img.file_map["image"].filename or path)
    # the proxy's offset, not hdr.get_data_offset(): a single .nii with vox_offset 0 (as old writers
    # left it) has its voxels after the 352 header bytes, which is where nibabel's proxy reads them
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    compressed = image_file.name.lower().endswith((".gz", ".bz2", ".zst", ".mgz"))
    return ImageHeader(
        path=path, shape=shape, spatial_shape=_maybe_spatial_shape(path, shape),
        spacing=tuple(float(s) for s in _affine_spacing(affine, min(len(shape), 3))), dtype=dtype,
        file_bytes=image_file.stat().st_size, data_bytes=int(np.prod(shape, dtype=np.int64)) * dtype.itemsize,
        compressed=compressed, components=components, data_offset=offset)


def _header_sitk(path: Path) -> ImageHeader:
    import SimpleITK as sitk

    reader = _sitk_reader(path)
    shape = tuple(int(s) for s in reader.GetSize())  # ITK's (x, y, z) is our (i, j, k)
    components = int(reader.GetNumberOfComponents())
    # the numpy type of one component, as SimpleITK itself maps it for arrays
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID(), components)).dtype
    data_file, offset, compressed = _itk_layout(path)
    return ImageHeader(
        path=path, shape=shape, spatial_shape=_maybe_spatial_shape(path, shape),
        spacing=tuple(float(s) for s in reader.GetSpacing()[:3]), dtype=dtype,
        file_bytes=data_file.stat().st_size if data_file is not None else -1,
        data_bytes=int(np.prod(shape, dtype=np.int64)) * components * dtype.itemsize,
        compressed=compressed, components=components, data_offset=offset)


def _maybe_spatial_shape(path: Path, shape: Sequence[int]) -> tuple[int, int, int] | None:
    try:
        return _spatial_shape(path, shape)
    except S3DError:
        return None


def _itk_layout(path: Path) -> tuple[Path | None, int, bool]:
    """(file holding the voxels or None when several, byte offset of the voxels there, compressed)
    of a MetaImage (.mha/.mhd) or NRRD (.nrrd/.nhdr) file, from its text header.

    SimpleITK does not tell whether the voxels are compressed, so the few keys that say where the
    voxels are and how they are encoded are read here (MetaIO and NRRD0004 specifications).
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)  # real headers are a few hundred bytes
    meta = not head.startswith(b"NRRD")
    pos = 0
    fields: dict[str, str] = {}
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            raise S3DError(f"{path}: header has no end")
        line = head[pos:end].decode("latin-1").strip()
        pos = end + 1
        if meta:
            key, _, value = line.partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":  # always the last MetaImage header line
                break
        elif not line:  # NRRD: an empty line ends the header
            break
        elif not line.startswith("#"):
            key, sep, value = line.partition(":")
            if sep and not value.startswith("="):  # "key:=value" lines are key/value pairs, not fields
                fields[key.strip().lower()] = value.strip()
    if meta:
        compressed = (fields.get("compresseddata", "false").lower() == "true"
                      or fields.get("binarydata", "true").lower() == "false")
        name = fields.get("elementdatafile", "LOCAL")
        skip = int(fields.get("headersize", "0") or 0)
        local = name.upper() == "LOCAL"
        many = name.upper().startswith("LIST") or "%" in name or " " in name
    else:
        compressed = fields.get("encoding", "raw").lower() != "raw"
        name = fields.get("data file", fields.get("datafile", ""))
        skip = int(fields.get("byte skip", "0") or 0)
        local = not name
        many = name.upper().startswith("LIST") or " " in name
    if many:
        return None, 0, compressed
    data_file = path if local else path.parent / name
    if not data_file.is_file():
        raise S3DError(f"{path}: its voxel file {data_file} is missing")
    # a skip of -1 means "the voxels are the last bytes of the file": only the size can be checked
    offset = (pos if local else 0) + max(skip, 0)
    return data_file, offset, compressed


def read_header(path: str | Path) -> ImageHeader:
    """The header of an image file (shape, spacing in mm, voxel type, sizes), without reading voxels.

    Cheap enough to run on every file of a 100k-image corpus before deciding to read it.
    """
    return _dispatch(path, _header_nibabel, _header_sitk, "cannot read image header ({})")


def output_problem(path: str | Path, shape: Sequence[int]) -> str | None:
    """Why `path` is not a complete image of spatial shape `shape`, or None when it is.

    For `s3d predict --continue`, which must not keep the 0-byte or cut-off file a killed run (or an
    interrupted copy) left. Cheap for NIfTI, the format predict writes: the header, then for a
    .nii the file size it implies, for a .nii.gz the gzip trailer (RFC 1952 ends every stream with
    the uncompressed size mod 2**32, so a stream cut short ends in other bytes). Other compressed
    formats say nothing about their length up front and are read in full.
    """
    path = Path(path)
    want = tuple(int(s) for s in shape)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        h = read_header(path)
    except OSError as e:
        return _one_line(e)
    except S3DError as e:
        return _reason(e, path)
    if h.spatial_shape != want:
        return f"shape {h.spatial_shape or h.shape} is not the input's {want}"
    if h.truncated:
        return f"truncated ({h.file_bytes} bytes, the header needs {h.data_offset + h.data_bytes})"
    if not h.compressed:
        return None
    if _suffix(path) == ".nii.gz":
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize != (h.data_offset + h.data_bytes) % 2**32:
            return "truncated (its gzip stream ends before the voxels the header declares)"
        return None
    try:
        _load(path)
    except S3DError as e:
        return _reason(e, path)
    return None


def _reason(e: S3DError, path: Path) -> str:
    """A reader's one-line error about `path`, without the path it starts with."""
    return " ".join(str(e).split()).removeprefix(f"{path}: ")


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Image as float32 `(i, j, k)` with NIfTI scl_slope/scl_inter applied, and its Geometry."""
    raw = _load(path)
    try:
        return raw.as_float32(), raw.geometry
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise S3DError(f"{path}: cannot convert voxels to float32: {_one_line(e)}") from e


def _label_values(path: Path, raw: _Raw) -> np.ndarray:
    data = raw.data
    if not raw.scaled and np.issubdtype(data.dtype, np.integer):
        return data
    values = data.astype(np.float64) * raw.slope + raw.inter if raw.scaled else data
    if not np.isfinite(values).all():
        raise S3DError(f"{path}: label map contains NaN/inf values")
    rounded = np.round(values)
    # float-stored labels are fine as long as every value is (within float error) an integer
    if not np.allclose(values, rounded, rtol=0, atol=1e-3):
        raise S3DError(f"{path}: label map has non-integer values")
    return rounded


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Label map as an integer array `(i, j, k)` (int16 when the values fit, else int32)."""
    path = Path(path)
    raw = _load(path)
    values = _label_values(path, raw)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    info16 = np.iinfo(np.int16)
    dtype = np.int16 if info16.min <= lo and hi <= info16.max else np.int32
    if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
        raise S3DError(f"{path}: label values {lo}..{hi} do not fit in 32-bit integers")
    return np.ascontiguousarray(values, dtype=dtype), raw.geometry


def same_grid(a: Geometry, b: Geometry, rtol: float = 1e-3, atol: float = 1e-4) -> str | None:
    """None when `a` and `b` describe the same voxel grid, else a short description of the difference.

    Tolerances are relative like nnU-Net's dataset integrity check, so float32 header round-off
    (qform quaternions, sform rows) does not count as a mismatch.
    """
    if tuple(a.shape) != tuple(b.shape):
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not np.allclose(a.spacing, b.spacing, rtol=rtol, atol=atol):
        return f"spacing {_fmt(a.spacing)} != {_fmt(b.spacing)}"
    if not np.allclose(a.direction, b.direction, rtol=rtol, atol=atol):
        return "axis directions differ"
    scale = max(1.0, float(np.abs(a.origin).max()), float(np.abs(b.origin).max()))
    if not np.allclose(a.origin, b.origin, rtol=0, atol=max(atol, rtol * scale)):
        return f"origin {_fmt(a.origin)} != {_fmt(b.origin)}"
    return None


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def read_channels(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Stack the channel files of one case into `(C, i, j, k)` float32; all must share one grid."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise S3DError("read_channels: no image files given")
    first, geometry = read_image(paths[0])
    out = np.empty((len(paths), *first.shape), dtype=np.float32)
    out[0] = first
    del first
    for c, p in enumerate(paths[1:], start=1):
        data, geo = read_image(p)
        diff = same_grid(geo, geometry)
        if diff is not None:
            raise S3DError(f"{p}: not on the grid of channel 0 ({paths[0].name}): {diff}")
        out[c] = data
    return out, geometry


def _nifti_header(like: Geometry, shape: tuple[int, ...], dtype: np.dtype) -> nib.Nifti1Header:
    if like.header is not None:
        # same field values, little-endian bytes: what every NIfTI reader expects most
        hdr = like.header.as_byteswapped("<") if like.header.endianness != "<" else like.header.copy()
        pixdim = hdr["pixdim"].copy()
        hdr.set_data_shape(shape)
        # set_data_shape() rewrites the pixdim of unused axes to 1; keep the reference's bytes
        hdr["pixdim"] = pixdim
        if not np.allclose(hdr.get_best_affine(), like.affine, rtol=0, atol=1e-4):
            # the Geometry was moved after reading: its affine wins; nibabel keeps non-zero codes
            hdr.set_qform(like.affine)
            hdr.set_sform(like.affine)
    else:
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(shape)
        # ITK writes both codes as scanner (1); an image read by SimpleITK has no codes of its own
        hdr.set_qform(like.affine, code=1)
        hdr.set_sform(like.affine, code=1)
        hdr.set_xyzt_units("mm")
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    hdr.set_intent("none")
    # extensions describe the source image (AFNI, DICOM...), not our output
    hdr.extensions.clear()
    return hdr


def _write_nifti(arr: np.ndarray, like: Geometry, path: Path) -> None:
    hdr = _nifti_header(like, arr.shape, arr.dtype)
    hdr["magic"] = hdr.single_magic
    hdr["vox_offset"] = 0  # write_to() sets the single-file offset (header + empty extension block)
    # Writing the header ourselves keeps every geometry field (codes, quaternion, srow, pixdim) byte
    # for byte as in the reference; nibabel's image saving would refit them from a float64 affine and
    # turn scl_slope/scl_inter 1/0 into NaN.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if path.name.lower().endswith(".gz"):
            # level 1 as nibabel uses: labels compress well anyway and big volumes stay fast
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=1, mtime=0) as gz:
                hdr.write_to(gz)
                array_to_file(arr, gz, out_dtype=hdr.get_data_dtype(), offset=None, order="F")
        else:
            hdr.write_to(f)
            array_to_file(arr, f, out_dtype=hdr.get_data_dtype(), offset=None, order="F")


def _write_sitk(arr: np.ndarray, like: Geometry, path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    lps = _LPS_TO_RAS @ like.affine[:3, :3]
    spacing = np.sqrt((lps**2).sum(axis=0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps / spacing[None, :]).ravel()])
    img.SetOrigin([float(v) for v in _LPS_TO_RAS @ like.affine[:3, 3]])
    # SimpleITK picks the format from the extension and .mhd/.nhdr write a second data file, so
    # write into a private folder under the final names and move the files (data file first)
    tmp_dir = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_dir.mkdir(exist_ok=True)
    try:
        sitk.WriteImage(img, str(tmp_dir / path.name), True)
        produced = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)
        for p in produced:
            os.replace(p, path.with_name(p.name))
    finally:
        for p in tmp_dir.iterdir() if tmp_dir.exists() else ():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            tmp_dir.rmdir()


def _write(arr: np.ndarray, like: Geometry, path: str | Path, what: str) -> None:
    path = Path(path)
    if tuple(arr.shape) != tuple(like.shape):
        raise S3DError(f"{path}: {what} shape {tuple(arr.shape)} does not match the reference image "
                       f"{like.source or ''} shape {tuple(like.shape)}")
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise S3DError(f"{path}: unknown image format (use one of {', '.join(IMAGE_SUFFIXES)})")
    if not path.parent.exists():
        raise S3DError(f"{path}: folder {path.parent} does not exist")
    try:
        with _working_on(path):
            if suffix in _NIFTI_SUFFIXES:
                _write_nifti(arr, like, path)
            else:
                _write_sitk(arr, like, path)
    except S3DError:
        raise
    except OSError as e:
        raise S3DError(f"{path}: cannot write: {_one_line(e)}") from e


def write_segmentation(seg: np.ndarray, like: Geometry, path: str | Path) -> None:
    """Write an integer label map `(i, j, k)` on exactly the grid (and NIfTI header) of `like`.

    Stored as uint8, or uint16 / uint32 when the largest label needs it.
    """
    seg = np.asarray(seg)
    if seg.dtype == np.bool_:
        seg = seg.astype(np.uint8)
    if not np.issubdtype(seg.dtype, np.integer):
        if not np.isfinite(seg).all() or not np.array_equal(seg, np.round(seg)):
            raise S3DError(f"{path}: segmentation has non-integer values")
    lo, hi = (seg.min(), seg.max()) if seg.size else (0, 0)
    if lo < 0:
        raise S3DError(f"{path}: segmentation has negative label {int(lo)}")
    dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32
    _write(seg.astype(dtype, copy=False), like, path, "segmentation")


def write_image(arr: np.ndarray, like: Geometry, path: str | Path) -> None:
    """Write a float32 volume `(i, j, k)` (e.g. probabilities) on the grid of `like`."""
    _write(np.asarray(arr, dtype=np.float32), like, path, "image")
