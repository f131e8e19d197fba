"""Prometheus metrics of the API process."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from api.core.models import Delivery, DeliveryStatus, Job, JobStatus

REGISTRY = CollectorRegistry()
REQUESTS = Counter("msgldm_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("msgldm_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
JOBS = Gauge("msgldm_jobs", "jobs by status", ["status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("msgldm_queue_depth", "queued jobs", registry=REGISTRY)
DELIVERIES = Gauge("msgldm_deliveries", "deliveries to DICOM nodes by node and status (docs/pacs.md)",
                   ["node", "status"], registry=REGISTRY)


def refresh_job_gauges(session: Session) -> None:
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    for status in JobStatus:
        JOBS.labels(status.value).set(counts.get(status.value, 0))
    QUEUE_DEPTH.set(counts.get(JobStatus.queued.value, 0))
    rows = session.execute(select(Delivery.node, Delivery.status, func.count()).group_by(Delivery.node,
                                                                                         Delivery.status)).all()
    by_node: dict[str, dict[str, int]] = {}
    for node, state, count in rows:
        by_node.setdefault(node, {})[state] = count
    for node, counts_of in by_node.items():  # node names come from the settings (a bounded label set)
        for st in DeliveryStatus:
            DELIVERIES.labels(node, st.value).set(counts_of.get(st.value, 0))


class MetricsMiddleware:
    """Counts requests by route template (never by raw path: ids would explode the label space)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], template, str(status["code"])).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - start)
