"""Fuzz worker: writes seeded mutated NIfTI / PNG / TIFF / DICOM files and feeds them to the readers or to
``preprocess`` under an address-space cap, one outcome per input (tests/data/test_fuzz.py runs it).

Run as ``python fuzz_worker.py FOLDER READS PREPROCESSES SEED CAP_MB CLAIM_MB RESULT_JSON``:
``READS`` inputs each go to :func:`read_nifti` / :func:`nifti_geometry` / :func:`read_picture` (DICOM:
:func:`scan_dicom` then :func:`read_dicom_series`, or :func:`read_dicom_picture`), then
``PREPROCESSES`` other inputs each go, with one good file beside it, to
:func:`invcoss.data.preprocess`. The cap is set with ``RLIMIT_AS`` after the imports: the address
space then in use plus ``CAP_MB``, so an input whose header makes a reader allocate more fails with
``MemoryError`` and is reported, not swapped. An input whose header claims sizes or lengths
(``CLAIMS``) gets only ``CLAIM_MB`` above what is in use before it: rejecting a claim must not
allocate it. Preprocessing uses :class:`ReadLimits` sized to the cap (``FUZZ_VOXELS``,
``FUZZ_PIXELS``); reads alternate between those and the defaults.

Mutations of small valid seed files: bit flips (anywhere, or in the header), truncations, header
fields overwritten with extreme values (NIfTI dims, datatype, bitpix, pixdim, vox_offset, scaling,
qform/sform; PNG IHDR fields with a valid CRC and chunk lengths; TIFF IFD entries such as width,
length, bits per sample, strip offsets and counts; DICOM Rows, Columns, BitsAllocated,
SamplesPerPixel), random bytes after a valid magic number, and
splices of two seeds. Each outcome is ``read`` (a float32 array came back), ``skipped`` (a
``ReadError`` with its reason and kind) or a failure: ``over_cap`` (MemoryError or a failed
allocation), ``crash`` (any other exception, or a ReadError without a reason or known kind),
``lost`` (``preprocess`` did not account for a file), ``slow`` (longer than the time limit per
input). Each outcome also records its mutation, the limits used and ``rss_mb``, the growth of the
peak resident memory while the input ran.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SECONDS_PER_INPUT = 20
# ReadLimits sized to the cap: the largest image they let through (2**22 voxels or RGB pixels,
# 48 MB as float32) is read and resampled well inside CAP_MB, so a MemoryError under them is a
# reader allocating past its own limits. Read inputs alternate between these and the defaults.
FUZZ_VOXELS = FUZZ_PIXELS = 2**22

INT_EXTREMES = [0, 1, -1, 2, 3, 7, 8, 255, 32767, -32768]
FLOAT_EXTREMES = [0.0, -1.0, 1e-30, 1e-3, 500.0, 1e30, float("nan"), float("inf"), float("-inf")]
U32_EXTREMES = [0, 1, 65535, 15000, 100_000, 2**31 - 1, 2**32 - 1]
# NIfTI-1 header fields: (offset, struct format) of sizeof_hdr, dim[0..7], datatype, bitpix, pixdim[0..7],
# vox_offset, scl_slope, scl_inter, qform_code, sform_code, quatern_b..d, srow_x..z.
NIFTI_FIELDS = (
    [(0, "<i")]
    + [(40 + 2 * i, "<h") for i in range(8)]
    + [(70, "<h"), (72, "<h")]
    + [(76 + 4 * i, "<f") for i in range(8)]
    + [(108, "<f"), (112, "<f"), (116, "<f"), (252, "<h"), (254, "<h")]
    + [(256 + 4 * i, "<f") for i in range(3)]
    + [(280 + 4 * i, "<f") for i in range(12)]
)


def _nifti(array: np.ndarray, zooms, gz: bool, slope: float | None = None) -> tuple[str, bytes]:
    img = nib.Nifti1Image(array, np.diag([*zooms, *(1.0,) * (4 - len(zooms))]))
    img.header.set_zooms(tuple(zooms) + (1.0,) * (array.ndim - len(zooms)))
    if slope is not None:
        img.header.set_slope_inter(slope, -1024.0)
    raw = img.to_bytes()
    return (".nii.gz", gzip.compress(raw, mtime=0)) if gz else (".nii", raw)


def _picture(array: np.ndarray, mode: str | None, fmt: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(buf, format=fmt)
    return (".png" if fmt == "PNG" else ".tif"), buf.getvalue()


def _dicom(ds) -> bytes:
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dicom_seeds() -> list[tuple[str, bytes]]:
    """A CT slice and an 8-frame enhanced CT (``.ct.dcm``), a DX and a windowed CR (``.dx.dcm``);
    none without pydicom (the ``invcoss[dicom]`` extra)."""
    try:
        # This script runs as a file, so its own folder (tests/data) is on sys.path.
        from dicom_files import multiframe, projection, slice_dataset
    except ImportError:
        return []

    g = np.random.default_rng(2)
    ct = g.integers(-1000, 1500, (8, 12, 10)).astype(np.int16)
    axial = (1, 0, 0, 0, 1, 0)
    grey16 = g.integers(0, 4096, (9, 7)).astype(np.uint16)
    return [
        (".ct.dcm", _dicom(slice_dataset(ct[0], (0, 0, 0), axial, (0.8, 0.8), slope=1.0, intercept=-1024))),
        (".ct.dcm", _dicom(multiframe(ct, axial, (2.0, 2.0), 3.0, (0, 0, 0), 1.0, -1024.0))),
        (".dx.dcm", _dicom(projection(grey16))),
        (".dx.dcm", _dicom(projection(grey16, "MONOCHROME1", window=(2048, 1000), modality="CR"))),
    ]


def seeds() -> list[tuple[str, bytes]]:
    """Small valid files of every kind the readers take."""
    g = np.random.default_rng(0)
    ct = (g.integers(-1000, 1500, (6, 7, 5))).astype(np.int16)
    out = [
        _nifti(ct, (0.8, 0.8, 2.0), gz=False, slope=1.0),
        _nifti(ct, (0.8, 0.8, 2.0), gz=True),
        _nifti(g.random((5, 6, 4)).astype(np.float32), (1.0, 1.0, 1.0), gz=False),
        _nifti(g.integers(0, 255, (6, 7)).astype(np.uint8), (1.0, 1.0), gz=False, slope=0.5),
        _nifti(g.random((4, 4, 3, 2)).astype(np.float32), (1.0, 1.0, 3.0, 1.0), gz=True),
    ]
    grey = g.integers(0, 255, (9, 7)).astype(np.uint8)
    rgb = g.integers(0, 255, (8, 6, 3)).astype(np.uint8)
    grey16 = g.integers(0, 65535, (7, 5)).astype(np.uint16)
    for fmt in ("PNG", "TIFF"):
        out += [_picture(grey, None, fmt), _picture(rgb, None, fmt), _picture(grey16, None, fmt)]
    out += [_picture(rgb, "P", "PNG"), _picture(grey, "LA", "PNG")]
    out.append(_picture(g.random((6, 5)).astype(np.float32), None, "TIFF"))
    return out + dicom_seeds()


def _flip(data: bytearray, rng: random.Random, limit: int) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(min(limit, len(data)))
        data[i] ^= 1 << rng.randrange(8)


def _png_ihdr(data: bytearray, rng: random.Random) -> None:
    """Overwrite an IHDR field (width, height, depth, colour type, ...) and fix the chunk's CRC."""
    if rng.random() < 0.6:
        struct.pack_into(">I", data, rng.choice((16, 20)), rng.choice(U32_EXTREMES))
    else:
        data[rng.randrange(24, 29)] = rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 16, 255])
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))


