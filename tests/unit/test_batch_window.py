"""BatchWindow: the wait is 5% of the job's expected run time, capped, learned."""

from __future__ import annotations

import dataclasses

import pytest

from serve_app.jobs.batch_window import WAIT_FRACTION, BatchWindow
from serve_app.messages import GenerationTask
from tests.support.generation import make_task


def task(steps: int = 20, size: int = 1000, num_images: int = 1) -> GenerationTask:
    return make_task(steps=steps, width=size, height=size, num_images=num_images)


def test_no_wait_before_any_call_finished_or_when_turned_off() -> None:
    assert BatchWindow(max_wait_ms=50).wait_ms(task()) == 0
    off = BatchWindow(max_wait_ms=0)
    off.observe([task()], 1000)
    assert off.wait_ms(task()) == 0


def test_the_wait_is_a_fraction_of_the_expected_run_time_up_to_the_cap() -> None:
    window = BatchWindow(max_wait_ms=50)
    window.observe([task(steps=20)], 200)  # 10 ms per step at 1 megapixel
    assert window.wait_ms(task(steps=20)) == pytest.approx(WAIT_FRACTION * 200)
    assert window.wait_ms(task(steps=1, size=500)) == pytest.approx(WAIT_FRACTION * 2.5)
    assert window.wait_ms(task(steps=200)) == 50  # 2 s expected: capped


def test_a_batched_call_counts_all_its_work_and_estimates_follow_new_calls() -> None:
    window = BatchWindow(max_wait_ms=1e9)
    window.observe([task(), dataclasses.replace(task(), num_images=3)], 800)  # 80 units
    assert window.ms_per_unit == pytest.approx(10)
    window.observe([task()], 400)  # 20 ms per unit now
    assert 10 < (window.ms_per_unit or 0) < 20
    window.observe([task()], 0)  # nothing measured: ignored
    assert 10 < (window.ms_per_unit or 0) < 20


def test_a_hires_job_is_expected_to_cost_both_passes() -> None:
    from serve_app.messages import HiresFix

    window = BatchWindow(max_wait_ms=1e9)
    window.observe([task(steps=20)], 200)  # 10 ms per megapixel-step
    # 20 steps at 1 MP, then int(10 x 0.5) = 5 steps at 4 MP: 40 units, 400 ms expected.
    hires = dataclasses.replace(task(steps=20), hires=HiresFix(2000, 2000, "latent", 10, 0.5,
                                                               "euler_a"))
    assert window.wait_ms(hires) == pytest.approx(WAIT_FRACTION * 400)
