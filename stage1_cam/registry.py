"""A small name -> builder registry with listing and helpful unknown-name errors."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, TypeVar

from .utils.cli import UnknownNameError

T = TypeVar("T", bound=Callable[..., Any])


class Registry:
    """Maps names to callables (classes or factory functions).

    Example:
        >>> CAM_SOURCES = Registry("CAM source")
        >>> @CAM_SOURCES.register("clip_es_gradcam")
        ... def build(...): ...
        >>> CAM_SOURCES.build("clip_es_gradcam", **kwargs)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items)) or '(none registered)'}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def list_names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


# The project's registries live here, in a module that imports nothing from the package, so that a module that
# registers a member and the package that lists them never import each other.
CAM_SOURCES = Registry("CAM source")  # members: stage1_cam.cams
HEADS = Registry("head")  # members: stage1_cam.heads
