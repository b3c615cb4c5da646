"""What the infotext notes and the console summary say about a generation's schedule and updates."""

from __future__ import annotations

from clora_ext.records import StepRecord, update_summary
from clora_ext.update import Schedule, schedule_notes


def test_paper_schedule_needs_no_note():
    assert schedule_notes(Schedule(), 20) == []
    assert schedule_notes(Schedule(), 50) == []


def test_refine_points_past_the_update_fraction_are_named():
    (note,) = schedule_notes(Schedule(update_fraction=0.3, refine_at=(0.0, 0.2, 0.4, 0.8)), 20)
    assert "refine at 0.4, 0.8" in note and "update fraction 0.3" in note
    # no refinement asked for: nothing to say
    assert schedule_notes(Schedule(update_fraction=0.3, refine_at=(0.8,), refine_iterations=0), 20) == []


def test_a_single_content_subject_says_no_update_runs():
    (note,) = schedule_notes(Schedule(), 20, content_concepts=1)
    assert "one content subject" in note and "no latent update" in note


def test_a_sampler_running_one_step_fewer_is_said():
    (note,) = schedule_notes(Schedule(), 20, model_calls=19)
    assert "19 model steps for 20 steps" in note and "first 10 of the 19" in note


def _record(step: int, losses: dict[int, list[float]], after: list[float], updates: dict[int, int]) -> StepRecord:
    return StepRecord(step, iterations=max(updates.values(), default=0), image_losses=losses,
                      image_updates=updates, image_loss_after=after, loss_after=sum(after))


def test_summary_compares_each_image_at_the_same_step():
    records = [
        _record(0, {0: [2.0, 1.9, 1.8], 1: [3.0, 2.5]}, [1.7, 2.4], {0: 2, 1: 1}),
        _record(1, {0: [1.6], 1: [2.2]}, [1.5, 2.0], {0: 1, 1: 1}),
        StepRecord(2, image_loss_after=[1.4, 1.9], loss_after=3.3),  # no update: not in the summary
    ]
    one, two = update_summary(records)
    assert one.startswith("image 1: contrastive loss 2.0000 -> 1.7000 at step 1 (2 updates)")
    assert "mean 1.8000 -> 1.6000 over its 2 update steps (3 updates kept)" in one
    assert two.startswith("image 2: contrastive loss 3.0000 -> 2.4000 at step 1 (1 updates)")


def test_summary_names_batch_images_of_a_partial_step():
    record = _record(0, {0: [2.0]}, [1.5], {0: 1})
    record.batch_images = [2]
    (line,) = update_summary([record])
    assert line.startswith("image 3:")
