"""The worker's PACS side (docs/pacs.md): deliveries of DICOM results (STOW-RS then QIDO-RS, or C-STORE then
C-FIND) and pulls of a study (WADO-RS, or C-GET for a DIMSE-only node) with the upload's checks.

Nothing here logs patient data: log lines name the job, the node and counts; errors carry UIDs and the node's
status codes and reasons.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
from sqlalchemy import update

from api.core import deliveries
from api.core import results as result_names
from api.core.db import session_scope
from api.core.errors import ProblemError
from api.core.models import Job
from api.core.queue import DELIVER_TASK, publish_delivery
from api.core.settings import DicomNode, get_settings
from api.core.storage import get_storage
from api.dicom import inspected_files
from api.submission import pulled_targets
from worker.app import app

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO/DEBUG dumps show identifiers (patient data)
DICOM_JSON = "application/dicom+json"
# C-STORE statuses that are a success with a warning (PS3.4 B.2.3): coercion, elements discarded, already stored
STORE_WARNINGS = {0x0107, 0x0116, 0xB000, 0xB006, 0xB007}
VERIFY_CHECKS = 3  # QIDO-RS / C-FIND queries after sending, 1 s and 2 s apart


class DeliveryError(Exception):
    """One attempt failed; ``permanent`` when the node refused (retrying would not change its answer)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class PullError(ValueError):
    """A pull job's study could not be retrieved or used; ``code`` is the job's error code (docs/errors.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- DICOMweb -----------------------------------------------------------------------------------------------------


def _client(node: DicomNode) -> httpx.Client:
    timeout = get_settings().dicom.network_timeout_seconds
    return httpx.Client(base_url=(node.dicomweb_url or "").rstrip("/"), auth=node.auth, timeout=timeout)


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list((item.get(tag) or {}).get("Value") or [])


def stow(node: DicomNode, paths: Sequence[Path]) -> None:
    """STOW-RS every file in one multipart/related request; the node's FailedSOPSequence is the error."""
    boundary = uuid.uuid4().hex
    parts = [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p.read_bytes() + b"\r\n"
             for p in paths]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": DICOM_JSON}
    with _client(node) as client:
        r = client.post("/studies", content=body, headers=headers)
    try:
        answer = r.json() if r.content else {}
    except ValueError:
        answer = {}
    failed = _values(answer, "00081198") if isinstance(answer, dict) else []
    if failed:
        reasons = [f"{_values(f, '00081155')[0] if _values(f, '00081155') else '?'}: FailureReason "
                   f"0x{int(_values(f, '00081197')[0]) if _values(f, '00081197') else 0:04X}" for f in failed]
        raise DeliveryError(f"STOW-RS HTTP {r.status_code}: {len(failed)} of {len(paths)} instance(s) refused "
                            f"(FailedSOPSequence): " + "; ".join(reasons[:5]), permanent=True)
    if r.status_code >= 300:
        text = r.text.strip().replace("\n", " ")[:300]
        permanent = 400 <= r.status_code < 500 and r.status_code not in (408, 429)
        raise DeliveryError(f"STOW-RS HTTP {r.status_code}: {text}", permanent=permanent)


def qido_instances(node: DicomNode, study_uid: str, series_uid: str) -> set[str]:
    with _client(node) as client:
        r = client.get(f"/studies/{study_uid}/series/{series_uid}/instances", headers={"Accept": DICOM_JSON})
    if r.status_code == 204 or (r.status_code == 200 and not r.content):
        return set()
    if r.status_code >= 300:
        raise DeliveryError(f"QIDO-RS HTTP {r.status_code}: {r.text.strip()[:300]}")
    return {str(v) for item in r.json() for v in _values(item, "00080018")}


