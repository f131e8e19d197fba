"""A canary patient name and ID (NIfTI descrip, aux_file, db_name and the upload's file name) sent through the
real processes (uvicorn, a Celery worker, PostgreSQL, Redis, S3) appears in no log line, Redis key or message,
object key, result, API response, metric or database column."""

from __future__ import annotations

import gzip
import time

import nibabel as nib
import numpy as np
import pytest

from tests.service.conftest import brats_files, wait_for_job

CANARY_NAME, CANARY_ID = "ZQXCANARY^JANE", "PIDZQX7741"
TOKENS = ("ZQXCANARY", "PIDZQX7741", "zqxcanary", "pidzqx7741")


def _canary_study() -> dict[str, bytes]:
    """16 slices of the shared BraTS case whose headers carry the canary in descrip, aux_file and db_name."""
    out = {}
    for m in ("t1", "t2"):
        img = nib.load(brats_files()[m]).slicer[:, :, 70:86]
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
        img.header["descrip"] = f"{CANARY_NAME} {CANARY_ID}".encode()
        img.header["aux_file"] = CANARY_ID.encode()
        img.header["db_name"] = CANARY_ID.encode()
        out[m] = gzip.compress(img.to_bytes(), compresslevel=1)
    return out


def _redis_dump(url: str) -> str:
    import redis

    r = redis.Redis.from_url(url)
    parts = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        value = {"string": lambda k: r.get(k), "list": lambda k: r.lrange(k, 0, -1), "hash": lambda k: r.hgetall(k),
                 "set": lambda k: r.smembers(k), "zset": lambda k: r.zrange(k, 0, -1)}.get(kind, lambda k: b"")(key)
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def _database_dump() -> str:
    from sqlalchemy import MetaData, select

    from api.core.db import get_engine

    meta = MetaData()
    meta.reflect(get_engine())
    with get_engine().connect() as conn:
        return "\n".join(f"{t.name} {row!r}" for t in meta.sorted_tables for row in conn.execute(select(t)))


def _assert_clean(where: str, text: str) -> None:
    hits = [t for t in TOKENS if t in text]
    assert not hits, f"canary {hits} found in {where}: ...{text[max(0, text.find(hits[0]) - 200):][:400]}"


@pytest.fixture(params=["real"])
def stack(request, tmp_path, checkpoint):
    from tests.service.conftest import real_stack

    s = real_stack(checkpoint, request.getfixturevalue("s3_server"))
    yield s
    for fn in s.cleanup:
        fn()


def test_canary_patient_data_goes_nowhere(service, monkeypatch):
    from tests.service.conftest import create_key as cli_key

    study = _canary_study()
    snapshots = []
    with service.client(cli_key(service.stack, "integrator")) as client:
        files = [(m, (f"{CANARY_NAME}_{CANARY_ID}_{m}.nii.gz", data)) for m, data in study.items()]
        r = client.post("/api/v1/synthesize", data={"targets": "flair", "steps": "1"}, files=files)
        assert r.status_code == 202, r.text
        snapshots.append(_redis_dump(service.stack.env["MSGLDM_BROKER__URL"]))  # the message while it is queued
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.1)
        snapshots.append(_redis_dump(service.stack.env["MSGLDM_BROKER__URL"]))  # unacked while it runs
        job = wait_for_job(client, job_id, timeout=300)
        assert job["status"] == "succeeded", f"{job}\n{service.log_text()}"
        responses = [client.get(f"/api/v1/jobs/{job_id}").text, client.get("/api/v1/jobs").text]
        responses += [client.get(url).content.decode("latin-1") for url in job["results"].values()]
        four_d = nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4))  # refused: the error must not
        four_d.header["descrip"] = CANARY_NAME.encode()  # echo the header or the file name
        bad = client.post("/api/v1/synthesize", files=[("t1", (f"{CANARY_ID}.nii", four_d.to_bytes()))])
        assert bad.status_code == 422
        responses.append(bad.text)
        responses.append(client.get("/metrics").text)
    time.sleep(1)  # let the last log lines reach the files
    service.stack.apply(monkeypatch)
    from api.core.storage import get_storage

    storage = get_storage()
    keys = storage.list_keys("")
    results = [k for k in keys if "/inputs/" not in k]
    blobs = {k: b"".join(storage.open_stream(k)) for k in results}
    _assert_clean("API responses", "\n".join(responses))
    _assert_clean("result objects", "".join((gzip.decompress(b) if k.endswith(".gz") else b).decode("latin-1")
                                            for k, b in blobs.items()))
    _assert_clean("object keys", "\n".join(keys))
    for snapshot in snapshots + [_redis_dump(service.stack.env["MSGLDM_BROKER__URL"])]:
        _assert_clean("Redis", snapshot)
    _assert_clean("database", _database_dump())
    logs = "\n".join(p.read_text(errors="replace") for p in service.logs.glob("*.log"))
    assert "succeeded" in logs  # the logs are there and were written
    _assert_clean("logs", logs)
    # the inputs are stored as sent (they are the study): the canary is there, so the search above can find it
    inputs = b"".join(gzip.decompress(b"".join(storage.open_stream(k))) for k in keys if "/inputs/" in k)
    assert CANARY_ID.encode() in inputs
