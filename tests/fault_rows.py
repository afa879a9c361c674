"""Rows of the fault matrix (``benchmarks/fault_matrix.py``).

A test that rebuilds one fault says which fault and what it expects with :func:`fault_row`, and
what it saw with :meth:`Row.observed`. Both land in the test's pytest ``user_properties``, which
the JUnit XML report (``--junitxml``) carries, so the script reads every row back from the same
run that checked it; the test's outcome is the row's verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Row:
    """One fault-matrix row being recorded on a pytest item."""

    node: Any

    def observed(self, text: str, lost_or_corrupt: str = "none") -> None:
        """Record what happened and which artifacts were lost or corrupt (``none`` when none)."""
        self.node.user_properties.append(("fault.observed", text))
        self.node.user_properties.append(("fault.lost_or_corrupt", lost_or_corrupt))


def fault_row(request: Any, fault: str, expected: str) -> Row:
    """Declare the test's fault-matrix row (``request`` is pytest's fixture request)."""
    request.node.user_properties.append(("fault", fault))
    request.node.user_properties.append(("fault.expected", expected))
    return Row(request.node)
