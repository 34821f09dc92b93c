"""Name -> builder registries, filled by a decorator next to each builder (as torchvision's
`register_model`): the names a config may use are exactly the registered ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Builders by name; `what` says what they build, for the error on a second registration."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def add(self, name: str, entry: T) -> None:
        if name in self:
            raise ValueError(f"two {self.what}s are registered as '{name}'")
        self[name] = entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorate
