"""Feature-map methods NST is compared with: FitNets hints and Attention Transfer.

FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550)
----------------------------------------------------------------------------------
Student hint map ``f_s`` (B, C_s, H, W), teacher guided map ``f_t`` (B, C_t, H', W'), a learned
connector r (the paper's regressor):

    L_hint = mean over B*C_t*h*w of (pool(r(f_s)) - pool(f_t))^2

(``F.mse_loss`` mean, as RepDistiller/mdistiller; the paper writes 1/2 |.|^2 summed). Choices:

* Connector (``connector``): ``conv_bn`` (default) 1x1 conv C_s -> C_t + BatchNorm(C_t);
  ``conv_bn_relu`` adds the ReLU of RepDistiller/mdistiller; ``conv`` the bare 1x1 conv (the
  paper's convolutional regressor); ``identity`` none (needs C_s == C_t). The reference code picks
  3x3 stride-2 / 4x4 transposed / (1+dH)x(1+dW) convs by the spatial ratio and leaves any other
  ratio unhandled; here the connector never changes the spatial size and ``align`` does instead.
* Spatial mismatch (``align="pool"``, default): after the connector, the larger map is adaptive-
  average-pooled, per axis, to the smaller size (the same rule as NST and AT here). ``align="none"``
  requires equal sizes. Shapes that cannot be aligned are refused in :meth:`FitNetsLoss.build`.
* Training: jointly with CE (RepDistiller/mdistiller; weight 100, hint = the middle stage output,
  ``layer2`` of a 4-stage ResNet); the paper and torchdistill pre-train the hint alone first, which
  is not implemented. The connector trains with the student (DistillModule puts it in the
  student's optimizer, with the optimizer's weight decay as the reference code does).
* Shapes come from DistillModule's probe forward with both networks in eval mode under no_grad,
  so the teacher's BatchNorm statistics never see it (a pitfall of building connectors from a
  dummy forward before ``teacher.eval()``).
* Teacher map detached; computed in float32 with autocast off (float64 stays float64).

Attention Transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention", ICLR)
-------------------------------------------------------------------------------------------
Per pair j, a(F) = L2-normalise over HW of mean_c |F_c|^p, p = 2 (B, HW). The loss implemented is
the official code's (and RepDistiller's / mdistiller's):

    L_AT = beta * sum_j mean over B*HW of (a(f_s_j) - a(f_t_j))^2,   beta = 1000

The paper writes beta/2 * sum_j |a_s - a_t|_p (a norm, not squared, per sample) with beta "1e3
divided by the number of elements in the attention map and batch"; the code squares, averages
over B*HW (which is the division by the number of elements) and has no 1/2. Channels may differ;
the larger map of a pair is adaptive-average-pooled to the smaller before a(.). The paper's |F|^p
is used; for even p (the default 2) it is the code's F.pow(p), for odd p on signed maps it is not.
Each pair is one logged term (``train/at_<student layer>``) weighted by beta. A pair whose
common map is 1x1 (ResNet layer4 at 32 px) has an attention map of one normalised value, 1, so
its term is identically 0: :meth:`ATLoss.build` logs a warning.
Shapes: f_s (B, C_s, H, W), f_t (B, C_t, H', W') -> a (B, hw) -> scalar per pair.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.distill.methods import (
    DistillInputs,
    DistillMethod,
    check_choice,
    check_pairs,
    check_weight,
    pool_to_common,
    refuse_unknown,
)
from kd_lightning.distill.precision import compute_dtype, fp32_region

__all__ = ["CONNECTORS", "ATLoss", "FitNetsLoss", "attention_map"]

log = logging.getLogger(__name__)

CONNECTORS = ("conv_bn", "conv_bn_relu", "conv", "identity")
ALIGNS = ("pool", "none")
_FITNETS_OPTIONS = ("student", "teacher", "weight", "connector", "align")
_AT_OPTIONS = ("pairs", "beta", "p")
AT_DEFAULT_PAIRS = tuple(
    {"student": n, "teacher": n} for n in ("layer1", "layer2", "layer3", "layer4")
)


def _check_4d(owner: str, f_s: Tensor, f_t: Tensor) -> None:
    if f_s.dim() != 4 or f_t.dim() != 4 or f_s.shape[0] != f_t.shape[0]:
        raise ValueError(
            f"{owner} expects 4-D maps (B, C, H, W) with the same B, got student "
            f"{tuple(f_s.shape)} and teacher {tuple(f_t.shape)}"
        )


class FitNetsLoss(DistillMethod):
    """FitNets hint loss on one (student, teacher) layer pair; see the module docstring.

    ``FitNetsLoss("layer2", "layer2")`` is unusable until :meth:`build` (called by DistillModule
    with the probed shapes, or by hand) creates the connector. :meth:`hint` takes (B, C_s, H, W)
    and (B, C_t, H', W') maps and returns the unweighted scalar; the term is logged as
    ``train/<key>`` with weight ``weight`` (100: RepDistiller/mdistiller).
    """

    def __init__(
        self,
        student: str = "layer2",
        teacher: str = "layer2",
        weight: float = 100.0,
        connector: str = "conv_bn",
        align: str = "pool",
        **unknown: Any,
    ) -> None:
        super().__init__()
        refuse_unknown("FitNets", unknown, _FITNETS_OPTIONS)
        self.student, self.teacher = str(student), str(teacher)
        self.weight = check_weight("FitNets", "weight", weight)
        self.connector_kind = check_choice("FitNets", "connector", connector, CONNECTORS)
        self.align = check_choice("FitNets", "align", align, ALIGNS)
        self.connector: nn.Module | None = None

    def student_layers(self) -> tuple[str, ...]:
        return (self.student,)

    def teacher_layers(self) -> tuple[str, ...]:
        return (self.teacher,)

    def build(
        self,
        student_shapes: Mapping[str, torch.Size],
        teacher_shapes: Mapping[str, torch.Size],
        num_classes: int = 2,
    ) -> None:
        s, t = tuple(student_shapes[self.student]), tuple(teacher_shapes[self.teacher])
        where = f"student {self.student} {s[1:]} -> teacher {self.teacher} {t[1:]}"
        if len(s) != 4 or len(t) != 4:
            raise ValueError(f"FitNets needs 4-D feature maps (B, C, H, W); got {where}")
        c_s, c_t = s[1], t[1]
        if self.connector_kind == "identity" and c_s != c_t:
            raise ValueError(
                f"FitNets connector='identity' cannot align {where}: channels differ; "
                "expected connector=conv_bn, conv_bn_relu or conv"
            )
        if self.align == "none" and s[2:] != t[2:]:
            raise ValueError(
                f"FitNets align='none' cannot align {where}: spatial sizes differ; "
                "expected align=pool (adaptive average pooling of the larger map)"
            )
        self.connector = make_connector(self.connector_kind, c_s, c_t)

    def hint(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        if self.connector is None:
            raise RuntimeError(
                "FitNetsLoss.build() must run before the loss (it makes the connector)"
            )
        _check_4d("FitNets", f_s, f_t)
        params = list(self.connector.parameters())
        dtype = params[0].dtype if params else compute_dtype(f_s, f_t)
        with fp32_region(f_s.device):
            mapped = self.connector(f_s.to(dtype))
            a, b = pool_to_common(mapped, f_t.detach().to(dtype))
            if a.shape[1] != b.shape[1]:
                raise ValueError(
                    f"FitNets connector gives {a.shape[1]} channels, teacher has {b.shape[1]}"
                )
            return F.mse_loss(a, b)

    def terms(self, inputs: DistillInputs) -> dict[str, tuple[float, Tensor]]:
        value = self.hint(inputs.student[self.student], inputs.teacher[self.teacher])
        return {"": (self.weight, value)}

    def extra_repr(self) -> str:
        return (
            f"student={self.student!r}, teacher={self.teacher!r}, weight={self.weight}, "
            f"connector={self.connector_kind!r}, align={self.align!r}"
        )


def make_connector(kind: str, c_s: int, c_t: int) -> nn.Module:
    if kind == "identity":
        return nn.Identity()
    layers: list[nn.Module] = [nn.Conv2d(c_s, c_t, kernel_size=1, bias=kind == "conv")]
    if kind in ("conv_bn", "conv_bn_relu"):
        layers.append(nn.BatchNorm2d(c_t))
    if kind == "conv_bn_relu":
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


def attention_map(f: Tensor, p: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, HW): L2-normalised mean_c |F_c|^p (Zagoruyko & Komodakis)."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), p=2.0, dim=1, eps=1e-12)


class ATLoss(DistillMethod):
    """Attention Transfer on several layer pairs; one term per pair, each weighted by ``beta``.

    ``pairs`` defaults to every ResNet stage output (layer1..layer4), as RepDistiller/mdistiller
    apply it. :meth:`pair_loss` takes (B, C_s, H, W), (B, C_t, H', W') and returns the unweighted
    mean over B*hw of the squared attention-map difference. See the module docstring.
    """

    def __init__(
        self,
        pairs: Sequence[Mapping[str, str]] = AT_DEFAULT_PAIRS,
        beta: float = 1000.0,
        p: int = 2,
        **unknown: Any,
    ) -> None:
        super().__init__()
        refuse_unknown("AT", unknown, _AT_OPTIONS)
        self.pairs = check_pairs("AT", pairs)
        self.beta = check_weight("AT", "beta", beta)
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"AT p={p!r}: expected an integer >= 1 (the paper uses 2)")
        self.p = p
        students = [pair["student"] for pair in self.pairs]
        self.names = [
            pair["student"]
            if students.count(pair["student"]) == 1
            else f"{pair['student']}_{pair['teacher']}"
            for pair in self.pairs
        ]

    def student_layers(self) -> tuple[str, ...]:
        return tuple(pair["student"] for pair in self.pairs)

    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(pair["teacher"] for pair in self.pairs)

    def build(
        self,
        student_shapes: Mapping[str, torch.Size],
        teacher_shapes: Mapping[str, torch.Size],
        num_classes: int = 2,
    ) -> None:
        for name, pair in zip(self.names, self.pairs, strict=True):
            s, t = student_shapes[pair["student"]], teacher_shapes[pair["teacher"]]
            if len(s) != 4 or len(t) != 4:
                raise ValueError(
                    f"AT pair {name} needs 4-D maps (B, C, H, W); got student {tuple(s)} "
                    f"and teacher {tuple(t)}"
                )
            if min(s[2], t[2]) * min(s[3], t[3]) == 1:
                log.warning(
                    "AT pair %s: 1x1 attention map at this image size, a normalised scalar (1): "
                    "the term is identically 0",
                    name,
                )

    def pair_loss(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        _check_4d("AT", f_s, f_t)
        dtype = compute_dtype(f_s, f_t)
        with fp32_region(f_s.device):
            a, b = pool_to_common(f_s.to(dtype), f_t.detach().to(dtype))
            return (attention_map(a, self.p) - attention_map(b, self.p)).pow(2).mean()

    def terms(self, inputs: DistillInputs) -> dict[str, tuple[float, Tensor]]:
        return {
            name: (
                self.beta,
                self.pair_loss(inputs.student[p["student"]], inputs.teacher[p["teacher"]]),
            )
            for name, p in zip(self.names, self.pairs, strict=True)
        }

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, beta={self.beta}, p={self.p}"
