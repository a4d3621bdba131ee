"""Which worker-group failures Ray Train restarts from the last checkpoint.

Ray Train (2.60, Train V2) restarts the worker group after any worker error, up to
``FailureConfig(max_failures)`` times, each restart loading the model again and training again
from the last checkpoint. An error that says the run cannot go on (``STOPS_THE_RUN``: a node
that does not see the data or the run directory, the run directory taken by another run) fails
the same way every time: it ends the run at once, in its one line.
"""

from __future__ import annotations

from disco.pipeline.errors import stopping_error

try:  # Ray Train V2's policy interface (internal): without it, Ray's own policy stays
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
except ImportError:  # pragma: no cover - another Ray
    FailureDecision = FailurePolicy = None


class StopsTheRunPolicy(FailurePolicy or object):
    """Ray Train's own policy (``inner``), except that a worker group failure where any worker
    raised a ``STOPS_THE_RUN`` error is raised, not retried."""

    def __init__(self, inner):
        self.failure_config = inner.failure_config
        self.inner = inner

    def make_decision(self, training_failed_error):
        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if failures and stopping_error(*failures.values()) is not None:
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


def trainer_class():
    """``TorchTrainer`` whose controller gets ``StopsTheRunPolicy`` around the policy Ray built
    from the run's ``FailureConfig`` (Ray Train has no public hook for it); plain ``TorchTrainer``
    where this Ray's trainer does not take a failure policy so."""
    from ray.train.torch import TorchTrainer

    if FailurePolicy is None or not hasattr(TorchTrainer, "_initialize_and_run_controller"):
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs):
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = StopsTheRunPolicy(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer
