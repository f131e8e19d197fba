"""Training runs: the shared lease state machine (``api/core/leases.py``) over the ``training_run`` table, with a
lease suited to hours-long work: a run whose lease expired is re-queued and its next attempt resumes from the last
stage checkpoint in object storage. Plus where those checkpoints live and the dataset layout names.
"""

from __future__ import annotations

from api.core.errors import NotFound
from api.core.leases import Claim, InvalidTransition, Leases
from api.core.models import TrainingRun

__all__ = ["DATASET_LAYOUTS", "Claim", "InvalidTransition", "RunNotFound", "claim", "complete",
           "fail", "mark_cancelled", "reap_expired", "renew", "request_cancel", "stale_queued"]

# API layout names -> model.data layouts; "brats" takes every BraTS naming (2020, 2021, 2023, BraTS-Toolkit)
DATASET_LAYOUTS = {"brats": "auto", "wmh": "wmh", "ixi": "ixi", "auto": "auto", "brats2020": "brats2020",
                   "brats2021": "brats2021", "brats2023": "brats2023", "brats-toolkit": "brats-toolkit"}


class RunNotFound(NotFound):
    """No training run with this id."""

    code = "training_run_not_found"


LEASES = Leases(TrainingRun, "training run", worker="training worker")
claim, renew, complete, fail = LEASES.claim, LEASES.renew, LEASES.complete, LEASES.fail
mark_cancelled, request_cancel = LEASES.mark_cancelled, LEASES.request_cancel
reap_expired, stale_queued = LEASES.reap_expired, LEASES.stale_queued