def _png_chunk_length(data: bytearray, rng: random.Random) -> None:
    pos, starts = 8, []
    while pos + 8 <= len(data):
        starts.append(pos)
        pos += 12 + struct.unpack_from(">I", data, pos)[0]
    struct.pack_into(">I", data, rng.choice(starts), rng.choice(U32_EXTREMES))


def _tiff_entry(data: bytearray, rng: random.Random) -> None:
    """Overwrite the count or value of one IFD entry (little-endian TIFF, as Pillow writes it)."""
    ifd = struct.unpack_from("<I", data, 4)[0]
    n = struct.unpack_from("<H", data, ifd)[0]
    entry = ifd + 2 + 12 * rng.randrange(n)
    tags = {256, 257, 258, 273, 277, 278, 279}
    for _ in range(4):  # prefer the entries that size the image
        if struct.unpack_from("<H", data, entry)[0] in tags:
            break
        entry = ifd + 2 + 12 * rng.randrange(n)
    struct.pack_into("<I", data, entry + rng.choice((4, 8)), rng.choice(U32_EXTREMES))


def _nifti_field(data: bytearray, rng: random.Random) -> None:
    offset, fmt = rng.choice(NIFTI_FIELDS)
    value = rng.choice(FLOAT_EXTREMES) if fmt == "<f" else rng.choice(INT_EXTREMES + [2**31 - 1])
    if fmt == "<h":
        value = max(-32768, min(32767, int(value)))
    struct.pack_into(fmt, data, offset, value)


