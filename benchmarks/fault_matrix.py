"""Fault matrix: inject every fault quantdag must survive, then print what was expected and what happened.

Each row is one test (listed in :data:`ROWS`) that rebuilds the fault from its description against
real Prefect, MLflow and S3 (moto) servers, asserts the expected outcome, and records the row with
``tests/fault_rows.py``. This script runs those tests in one pytest session (the service rows share
one deployed stack: a Prefect server, a process worker, an MLflow server, S3), reads the rows back
from pytest's JUnit XML report and prints one Markdown table: fault, expected, observed, artifacts
lost or corrupt (every published object compared with its manifest), and the test's verdict.

    .venv/bin/python -m benchmarks.fault_matrix              # every row (about 10 minutes on 2 cores)
    .venv/bin/python -m benchmarks.fault_matrix --no-service # the rows that need no deployed stack (about 3)
    .venv/bin/python -m benchmarks.fault_matrix --out rows.md -- -x   # after --: more pytest arguments

Exit status: 0 when every row passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICE = "tests/service/test_deployment.py"
ROWS = [
    "tests/quantdag/test_verified_hits.py::test_cached_result_with_damaged_artifact_recomputes_and_repairs",
    f"{SERVICE}::test_checkpoint_changed_in_the_store_after_its_audit_is_recomputed_not_registered",
    "tests/tasks/test_audit_binding.py::test_exclusions_edited_after_the_audit_are_never_registered",
    "tests/quantdag/test_store_integrity.py::test_writing_an_artifact_whose_stored_copy_is_damaged_replaces_it",
    "tests/tasks/test_fetch.py::test_truncated_png_fails_naming_subset_row_and_member_and_is_never_stored",
    "tests/tasks/test_fetch.py::test_a_mirror_changed_in_place_is_fetched_again",
    "tests/tasks/test_fetch.py::test_malformed_jsonl_line_names_the_file_and_the_line",
    "tests/tasks/test_fetch.py::test_missing_subset_names_the_subsets_the_mirror_has",
    "tests/quantdag/test_scan.py::test_nonfinite_tensors_are_named_from_the_files",
    "tests/quantdag/test_preflight_counts.py::test_too_few_held_out_rows_fail_the_preflight_naming_each_subset",
    "tests/flows/test_cli.py::test_a_credential_in_a_profile_url_is_refused_and_never_printed",
    "tests/flows/test_cli.py::test_temporary_api_ends_with_its_parent_on_kill_9",
    "tests/quantdag/test_reaper_liveness.py::test_killed_run_is_ended_killed_by_a_rerun_within_the_stale_window",
    f"{SERVICE}::test_kill_9_at_each_model_step_then_rerun_completes",
    "tests/quantdag/test_store_integrity.py::test_exception_in_the_middle_of_an_s3_write_leaves_no_artifact",
    f"{SERVICE}::test_two_identical_runs_at_once_compute_each_step_once",
    f"{SERVICE}::test_unreachable_s3_or_mlflow_fails_before_any_model_loads_naming_the_endpoint",
    f"{SERVICE}::test_secrets_never_reach_any_store",
]
"""Test node ids, one per row, in the order the table lists them."""


@dataclass
class Row:
    """One line of the table."""

    test: str
    fault: str
    expected: str
    observed: str
    lost_or_corrupt: str
    verdict: str


def read_rows(report: Path, nodes: list[str]) -> list[Row]:
    """The rows recorded in a JUnit XML report, in the order of ``nodes``; a test that did not
    record its row (it failed early, or did not run) still gets one, with its failure as observed."""
    found: dict[str, Row] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        props = {prop.get("name"): prop.get("value") for prop in case.iter("property")}
        file = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{file}::{case.get('name')}"
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        verdict = "pass" if problem is None else problem.tag.upper().replace("SKIPPED", "skipped")
        observed = props.get("fault.observed") or ((problem.get("message") or "").splitlines() or ["-"])[0][:200]
        found[node] = Row(node, props.get("fault", case.get("name")), props.get("fault.expected", "-"), observed,
                          props.get("fault.lost_or_corrupt", "-"), verdict)
    return [found.get(node) or Row(node, node.rsplit("::", 1)[1], "-", "not run", "-", "NOT RUN") for node in nodes]


def markdown(rows: list[Row]) -> str:
    """The table as Markdown (``|`` in cells escaped)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| fault | expected | observed | artifacts lost or corrupt | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {cell(r.fault)} | {cell(r.expected)} | {cell(r.observed)} | {cell(r.lost_or_corrupt)} | {r.verdict} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-service", action="store_true", help="skip the rows that need the deployed stack")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)
    nodes = [node for node in ROWS if not (args.no_service and node.startswith(SERVICE))]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *args.pytest_args, *nodes], cwd=REPO, check=False)
        rows = read_rows(report, nodes) if report.exists() else []
    table = markdown(rows)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0 if rows and all(row.verdict == "pass" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
