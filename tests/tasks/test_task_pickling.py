"""Model tasks travel to worker processes (``ProcessPoolTaskRunner`` pickles them by value)."""

from __future__ import annotations

import cloudpickle
import pytest

from tasks.calibrate import calibrate_task
from tasks.evaluate import evaluate_task
from tasks.reference import bf16_reference_task
from tasks.export import export_task
from quantdag.runtime.prefect_task import MODEL_LOCK


@pytest.mark.parametrize("task", [bf16_reference_task, calibrate_task, export_task, evaluate_task], ids=lambda t: t.name)
def test_model_task_pickles_after_this_process_used_its_lock(task) -> None:
    with MODEL_LOCK:  # the lock exists and is held: a wrapper that captured it could not be pickled
        restored = cloudpickle.loads(cloudpickle.dumps(task))
    assert restored.name == task.name and restored.fn.__wrapped__.__name__ == task.fn.__wrapped__.__name__