# The mutations by number; those in CLAIMS make a header claim sizes or lengths the file does not hold.
MUTATIONS = (
    "flip",
    "header flip",
    "truncation",
    "header field",
    "header field",
    "random body",
    "splice",
    "size claim",
)
CLAIMS = ("header field", "size claim")


# DICOM image pixel module tags (group 0x0028, little endian) and the extreme US values written in.
_DICOM_TAGS = (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00", b"\x28\x00\x00\x01", b"\x28\x00\x02\x00")
_US_EXTREMES = [0, 1, 2, 3, 8, 255, 4000, 32767, 65535]


def _dicom_field(data: bytearray, rng: random.Random, huge: bool = False) -> None:
    """Overwrite the value of one image tag (explicit VR ``US``, 2 bytes after VR and length)."""
    tags = _DICOM_TAGS[:2] if huge else _DICOM_TAGS
    for tag in rng.sample(tags, k=1 if not huge else 2):
        at = data.find(tag + b"US")
        if at >= 0:
            value = rng.choice([4000, 30000, 65535] if huge else _US_EXTREMES)
            struct.pack_into("<H", data, at + 8, value)


def mutate(suffix: str, data: bytes, rng: random.Random, other: bytes) -> tuple[bytes, str]:
    """One mutation of a seed file and its name in ``MUTATIONS`` (for .nii.gz the header mutations
    act on the gunzipped bytes)."""
    gz = suffix == ".nii.gz"
    body = bytearray(gzip.decompress(data) if gz else data)
    kind = rng.randrange(8)
    name = MUTATIONS[kind]
    if kind == 0:  # bit flips anywhere (in the compressed stream for .nii.gz)
        raw = bytearray(data)
        _flip(raw, rng, len(raw))
        return bytes(raw), name
    dicom = suffix.endswith(".dcm")
    if kind == 1:
        _flip(body, rng, 352 if suffix.startswith(".nii") else 700 if dicom else 64)
    elif kind == 2:  # truncation (of the compressed stream, or of the data inside it)
        if gz and rng.random() < 0.5:
            return data[: rng.randrange(len(data))], name
        body = body[: rng.randrange(len(body))]
    elif kind in (3, 4):  # header fields with extreme values
        if dicom:
            _dicom_field(body, rng)
        elif suffix.startswith(".nii"):
            for _ in range(rng.randint(1, 3)):
                _nifti_field(body, rng)
        elif suffix == ".png":
            (_png_ihdr if kind == 3 else _png_chunk_length)(body, rng)
        else:
            for _ in range(rng.randint(1, 2)):
                _tiff_entry(body, rng)
    elif kind == 5:  # random bytes after the magic number
        keep = 4 if suffix.startswith(".nii") else 132 if dicom else 8
        body = bytearray(bytes(body[:keep]) + rng.randbytes(rng.randrange(2000)))
        if suffix.startswith(".nii"):
            body = bytearray(bytes(data if not gz else gzip.decompress(data))[:348]) + body[keep:]
    elif kind == 7 and suffix.startswith(".nii"):  # a header claiming a huge image (e.g. 1000^3 int16)
        for i in range(1, 4):
            struct.pack_into("<h", body, 40 + 2 * i, rng.choice([1000, 3000, 32767, body[40 + 2 * i]]))
    elif kind == 7 and dicom:  # a DICOM header claiming a huge image
        _dicom_field(body, rng, huge=True)
    elif kind == 7:  # the same for a picture: a huge width and height with the CRC fixed
        if suffix == ".png":
            struct.pack_into(
                ">II", body, 16, rng.choice([15000, 30000, 65535]), rng.choice([15000, 30000, 65535])
            )
            struct.pack_into(">I", body, 29, zlib.crc32(bytes(body[12:29])))
        else:
            _tiff_entry(body, rng)
    else:  # a splice of two seeds
        cut = rng.randrange(1, len(body))
        body = bytearray(bytes(body[:cut]) + other[rng.randrange(len(other)) :])
    return (gzip.compress(bytes(body), mtime=0) if gz else bytes(body)), name


def write_inputs(folder: Path, count: int, seed: int) -> list[tuple[Path, str]]:
    """``count`` mutated files in ``folder``, each with the name of its mutation."""
    rng = random.Random(seed)
    pool = seeds()
    inputs = []
    for i in range(count):
        suffix, data = rng.choice(pool)
        same_kind = [d for s, d in pool if s.startswith(suffix[:4])]
        path = folder / f"input{i:05d}{suffix}"
        blob, mutation = mutate(suffix, data, rng, rng.choice(same_kind))
        path.write_bytes(blob)
        inputs.append((path, mutation))
    return inputs


class _Slow(Exception):
    pass


def _alarm(signum, frame):
    raise _Slow


def _failed_allocation(text: str) -> bool:
    """numpy's "Unable to allocate", torch's "can't allocate memory" (not a DICOM "Bits Allocated")."""
    return re.search(r"(unable to|can't|cannot|failed to) allocate", text, re.IGNORECASE) is not None


def _classify(e: BaseException) -> tuple[str, str, str]:
    """``(outcome, detail, ReadError kind or "")`` of an exception."""
    from invcoss.data.readers import SKIP_KINDS, ReadError

    text = f"{type(e).__name__}: {e}"[:300]
    hit_cap = isinstance(e, MemoryError) or _failed_allocation(str(e)) or "MemoryError" in str(e)
    if isinstance(e, ReadError) and not hit_cap:
        if not e.reason or e.kind not in SKIP_KINDS:
            return "crash", f"ReadError without a reason or a known kind: {text}", ""
        return "skipped", e.reason, e.kind
    if hit_cap:  # also a ReadError that caught the MemoryError: the allocation was attempted
        return "over_cap", text, ""
    if isinstance(e, _Slow):
        return "slow", f"more than {SECONDS_PER_INPUT} s", ""
    return "crash", text, ""


def _read_one(path: Path, limits) -> None:
    from invcoss.data.dicom import read_dicom_picture, read_dicom_series, scan_dicom
    from invcoss.data.readers import nifti_geometry, read_nifti, read_picture

    if path.name.endswith(".dx.dcm"):
        pic = read_dicom_picture(path, limits)
        if pic.array.dtype != np.float32 or pic.array.ndim != 3 or pic.array.shape[0] not in (1, 3):
            raise AssertionError(f"read_dicom_picture gave {pic.array.dtype} {pic.array.shape}")
    elif path.name.endswith(".dcm"):
        scan = scan_dicom([path], limits, 3)
        if scan.skipped:
            raise scan.skipped[0]
        if len(scan.series) != 1:
            raise AssertionError(f"scan_dicom of one file gave {len(scan.series)} series and no skip")
        volume = read_dicom_series(scan.series[0], limits)
        if volume.array.dtype != np.float32 or volume.array.shape != scan.series[0].header.shape:
            raise AssertionError(
                f"read_dicom_series gave {volume.array.dtype} {volume.array.shape}, header {scan.series[0].header.shape}"
            )
    elif path.name.endswith((".nii", ".nii.gz")):
        (d, h, w), _ = nifti_geometry(path, limits=limits)
        volume = read_nifti(path, limits=limits)
        if volume.array.dtype != np.float32 or volume.array.shape != (d, h, w):
            raise AssertionError(
                f"read_nifti gave {volume.array.dtype} {volume.array.shape}, header ({d}, {h}, {w})"
            )
    else:
        pic = read_picture(path, limits)
        if pic.array.dtype != np.float32 or pic.array.ndim != 3 or pic.array.shape[0] not in (1, 3):
            raise AssertionError(f"read_picture gave {pic.array.dtype} {pic.array.shape}")


def _good_file(folder: Path, suffix: str) -> Path:
    if suffix.startswith(".nii"):
        g = np.random.default_rng(1)
        path = folder / "good.nii.gz"
        nib.save(nib.Nifti1Image(g.integers(-1000, 1000, (48, 48, 24)).astype(np.int16), np.eye(4)), path)
    else:
        path = folder / "good.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64)).astype(np.uint8)).save(path)
    return path


def _preprocess_one(path: Path, work: Path, limits) -> tuple[str, str, str]:
    """``preprocess`` of a folder with ``path`` and one good file: both must be accounted for."""
    from invcoss.data import SKIP_KINDS, preprocess

    modality = "ct" if path.name.endswith((".nii", ".nii.gz", ".ct.dcm")) else "xray"
    folder = Path(tempfile.mkdtemp(dir=work))
    (folder / path.name).write_bytes(path.read_bytes())
    good = _good_file(folder, ".nii" if modality == "ct" else ".png")
    report = preprocess(folder, Path(tempfile.mkdtemp(dir=work)) / "cache", modality, "quick", limits=limits)
    skipped = dict(report.skipped)
    # A DICOM input is named by its series when its header places it in one (``series <UID>``).
    mine = [rel for rel in skipped if rel != good.name]
    if good.name in skipped or report.processed + len(skipped) != 2:
        return (
            "lost",
            f"processed {report.processed}, skipped {report.skipped}: the good file or an input is lost",
            "",
        )
    if mine:
        reason, kind = skipped[mine[0]], report.skip_kinds.get(mine[0], "")
        if "MemoryError" in reason or _failed_allocation(reason):
            return "over_cap", reason, kind
        if not reason or kind not in SKIP_KINDS:
            return "lost", f"skipped without a reason or a known kind: {reason!r} ({kind!r})", kind
        return "skipped", reason, kind
    return "read", "", ""


def _status_mb(field: str) -> float:
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) / 1024


