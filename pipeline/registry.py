"""Name -> builder registries, filled by a decorator next to each builder (as torchvision's
`register_model`). Where the builders import torch, the names a config may use are declared as
data in `pipeline.config` (heads), so a config is checked without importing them; such a
registry refuses any other name. An open registry declares nothing: the data sources (light
enough for config validation to import) and the backbones (the zoo registers itself, checked
when a model is built) allow the names registered."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Builders by name; `what` says what they build, `names` are the declared ones (None: any
    name may be registered)."""

    def __init__(self, what: str, names: Iterable[str] | None = None) -> None:
        super().__init__()
        self.what = what
        self.names = None if names is None else tuple(names)

    def add(self, name: str, entry: T) -> None:
        if self.names is not None and name not in self.names:
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
