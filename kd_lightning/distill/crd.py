"""Contrastive Representation Distillation (Tian, Krishnan & Isola 2020, ICLR, arXiv 1910.10699).

Penultimate features (the pooled features before fc) f_s (B, D_s), f_t (B, D_t) are embedded by two
learned linear heads and L2-normalised: v_s = g_s(f_s), v_t = g_t(f_t) (B, d), d = 128. Two memory
banks hold one d-vector per training sample: M_s (N, d) of student embeddings, M_t (N, d) of
teacher embeddings. For sample i with dataset index y_i and K negative indices n_i1..n_iK:

    P_t(j | v_s_i) = exp(<M_t[j], v_s_i> / tau) / Z_t     (student anchor, teacher memory)
    P_s(j | v_t_i) = exp(<M_s[j], v_t_i> / tau) / Z_s     (teacher anchor, student memory)
    h(P) = P / (P + K/N)                                  (NCE with noise distribution 1/N)
    L_NCE(P) = -(1/B) sum_i [ log h(P(y_i)) + sum_k log(1 - h(P(n_ik))) ]
    L_CRD = L_NCE(P_t) + L_NCE(P_s),  logged as ``train/<key>_s`` and ``train/<key>_t``

Z is estimated once, on the first batch, as mean(exp(score / tau)) * N (reference code), and kept.
After each training step the banks move toward the batch: M[y] <- normalise(m M[y] + (1 - m) v),
momentum m = 0.5. Defaults (RepDistiller): d 128, tau 0.07, m 0.5, weight 0.8 (plus KD 1 for
CRD+KD). Shapes: f (B, D) or (B, D, 1, 1), indices (B,) int64, banks (N, d), scores (B, K+1).

Choices where the paper, RepDistiller and this implementation differ:

* K (``num_negatives``): 16384 in the paper on CIFAR-100 (N = 50000). PneumoniaMNIST has N = 4708
  training images officially (3882 in this project's train split), where K/N is not small; the
  default here is 1024 and K >= N is refused ("a bank larger than the training set"). Negatives
  are drawn with replacement (with two classes and "other_class", a pneumonia image's negatives
  come from the 388 normal ones: many repeats).
* Negatives (``negatives``): "other_class" (RepDistiller's "exact" CRD dataset: negatives from
  other classes; with two classes that is every image of the other class) needs the dataset's
  ``labels``; "uniform" draws from all N rows (RepDistiller's sampler without a CRD dataset).
* Memory: the banks are 2 * N * d float32 = 8 N d bytes: 4.6 MB for PneumoniaMNIST (N = 4708,
  d = 128), 1.3 GB for ImageNet (N = 1.28M, a complaint upstream). ``max_bank_mb`` (default 1024)
  bounds it; the size is logged once when the bank is made. The reference gathers the
  (B, K+1, d) memory rows (B * 16385 * 128 floats); here scores come from whichever is smaller:
  v @ M^T (B, N) then gathered, or the gathered rows; never both.
* Device: the banks are buffers of the module, so they follow it to CPU or GPU (the reference
  calls ``.cuda()`` unconditionally); they are saved in checkpoints and restored on resume,
  together with Z and the labels. The embedding heads train with the student and are in its
  optimizer (RepDistiller trains both heads, the teacher's included).
* Index: CRD needs each sample's position in the training dataset: batches must be
  (images, targets, indices) — ``data.return_index=true``. A batch without indices is refused.
* NCE in log space (log h = -softplus(log(K/N + eps) - log P)), equal to the reference's
  ``(P / (P + K/N + eps)).log()`` with eps = 1e-7 but without overflow; float32 with autocast off.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.distill.methods import (
    DistillInputs,
    DistillMethod,
    check_choice,
    check_weight,
    flat_embedding,
    refuse_unknown,
)
from kd_lightning.distill.precision import fp32_region

__all__ = ["CRDLoss", "bank_megabytes", "nce_loss"]

log = logging.getLogger(__name__)

_CRD_OPTIONS = (
    "student",
    "teacher",
    "weight",
    "feat_dim",
    "num_negatives",
    "temperature",
    "momentum",
    "negatives",
    "max_bank_mb",
)
NEGATIVES = ("other_class", "uniform")
_NCE_EPS = 1e-7


def bank_megabytes(n_data: int, feat_dim: int) -> float:
    """Size of the two float32 memory banks, 2 * N * d * 4 bytes, in MB (2^20 bytes)."""
    return 2 * n_data * feat_dim * 4 / 2**20


def nce_loss(log_p: Tensor, n_data: int) -> Tensor:
    """NCE loss of (B, K+1) log-probabilities, positive in column 0 (see the module docstring)."""
    k = log_p.shape[1] - 1
    log_c = math.log(k / n_data + _NCE_EPS)
    log_d1 = -F.softplus(log_c - log_p[:, 0])
    log_d0 = math.log(k / n_data) - torch.logaddexp(log_p[:, 1:], log_p.new_tensor(log_c))
    return -(log_d1.sum() + log_d0.sum()) / log_p.shape[0]


class _Embed(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x), p=2.0, dim=1)


class CRDLoss(DistillMethod):
    """CRD with two bounded memory banks on CPU or GPU; see the module docstring.

    Lifecycle: :meth:`build` makes the embedding heads from the probed feature widths;
    :meth:`bind_data` makes the banks from the training dataset (its length, its ``labels`` and a
    check that items carry an index); :meth:`terms` / :meth:`forward` compute the loss and, in
    training mode, update the banks.
    """

    requires_index = True

    def __init__(
        self,
        student: str = "avgpool",
        teacher: str = "avgpool",
        weight: float = 0.8,
        feat_dim: int = 128,
        num_negatives: int = 1024,
        temperature: float = 0.07,
        momentum: float = 0.5,
        negatives: str = "other_class",
        max_bank_mb: float = 1024.0,
        **unknown: Any,
    ) -> None:
        super().__init__()
        refuse_unknown("CRD", unknown, _CRD_OPTIONS)
        self.student, self.teacher = str(student), str(teacher)
        self.weight = check_weight("CRD", "weight", weight)
        for key, value in (("feat_dim", feat_dim), ("num_negatives", num_negatives)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CRD {key}={value!r}: expected an integer >= 1")
        self.feat_dim, self.num_negatives = feat_dim, num_negatives
        self.temperature = check_weight("CRD", "temperature", temperature, positive=True)
        self.momentum = check_weight("CRD", "momentum", momentum)
        if self.momentum >= 1:
            raise ValueError(f"CRD momentum={momentum!r}: expected a number in [0, 1)")
        self.negatives = check_choice("CRD", "negatives", negatives, NEGATIVES)
        self.max_bank_mb = check_weight("CRD", "max_bank_mb", max_bank_mb, positive=True)
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.register_buffer("memory_s", None)
        self.register_buffer("memory_t", None)
        self.register_buffer("labels", None)
        self._pools: dict[int, Tensor] = {}

    # ------------------------------------------------------------------ setup
    def student_layers(self) -> tuple[str, ...]:
        return (self.student,)

    def teacher_layers(self) -> tuple[str, ...]:
        return (self.teacher,)

    def build(self, student_shapes, teacher_shapes, num_classes: int = 2) -> None:
        d_s = flat_embedding(
            "CRD", self.student, torch.empty(student_shapes[self.student], device="meta")
        )
        d_t = flat_embedding(
            "CRD", self.teacher, torch.empty(teacher_shapes[self.teacher], device="meta")
        )
        self.embed_s = _Embed(d_s.shape[1], self.feat_dim)
        self.embed_t = _Embed(d_t.shape[1], self.feat_dim)

    @property
    def n_data(self) -> int | None:
        return None if self.memory_s is None else int(self.memory_s.shape[0])

    def bind_data(self, dataset: Any) -> None:
        """Make the banks for ``dataset`` (len N); refuse one that cannot work, before training."""
        n = len(dataset)
        item = dataset[0] if n else None
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            got = len(item) if isinstance(item, (tuple, list)) else type(item).__name__
            raise ValueError(
                f"CRD needs each sample's dataset index: training items must be (image, label, "
                f"index), got {got}-item ones; set data.return_index=true"
            )
        labels = getattr(dataset, "labels", None)
        if self.negatives == "other_class" and labels is None:
            raise ValueError(
                f"CRD negatives='other_class' needs the training dataset's labels, but "
                f"{type(dataset).__name__} has no .labels; expected negatives=uniform"
            )
        labels = torch.as_tensor(labels if labels is not None else [0] * n, dtype=torch.long)
        self.allocate(n, labels)

    def allocate(self, n: int, labels: Tensor) -> None:
        if self.num_negatives >= n:
            raise ValueError(
                f"CRD num_negatives={self.num_negatives} is not smaller than the training set "
                f"({n} samples): expected num_negatives < {n} (a bank larger than the data set)"
            )
        mb = bank_megabytes(n, self.feat_dim)
        if mb > self.max_bank_mb:
            raise ValueError(
                f"CRD memory bank of 2 x {n} x {self.feat_dim} float32 = {mb:.1f} MB exceeds "
                f"max_bank_mb={self.max_bank_mb}; expected a smaller feat_dim or larger max_bank_mb"
            )
        if labels.shape != (n,):
            raise ValueError(f"CRD labels must have shape ({n},), got {tuple(labels.shape)}")
        if self.memory_s is not None and self.memory_s.shape == (n, self.feat_dim):
            return  # already bound (fit then test, or restored from a checkpoint)
        device = self.z_s.device
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        # Uniform in [-stdv, stdv] as RepDistiller's ContrastMemory.
        self.memory_s = (torch.rand(n, self.feat_dim, device=device) * 2 - 1) * stdv
        self.memory_t = (torch.rand(n, self.feat_dim, device=device) * 2 - 1) * stdv
        self.labels = labels.to(device)
        self._pools = {}
        if self.negatives == "other_class":
            for c in labels.unique().tolist():
                if not (labels != c).any():
                    raise ValueError(
                        f"CRD negatives='other_class': the training set has only class {c}; "
                        "expected at least two classes or negatives=uniform"
                    )
        log.info(
            "CRD memory bank: 2 x %d x %d float32 = %.2f MB (%d negatives, %s)",
            n,
            self.feat_dim,
            mb,
            self.num_negatives,
            self.negatives,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "memory_s")
        if saved is not None:
            if self.memory_s is None:
                n = saved.shape[0]
                self.memory_s = torch.empty_like(saved, device=self.z_s.device)
                self.memory_t = torch.empty_like(saved, device=self.z_s.device)
                self.labels = torch.empty(n, dtype=torch.long, device=self.z_s.device)
                self._pools = {}
            elif self.memory_s.shape != saved.shape:
                raise ValueError(
                    f"checkpoint's CRD bank has shape {tuple(saved.shape)}, this run's "
                    f"{tuple(self.memory_s.shape)}: the training set or feat_dim changed"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pools = {}

    # ------------------------------------------------------------------ loss
    def _pool(self, c: int) -> Tensor:
        if c not in self._pools:
            self._pools[c] = torch.nonzero(self.labels != c).flatten()
        return self._pools[c]

    def sample(self, indices: Tensor, targets: Tensor) -> Tensor:
        """(B, K+1) bank rows: column 0 the sample itself, then K negatives (with replacement)."""
        b, k = indices.shape[0], self.num_negatives
        device = self.memory_s.device
        if self.negatives == "uniform":
            neg = torch.randint(self.n_data, (b, k), device=device)
        else:
            neg = torch.empty(b, k, dtype=torch.long, device=device)
            for c in targets.unique().tolist():
                rows = targets == c
                pool = self._pool(int(c))
                neg[rows] = pool[torch.randint(len(pool), (int(rows.sum()), k), device=device)]
        return torch.cat([indices.view(-1, 1).to(device), neg], dim=1)

    def _scores(self, v: Tensor, memory: Tensor, idx: Tensor) -> Tensor:
        """<memory[idx[b, j]], v[b]> (B, K+1) via the smaller intermediate."""
        b, k1 = idx.shape
        if b * memory.shape[0] <= b * k1 * memory.shape[1]:
            return (v @ memory.t()).gather(1, idx)
        return torch.bmm(memory[idx], v.unsqueeze(2)).squeeze(2)

    def forward(
        self,
        f_s: Tensor,
        f_t: Tensor,
        indices: Tensor,
        targets: Tensor,
        contrast: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(L_NCE student anchor, L_NCE teacher anchor), unweighted; updates banks in training."""
        if self.embed_s is None or self.memory_s is None:
            raise RuntimeError(
                "CRDLoss needs build() (embedding heads) and bind_data() (banks) first"
            )
        if indices is None:
            raise ValueError(
                "CRD needs each sample's dataset index: the batch has no indices; "
                "set data.return_index=true so batches are (images, targets, indices)"
            )
        indices = indices.long().to(self.memory_s.device)
        n = self.n_data
        if indices.min() < 0 or indices.max() >= n:
            low, high = int(indices.min()), int(indices.max())
            raise ValueError(f"CRD indices must lie in [0, {n}), got [{low}, {high}]")
        idx = self.sample(indices, targets) if contrast is None else contrast
        dtype = self.memory_s.dtype
        with fp32_region(f_s.device):
            v_s = self.embed_s(f_s.to(dtype))
            v_t = self.embed_t(f_t.detach().to(dtype))
            # The banks are updated in place below, after the scores; autograd keeps what it read.
            mem_s, mem_t = self.memory_s.detach(), self.memory_t.detach()
            if self.training:
                mem_s, mem_t = mem_s.clone(), mem_t.clone()
            logit_s = self._scores(v_s, mem_t, idx) / self.temperature  # student anchor
            logit_t = self._scores(v_t, mem_s, idx) / self.temperature  # teacher anchor
            with torch.no_grad():
                if self.z_s < 0:  # first batch: Z = mean(exp(score / tau)) * N, then fixed
                    self.z_s.copy_(logit_s.exp().mean() * n)
                    self.z_t.copy_(logit_t.exp().mean() * n)
            loss_s = nce_loss(logit_s - self.z_s.log(), n)
            loss_t = nce_loss(logit_t - self.z_t.log(), n)
            if self.training:
                self._update(self.memory_s, indices, v_s.detach())
                self._update(self.memory_t, indices, v_t.detach())
        return loss_s, loss_t

    @torch.no_grad()
    def _update(self, memory: Tensor, indices: Tensor, v: Tensor) -> None:
        moved = memory[indices] * self.momentum + v * (1.0 - self.momentum)
        memory.index_copy_(0, indices, F.normalize(moved, p=2.0, dim=1))

    def terms(self, inputs: DistillInputs) -> dict[str, tuple[float, Tensor]]:
        f_s = flat_embedding("CRD", self.student, inputs.student[self.student])
        f_t = flat_embedding("CRD", self.teacher, inputs.teacher[self.teacher])
        loss_s, loss_t = self(f_s, f_t, inputs.indices, inputs.targets)
        return {"s": (self.weight, loss_s), "t": (self.weight, loss_t)}

    def extra_repr(self) -> str:
        return (
            f"student={self.student!r}, teacher={self.teacher!r}, weight={self.weight}, "
            f"feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
            f"temperature={self.temperature}, momentum={self.momentum}, "
            f"negatives={self.negatives!r}, n_data={self.n_data}"
        )
