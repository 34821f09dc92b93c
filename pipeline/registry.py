"""Name -> builder registries, filled by a decorator next to each builder (as torchvision's
`register_model`). The names a config may use are declared as data in `pipeline.config`, so a
config is checked without importing the builders (torch); a registry refuses any other name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Builders by name; `what` says what they build, `names` are the declared ones."""

    def __init__(self, what: str, names: Iterable[str]) -> None:
        super().__init__()
        self.what = what
        self.names = tuple(names)

    def add(self, name: str, entry: T) -> None:
        if name not in self.names:
            raise ValueError(
                f"{self.what} '{name}' is not declared in pipeline.config: add it to the names "
                f"there ({', '.join(self.names)})"
            )
        if name in self:
            raise ValueError(f"two {self.what}s are registered as '{name}'")
        self[name] = entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorate
