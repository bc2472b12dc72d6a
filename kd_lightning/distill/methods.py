"""The interface DistillModule composes the compared methods through (plain torch, no Lightning).

Each method (FitNets, AT, DKD, RKD, CRD) is one ``nn.Module`` subclass of :class:`DistillMethod`,
built by Hydra from its ``_target_`` and handed to ``DistillModule(methods={key: method})``. The
module hooks the layers a method names, runs one probe forward to tell it the feature shapes
(:meth:`DistillMethod.build`, where learned parts such as connectors are created), tells it the
training set (:meth:`DistillMethod.bind_data`, CRD only) and, every training step, asks it for its
loss terms (:meth:`DistillMethod.terms`): ``{term: (weight, unweighted value)}``. The module adds
``weight * value`` to the loss and logs each value as ``train/<key>_<term>`` (``train/<key>`` for
a term named ""). Learned parts are submodules of the method, so they are trained, checkpointed and
left out of the deployable student by the module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DistillInputs",
    "DistillMethod",
    "check_choice",
    "check_weight",
    "pool_to_common",
    "refuse_unknown",
]


@dataclass
class DistillInputs:
    """What one training step gives each method.

    ``student``/``teacher``: hooked layer name -> output of the latest forward (teacher's under
    no_grad). ``logits_s``/``logits_t`` (B, K), ``targets`` (B,) int64, ``indices`` (B,) int64
    dataset positions or None when the batch has none, ``epoch`` the 0-based training epoch.
    """

    student: Mapping[str, Tensor]
    teacher: Mapping[str, Tensor]
    logits_s: Tensor
    logits_t: Tensor
    targets: Tensor
    indices: Tensor | None = None
    epoch: int = 0


class DistillMethod(nn.Module):
    """Base class: override the layer lists, :meth:`build`/:meth:`bind_data` when needed, and
    :meth:`terms`. ``requires_index`` methods need batches (images, targets, indices)."""

    requires_index: bool = False

    def student_layers(self) -> tuple[str, ...]:
        return ()

    def teacher_layers(self) -> tuple[str, ...]:
        return ()

    def build(
        self,
        student_shapes: Mapping[str, torch.Size],
        teacher_shapes: Mapping[str, torch.Size],
        num_classes: int,
    ) -> None:
        """Create learned parts and refuse shapes that cannot work, before training."""

    def bind_data(self, dataset: Any) -> None:
        """Called with the training dataset before fitting (CRD sizes its memory from it)."""

    def terms(self, inputs: DistillInputs) -> dict[str, tuple[float, Tensor]]:
        raise NotImplementedError


def check_weight(owner: str, key: str, value: Any, *, positive: bool = False) -> float:
    """A finite number >= 0 (> 0 when ``positive``), else one-line ValueError naming the key."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{owner} {key}={value!r}: expected a finite number {bound}")
    return float(value)


def check_choice(owner: str, key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {owner} {key}={value!r}; valid: {', '.join(valid)}")
    return value


def refuse_unknown(owner: str, unknown: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    """Constructors take ``**unknown`` so a misspelt option is a ValueError, not a TypeError."""
    if unknown:
        given = ", ".join(f"{k}={v!r}" for k, v in unknown.items())
        raise ValueError(f"unknown {owner} option {given}; valid: {', '.join(valid)}")


def check_pairs(owner: str, pairs: Any) -> list[dict[str, str]]:
    """[{student: name, teacher: name}, ...], at least one."""
    if isinstance(pairs, (str, Mapping)) or not pairs:
        raise ValueError(
            f"{owner} pairs={pairs!r}: expected a non-empty list of {{student, teacher}} layers"
        )
    out = []
    for pair in pairs:
        if not isinstance(pair, Mapping) or set(pair) != {"student", "teacher"}:
            raise ValueError(
                f"{owner} pairs entry {pair!r}: expected {{student: <layer>, teacher: <layer>}}"
            )
        out.append({"student": str(pair["student"]), "teacher": str(pair["teacher"])})
    return out


def pool_to_common(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever 4-D map is larger, per axis, to the common smaller size."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if tuple(a.shape[2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def flat_embedding(owner: str, name: str, x: Tensor) -> Tensor:
    """(B, D) or (B, D, 1, ...) pooled features -> (B, D); anything else is refused."""
    if x.dim() > 2 and all(s == 1 for s in x.shape[2:]):
        x = x.flatten(1)
    if x.dim() != 2:
        raise ValueError(
            f"{owner} layer {name!r} gives shape {tuple(x.shape)}; expected pooled features "
            "(B, D) or (B, D, 1, 1), e.g. 'avgpool' (the features before fc)"
        )
    return x
