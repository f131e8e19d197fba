"""Training runs: the shared lease state machine (``api/core/leases.py``) over the ``training_run`` table, with a
lease suited to hours-long work: a run whose lease expired is re-queued and its next attempt resumes from the last
stage checkpoint in object storage. Plus the dataset layout names the API accepts.
"""

from __future__ import annotations

from api.core.errors import NotFound
from api.core.leases import Claim, InvalidTransition, Leases
from api.core.models import TrainingRun
from model.data import LAYOUTS

__all__ = ["DATASET_LAYOUTS", "Claim", "InvalidTransition", "RunNotFound", "claim", "complete",
           "fail", "mark_cancelled", "reap_expired", "renew", "request_cancel", "stale_queued"]

# API layout names -> model.data layouts: each of the model's, "brats" (and "auto") for any BraTS naming
DATASET_LAYOUTS = {"brats": "auto", "auto": "auto", **{name: name for name in LAYOUTS}}


class RunNotFound(NotFound):
    """No training run with this id."""

    code = "training_run_not_found"


LEASES = Leases(TrainingRun, "training run", worker="training worker")
claim, renew, complete, fail = LEASES.claim, LEASES.renew, LEASES.complete, LEASES.fail
mark_cancelled, request_cancel = LEASES.mark_cancelled, LEASES.request_cancel
reap_expired, stale_queued = LEASES.reap_expired, LEASES.stale_queued
