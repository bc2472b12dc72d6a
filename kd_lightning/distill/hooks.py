"""Forward hooks that capture intermediate feature maps by dotted module name (plain torch)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureHooks", "MissingFeatureError"]

_LIST_ALL_BELOW = 20


class MissingFeatureError(KeyError):
    """A hooked layer has no feature from the latest forward (KeyError, readable message)."""

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; this message is a sentence.
        return str(self.args[0]) if self.args else ""


class _FeatureMap(Mapping):
    """Read-only name -> output mapping whose missing keys explain why they are missing."""

    def __init__(self, data: dict[str, Any], names: tuple[str, ...], removed: bool) -> None:
        self._data = data
        self._names = names
        self._removed = removed

    def __getitem__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            pass
        if name not in self._names:
            raise MissingFeatureError(
                f"{name!r} is not a hooked layer; hooked: {', '.join(self._names)}"
            )
        if self._removed:
            raise MissingFeatureError(f"feature {name!r} unavailable: the hooks were removed")
        captured = ", ".join(self._data) or "none"
        raise MissingFeatureError(
            f"feature {name!r} was not captured by the latest forward (captured: {captured}); "
            f"features are cleared by clear() and at the start of every model forward"
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        shapes = {k: tuple(getattr(v, "shape", ())) for k, v in self._data.items()}
        return f"FeatureMap({shapes})"


def _unknown_layer_message(model: nn.Module, name: str) -> str:
    all_names = [n for n, _ in model.named_modules() if n]
    model_name = type(model).__name__
    if not all_names:
        return f"unknown layer {name!r} in {model_name}: it has no submodules"
    if len(all_names) <= _LIST_ALL_BELOW:
        valid = ", ".join(all_names)
    else:
        valid = ", ".join(n for n, _ in model.named_children())
        dotted = [n for n in all_names if "." in n]
        if dotted:
            valid += f" (and any dotted submodule such as {dotted[-1]})"
    close = difflib.get_close_matches(name, all_names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown layer {name!r} in {model_name}; valid: {valid}{hint}"


class FeatureHooks:
    """Capture the outputs of named submodules on every forward of ``model``.

    ``FeatureHooks(model, ["layer1", "layer4.1.conv2"])`` registers a forward hook on each module
    found by ``model.get_submodule(name)``. After a forward, ``hooks.features[name]`` is that
    module's output (tensors are kept as-is, with their autograd graph, so a student's features
    can carry gradients). A pre-hook on ``model`` empties the store at the start of every forward,
    so a feature never survives into a later forward (a layer skipped by the latest forward raises
    instead of returning a stale tensor); each hook overwrites its entry, never appends. Call
    ``clear()`` after each step to release the tensors (and their graphs) early, ``remove()`` to
    detach the hooks; usable as a context manager that removes them on exit.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureHooks expects an nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            raise ValueError(f"FeatureHooks expects a sequence of layer names, got str {names!r}")
        # Repeats are legal (two feature pairs may share a student layer): one hook per layer.
        names = tuple(dict.fromkeys(names))
        if not names:
            raise ValueError("FeatureHooks expects at least one layer name, got none")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"layer names must be non-empty strings, got {name!r}")
        modules = []
        for name in names:
            try:
                modules.append(model.get_submodule(name))
            except AttributeError:
                raise ValueError(_unknown_layer_message(model, name)) from None

        self.names: tuple[str, ...] = names
        self._store: dict[str, Any] = {}
        self._removed = False
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._on_model_forward)
        ]
        for name, module in zip(names, modules, strict=True):
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _on_model_forward(self, module: nn.Module, args: Any) -> None:
        self._store.clear()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._store[name] = output

        return hook

    @property
    def features(self) -> Mapping[str, Any]:
        """Snapshot of name -> output of the latest forward; a missing name raises KeyError."""
        return _FeatureMap(dict(self._store), self.names, self._removed)

    def clear(self) -> None:
        """Drop all captured features (call once per step so graphs are freed)."""
        self._store.clear()

    def remove(self) -> None:
        """Remove every hook and drop captured features; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()
        self._removed = True

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._store)} captured"
        return f"FeatureHooks({list(self.names)}, {state})"