def _run(mode: str, inputs: list[tuple[Path, str]], work: Path, cap: int, claim_mb: int) -> list[dict]:
    """One outcome per input. An input whose mutation is in ``CLAIMS`` runs with only ``claim_mb``
    of address space above what is in use before it (never above ``cap``): its header claims sizes
    the file does not hold, and a reader must reject them before allocating.

    ``rss_mb`` of an outcome is the growth of the peak resident memory while that input ran.
    """
    from invcoss.data.readers import DEFAULT_LIMITS, ReadLimits

    fuzz_limits = ReadLimits(max_voxels=FUZZ_VOXELS, max_pixels=FUZZ_PIXELS)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    outcomes = []
    for i, (path, mutation) in enumerate(inputs):
        limits = DEFAULT_LIMITS if mode == "read" and i % 2 == 0 else fuzz_limits
        (work / "current").write_text(f"{mode} {path.name}")  # names the input if the process dies on it
        if mutation in CLAIMS:
            in_use = int(_status_mb("VmSize") * 2**20)
            resource.setrlimit(resource.RLIMIT_AS, (min(cap, in_use + claim_mb * 2**20), hard))
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) at what is resident now
        rss = _status_mb("VmRSS")
        signal.alarm(SECONDS_PER_INPUT)
        try:
            if mode == "read":
                _read_one(path, limits)
                outcome = ("read", "", "")
            else:
                outcome = _preprocess_one(path, work, limits)
        except BaseException as e:  # noqa: BLE001  (every failure is an outcome to report)
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = _classify(e)
        finally:
            signal.alarm(0)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        outcomes.append(
            {
                "input": path.name,
                "mode": mode,
                "mutation": mutation,
                "limits": "default" if limits is DEFAULT_LIMITS else "fuzz",
                "outcome": outcome[0],
                "detail": outcome[1],
                "kind": outcome[2],
                "rss_mb": round(_status_mb("VmHWM") - rss, 2),
            }
        )
    return outcomes


