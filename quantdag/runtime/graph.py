"""How a flow's steps are drawn in Prefect's run graph: edges only where data really flows.

Prefect draws an edge from task A to task B when B receives a future of A, or an object that A
returned: it remembers each result, and each item one level inside it, by ``id()``. Strings are
remembered too, so a step that returns a profile's strings (the artifact store URI) or a model
whose fields hold the same interned constants (``"main"``) gets an edge into every later step
that receives those strings, whether or not it uses A's result. :func:`detached` gives a flow a
copy of such a result that Prefect does not know; the flow states the dependency that is real
with ``wait_for``.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def detached(value: M) -> M:
    """An equal copy of a task's pydantic result that shares no object with it (JSON round trip).

    Cache keys do not change: Prefect hashes inputs by value. Use it for a result that many
    steps take as configuration (the resolved base), and give the first consumer ``wait_for``.

    Raises:
        TypeError: ``value`` is not a pydantic model.
    """
    if not isinstance(value, BaseModel):
        raise TypeError(f"detached() takes a pydantic model (a step's reference), got {type(value).__name__}")
    return type(value).model_validate(json.loads(value.model_dump_json()))  # json.loads: new str objects
