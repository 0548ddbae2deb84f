"""Per-field numeric bounds of the typed configs, declared on the field and checked in one place.

`bounded(default, ge=0)` is a dataclass field whose value must lie within the bounds when it is set
(None passes: an optional key left empty); `check_bounds(obj)` lists the fields of a dataclass
instance that break theirs. `annomine.config.from_dict` calls it for every section it builds, so a
setting that cannot mean anything is refused at config time with the key in the message.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

BOUNDS = "bounds"  # the field-metadata key


@dataclass(frozen=True)
class Bounds:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        parts = [f"{op} {_number(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, metadata: dict | None = None) -> Any:
    """A dataclass field with `default` whose value (each value, for a dict or list) must satisfy the bounds."""
    meta = {**(metadata or {}), BOUNDS: Bounds(ge=ge, gt=gt, le=le, lt=lt)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _values(value: Any) -> list:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def check_bounds(obj: Any) -> list[tuple[str, str]]:
    """(key, 'must be >= 1, got 0') for each bounded field of dataclass `obj` whose value is out of bounds."""
    problems = []
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get(BOUNDS)
        if bounds is None:
            continue
        value = getattr(obj, f.name)
        bad = [v for v in _values(value) if v is not None and not isinstance(v, bool) and not bounds.admits(v)]
        if bad:
            problems.append((f.name, f"must be {bounds.describe()}, got {value!r}"))
    return problems
