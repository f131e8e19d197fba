"""The DICOM C-STORE listener (docs/pacs.md): ``python -m worker.listener``, its own process.

A PACS (or a modality) sends a study with C-STORE; calling AE titles not in ``MSGLDM_DICOM__ALLOWED_CALLING_AE_TITLES``
(default: the ``ae_title`` of each configured node) are rejected at association; C-ECHO is answered. Each
association's instances are spooled under ``listener_spool/incoming/<association>/`` and join their study's folder
only when the association is released normally: an aborted association, or a listener killed mid-association,
leaves nothing that could become a job (the incoming folder is emptied at start). A study is complete when no
instance arrived for ``stable_seconds``; later associations join the same study until then. A complete study
becomes a job as an upload does (the same sandboxed checks and series rules, stored in object storage), owned by
``listener_api_key``, with ``auto_targets`` and ``auto_deliver_to``. A refused study (say, no series the rules
recognise) is kept under ``refused/`` with the reason, for an operator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from api.core.db import session_scope
from api.core.errors import ProblemError
from api.core.keys import KeyRefused, active_key
from api.core.settings import get_settings
from api.core.storage import get_storage
from api.dicom import inspected_files
from api.submission import create_job, parse_request, served_modalities

log = logging.getLogger("worker.listener")


class Spool:
    """The listener's folders: incoming/<association>/, studies/<study uid>/, refused/<study uid>-<time>/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming, self.studies, self.refused = root / "incoming", root / "studies", root / "refused"
        self._lock = threading.Lock()
        shutil.rmtree(self.incoming, ignore_errors=True)  # associations of a previous process never completed
        for d in (self.incoming, self.studies, self.refused):
            d.mkdir(parents=True, exist_ok=True)

    def store(self, assoc_id: str, study_uid: str, sop_uid: str, data: bytes) -> None:
        folder = self.incoming / assoc_id / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{sop_uid}.dcm").write_bytes(data)

    def commit(self, assoc_id: str) -> list[str]:
        """A released association: its instances join their studies (the study's clock restarts)."""
        src = self.incoming / assoc_id
        studies = []
        with self._lock:
            for study in sorted(src.iterdir()) if src.is_dir() else []:
                dest = self.studies / study.name
                dest.mkdir(exist_ok=True)
                for f in study.iterdir():
                    f.replace(dest / f.name)  # the same SOP instance sent again replaces the first copy
                (dest / ".last").write_text(str(time.time()))
                studies.append(study.name)
            shutil.rmtree(src, ignore_errors=True)
        return studies

    def discard(self, assoc_id: str) -> None:
        with self._lock:  # never while a commit moves this association's files
            shutil.rmtree(self.incoming / assoc_id, ignore_errors=True)

    def discard_stale(self, older_than: float) -> None:
        """Associations whose connection dropped without a release or an abort (the files of a live association
        are younger: every C-STORE writes one)."""
        with self._lock:
            for folder in self.incoming.iterdir():
                newest = max((f.stat().st_mtime for f in folder.rglob("*")), default=folder.stat().st_mtime)
                if time.time() - newest > older_than:
                    shutil.rmtree(folder, ignore_errors=True)

    def take_stable(self, stable_seconds: float) -> list[Path]:
        """Complete studies, each moved out of studies/ (so new instances start a new study folder)."""
        taken = []
        with self._lock:
            for study in sorted(self.studies.iterdir()):
                marker = study / ".last"
                if marker.is_file() and time.time() - float(marker.read_text() or 0) >= stable_seconds:
                    dest = self.root / f"processing-{study.name}-{uuid.uuid4().hex[:8]}"
                    study.replace(dest)
                    taken.append(dest)
        return taken

    @staticmethod
    def study_uid(folder: Path) -> str:
        """The StudyInstanceUID of a folder take_stable made (``processing-{uid}-{random}``)."""
        return folder.name.split("-", 1)[1].rsplit("-", 1)[0]

    def give_back(self, folder: Path) -> None:
        """A job could not be made for a transient reason: the study waits for the next pass."""
        with self._lock:
            dest = self.studies / self.study_uid(folder)
            dest.mkdir(exist_ok=True)
            for f in folder.iterdir():
                f.replace(dest / f.name)
            folder.rmdir()

    def recover(self) -> None:
        """Studies being made into jobs when a previous process died go back (job creation is idempotent)."""
        for folder in self.root.glob("processing-*"):
            self.give_back(folder)


