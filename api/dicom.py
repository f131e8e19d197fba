"""DICOM uploads, checked in the API from headers only (no pixel is decoded here; the worker reads the pixels).

:func:`inspect_dicom_upload` is the whole API-side inspection in one function over open files and plain settings
(no database, no storage), so that it can run under a resource-limited sandbox: zip safety (entry count, declared and
actual uncompressed size, compression ratio, no path escapes, links or nested archives), header parsing with
``stop_before_pixels``, grouping by SeriesInstanceUID, the series -> modality mapping (explicit ``series_map`` or the
configured rules), and what headers can refuse (non-MR, mosaic, multi-frame, missing pixel data, one frame of
reference). Slice geometry (order, uniform spacing, gantry tilt, repeated positions) is checked by the worker's reader
(``model.io.dicom``) and fails the job with the same kind of code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from pydicom.dataset import Dataset

from api.core.errors import ProblemError
from api.core.sandbox import SandboxError, run_limited
from api.core.settings import ApiSettings, DicomSettings, Settings
from api.core.storage import job_input_key
from model.io.dicom import DicomError, check_headers, describe, read_header

ZIP_MAGIC = b"PK\x03\x04"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")
ARCHIVE_MAGICS = (ZIP_MAGIC, b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!")
SPOOL_BYTES = 4 * 1024 * 1024


def _problem(code: str, detail: str, **extra: Any) -> ProblemError:
    return ProblemError(422, code, detail, field="dicom", **extra)


@dataclass
class DicomFile:
    name: str  # where it came from: "upload.zip:dir/IM0001" or the uploaded file name
    file: IO[bytes]
    header: Dataset
    sha256: str
    bytes: int


@dataclass
class UploadedSeries:
    """One series of the upload, mapped to a modality; ``record()`` is what the job row keeps."""

    modality: str
    rule: str  # why this modality: "series_map[3]" or the matching rule
    files: list[DicomFile]
    info: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        digest = hashlib.sha256("".join(sorted(f.sha256 for f in self.files)).encode()).hexdigest()
        return {"format": "dicom", **self.info, "rule": self.rule, "sha256": digest,
                "bytes": sum(f.bytes for f in self.files)}


@dataclass
class DicomUpload:
    series: dict[str, UploadedSeries]  # by modality; series not in an explicit series_map are left out

    def close(self) -> None:
        for s in self.series.values():
            for f in s.files:
                f.file.close()

    def store(self, storage: Any, job_id: str) -> dict[str, Any]:
        """Put each series' files under ``jobs/{id}/inputs/{modality}/``; the job row's inputs, by modality."""
        inputs = {}
        for m, series in self.series.items():
            keys = []
            for i, df in enumerate(series.files):
                obj_key = job_input_key(job_id, f"{m}/{i:05d}.dcm")
                df.file.seek(0)
                storage.put_stream(obj_key, df.file, df.bytes)
                keys.append(obj_key)
            inputs[m] = {**series.record(), "keys": keys}
        return inputs


def _describe(ds: Dataset) -> dict[str, Any]:
    return {"series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
            "series_number": str(ds.get("SeriesNumber", "")),
            "series_description": str(ds.get("SeriesDescription", "")),
            "protocol_name": str(ds.get("ProtocolName", "")),
            "sequence_name": str(ds.get("SequenceName", "")),
            "modality": str(ds.get("Modality", ""))}


def _spool(src: IO[bytes], limit: int, name: str) -> tuple[IO[bytes], str, int]:
    """Copy at most ``limit`` bytes into a spooled temporary file, hashing them; more is a zip bomb."""
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed by DicomUpload.close
    digest, size = hashlib.sha256(), 0
    while block := src.read(1024 * 1024):
        size += len(block)
        if size > limit:
            out.close()
            raise _problem("zip_too_large", f"{name}: decompresses to more than the {limit} bytes allowed")
        digest.update(block)
        out.write(block)
    out.seek(0)
    return out, digest.hexdigest(), size


Entry = tuple[str, IO[bytes], str, int]  # name, spooled content, sha256, size


def _zip_entries(name: str, f: BinaryIO, cfg: DicomSettings, budget: list[int]) -> list[Entry]:
    try:
        archive = zipfile.ZipFile(f)
        infos = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _problem("invalid_zip", f"{name}: not a readable zip archive ({exc})") from exc
    if len(infos) > cfg.max_files:
        raise _problem("zip_too_many_entries", f"{name}: {len(infos)} entries, at most {cfg.max_files} are accepted")
    declared = sum(i.file_size for i in infos)
    if declared > budget[0]:
        raise _problem("zip_too_large", f"{name}: declares {declared} bytes uncompressed, more than the "
                                        f"{budget[0]} bytes left of {cfg.max_uncompressed_bytes}")
    out = []
    for info in infos:
        path = PurePosixPath(info.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or re.match(r"^[a-zA-Z]:", info.filename):
            raise _problem("zip_unsafe_path", f"{name}: entry {info.filename!r} points outside the archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _problem("zip_unsafe_path", f"{name}: entry {info.filename!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise _problem("invalid_zip", f"{name}: entry {info.filename!r} is encrypted")
        if path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise _problem("zip_nested_archive", f"{name}: entry {info.filename!r} is an archive; send the DICOM "
                                                 f"files in one flat or foldered zip")
        if info.file_size > cfg.max_compression_ratio * max(info.compress_size, 1) and info.file_size > 1024 * 1024:
            raise _problem("zip_too_large", f"{name}: entry {info.filename!r} expands {info.file_size} bytes from "
                                            f"{info.compress_size} (ratio above {cfg.max_compression_ratio:g})")
        if path.name.startswith(".") or path.parts[0] == "__MACOSX" or path.name.upper() == "DICOMDIR":
            continue  # Finder/PACS export debris, not images
        try:
            with archive.open(info) as src:
                spooled, sha, size = _spool(src, budget[0], f"{name}:{info.filename}")
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _problem("invalid_zip", f"{name}: entry {info.filename!r} cannot be read ({exc})") from exc
        budget[0] -= size
        head = spooled.read(4)
        spooled.seek(0)
        if any(head.startswith(m) for m in ARCHIVE_MAGICS):
            spooled.close()
            raise _problem("zip_nested_archive", f"{name}: entry {info.filename!r} is an archive")
        out.append((f"{name}:{info.filename}", spooled, sha, size))
    return out


def _read_header(name: str, f: IO[bytes]) -> Dataset:
    try:
        ds = read_header(f, name)  # the model's reader: up to the pixel data, has_pixel_data set
    except DicomError as exc:
        raise _problem(exc.code, str(exc)) from None
    if not ds.get("SeriesInstanceUID"):
        raise _problem("invalid_dicom", f"{name}: no SeriesInstanceUID")
    return ds


def parse_series_map(raw: str | None, modalities: Sequence[str]) -> dict[str, str]:
    """``"3=t1,1.2.840.113619.2.1=flair"`` or a JSON object -> ``{SeriesNumber or SeriesInstanceUID: modality}``."""
    if not raw or not raw.strip():
        return {}
    try:
        pairs = json.loads(raw) if raw.strip().startswith("{") else dict(
            (k.strip(), v.strip()) for k, v in (p.split("=", 1) for p in raw.split(",") if p.strip()))
    except (ValueError, TypeError) as exc:
        raise ProblemError(422, "invalid_series_map", "series_map must be 'series=modality,...' (SeriesNumber or "
                           "SeriesInstanceUID) or a JSON object", field="series_map") from exc
    out = {}
    for key, modality in pairs.items():
        m = str(modality).strip().lower()
        if m not in modalities:
            raise ProblemError(422, "invalid_series_map", f"series_map maps {key!r} to {modality!r}, not a modality "
                                                          f"of the serving model ({', '.join(modalities)})",
                               field="series_map")
        out[str(key).strip()] = m
    return out


def _classify(ds: Dataset, rules: Sequence[tuple[str, str]]) -> tuple[str | None, str]:
    d = _describe(ds)
    text = " | ".join(v for v in (d["series_description"], d["protocol_name"], d["sequence_name"]) if v)
    for modality, pattern in rules:
        if re.search(pattern, text, re.IGNORECASE):
            return modality, f"rule {modality}: /{pattern}/ matched {text!r}"
    return None, f"no rule matched {text!r}"


def _is_localizer(ds: Dataset) -> bool:
    """A planning image: ImageType says LOCALIZER (PS3.3 C.8.3.1.1.1). A series only described as a localizer
    matches no modality rule and is ``series_unrecognised`` like any other unknown series."""
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _check_headers(series: list[DicomFile]) -> None:
    first = series[0].header
    if _is_localizer(first):
        raise _problem("dicom_localizer", f"{describe(first)}: a localizer (planning image), not a diagnostic series")
    try:
        check_headers([f.header for f in series])  # the model reader's own header checks, with its codes
    except DicomError as exc:
        raise _problem(exc.code, str(exc)) from None


def inspect_dicom_upload(uploads: Sequence[tuple[str, BinaryIO]], *, modalities: Sequence[str],
                         series_map: str | None, cfg: DicomSettings, max_voxels: int) -> DicomUpload:
    """Uploaded DICOM files and zips -> the series to use, by modality (422 :class:`ProblemError` otherwise).

    With ``series_map`` only the mapped series are used; without it every series must be recognised by
    ``cfg.series_rules`` and no two may claim one modality.
    """
    files: list[DicomFile] = []
    budget = [cfg.max_uncompressed_bytes]
    try:
        for name, f in uploads:
            f.seek(0)
            head = f.read(4)
            f.seek(0)
            if head == ZIP_MAGIC:
                entries = _zip_entries(name, f, cfg, budget)
            else:
                entries = [(name, *_spool(f, budget[0], name))]
                budget[0] -= entries[0][3]
            for entry_name, spooled, sha, size in entries:
                try:
                    header = _read_header(entry_name, spooled)
                except BaseException:
                    for _, other, _, _ in entries:
                        other.close()
                    raise
                files.append(DicomFile(entry_name, spooled, header, sha, size))
                if len(files) > cfg.max_files:
                    raise _problem("zip_too_many_entries", f"more than {cfg.max_files} DICOM files in the request")
        if not files:
            raise _problem("invalid_dicom", "the DICOM upload holds no file")
        return _map_series(files, modalities, parse_series_map(series_map, modalities), cfg, max_voxels)
    except BaseException:
        for df in files:
            df.file.close()
        raise


def inspect_dicom_upload_limited(uploads: Sequence[tuple[str, BinaryIO]], *, modalities: Sequence[str],
                                 series_map: str | None, cfg: DicomSettings, max_voxels: int,
                                 limits: ApiSettings) -> DicomUpload:
    """:func:`inspect_dicom_upload`, first run in the sandbox's forked child under ``limits``' memory, CPU and time
    caps, so that a parser bug on hostile bytes costs that child (422 ``parse_limit_exceeded``/``parse_failed``),
    never the API. The child only says whether parsing survived; a refusal is then reproduced in-process, with
    its full details (the series found, the rule outcomes), by the same function."""

    def preflight() -> bool:
        with contextlib.suppress(ProblemError):  # a documented refusal: the in-process pass raises it with details
            inspect_dicom_upload(uploads, modalities=modalities, series_map=series_map, cfg=cfg,
                                 max_voxels=max_voxels).close()
        return True

    try:
        run_limited(preflight, memory_bytes=limits.parse_memory_bytes, cpu_seconds=limits.parse_cpu_seconds,
                    timeout=limits.parse_timeout_seconds)
    except SandboxError as exc:
        raise _problem(exc.code, f"DICOM upload: {exc.detail}") from None
    finally:
        for _, f in uploads:  # on-disk spooled uploads share their file offset with the child
            f.seek(0)
    return inspect_dicom_upload(uploads, modalities=modalities, series_map=series_map, cfg=cfg, max_voxels=max_voxels)


@contextlib.contextmanager
def inspected_files(paths: Sequence[Path], *, modalities: Sequence[str], settings: Settings) -> Iterator[DicomUpload]:
    """DICOM files on disk (a pulled or received study) inspected as an upload is (no series_map: the rules
    decide), under the API's limits; the files and the upload are closed on exit."""
    handles = [(p.name, p.open("rb")) for p in paths]
    try:
        upload = inspect_dicom_upload_limited(handles, modalities=modalities, series_map=None, cfg=settings.dicom,
                                              max_voxels=settings.api.max_volume_voxels, limits=settings.api)
        try:
            yield upload
        finally:
            upload.close()
    finally:
        for _, f in handles:
            f.close()


