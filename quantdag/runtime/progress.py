"""Progress for long steps: a tqdm bar in the terminal and, inside a Prefect task run, a
Prefect progress artifact (shown on the run's page in the UI).
"""

from __future__ import annotations

import re
from typing import Any

from tqdm.auto import tqdm


def _artifact_key(text: str) -> str:
    # Prefect artifact keys allow only lowercase letters, digits and dashes.
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")


class Progress:
    """Count ``total`` units of a step.

    Args:
        description: shown next to the bar and as the artifact's description.
        total: number of units (rows, batches, files).
        key: Prefect artifact key stem; made Prefect-safe (lowercase letters, digits, dashes).
    """

    def __init__(self, description: str, total: int, key: str | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.bar = tqdm(total=total, desc=description, unit="row", dynamic_ncols=True)
        self._artifact_id: Any = None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is not None:
                self._artifact_id = create_progress_artifact(
                    progress=0.0, key=_artifact_key(key or description), description=description
                )
        except Exception:  # noqa: BLE001 - progress reporting must never fail a step
            self._artifact_id = None

    def update(self, units: int = 1) -> None:
        """Advance by ``units``; the Prefect artifact is updated about every 5 %."""
        self.done += units
        self.bar.update(units)
        if self._artifact_id is not None and (self.done == self.total or self.done % max(self.total // 20, 1) == 0):
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._artifact_id, progress=100.0 * self.done / self.total)
            except Exception:  # noqa: BLE001 - the API may be briefly unreachable; the bar still moves
                pass

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
