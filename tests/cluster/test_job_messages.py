"""What a front sends a replica: every field of a job that is the request itself survives the trip (the
message is plain data, as Ray carries it), so a field added to ``Job`` cannot be forgotten on the way."""

from __future__ import annotations

import pickle

from tailorlm.cluster.serving import event_from, event_message, job_from, job_message
from tailorlm.engine.continuous import Sampling
from tailorlm.serve.scheduler import Event, Job, JobError


def test_a_job_arrives_whole():
    job = Job(
        user_id="ann:1",
        version=3,
        bank=1,
        prompt_ids=[5, 6, 7],
        emit=print,
        sampling=Sampling(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=(1 << 64) - 1, ignore_eos=True),
        stops=("\n", "END"),
        labels=("yes", "no"),
        prompt_text="Is it?",
    )
    message = pickle.loads(pickle.dumps(job_message(job)))
    arrived = job_from(message, emit=print)
    for name in Job.request_fields():
        assert getattr(arrived, name) == getattr(job, name), name
    assert set(Job.request_fields()) >= {"user_id", "version", "bank", "prompt_ids", "sampling", "labels"}


def test_an_error_event_arrives_whole():
    error = JobError("queue_full", "full", retry_after=1.0)
    arrived = event_from(pickle.loads(pickle.dumps(event_message(Event(error=error)))))
    assert (arrived.error.reason, arrived.error.message, arrived.error.retry_after) == (
        "queue_full",
        "full",
        1.0,
    )
