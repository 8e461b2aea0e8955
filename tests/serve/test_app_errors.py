"""The scheduler speaks its own terms (``JobError`` reasons); the HTTP front alone turns them into
statuses, and has a status for every reason."""

from __future__ import annotations

from tailorlm.serve import app
from tailorlm.serve.scheduler import JobError


def test_every_reason_has_an_http_answer():
    assert set(app._JOB_ERRORS) == set(JobError.REASONS)
    for reason in JobError.REASONS:
        answer = app._job_error(JobError(reason, "why", retry_after=2.0 if reason == "queue_full" else None))
        assert 400 <= answer.status < 600 and answer.message == "why"
    assert app._job_error(JobError("deleted", "gone")).status == 404
    assert app._job_error(JobError("queue_full", "full", retry_after=2.0)).headers() == {"Retry-After": "2"}