def main(
    folder: str, reads: int, preprocesses: int, seed: int, cap_mb: int, claim_mb: int, result: str
) -> None:
    import torch

    torch.set_num_threads(1)
    root = Path(folder)
    (root / "read").mkdir()
    (root / "preprocess").mkdir()
    (root / "work").mkdir()
    read_inputs = write_inputs(root / "read", reads, seed)
    preprocess_inputs = write_inputs(root / "preprocess", preprocesses, seed + 1)
    _good_file(root / "work", ".nii"), _good_file(root / "work", ".png")  # load the writers before the cap
    vm_kb = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0])
    cap = vm_kb * 1024 + cap_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    work = root / "work"
    outcomes = _run("read", read_inputs, work, cap, claim_mb) + _run(
        "preprocess", preprocess_inputs, work, cap, claim_mb
    )
    Path(result).write_text(
        json.dumps(
            {
                "inputs": len(outcomes),
                "cap_mb": cap_mb,
                "claim_mb": claim_mb,
                "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024,
                "seconds": time.perf_counter() - t0,
                "outcomes": outcomes,
            }
        )
    )


if __name__ == "__main__":
    folder, reads, preprocesses, seed, cap_mb, claim_mb, result = sys.argv[1:]
    main(folder, int(reads), int(preprocesses), int(seed), int(cap_mb), int(claim_mb), result)