def _multipart_parts(content_type: str, body: bytes) -> Iterator[bytes]:
    """The bodies of a multipart/related answer (WADO-RS)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"').encode()
    if not boundary:
        raise PullError("pull_failed", f"WADO-RS answered {content_type!r}, not multipart/related")
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        _, _, payload = part.partition(b"\r\n\r\n")
        yield payload[:-2] if payload.endswith(b"\r\n") else payload


def wado_retrieve(node: DicomNode, study_uid: str, series_uids: Sequence[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with _client(node) as client:
        for url in ([f"/studies/{study_uid}/series/{s}" for s in series_uids] or [f"/studies/{study_uid}"]):
            r = client.get(url, headers=accept)
            if r.status_code == 404:
                raise PullError("study_not_found", f"{url} is not on the node (WADO-RS 404)")
            if r.status_code >= 300:
                raise PullError("pull_failed", f"WADO-RS {url}: HTTP {r.status_code} {r.text.strip()[:200]}")
            for payload in _multipart_parts(r.headers.get("content-type", ""), r.content):
                path = dest / f"{len(paths):05d}.dcm"
                path.write_bytes(payload)
                paths.append(path)
    return paths


# --- DIMSE ----------------------------------------------------------------------------------------------------------


def _associate(node: DicomNode, contexts: Sequence[tuple[str, Sequence[str]]], **kw: Any) -> Any:
    from pynetdicom import AE

    cfg = get_settings().dicom
    ae = AE(ae_title=cfg.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.network_timeout_seconds
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    assoc = ae.associate(node.host or "", node.port or 0, ae_title=node.ae_title or "", **kw)
    if not assoc.is_established:
        raise DeliveryError(f"no association with {node.ae_title}@{node.host}:{node.port} "
                            f"({'rejected' if assoc.is_rejected else 'aborted or unreachable'})")
    return assoc


def c_store(node: DicomNode, paths: Sequence[Path]) -> None:
    datasets = [pydicom.dcmread(p) for p in paths]
    syntaxes: dict[str, set[str]] = {}
    for ds in datasets:
        syntaxes.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    assoc = _associate(node, [(k, sorted(v)) for k, v in syntaxes.items()])
    refused = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status:
                raise DeliveryError(f"C-STORE {ds.SOPInstanceUID}: the association ended without an answer")
            code = int(status.Status)
            if code and code not in STORE_WARNINGS:
                comment = str(status.get("ErrorComment", "")).strip()
                refused.append(f"{ds.SOPInstanceUID}: status 0x{code:04X}" + (f" {comment}" if comment else ""))
    finally:
        assoc.release()
    if refused:
        raise DeliveryError(f"C-STORE: {len(refused)} of {len(paths)} instance(s) refused: " + "; ".join(refused[:5]),
                            permanent=True)


def c_find_instances(node: DicomNode, study_uid: str, series_uid: str) -> set[str]:
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = study_uid, series_uid, ""
    assoc = _associate(node, [(FIND, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])])
    found = set()
    try:
        for status, identifier in assoc.send_c_find(query, FIND):
            if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                found.add(str(identifier.SOPInstanceUID))
            elif status and status.Status not in (0x0000,):
                raise DeliveryError(f"C-FIND: status 0x{int(status.Status):04X}")
    finally:
        assoc.release()
    return found


def c_get(node: DicomNode, study_uid: str, series_uids: Sequence[str], dest: Path) -> list[Path]:
    """C-GET the study (or the named series): the node sends the instances back on the same association."""
    from pydicom.dataset import Dataset
    from pynetdicom import StoragePresentationContexts, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

    dest.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def on_store(event: Any) -> int:
        path = dest / f"{len(paths):05d}.dcm"
        event.dataset.file_meta = event.file_meta
        event.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
        return 0x0000

    storage = [str(c.abstract_syntax) for c in StoragePresentationContexts[:120]]  # 128 contexts at most, one for GET
    contexts = [(GET, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])] + [
        (s, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]) for s in storage]
    roles = [build_role(s, scp_role=True) for s in storage]
    try:
        assoc = _associate(node, contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except DeliveryError as exc:
        raise PullError("pull_failed", str(exc)) from None
    try:
        for uids in ([[s] for s in series_uids] or [[]]):
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES" if uids else "STUDY"
            query.StudyInstanceUID = study_uid
            if uids:
                query.SeriesInstanceUID = uids[0]
            for status, _ in assoc.send_c_get(query, GET):
                if status and int(status.Status) not in (0x0000, 0xFF00, 0xB000):
                    raise PullError("pull_failed", f"C-GET: status 0x{int(status.Status):04X}")
    finally:
        assoc.release()
    return paths


# --- deliveries -----------------------------------------------------------------------------------------------------


def result_instances(results: dict[str, str], workdir: Path) -> list[Path]:
    """The job's DICOM results (``{modality}.dicom.zip``, written by this service) unpacked."""
    storage = get_storage()
    paths: list[Path] = []
    for name, key in sorted(results.items()):
        if result_names.kind_of(name).kind != "dicom":
            continue
        local = storage.get_file(key, workdir / name)
        with zipfile.ZipFile(local) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    target = workdir / name.removesuffix(".zip") / Path(info.filename).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(info))
                    paths.append(target)
    return paths


def _send_and_verify(node: DicomNode, paths: Sequence[Path]) -> int:
    expected: dict[tuple[str, str], set[str]] = {}
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        expected.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), set()).add(str(ds.SOPInstanceUID))
    (stow if node.dicomweb_url else c_store)(node, paths)
    find = qido_instances if node.dicomweb_url else c_find_instances
    for (study_uid, series_uid), sops in expected.items():
        for check in range(VERIFY_CHECKS):  # a node may index what it stored a moment later
            missing = sops - find(node, study_uid, series_uid)
            if not missing:
                break
            time.sleep(1.0 + check)
        else:
            # The node said stored, yet does not hold them (Orthanc 1.10 answers success for instances its
            # ReceivedInstanceFilter drops): sending again would end the same way, so this attempt is the last.
            sent_by, found_by = ("STOW-RS", "QIDO-RS") if node.dicomweb_url else ("C-STORE", "C-FIND")
            raise DeliveryError(f"the node accepted the series {series_uid} ({sent_by} success) but {len(missing)} "
                                f"of {len(sops)} instance(s) are not found by {found_by}: dropped by the node",
                                permanent=True)
    return len(paths)