def _prefer_3d(chosen: dict[str, list[tuple[str, list[DicomFile]]]], found: list[dict[str, Any]]) -> None:
    """Several series claimed by one modality's rule, exactly one of them a 3D acquisition: that one is used (the
    reference of a raw study: docs/imaging.md), the 2D ones are left out and listed as not used. A raw Philips
    study has a 3D T1 and two 2D fat-saturated T1 spin echoes whose contrast is not recorded."""
    for modality, candidates in chosen.items():
        three_d = [c for c in candidates if str(c[1][0].header.get("MRAcquisitionType", "")).upper() == "3D"]
        if len(candidates) < 2 or len(three_d) != 1:
            continue
        chosen[modality] = three_d
        for _, series in candidates:
            if series is three_d[0][1]:
                continue
            uid = str(series[0].header.SeriesInstanceUID)
            for e in found:
                if e["series_instance_uid"] == uid:
                    e.update(outcome=None, not_used=True,
                             rule=f"{e['rule']}; not used: the 3D series is preferred for {modality}")


def _map_series(files: list[DicomFile], modalities: Sequence[str], explicit: dict[str, str], cfg: DicomSettings,
                max_voxels: int) -> DicomUpload:
    groups: dict[str, list[DicomFile]] = {}
    for f in files:
        groups.setdefault(str(f.header.SeriesInstanceUID), []).append(f)
    chosen: dict[str, list[tuple[str, list[DicomFile]]]] = {}
    found = []
    for uid, series in groups.items():
        first = series[0].header
        number = str(first.get("SeriesNumber", "")).strip()
        if explicit:
            key = uid if uid in explicit else number if number in explicit else None
            modality, rule = (explicit[key], f"series_map[{key}]") if key else (None, "not in series_map")
        elif _is_localizer(first):
            modality, rule = None, "a localizer (planning image): not used"
        else:
            modality, rule = _classify(first, cfg.series_rules)
            if modality is not None and modality not in modalities:
                modality, rule = None, f"{rule}, but the serving model has no {modality}"
        entry = {**_describe(first), "images": len(series), "outcome": modality, "rule": rule,
                 **({"not_used": True} if rule.startswith("a localizer") else {})}
        found.append(entry)
        if modality is None:
            continue
        chosen.setdefault(modality, []).append((rule, series))
    unknown_keys = sorted(set(explicit) - set(groups) - {str(g[0].header.get("SeriesNumber", "")).strip()
                                                          for g in groups.values()})
    if unknown_keys:
        raise ProblemError(422, "invalid_series_map", f"series_map names series not in the upload: "
                           f"{', '.join(unknown_keys)}", field="series_map", series=found)
    if not explicit:
        _prefer_3d(chosen, found)
    unrecognised = [e for e in found if e["outcome"] is None and not e.get("not_used")]
    if unrecognised and not explicit:
        raise _problem("series_unrecognised", "no modality rule recognises " + "; ".join(
            f"series {e['series_number']} {e['series_description']!r}" for e in unrecognised)
            + ": name them in series_map (SeriesNumber or SeriesInstanceUID = modality)", series=found)
    twice = {m: c for m, c in chosen.items() if len(c) > 1}
    if twice:
        raise _problem("series_ambiguous", "several series for one modality: " + "; ".join(
            f"{m}: " + ", ".join(describe(s[0].header) for _, s in c) for m, c in twice.items())
            + ": choose with series_map", series=found)
    if not chosen and found and all(e["rule"].startswith("a localizer") for e in found):
        raise _problem("dicom_localizer", "the upload holds only localizers (planning images): " + "; ".join(
            f"series {e['series_number']} {e['series_description']!r}" for e in found), series=found)
    if not chosen:
        raise _problem("series_unrecognised", "no series of the upload is mapped to a modality", series=found)
    out: dict[str, UploadedSeries] = {}
    for modality, [(rule, series)] in chosen.items():
        _check_headers(series)
        first = series[0].header
        shape = (int(first.get("Columns", 0) or 0), int(first.get("Rows", 0) or 0), len(series))
        if shape[0] * shape[1] * shape[2] > max_voxels:
            raise _problem("volume_too_large", f"{describe(first)}: {shape} voxels, at most {max_voxels}")
        out[modality] = UploadedSeries(modality, rule, series, {
            **_describe(first), "study_instance_uid": str(first.get("StudyInstanceUID", "")),
            "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")), "shape": list(shape),
            "images": len(series)})
    frames = {s.info["frame_of_reference_uid"] for s in out.values()}
    if len(frames) > 1:
        raise _problem("frame_of_reference_mismatch", "the series are not in one frame of reference (not one "
                       "physical space): " + "; ".join(f"{m} {s.info['frame_of_reference_uid'] or '(none)'}"
                                                      for m, s in out.items()), series=found)
    return DicomUpload(out)
