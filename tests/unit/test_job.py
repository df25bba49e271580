from __future__ import annotations

import json
import re

import pytest

from serve_app.errors import IllegalTransition
from serve_app.jobs.job import Job, JobResult, JobStatus, Phase, iso, new_job_id
from serve_app.messages import JobType


def make_job() -> Job:
    return Job(id="job_1_abc", type=JobType.TEXT2IMG, model="tiny-sd",
               request={"prompt": "x"}, created_at_ms=1_699_363_200_000)


def result() -> JobResult:
    return JobResult(images=["data:image/png;base64,AA=="], seeds=[42], parameters={},
                     time_taken_ms=10, content_type="image/png")


def test_job_ids_have_the_seed_shape() -> None:
    assert re.fullmatch(r"job_1699363200000_[a-z0-9]{9}", new_job_id(1_699_363_200_000))
    assert new_job_id(1) != new_job_id(1)


def test_timestamps_render_as_iso_with_milliseconds() -> None:
    assert iso(1_699_363_200_000) == "2023-11-07T13:20:00.000Z"
    assert iso(1_699_363_200_042) == "2023-11-07T13:20:00.042Z"


def test_terminal_statuses() -> None:
    assert {s for s in JobStatus if s.is_terminal()} == {
        JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}


def test_happy_path_stamps_each_transition() -> None:
    job = make_job()
    job.start(1_699_363_205_000, "r1")
    job.report_progress(15, 30)
    assert (job.status, job.progress, job.attempts) == (JobStatus.PROCESSING, 50, 1)
    job.report_progress(30, 30)
    assert job.progress == 99  # 100 only once the images exist
    job.complete(result(), 1_699_363_220_000)
    wire = job.to_wire()
    assert wire["status"] == "completed" and wire["progress"] == 100
    assert wire["startedAt"] == "2023-11-07T13:20:05.000Z"
    assert wire["completedAt"] == "2023-11-07T13:20:20.000Z"
    assert wire["result"]["seed"] == 42 and wire["result"]["timeTaken"] == 10


def test_submit_record_has_the_seed_fields() -> None:
    wire = make_job().to_wire(queue_position=1)
    assert {"id", "type", "status", "request", "createdAt", "progress"} <= wire.keys()
    assert (wire["status"], wire["progress"], wire["queuePosition"]) == ("queued", 0, 1)
    assert "result" not in wire and "startedAt" not in wire


def test_progress_never_goes_backwards() -> None:
    job = make_job()
    job.start(0)
    job.report_progress(20, 30)
    job.report_progress(10, 30)
    assert job.progress == 66


def test_a_hires_fixs_second_pass_shows_as_its_phase() -> None:
    job = make_job()
    job.start(0)
    job.report_progress(3, 7)
    assert job.to_wire()["phase"] == "generating"
    job.report_progress(4, 7, phase="hires")
    assert (job.phase, job.to_wire()["phase"], job.progress) == (Phase.HIRES, "hires", 57)
    job.report_progress(5, 7)  # a coalesced step without its phase does not go back
    assert job.phase is Phase.HIRES
    job.complete(result(), 1)
    assert job.phase is None


def test_cancel_keeps_progress_where_it_stopped() -> None:
    job = make_job()
    job.start(0)
    job.report_progress(12, 30)
    job.cancel(5)
    assert (job.status, job.progress) == (JobStatus.CANCELLED, 40)


@pytest.mark.parametrize("status_after", ["complete", "fail", "cancel"])
def test_terminal_jobs_refuse_every_transition(status_after: str) -> None:
    job = make_job()
    job.start(0)
    {"complete": lambda: job.complete(result(), 1), "fail": lambda: job.fail("x", 1),
     "cancel": lambda: job.cancel(1)}[status_after]()
    for attempt in (lambda: job.start(2), lambda: job.cancel(2), lambda: job.fail("y", 2),
                    lambda: job.complete(result(), 2), lambda: job.requeue("z")):
        with pytest.raises(IllegalTransition):
            attempt()


def test_queued_job_cannot_complete_or_report_progress() -> None:
    job = make_job()
    with pytest.raises(IllegalTransition):
        job.complete(result(), 1)
    with pytest.raises(IllegalTransition):
        job.report_progress(1, 2)


def test_requeue_resets_the_run_but_counts_the_attempt() -> None:
    job = make_job()
    job.start(10, "r1")
    job.report_progress(5, 10)
    job.requeue("replica died")
    assert (job.status, job.progress, job.started_at_ms, job.attempts) == (
        JobStatus.QUEUED, 0, None, 1)
    assert (job.phase, job.retry_reason) == (Phase.RETRYING, "replica died")
    wire = job.to_wire()
    assert (wire["phase"], wire["retryReason"]) == ("retrying", "replica died")


def test_summary_has_no_payloads() -> None:
    job = make_job()
    job.start(0)
    job.complete(result(), 1)
    summary = job.summary()
    assert "result" not in summary and "request" not in summary
    assert summary["status"] == "completed"


def test_a_preview_shows_while_running_is_not_stored_and_goes_with_the_run() -> None:
    from serve_app.jobs.codec import dumps, loads
    from serve_app.jobs.job import Preview

    job = make_job()
    job.start(0, "r1")
    job.report_progress(2, 8, Preview(2, "data:image/jpeg;base64,AA=="))
    job.report_progress(3, 8)  # a step without a thumbnail keeps the last one
    assert job.to_wire()["preview"] == {"step": 2, "image": "data:image/jpeg;base64,AA=="}
    assert "preview" not in dumps(job) and loads(dumps(job)).preview is None
    job.requeue("replica lost")
    assert "preview" not in job.to_wire()
    job.start(1, "r2")
    job.report_progress(4, 8, Preview(4, "data:image/jpeg;base64,AQ=="))
    job.complete(result(), 2)
    assert "preview" not in job.to_wire()


def test_records_round_trip_through_the_fast_encoder_and_what_it_refuses_still_encodes(
) -> None:
    from serve_app.jobs import jsontext
    from serve_app.jobs.codec import dumps, loads

    job = make_job()
    job.request["note"] = "ünïcode ✓ and \"quotes\""
    job.request["huge"] = 2**80 + 1  # beyond orjson's 64 bits, and not exact as a float
    text = dumps(job)
    assert loads(text).request == job.request
    assert json.loads(text)["request"]["huge"] == 2**80 + 1
    # A record written by the standard library with a NaN in it still loads.
    assert jsontext.loads('{"x": NaN, "y": [1, 2]}')["y"] == [1, 2]
    assert jsontext.dumps({"a": [1, "b"]}) == b'{"a":[1,"b"]}'