def run_delivery(delivery_id: str) -> str:
    """One attempt at one delivery; returns its new status (or "skipped" when it is not ours to attempt)."""
    cfg = get_settings().dicom
    with session_scope() as session:
        attempt = deliveries.claim(session, delivery_id, lease_seconds=cfg.delivery_lease_seconds)
        job = session.get(Job, attempt.job_id) if attempt else None
        results = dict(job.results) if job else {}
    if attempt is None:
        return "skipped"
    node = cfg.nodes.get(attempt.node)
    try:
        if node is None:
            raise DeliveryError(f"node {attempt.node!r} is no longer configured", permanent=True)
        with tempfile.TemporaryDirectory(prefix="msgldm-deliver-") as tmp:
            paths = result_instances(results, Path(tmp))
            if not paths:
                raise DeliveryError("the job has no DICOM result to send", permanent=True)
            sent = _send_and_verify(node, paths)
    except DeliveryError as exc:
        error, permanent = str(exc), exc.permanent
    except Exception as exc:  # noqa: BLE001 - network and node faults of every kind: retried
        error, permanent = f"{type(exc).__name__}: {exc}", False
    else:
        with session_scope() as session:
            deliveries.delivered(session, attempt, instances=sent)
        log.info("job %s: delivered %d instance(s) to %s (attempt %d)", attempt.job_id, sent, attempt.node,
                 attempt.attempt)
        return "delivered"
    with session_scope() as session:
        status = deliveries.failed_attempt(session, attempt, error=error, permanent=permanent, cfg=cfg)
    log.warning("job %s: delivery to %s attempt %d: %s (%s)", attempt.job_id, attempt.node, attempt.attempt, error,
                status)
    return str(status)


def start_deliveries(job_id: str) -> None:
    """The job succeeded: publish its deliveries (a lost message is published again by the reaper)."""
    with session_scope() as session:
        ids = deliveries.make_due(session, job_id)
    for delivery_id in ids:
        try:
            publish_delivery(delivery_id)
        except Exception:  # noqa: BLE001 - the reaper publishes it
            log.warning("job %s: delivery %s not published; the reaper will", job_id, delivery_id)


def publish_due() -> list[str]:
    """The reaper's part: deliveries whose next attempt is due."""
    with session_scope() as session:
        ids = deliveries.due(session)
    for delivery_id in ids:
        publish_delivery(delivery_id)
    return ids


@app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True)
def deliver(delivery_id: str) -> None:
    """Celery entry point: the message carries only the delivery id."""
    run_delivery(delivery_id)


# --- pulls ----------------------------------------------------------------------------------------------------------


def fetch_study(job: Job, token: str, modalities: Sequence[str], workdir: Path) -> Job:
    """A pull job's first attempt: retrieve the study, check it as an upload is checked, store it as uploads are,
    and record it in the job row (inputs, targets, source.fetched). Returns the updated job."""
    settings = get_settings()
    source = dict(job.source or {})
    node = settings.dicom.nodes.get(source.get("node", ""))
    if node is None:
        raise PullError("unknown_node", f"source node {source.get('node')!r} is not configured")
    dest = workdir / "pulled"
    try:
        if node.dicomweb_url:
            paths = wado_retrieve(node, source["study_uid"], source.get("series_uids") or [], dest)
        else:
            paths = c_get(node, source["study_uid"], source.get("series_uids") or [], dest)
    except httpx.HTTPError as exc:
        raise PullError("pull_failed", f"{source['node']}: {type(exc).__name__}: {exc}") from None
    if not paths:
        raise PullError("study_not_found", f"{source['node']} returned no instance of study {source['study_uid']}")
    try:
        with inspected_files(paths, modalities=modalities, settings=settings) as upload:
            stored = upload.store(get_storage(), job.id)
        inputs = {m: stored[m] for m in modalities if m in stored}
        targets = pulled_targets(list(job.targets), inputs, modalities)
    except ProblemError as exc:  # the study is refused as an upload would be
        raise PullError(exc.code, f"the study from {source['node']}: {exc.detail}") from None
    source["fetched"] = {"instances": len(paths), "bytes": sum(p.stat().st_size for p in paths),
                         "series": {m: info["series_instance_uid"] for m, info in inputs.items()}}
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job.id, Job.fencing_token == token)
                        .values(inputs=inputs, targets=targets, source=source)
                        .execution_options(synchronize_session=False))
        session.commit()
        fresh = session.get(Job, job.id)
        assert fresh is not None  # nosec B101
        session.expunge(fresh)
    log.info("job %s: pulled %d instance(s) from %s: %s", job.id, len(paths), source["node"], ", ".join(inputs))
    return fresh
