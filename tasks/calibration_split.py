"""How calibration splits into calls of ``tasks.calibrate.calibrate``, and what each call's states are named.

A branch (``image_text``, ``text``) may be split into ``source.shards`` shards: shard ``i`` of
``n`` calibrates on the branch's rows ``i::n``. One call calibrates one or more (branch, shard)
*units* on ONE model load, one after another, and returns a state per unit, labelled
:func:`branch_label`. Max is exact in any order, so however the units are grouped into calls and
wherever the calls run, the merged amax are the same bits.
"""

from __future__ import annotations

from typing import Any

Shard = tuple[int, int]
"""``(shard, num_shards)``: a branch calibrates on its rows ``shard::num_shards``."""

Shards = Shard | list[Shard]
"""One shard of a branch, or several of them calibrated one after another on the same load."""

Unit = tuple[str, int, int]
"""``(kind, shard, num_shards)``: one state a call writes."""


def branch_label(kind: str, shard: int = 0, num_shards: int = 1) -> str:
    """The label of a branch's state: ``kind``, or ``kind[shard]`` when the branch has several shards.

    Merge labels its inputs with it (metric ``set_by_text.1`` for ``text[1]``) and the flow logs
    each state as the MLflow child run ``calibrate_<label>``.
    """
    return kind if num_shards == 1 else f"{kind}[{shard}]"


def shard_units(kinds: Any, shards: dict[str, Shards] | None) -> list[Unit]:
    """The units of one call, in branch order, then shard order as given.

    Args:
        kinds: the call's branch kinds, in order (the keys of its ``rows``).
        shards: kind -> ``(shard, num_shards)``, or a list of them; a kind not named runs whole
            (``(0, 1)``). JSON lists (``[0, 2]``, ``[[0, 2], [2, 2]]``) are read as tuples.
    """
    units = []
    for kind in kinds:
        value = (shards or {}).get(kind, (0, 1))
        listed = list(value) if value and isinstance(value[0], list | tuple) else [value]
        units += [(kind, int(shard), int(count)) for shard, count in listed]
    return units


def call_labels(kinds: Any, shards: dict[str, Shards] | None) -> list[str]:
    """The labels of the states one call returns (:func:`branch_label` of each unit)."""
    return [branch_label(kind, shard, count) for kind, shard, count in shard_units(kinds, shards)]


def check_call(rows: dict[str, Any], sources: dict[str, Any], shards: dict[str, Shards], kinds: Any) -> None:
    """Raise ValueError naming every unknown kind, missing source and bad shard of one call.

    Args:
        rows: kind -> rows artifact.
        sources: kind -> source settings.
        shards: kind -> shard(s) (see :func:`shard_units`).
        kinds: the kinds a calibrator exists for.
    """
    problems = [] if rows else ["no branch to calibrate"]
    problems += [f"unknown calibration kind {kind!r} (kinds: {sorted(kinds)})" for kind in rows if kind not in kinds]
    problems += [f"branch {kind!r} has rows but no source" for kind in rows if kind not in sources]
    problems += [f"shards given for {kind!r}, which has no rows" for kind in shards if kind not in rows]
    units = shard_units(list(shards), shards)
    problems += [f"{kind}: shard {shard} is outside range(num_shards={count})"
                 for kind, shard, count in units if not 0 <= shard < count]
    problems += [f"{kind}: shard {shard} of {count} is listed twice" for i, (kind, shard, count) in enumerate(units)
                 if (kind, shard, count) in units[:i]]
    if problems:
        raise ValueError("calibrate: " + "; ".join(problems))


def calibration_calls(num_shards: dict[str, int], gpus: int, per_shard: bool = False) -> list[dict[str, Shards]]:
    """How calibration splits into calls of ``calibrate``, each a task that loads the model once.

    Args:
        num_shards: branch kind -> its number of shards (``source.shards``), in branch order.
        gpus: ``calibration_gpus``, how many calls may run at once.
        per_shard: one call per unit whatever ``gpus`` is (each shard a flow run of a work pool).

    Returns:
        The ``shards`` argument of each call:

        - ``gpus`` 1, no branch sharded (and not ``per_shard``): every branch in ONE call (one
          model load for all);
        - ``gpus`` 1 with shards, or ``per_shard``: one call per branch shard, ``{kind: (i, n)}``;
        - ``gpus`` N > 1: ``min(N, units)`` calls, one per GPU, the units dealt round-robin in
          branch order (``image_text[0], image_text[1], text[0], text[1]`` on 2 GPUs: each GPU
          gets one image-text and one text shard); a call keeps its model for all its units, and
          a branch with several shards in one call lists them (``{"text": [(0, 4), (2, 4)]}``).
    """
    units = [(kind, shard, count) for kind, count in num_shards.items() for shard in range(count)]
    if gpus == 1 and not per_shard and all(count == 1 for count in num_shards.values()):
        return [{kind: (0, 1) for kind in num_shards}]
    if gpus == 1 or per_shard:
        return [{kind: (shard, count)} for kind, shard, count in units]
    calls = []
    for group in range(min(gpus, len(units))):
        call: dict[str, list[Shard]] = {}
        for kind, shard, count in units[group::gpus]:
            call.setdefault(kind, []).append((shard, count))
        calls.append({kind: listed[0] if len(listed) == 1 else listed for kind, listed in call.items()})
    return calls
