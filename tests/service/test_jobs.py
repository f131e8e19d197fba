"""The job state machine on SQLite and PostgreSQL: atomic claims, fencing, leases, the reaper."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from api.core import jobs
from api.core.db import session_scope
from api.core.models import ApiKey, Job, JobStatus, utcnow
from tests.service.conftest import migrate_in_process


@pytest.fixture
def session(stack, monkeypatch):
    migrate_in_process(stack, monkeypatch)
    with session_scope() as s:
        s.add(ApiKey(id="k", name="t", role="integrator", prefix="p", key_hash="h"))
    with session_scope() as s:
        yield s


def new_job(session, **kw) -> Job:
    job = Job(owner_id="k", request_hash="x", inputs={}, targets=["flair"], formats=["nifti"], seed=1, **kw)
    session.add(job)
    session.commit()
    return job


def test_claim_is_exclusive_and_counts_attempts(session):
    job = new_job(session)
    first = jobs.claim(session, job.id, worker_id="w1", lease_seconds=60, max_attempts=3)
    assert first and first.attempt == 1
    assert jobs.claim(session, job.id, worker_id="w2", lease_seconds=60, max_attempts=3) is None  # 2nd delivery
    session.refresh(job)
    assert job.status == JobStatus.running and job.worker_id == "w1" and job.lease_expires_at > utcnow()


def test_stale_worker_cannot_complete(session):
    job = new_job(session)
    stale = jobs.claim(session, job.id, worker_id="w1", lease_seconds=60, max_attempts=3)
    assert jobs.reap_expired(session, max_attempts=3, now=utcnow() + timedelta(seconds=61)) == ([job.id], [])
    fresh = jobs.claim(session, job.id, worker_id="w2", lease_seconds=60, max_attempts=3)
    assert fresh and fresh.attempt == 2
    assert not jobs.renew(session, stale, lease_seconds=60)
    assert not jobs.complete(session, stale, results={"flair.nii.gz": "stale"}, model_version="v")
    assert jobs.complete(session, fresh, results={"flair.nii.gz": "k2"}, model_version="v")
    session.refresh(job)
    assert job.status == JobStatus.succeeded and job.results == {"flair.nii.gz": "k2"} and job.attempts == 2


def test_reaper_fails_after_the_attempt_limit(session):
    job = new_job(session)
    later = utcnow()
    for attempt in (1, 2):
        assert jobs.claim(session, job.id, worker_id="w", lease_seconds=1, max_attempts=2).attempt == attempt
        later += timedelta(seconds=5)
        requeued, failed = jobs.reap_expired(session, max_attempts=2, now=later)
    assert (requeued, failed) == ([], [job.id])
    session.refresh(job)
    assert job.status == JobStatus.failed and job.error_code == "worker_lost" and job.finished_at
    assert jobs.claim(session, job.id, worker_id="w", lease_seconds=1, max_attempts=2) is None


def test_live_lease_is_not_reaped(session):
    job = new_job(session)
    claim = jobs.claim(session, job.id, worker_id="w", lease_seconds=60, max_attempts=3)
    assert jobs.reap_expired(session, max_attempts=3) == ([], [])
    assert jobs.renew(session, claim, lease_seconds=60, phase="denoise", progress=40)
    session.refresh(job)
    assert (job.phase, job.progress) == ("denoise", 40)


def test_cancel_running_is_cooperative(session):
    job = new_job(session)
    claim = jobs.claim(session, job.id, worker_id="w", lease_seconds=60, max_attempts=3)
    jobs.request_cancel(session, job)
    assert job.status == JobStatus.running  # the worker stops it at its next step
    assert not jobs.renew(session, claim, lease_seconds=60)  # ...which is how the worker learns of it
    assert jobs.mark_cancelled(session, claim)
    session.refresh(job)
    assert job.status == JobStatus.cancelled
    with pytest.raises(jobs.InvalidTransition):
        jobs.request_cancel(session, job)


def test_failure_with_retry_requeues(session):
    job = new_job(session)
    claim = jobs.claim(session, job.id, worker_id="w", lease_seconds=60, max_attempts=3)
    assert jobs.fail(session, claim, code="storage_unavailable", message="down", retry=True)
    session.refresh(job)
    assert job.status == JobStatus.queued and job.attempts == 1
    assert jobs.claim(session, job.id, worker_id="w", lease_seconds=60, max_attempts=3).attempt == 2


def test_stale_queued_jobs_are_republished(session):
    job = new_job(session)
    assert jobs.stale_queued(session, older_than=timedelta(hours=1)) == []
    assert jobs.stale_queued(session, older_than=timedelta(seconds=-1)) == [job.id]
    assert session.execute(select(Job.status)).scalar_one() == JobStatus.queued
