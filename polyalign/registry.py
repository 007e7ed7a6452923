"""A small typed registry (lm-evaluation-harness style): decorator registration, duplicate
errors, lazy ``module:object`` targets and "did you mean" suggestions."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from polyalign.errors import PolyalignError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, hint: str = ""):
        self.kind, self.hint = kind, hint      # hint: where the user can see the names, e.g. a command
        self._items: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """Register ``obj`` under ``name``; used bare as a decorator when ``obj`` is None.

        ``obj`` may be a ``"module:attr"`` string, imported only on first lookup.
        """
        def add(item: T | str):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        if obj is None:
            return add
        add(obj)
        return None

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            where = f" ({self.hint})" if self.hint else ""
            raise PolyalignError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}{where}.{hint}")
        item = self._items[name]
        if isinstance(item, str) and ":" in item:
            module, attr = item.split(":", 1)
            item = getattr(importlib.import_module(module), attr)
            self._items[name] = item
        return item  # type: ignore[return-value]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
