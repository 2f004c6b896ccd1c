"""The small scikit-learn-style base every learner shares: parameters, a fitted check and a repr.

Learners (AFL's aggregate, AEF-OCL's recursive learner, DPCR's reconstruction, recursive least squares) follow
scikit-learn's conventions: constructor arguments are stored as given and do no work, learned state lives in
attributes ending in ``_``. ``BaseLearner`` writes the parts each of them would otherwise rewrite:

- ``get_params()``: the constructor arguments by name (read from ``__init__``'s signature);
- ``is_fitted``: whether the attribute named by ``_fitted_attribute`` exists (set by the first ``partial_fit``);
- ``_check_fitted()``: raises ``NotFittedError`` (a ``RuntimeError``) naming the learner and what to call first;
- ``__repr__``: ``Name(param=value, ...)`` over ``_repr_params`` (default: every constructor argument), plus
  ``_repr_state()`` (for example ``dim=..., num_classes=...`` once fitted).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

__all__ = ["BaseLearner", "NotFittedError"]


class NotFittedError(RuntimeError):
    """A learner was asked for what only a fitted learner has (coefficients, predictions, statistics)."""


class BaseLearner:
    """Base of fedsim's learners (see the module docstring)."""

    #: the attribute whose presence means "fitted" (set by the first ``partial_fit``/``fit``/``merge``)
    _fitted_attribute: ClassVar[str] = "coef_"
    #: what the ``NotFittedError`` message tells the user to call
    _fit_hint: ClassVar[str] = "call partial_fit"
    #: the parameters ``__repr__`` shows (None: every constructor argument, in signature order)
    _repr_params: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [name for name, p in signature.parameters.items()
                if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments as stored (scikit-learn's ``get_params(deep=False)``)."""
        return {name: getattr(self, name) for name in self._param_names()}

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, self._fitted_attribute)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} has seen no data yet ({self._fit_hint})")

    def _repr_state(self) -> str:
        """Extra ``key=value`` text for ``__repr__`` (e.g. shapes once fitted); empty by default."""
        return ""

    def __repr__(self) -> str:
        names = self._repr_params if self._repr_params is not None else tuple(self._param_names())
        parts = [f"{name}={getattr(self, name)!r}" for name in names]
        state = self._repr_state()
        return f"{type(self).__name__}({', '.join(parts + ([state] if state else []))})"
