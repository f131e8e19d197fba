"""PACS (docs/pacs.md) against a real Orthanc on loopback, started by the tests with HTTP authentication on:
a pull job (WADO-RS; C-GET for a DIMSE node) whose result goes back by STOW-RS (C-STORE), verified by QIDO-RS
(C-FIND), idempotent on re-delivery; deliveries to a stopped Orthanc (pending with the error, delivered after the
restart) and to an Orthanc that refuses instances (failed with its reason); the submission's PACS options refused
with their codes."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.service.conftest import (
    DATA,
    ROOT,
    create_key,
    free_port,
    running_service,
    start_process,
    stop_process,
    wait_for_job,
    worker_args,
)
from tests.service.orthanc import Orthanc, orthanc_missing
from tests.service.test_api import assert_problem, auth
from tests.service.test_api import create_key as create_key_in_process
from tests.service.test_canary import CANARY_ID, CANARY_NAME, _assert_clean, _database_dump, _redis_dump

SAGITTAL = DATA / "dicom_dcm_qa_decubitus_HFS_t1_fl2d_sag"
SLICES = 8  # of its 35: contiguous, uniformly spaced
STUDY_UID = "1.3.12.2.1107.5.2.43.67060.30000022040717195958300000010"  # the sagittal series' study
pytestmark = pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "")
requires_sagittal = pytest.mark.skipif(not SAGITTAL.is_dir(), reason=f"sample series {SAGITTAL} is absent")
real_only = pytest.mark.parametrize("stack", ["real"], indirect=True)
embedded_only = pytest.mark.parametrize("stack", ["embedded"], indirect=True)


@pytest.fixture
def orthanc(tmp_path: Path):
    o = Orthanc(tmp_path / "orthanc")
    o.write_password()
    yield o.start()
    o.stop()


def pacs_env(nodes: dict[str, dict], **extra: str) -> dict[str, str]:
    return {"MSGLDM_DICOM__NODES": json.dumps(nodes), "MSGLDM_DICOM__DELIVERY_BACKOFF_SECONDS": "1",
            "MSGLDM_DICOM__DELIVERY_BACKOFF_MAX_SECONDS": "2", "MSGLDM_DICOM__NETWORK_TIMEOUT_SECONDS": "10",
            "MSGLDM_DICOM__DELIVERY_LEASE_SECONDS": "10", **extra}


def wait_for_delivery(client, job_id: str, node: str, until: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        found = [d for d in job["deliveries"] if d["node"] == node]
        if found and found[0]["status"] in until:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"delivery of {job_id} to {node} did not reach {until}: {job['deliveries']}")


def canary_series(folder: Path) -> list[Path]:
    """The first SLICES slices of the shared sagittal series (a smaller volume: quicker jobs) with the canary patient
    name and ID (tests/service/test_canary.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(SAGITTAL.glob("*.dcm"))[:SLICES]:
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
        ds.save_as(folder / p.name)
        out.append(folder / p.name)
    return out


def assert_no_canary(svc, client, job_id: str, monkeypatch) -> None:
    """The canary goes to no log line, API response, metric, Redis key or message, or database column."""
    time.sleep(1)  # the last log lines
    _assert_clean("API responses", "\n".join(client.get(u).text for u in (
        f"/api/v1/jobs/{job_id}", "/api/v1/jobs", "/metrics")))
    _assert_clean("Redis", _redis_dump(svc.stack.env["MSGLDM_BROKER__URL"]))
    logs = "\n".join(p.read_text(errors="replace") for p in svc.logs.glob("*.log"))
    assert job_id in logs
    _assert_clean("logs", logs)
    svc.stack.apply(monkeypatch)
    _assert_clean("database", _database_dump())


def synthetic_series(o: Orthanc) -> tuple[str, list[dict]]:
    """The one series of the study whose instances say SyntheticData YES, with every instance's metadata."""
    with o.client() as c:
        series = c.get(f"/dicom-web/studies/{STUDY_UID}/series").json()
        out = []
        for s in series:
            uid = s["0020000E"]["Value"][0]
            meta = c.get(f"/dicom-web/studies/{STUDY_UID}/series/{uid}/metadata").json()
            if all(m.get("0008001C", {}).get("Value") == ["YES"] for m in meta):
                out.append((uid, meta))
    assert len(out) == 1, f"{len(out)} synthetic series in the study ({len(series)} series)"
    return out[0]


@embedded_only
def test_pacs_options_refused(app_client, stack, monkeypatch, study):
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("MSGLDM_DICOM__NODES", json.dumps({"pacs": {"dicomweb_url": "http://127.0.0.1:9/dicom-web"}}))
    clear_caches()
    key = create_key_in_process(stack, "integrator")
    files = [(m, (p.name, p.read_bytes(), "application/gzip")) for m, p in study.items()]

    def post(with_files: bool = False, **fields: str):
        return app_client.post("/api/v1/synthesize", headers=auth(key), data=fields,
                               files=files if with_files else None)

    assert_problem(post(True, deliver_to="pacs,nowhere", targets="flair"), 422, "unknown_node")
    assert_problem(post(True, source_node="pacs", study_uid="1.2.3"), 422, "pull_with_files")
    assert_problem(post(source_node="pacs"), 422, "invalid_pull")
    assert_problem(post(source_node="elsewhere", study_uid="1.2.3"), 422, "unknown_node")
    assert_problem(post(source_node="pacs", study_uid="1.2.x"), 422, "invalid_uid")
    assert_problem(post(source_node="pacs", study_uid="1.2.3", series_uids="1.2,abc"), 422, "invalid_uid")
    assert app_client.get("/api/v1/jobs", headers=auth(key)).json()["items"] == []  # nothing half-made
    # accepted: a pull names no targets (every modality the study lacks) and deliver_to turns on the DICOM output
    r = post(source_node="pacs", study_uid="1.2.3", deliver_to="pacs")
    assert r.status_code == 202, r.text
    job = app_client.get(f"/api/v1/jobs/{r.json()['id']}", headers=auth(key)).json()
    assert job["inputs"] == [] and job["targets"] == [] and "dicom" in job["formats"]
    assert job["source"] == {"node": "pacs", "study_uid": "1.2.3", "series_uids": []}
    assert job["deliveries"] == [{"node": "pacs", "status": "pending", "attempts": 0, "error": None,
                                  "instances": None, "verified_at": None}]
    # the node's password never shows: settings print it masked
    from api.core.settings import DicomNode

    assert "hunter2" not in repr(DicomNode(dicomweb_url="http://x", username="u", password="hunter2"))


@requires_sagittal
@real_only
def test_pull_dicomweb_deliver_back_verified_idempotent(stack, tmp_path, orthanc, monkeypatch):
    paths = canary_series(tmp_path / "study")
    orthanc.storescu(paths)
    assert orthanc.count_instances() == len(paths)
    stack.env |= pacs_env({"orthanc": orthanc.node()})
    with running_service(stack, tmp_path) as svc:
        key = create_key(stack, "integrator")
        admin = create_key(stack, "admin")
        with svc.client(key) as client:
            r = client.post("/api/v1/synthesize", data={"source_node": "orthanc", "study_uid": STUDY_UID,
                                                        "preprocess": "none",  # transport under test, not imaging
                                                        "targets": "flair", "deliver_to": "orthanc", "steps": "2"})
            assert r.status_code == 202, r.text
            job = wait_for_job(client, r.json()["id"])
            assert job["status"] == "succeeded", (job, svc.log_text())
            assert job["inputs"] == ["t1"] and job["source"]["fetched"]["instances"] == len(paths)
            delivery = wait_for_delivery(client, job["id"], "orthanc", ("delivered", "failed"))
            assert delivery["status"] == "delivered", (delivery, svc.log_text())
            assert delivery["instances"] == len(paths) and delivery["attempts"] == 1 and delivery["verified_at"]
            assert job["status"] == client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        # in the same study, marked synthetic, every instance present
        uid, meta = synthetic_series(orthanc)
        assert len(meta) == len(paths)
        assert all(m["0020000D"]["Value"] == [STUDY_UID] for m in meta)
        assert orthanc.count_instances() == 2 * len(paths)
        # an admin re-delivers: the same SOP Instance UIDs, so Orthanc still holds one copy
        with svc.client(admin) as client:
            r = client.post(f"/api/v1/admin/jobs/{job['id']}/deliveries/orthanc")
            assert r.status_code == 202, r.text
            assert [d["status"] for d in r.json()["deliveries"]] == ["pending"]
            delivery = wait_for_delivery(client, job["id"], "orthanc", ("delivered", "failed"))
            assert delivery["status"] == "delivered", delivery
            assert_no_canary(svc, client, job["id"], monkeypatch)
        assert orthanc.count_instances() == 2 * len(paths)
        assert synthetic_series(orthanc)[0] == uid
        # the synthesized series is in the patient's study, so the canary is there: the search above can find it
        assert all(m["00100010"]["Value"] == [{"Alphabetic": CANARY_NAME}] for m in meta)


@real_only
def test_delivery_faults_orthanc_down_then_up_and_refusing(stack, tmp_path, study, orthanc):
    # a second Orthanc that refuses every instance (a Lua filter), as a PACS with a full disk or a policy would
    refusing = Orthanc(tmp_path / "refusing", aet="REFUSING", lua="function ReceivedInstanceFilter(dicom, origin, "
                                                                   "info)\n  return false\nend\n")
    refusing.write_password()
    refusing.start()
    orthanc.stop()  # the PACS is down when the job finishes
    stack.env |= pacs_env({"orthanc": orthanc.node(), "refusing": refusing.node()})
    try:
        with running_service(stack, tmp_path) as svc:
            key = create_key(stack, "integrator")
            with svc.client(key) as client:
                files = [(m, (p.name, p.read_bytes(), "application/gzip")) for m, p in study.items()]
                r = client.post("/api/v1/synthesize", files=files,
                                data={"targets": "flair", "deliver_to": "orthanc,refusing", "steps": "2",
                                      "preprocess": "none"})
                assert r.status_code == 202, r.text
                job = wait_for_job(client, r.json()["id"])
                assert job["status"] == "succeeded", (job, svc.log_text())
                refused = wait_for_delivery(client, job["id"], "refusing", ("delivered", "failed"))
                assert refused["status"] == "failed" and refused["attempts"] == 1, refused
                # Orthanc 1.10 answers STOW-RS 200 for instances its filter drops: the QIDO-RS check catches it
                assert "not found by QIDO-RS" in refused["error"], refused
                assert 'msgldm_deliveries{node="refusing",status="failed"} 1.0' in client.get("/metrics").text
                deadline = time.monotonic() + 60
                while (down := wait_for_delivery(client, job["id"], "orthanc", ("pending",)))["attempts"] < 2:
                    assert time.monotonic() < deadline, down
                    time.sleep(0.5)
                assert down["error"] and "Connect" in down["error"], down
                # the worker killed with -9 (waiting between attempts, or mid-attempt: then the attempt's lease
                # ends first): a new worker carries on from the database
                stop_process(svc.procs["worker"], signal.SIGKILL)
                svc.procs["worker"] = start_process("worker-2", worker_args(), svc.env, svc.logs)
                orthanc.start()
                up = wait_for_delivery(client, job["id"], "orthanc", ("delivered", "failed"))
                assert up["status"] == "delivered" and up["attempts"] > down["attempts"] and up["error"] is None, up
                assert client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        assert orthanc.count_instances() == up["instances"] == 12 and refusing.count_instances() == 0
    finally:
        refusing.stop()


@requires_sagittal
@real_only
def test_dimse_pull_c_get_deliver_c_store_verified_c_find(stack, tmp_path, orthanc, monkeypatch):
    paths = canary_series(tmp_path / "study")
    orthanc.storescu(paths)
    stack.env |= pacs_env({"pacs": orthanc.node(dimse=True)})
    with running_service(stack, tmp_path) as svc:
        key = create_key(stack, "integrator")
        with svc.client(key) as client:
            r = client.post("/api/v1/synthesize", data={"source_node": "pacs", "study_uid": STUDY_UID,
                                                        "preprocess": "none",
                                                        "deliver_to": "pacs", "targets": "t2", "steps": "2"})
            assert r.status_code == 202, r.text
            job = wait_for_job(client, r.json()["id"])
            assert job["status"] == "succeeded", (job, svc.log_text())
            assert job["source"]["fetched"]["instances"] == len(paths)
            delivery = wait_for_delivery(client, job["id"], "pacs", ("delivered", "failed"))
            assert delivery["status"] == "delivered" and delivery["instances"] == len(paths), (delivery,
                                                                                               svc.log_text())
            assert_no_canary(svc, client, job["id"], monkeypatch)
    assert orthanc.count_instances() == 2 * len(paths)
    assert len(synthetic_series(orthanc)[1]) == len(paths)


def _wait_port(port: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the listener exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


@requires_sagittal
@real_only
def test_listener_orthanc_pushes_a_study_it_becomes_one_job_delivered_back(stack, tmp_path, monkeypatch):
    port = free_port()
    o = Orthanc(tmp_path / "orthanc", modalities={"msgldm": ["MSGLDM", "127.0.0.1", port]})
    o.write_password()
    o.start()
    paths = canary_series(tmp_path / "study")
    spool = tmp_path / "spool"
    try:
        o.storescu(paths)
        stack.env |= pacs_env({"orthanc": o.node()}, MSGLDM_DICOM__LISTENER_PORT=str(port),
                              MSGLDM_DICOM__ALLOWED_CALLING_AE_TITLES='["ORTHANC"]',
                              MSGLDM_DICOM__STABLE_SECONDS="4", MSGLDM_DICOM__AUTO_DELIVER_TO="orthanc",
                              MSGLDM_DICOM__AUTO_TARGETS="flair", MSGLDM_DICOM__AUTO_PREPROCESS="none",
                              MSGLDM_DICOM__LISTENER_SPOOL=str(spool),
                              MSGLDM_INFERENCE__DEFAULT_STEPS="2")  # the listener's jobs ask for no steps
        with running_service(stack, tmp_path) as svc:
            key = create_key(stack, "integrator")
            env = {**svc.env, **stack.env, "MSGLDM_DICOM__LISTENER_API_KEY": key}
            listener = start_process("listener", [sys.executable, "-m", "worker.listener"], env, svc.logs)
            try:
                _wait_port(port, listener)
                # C-ECHO is answered; an unknown calling AE title is refused at association
                echo = subprocess.run(["echoscu", "-aet", "ORTHANC", "-aec", "MSGLDM", "127.0.0.1", str(port)],
                                      capture_output=True, text=True, timeout=30)
                assert echo.returncode == 0, echo.stderr
                evil = subprocess.run(["storescu", "-aet", "EVIL", "-aec", "MSGLDM", "127.0.0.1", str(port),
                                       str(paths[0])], capture_output=True, text=True, timeout=30)
                assert evil.returncode != 0 and "Rejected" in evil.stderr + evil.stdout, evil
                # the listener killed with -9 mid-association: nothing half-received becomes a job
                from pynetdicom import AE

                ae = AE(ae_title="ORTHANC")
                ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
                ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])
                assoc = ae.associate("127.0.0.1", port, ae_title="MSGLDM")
                assert assoc.is_established
                for p in paths[:3]:
                    assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0
                stop_process(listener, signal.SIGKILL)
                assoc.abort()
                listener = start_process("listener-2", [sys.executable, "-m", "worker.listener"], env, svc.logs)
                _wait_port(port, listener)
                # Orthanc pushes the study (/modalities/{id}/store) in two associations: one study, one job
                with o.client() as c:
                    ids = c.get("/instances").json()
                    assert len(ids) == len(paths)
                    for half in (ids[: len(ids) // 2], ids[len(ids) // 2:]):
                        r = c.post("/modalities/msgldm/store", json={"Resources": half, "Synchronous": True})
                        assert r.status_code == 200, r.text
                with svc.client(key) as client:
                    deadline = time.monotonic() + 60
                    while not (items := client.get("/api/v1/jobs").json()["items"]):
                        assert time.monotonic() < deadline, svc.log_text()
                        time.sleep(0.5)
                    job = wait_for_job(client, items[0]["id"])
                    assert job["status"] == "succeeded", (job, svc.log_text())
                    assert job["inputs"] == ["t1"] and job["targets"] == ["flair"]
                    delivery = wait_for_delivery(client, job["id"], "orthanc", ("delivered", "failed"))
                    assert delivery["status"] == "delivered" and delivery["instances"] == len(paths), delivery
                    assert len(client.get("/api/v1/jobs").json()["items"]) == 1
                    assert_no_canary(svc, client, job["id"], monkeypatch)  # the listener's log too
                from api.core.db import session_scope
                from api.core.models import Job

                with session_scope() as session:
                    assert session.get(Job, job["id"]).inputs["t1"]["images"] == len(paths)
                assert not list((spool / "incoming").iterdir()) and not list((spool / "studies").iterdir())
            finally:
                stop_process(listener)
        assert o.count_instances() == 2 * len(paths)
        assert len(synthetic_series(o)[1]) == len(paths)
    finally:
        o.stop()


@requires_sagittal
@real_only
def test_orthanc_lua_on_stable_study_asks_for_a_pull_with_deliver_to(stack, tmp_path):
    """The Lua script of docs/pacs.md, run by Orthanc: a stable study becomes a pull job delivering back to it."""
    doc = (ROOT / "docs" / "pacs.md").read_text()
    lua = re.search(r"```lua\n(.*?)```", doc, re.S).group(1)
    stack.env |= pacs_env({"orthanc": {"dicomweb_url": "http://127.0.0.1:9/dicom-web"}})
    with running_service(stack, tmp_path) as svc:
        key = create_key(stack, "integrator")
        script = re.sub(r"local MSGLDM = '[^']*'", f"local MSGLDM = '{svc.base}/api/v1/synthesize'", lua)
        script = re.sub(r"local KEY = '[^']*'", f"local KEY = '{key}'", script)
        o = Orthanc(tmp_path / "orthanc", lua=script)
        o.write_password()
        o.start()
        try:
            o.storescu(sorted(SAGITTAL.glob("*.dcm"))[:3])  # a stable study (Orthanc's StableAge: 1 s)
            with svc.client(key) as client:
                deadline = time.monotonic() + 60
                while not (items := client.get("/api/v1/jobs").json()["items"]):
                    assert time.monotonic() < deadline, (o.root / "orthanc.log").read_text()[-2000:]
                    time.sleep(0.5)
                job = client.get(f"/api/v1/jobs/{items[0]['id']}").json()
        finally:
            o.stop()
    assert job["source"]["node"] == "orthanc" and job["source"]["study_uid"] == STUDY_UID, job
    assert [d["node"] for d in job["deliveries"]] == ["orthanc"] and "dicom" in job["formats"]
