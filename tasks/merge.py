"""Merge step: element-wise max of amax per quantizer over calibration states.

Max is associative and commutative, so calibration can be split into any number of shards or
modalities, calibrated anywhere, and merged in any order with a bit-identical result. The merge
is strict (never warns): both sides must hold the same quantizers with the same shapes, weight
amax must be identical (they come from the same weights), and after merging every enabled input
quantizer must have a finite amax > 0.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from quantdag.calibration.plots import plot_amax_by_modality
from quantdag.calibration.quantizer_state import STATE_FILE, amax_summary, load_state, require_valid_inputs, save_state
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.prefect_task import quantdag_task

MERGED_KIND = "quantizer-state"


def merge_states(states: list[dict[str, Any]], labels: list[str] | None = None) -> dict[str, Any]:
    """Merge quantizer states by element-wise max of each amax (pure; inputs untouched).

    Args:
        states: two or more states from :func:`quantdag.calibration.quantizer_state.collect_state`; each
            ``amax`` value is a float32 tensor (scalar for per-tensor quantizers).
        labels: names for the states in error messages (default ``state0``, ``state1``...).

    Returns:
        A new state: the first state's ``modelopt_state``, the union of ``input_quantizers``, and
        ``amax[name] = max(state[name] for state in states)``; also ``sources``: per quantizer
        the label of the state that set the max (first wins ties), for the image-vs-text plot.

    Raises:
        ValueError: fewer than one state; quantizer sets or shapes differ (names listed); weight
            amax differ between states; an enabled input quantizer ends without a usable amax.
    """
    if not states:
        raise ValueError("merge_states needs at least one quantizer state")
    labels = labels or [f"state{i}" for i in range(len(states))]
    first_names = set(states[0]["amax"])
    for label, state in zip(labels[1:], states[1:]):
        names = set(state["amax"])
        if names != first_names:
            only_a, only_b = sorted(first_names - names), sorted(names - first_names)
            raise ValueError(
                f"quantizer sets differ: only in {labels[0]}: {only_a[:8]} ({len(only_a)}); "
                f"only in {label}: {only_b[:8]} ({len(only_b)}); calibrate both with the same recipe and base"
            )
        if set(state["input_quantizers"]) != set(states[0]["input_quantizers"]):
            raise ValueError(f"enabled input quantizers differ between {labels[0]} and {label}")
    merged: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    shape_errors, weight_errors = [], []
    for name in sorted(first_names):
        values = [state["amax"][name] for state in states]
        if any(v.shape != values[0].shape for v in values):
            shape_errors.append(f"{name}: {[tuple(v.shape) for v in values]}")
            continue
        if name.endswith("weight_quantizer") and any(not torch.equal(v, values[0]) for v in values[1:]):
            weight_errors.append(name)
            continue
        stacked = torch.stack([v.to(torch.float32) for v in values])
        merged[name] = stacked.amax(dim=0)
        sources[name] = labels[int(stacked.reshape(len(values), -1).amax(dim=1).argmax())]
    if shape_errors:
        raise ValueError("amax shapes differ:\n  " + "\n  ".join(shape_errors))
    if weight_errors:
        raise ValueError(
            f"weight amax differ between states for {len(weight_errors)} quantizers (e.g. {weight_errors[:5]}): "
            "the states were calibrated on different base weights"
        )
    result = {
        "modelopt_state": states[0]["modelopt_state"],
        "amax": merged,
        "input_quantizers": sorted(states[0]["input_quantizers"]),
        "sources": sources,
    }
    require_valid_inputs(result, where="merge_amax")
    return result


def amax_table(states: list[dict[str, Any]], labels: list[str], merged: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{quantizer, <label>..., merged, source}`` of the input amax (max over elements), for reports."""
    rows = []
    for name in merged["input_quantizers"]:
        row: dict[str, Any] = {"quantizer": name}
        for label, state in zip(labels, states):
            row[label] = float(state["amax"][name].max())
        row["merged"] = float(merged["amax"][name].max())
        row["source"] = merged["sources"].get(name)
        rows.append(row)
    return rows


def merge_amax(refs: dict[str, ArtifactRef], store: ArtifactStore) -> ArtifactRef:
    """Merge stored calibration states (label -> state artifact) into one stored state.

    Returns:
        A ``quantizer-state`` artifact with ``quantizer_state.pt``, ``amax_table.json`` (per input
        quantizer: each label's amax, the merged amax, which label set it) and
        ``amax_by_modality.png`` (that table as a per-layer plot).

    Raises:
        ValueError: see :func:`merge_states`; also when ``refs`` is empty.
    """
    if not refs:
        raise ValueError("merge_amax: no calibration states given")
    labels = list(refs)
    states = [load_state(store.local_dir(refs[label]) / STATE_FILE) for label in labels]
    merged = merge_states(states, labels)
    table = amax_table(states, labels, merged)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_state(merged, out)
        (out / "amax_table.json").write_text(json.dumps(table, indent=1))
        plot_amax_by_modality(table, labels, out / "amax_by_modality.png")
        # a metric name per source; MLflow allows no brackets: shard "text[1]" counts as "set_by_text.1"
        counts = {f"set_by_{label.replace('[', '.').rstrip(']')}": sum(1 for r in table if r["source"] == label)
                  for label in labels}
        return store.put_dir(out, MERGED_KIND, {"merged_from": labels, **counts, **amax_summary(merged)})


@quantdag_task("merge_amax")
def merge_amax_task(refs: dict[str, ArtifactRef], artifact_store: str, code_version: str) -> ArtifactRef:
    """Prefect wrapper of :func:`merge_amax`."""
    return merge_amax(refs, ArtifactStore(artifact_store))