def make_job(folder: Path, study_uid: str) -> tuple[str | None, str]:
    """A complete study -> a job, as ``POST /synthesize`` with the study's files would; (job id, what happened).
    Raises ProblemError (422: refused) for the study, other errors when the service is not available."""

    settings = get_settings()
    cfg = settings.dicom
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
    if cfg.listener_api_key is None:
        raise ProblemError(503, "listener_unconfigured", "MSGLDM_DICOM__LISTENER_API_KEY(_FILE) is not set")
    digest = hashlib.sha256("".join(p.name for p in files).encode()).hexdigest()[:32]
    with session_scope() as session:
        try:
            key = active_key(session, cfg.listener_api_key.get_secret_value())
        except KeyRefused as exc:
            raise ProblemError(503, "listener_unconfigured", f"the listener's key: {exc}") from None
        modalities = served_modalities(session)
        with inspected_files(files, modalities=modalities, settings=settings) as upload:
            targets = "" if cfg.auto_targets.strip().lower() == "missing" else cfg.auto_targets
            fields = {"targets": targets, "formats": "nifti,dicom", "deliver_to": cfg.auto_deliver_to,
                      "preprocess": cfg.auto_preprocess}
            submission = parse_request(fields, modalities=modalities, dicom=upload)
            job = create_job(session, get_storage(), key=key, submission=submission, dicom=upload,
                             idempotency_key=f"listener:{study_uid[:64]}:{digest}")
        return job.id, f"{len(files)} instance(s), inputs {', '.join(submission.inputs)}, targets " \
                       f"{', '.join(submission.targets)}"


def process_stable(spool: Spool) -> None:
    for folder in spool.take_stable(get_settings().dicom.stable_seconds):
        study_uid = spool.study_uid(folder)
        try:
            job_id, what = make_job(folder, study_uid)
        except ProblemError as exc:
            if exc.status == 422:  # the study itself is refused: kept with the reason for an operator
                dest = spool.refused / f"{study_uid}-{int(time.time())}"
                folder.replace(dest)
                (dest / "reason.json").write_text(json.dumps({"code": exc.code, "detail": exc.detail}))
                log.warning("study %s refused: %s (%s)", study_uid, exc.code, exc.detail)
                continue
            log.warning("study %s: no job yet (%s); retrying", study_uid, exc.code)
            spool.give_back(folder)
            continue
        except Exception:  # noqa: BLE001 - database or storage down: the study waits
            log.warning("study %s: no job yet; retrying", study_uid, exc_info=True)
            spool.give_back(folder)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("study %s complete: job %s (%s)", study_uid, job_id, what)


def allowed_calling_ae_titles() -> list[str]:
    cfg = get_settings().dicom
    return list(cfg.allowed_calling_ae_titles) or sorted({n.ae_title for n in cfg.nodes.values() if n.ae_title})


def serve(stop: threading.Event) -> None:
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    cfg = get_settings().dicom
    if cfg.listener_port is None:
        raise SystemExit("MSGLDM_DICOM__LISTENER_PORT is not set")
    spool = Spool(cfg.listener_spool)
    spool.recover()
    allowed = allowed_calling_ae_titles()
    if not allowed:
        log.warning("no calling AE title is allowed (MSGLDM_DICOM__ALLOWED_CALLING_AE_TITLES, or nodes with an "
                    "ae_title): every association will be rejected")
    ae = AE(ae_title=cfg.listener_ae_title)
    ae.require_calling_aet = allowed or ["\0never\0"]
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = cfg.network_timeout_seconds
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:  # every syntax pydicom reads (compressed ones via pylibjpeg)
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)

    def assoc_id(event: Any) -> str:
        return f"{id(event.assoc):x}-{event.assoc.native_id or 0}"

    def on_store(event: Any) -> int:
        ds = event.dataset
        study, sop = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        if not study or not sop or not all(c.isdigit() or c == "." for c in study + sop):
            return 0xA900  # dataset does not match SOP class: no usable UIDs
        spool.store(assoc_id(event), study, sop, event.encoded_dataset())
        return 0x0000

    def on_released(event: Any) -> None:
        for study in spool.commit(assoc_id(event)):
            log.info("association from %s released: study %s updated",
                     event.assoc.requestor.ae_title, study)

    def on_aborted(event: Any) -> None:
        spool.discard(assoc_id(event))
        log.warning("association from %s aborted: its instances are discarded", event.assoc.requestor.ae_title)

    # No EVT_CONN_CLOSE handler: it can fire from another thread while the release handler is still committing;
    # a connection lost without release or abort is discarded by discard_stale below.
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_RELEASED, on_released), (evt.EVT_ABORTED, on_aborted)]
    server = ae.start_server((cfg.listener_host, cfg.listener_port), block=False, evt_handlers=handlers)
    log.info("listening as %s on %s:%d; calling AE titles allowed: %s; stable after %.0fs", cfg.listener_ae_title,
             cfg.listener_host, cfg.listener_port, ", ".join(allowed) or "none", cfg.stable_seconds)
    try:
        while not stop.wait(min(1.0, max(0.1, cfg.stable_seconds / 4))):
            try:
                spool.discard_stale(max(600.0, 4 * cfg.network_timeout_seconds))
                process_stable(spool)
            except Exception:  # noqa: BLE001 - the loop must go on
                log.exception("processing complete studies failed")
    finally:
        if server is not None:
            server.shutdown()


def main() -> None:
    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its debug dumps would log patient attributes
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(stop)


if __name__ == "__main__":
    main()
