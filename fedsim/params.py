"""Declared parameter constraints and the one validator that enforces them (scikit-learn's ``_parameter_constraints``).

A settings dataclass (a strategy's ``[strategy]`` table, a scenario section) declares what each field may hold once::

    @dataclass
    class AFLParams:
        gamma: float = 1.0
        target: str = "ridge"
        _parameter_constraints = {"gamma": [Interval(0, None, closed="neither")], "target": [Options(TARGETS)]}

and ``validate_params(obj, "strategy")`` raises a ``ConfigError`` naming the first offending field, its value and
what is allowed, in the words every fedsim error uses (``strategy.gamma: -1.0 is out of range; it must be a finite
number > 0``). A field may list several constraints: it is valid when one of them accepts it (``None`` in the list
admits an unset value). Cross-field rules stay in an optional ``check(path)`` method of the dataclass.
Nothing here imports torch or Flower: validating a scenario must stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedsim.errors import ConfigError

__all__ = ["Interval", "Options", "validate_params", "check_choice", "check_range"]


@dataclass(frozen=True)
class Interval:
    """``low <= value <= high`` (bounds per ``closed``; ``None`` = unbounded), finite, integral if ``integer``."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both" | "left" | "right" | "neither"
    integer: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.low is not None and (value < self.low or (value == self.low and not left)):
            return False
        if self.high is not None and (value > self.high or (value == self.high and not right)):
            return False
        return True

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        lo_op = ">=" if self.closed in ("both", "left") else ">"
        hi_op = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            if not self.integer and self.low == 0 and self.high == 1:
                return f"it must lie in {'[' if lo_op == '>=' else '('}0, 1{']' if hi_op == '<=' else ')'}"
            return f"it must be {kind} {lo_op} {_num(self.low)} and {hi_op} {_num(self.high)}"
        if self.low is not None:
            return f"it must be {kind} {lo_op} {_num(self.low)}"
        if self.high is not None:
            return f"it must be {kind} {hi_op} {_num(self.high)}"
        return f"it must be {kind}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple

    def __init__(self, values: Iterable[Any]) -> None:
        object.__setattr__(self, "values", tuple(values))

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def describe(self) -> str:
        return f"choose one of {', '.join(map(repr, self.values))}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def check_range(path: str, value: Any, constraint: Interval) -> None:
    """Raise the standard out-of-range error unless ``constraint`` accepts ``value``."""
    if not constraint.accepts(value):
        raise ConfigError(f"{path}: {value!r} is out of range; {constraint.describe()}")


def check_choice(path: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise the standard not-allowed error unless ``value`` is one of ``allowed``."""
    options = Options(allowed)
    if not options.accepts(value):
        raise ConfigError(f"{path}: {value!r} is not allowed; {options.describe()}")


def constraints_of(cls: type) -> dict[str, list]:
    """The merged ``_parameter_constraints`` of ``cls`` and its bases (a subclass may add or override fields)."""
    merged: dict[str, list] = {}
    for klass in reversed(cls.__mro__):
        merged.update(getattr(klass, "_parameter_constraints", None) or {})
    return merged


def validate_params(obj: Any, path: str) -> None:
    """Check every declared constraint of ``obj``'s fields, then its optional ``check(path)`` cross-field rules."""
    for name, allowed in constraints_of(type(obj)).items():
        value = getattr(obj, name)
        if value is None and None in allowed:
            continue
        rules = [c for c in allowed if c is not None]
        if any(rule.accepts(value) for rule in rules):
            continue
        field = f"{path}.{name}"
        if value is None:
            raise ConfigError(f"{field}: must be set; {rules[0].describe()}")
        first = rules[0]
        if isinstance(first, Options):
            raise ConfigError(f"{field}: {value!r} is not allowed; {first.describe()}")
        unset = " or left unset" if None in allowed else ""
        raise ConfigError(f"{field}: {value!r} is out of range; {first.describe()}{unset}")
    check = getattr(obj, "check", None)
    if callable(check):
        check(path)
