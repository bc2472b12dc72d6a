"""FitNets, AT, DKD, RKD and CRD against float64 references written from the papers' formulas,
plus gradient, precision, memory-bound and bad-option checks (plain torch, no training)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kd_lightning.distill import ATLoss, CRDLoss, DKDLoss, FitNetsLoss, KDLoss, RKDLoss
from kd_lightning.distill.crd import bank_megabytes
from kd_lightning.distill.dkd import BINARY_WARNING, dkd_parts
from kd_lightning.distill.rkd import rkd_parts

D64 = torch.float64


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any op output (works on meta tensors: no memory used)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same_grad(fn_ours, fn_ref, x: torch.Tensor) -> None:
    a = x.detach().clone().requires_grad_(True)
    b = x.detach().clone().requires_grad_(True)
    fn_ours(a).backward()
    fn_ref(b).backward()
    assert a.grad.abs().sum() > 0
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- FitNets


def _built_fitnets(c_s=3, c_t=5, hw_s=(8, 8), hw_t=(4, 4), **kw) -> FitNetsLoss:
    loss = FitNetsLoss("a", "b", **kw)
    loss.build({"a": torch.Size((2, c_s, *hw_s))}, {"b": torch.Size((2, c_t, *hw_t))})
    return loss


def _ref_fitnets(loss: FitNetsLoss, f_s, f_t) -> torch.Tensor:
    """Romero et al.: mean of (r(f_s) - f_t)^2; r = 1x1 conv + BatchNorm (batch statistics)."""
    conv, bn = loss.connector[0], loss.connector[1]
    w = conv.weight.reshape(conv.out_channels, conv.in_channels)
    y = torch.einsum("oc,bchw->bohw", w, f_s)
    mu = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (y - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(
        1, -1, 1, 1
    )
    b, c, h, w_ = y.shape
    th, tw = f_t.shape[2:]
    y = y.reshape(b, c, th, h // th, tw, w_ // tw).mean(dim=(3, 5))  # exact average pooling
    return ((y - f_t) ** 2).sum() / y.numel()


def test_fitnets_matches_reference_values_and_gradients():
    torch.manual_seed(0)
    loss = _built_fitnets().double().train()
    with torch.no_grad():
        loss.connector[1].weight.uniform_(0.5, 1.5)
        loss.connector[1].bias.uniform_(-0.5, 0.5)
    f_s = torch.randn(4, 3, 8, 8, generator=_gen(1), dtype=D64)
    f_t = torch.randn(4, 5, 4, 4, generator=_gen(2), dtype=D64)
    got = loss.hint(f_s, f_t)
    assert got.dtype == D64
    torch.testing.assert_close(got, _ref_fitnets(loss, f_s, f_t), rtol=1e-10, atol=1e-12)
    _assert_same_grad(lambda s: loss.hint(s, f_t), lambda s: _ref_fitnets(loss, s, f_t), f_s)
    # The connector is learned: gradients reach its weights, never the teacher map.
    f_t.requires_grad_(True)
    loss.zero_grad()
    loss.hint(f_s, f_t).backward()
    assert loss.connector[0].weight.grad.abs().sum() > 0 and f_t.grad is None


def test_fitnets_pools_teacher_when_larger_and_connector_kinds():
    loss = _built_fitnets(hw_s=(4, 4), hw_t=(8, 4), connector="conv").double()
    f_s = torch.randn(2, 3, 4, 4, dtype=D64)
    f_t = torch.randn(2, 5, 8, 4, dtype=D64)
    w, bias = loss.connector[0].weight, loss.connector[0].bias
    want = F.mse_loss(F.conv2d(f_s, w, bias), f_t.reshape(2, 5, 4, 2, 4).mean(3))
    torch.testing.assert_close(loss.hint(f_s, f_t), want)
    assert isinstance(_built_fitnets(c_s=5).connector, torch.nn.Sequential)
    kinds = [type(m).__name__ for m in _built_fitnets(connector="conv_bn_relu").connector]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"]
    ident = _built_fitnets(c_s=5, connector="identity", align="none", hw_s=(4, 4))
    x = torch.randn(2, 5, 4, 4)
    assert ident.hint(x, x).item() == 0.0


@pytest.mark.parametrize(
    ("kw", "shapes", "match"),
    [
        ({"connector": "identity"}, {}, r"connector='identity' cannot align .* channels differ"),
        ({"align": "none"}, {}, r"align='none' cannot align .* spatial sizes differ"),
    ],
)
def test_fitnets_unalignable_shapes_are_refused_at_build(kw, shapes, match):
    with pytest.raises(ValueError, match=match):
        _built_fitnets(**kw)


def test_fitnets_memory_is_bounded_by_the_maps():
    loss = _built_fitnets(c_s=64, c_t=256, hw_s=(56, 56), hw_t=(28, 28)).to("meta")
    f_s = torch.empty(32, 64, 56, 56, device="meta", requires_grad=True)
    f_t = torch.empty(32, 256, 28, 28, device="meta")
    with _LargestTensor() as mode:
        loss.hint(f_s, f_t).backward()
    # The connector's output (B, C_t, H_s, W_s) is the largest thing the method needs.
    assert mode.largest <= 32 * 256 * 56 * 56


# ---------------------------------------------------------------- AT


def _ref_at(pairs, beta=1000.0) -> torch.Tensor:
    """Zagoruyko & Komodakis as the official code: beta * sum_j mean_{B,HW} (a_s - a_t)^2."""
    total = torch.zeros((), dtype=D64)
    for f_s, f_t in pairs:
        b, hw = f_s.shape[0], f_s.shape[2] * f_s.shape[3]
        pair = torch.zeros((), dtype=D64)
        for i in range(b):
            a_s = (f_s[i] ** 2).mean(0).reshape(-1)
            a_t = (f_t[i] ** 2).mean(0).reshape(-1)
            a_s = a_s / torch.sqrt((a_s**2).sum())
            a_t = a_t / torch.sqrt((a_t**2).sum())
            pair = pair + ((a_s - a_t) ** 2).sum()
        total = total + pair / (b * hw)
    return beta * total


def test_at_matches_reference_values_and_gradients():
    g = _gen(3)
    pairs = [
        (
            torch.randn(3, 4, 6, 6, generator=g, dtype=D64),
            torch.randn(3, 9, 6, 6, generator=g, dtype=D64),
        ),
        (
            torch.randn(3, 5, 4, 4, generator=g, dtype=D64),
            torch.randn(3, 2, 4, 4, generator=g, dtype=D64),
        ),
    ]
    loss = ATLoss([{"student": "x", "teacher": "y"}, {"student": "z", "teacher": "w"}])
    got = sum(loss.beta * loss.pair_loss(s, t) for s, t in pairs)
    assert got.dtype == D64
    torch.testing.assert_close(got, _ref_at(pairs), rtol=1e-10, atol=1e-12)
    f_s, f_t = pairs[0]
    _assert_same_grad(lambda s: 1000 * loss.pair_loss(s, f_t), lambda s: _ref_at([(s, f_t)]), f_s)


def test_at_pools_larger_map_and_logs_one_term_per_pair():
    f_s = torch.randn(2, 3, 8, 8, dtype=D64)
    f_t = torch.randn(2, 4, 4, 4, dtype=D64)
    pooled = f_s.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    loss = ATLoss([{"student": "l1", "teacher": "l1"}, {"student": "l2", "teacher": "l2"}])
    torch.testing.assert_close(loss.pair_loss(f_s, f_t) * 1000, _ref_at([(pooled, f_t)]))
    from kd_lightning.distill import DistillInputs

    feats = {"l1": f_s, "l2": f_s}
    inputs = DistillInputs(feats, {"l1": f_t, "l2": f_t}, None, None, None)
    terms = loss.terms(inputs)
    assert set(terms) == {"l1", "l2"} and all(w == 1000.0 for w, _ in terms.values())


def test_at_memory_is_bounded_by_the_maps():
    f_s = torch.empty(32, 64, 56, 56, device="meta", requires_grad=True)
    f_t = torch.empty(32, 256, 56, 56, device="meta")
    with _LargestTensor() as mode:
        ATLoss().pair_loss(f_s, f_t).backward()
    assert mode.largest <= f_t.numel()


# ---------------------------------------------------------------- DKD


def _ref_dkd(z_s, z_t, y, temp) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhao et al.: TCKD on b = [p_y, 1 - p_y], NCKD on p_k / (1 - p_y), k != y; T^2 batch mean."""
    tckd = nckd = torch.zeros((), dtype=D64)
    for i in range(z_s.shape[0]):
        p_s, p_t = torch.softmax(z_s[i] / temp, 0), torch.softmax(z_t[i] / temp, 0)
        t = int(y[i])
        b_s = torch.stack([p_s[t], 1 - p_s[t]])
        b_t = torch.stack([p_t[t], 1 - p_t[t]])
        tckd = tckd + (b_t * (b_t.log() - b_s.log())).sum()
        keep = [k for k in range(z_s.shape[1]) if k != t]
        q_s, q_t = p_s[keep] / (1 - p_s[t]), p_t[keep] / (1 - p_t[t])
        nckd = nckd + (q_t * (q_t.log() - q_s.log())).sum()
    b = z_s.shape[0]
    return temp**2 * tckd / b, temp**2 * nckd / b


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_matches_reference_values_and_gradients(temp):
    g = _gen(4)
    z_s = torch.randn(6, 5, generator=g, dtype=D64)
    z_t = torch.randn(6, 5, generator=g, dtype=D64) * 2
    y = torch.tensor([0, 1, 4, 2, 3, 1])
    tckd, nckd = dkd_parts(z_s, z_t, y, temp)
    ref_t, ref_n = _ref_dkd(z_s, z_t, y, temp)
    torch.testing.assert_close(tckd, ref_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(nckd, ref_n, rtol=1e-10, atol=1e-12)
    loss = DKDLoss(alpha=1.0, beta=8.0, temperature=temp, warmup=0)

    def ref(s):
        a, b = _ref_dkd(s, z_t, y, temp)
        return a + 8.0 * b

    _assert_same_grad(lambda s: loss(s, z_t, y), ref, z_s)


def test_binary_dkd_is_alpha_times_kd_and_nckd_is_zero(caplog):
    # This project's data: two classes. NCKD has one non-target class -> exactly 0, zero gradient.
    g = _gen(5)
    z_s = torch.randn(8, 2, generator=g, dtype=D64, requires_grad=True)
    z_t = torch.randn(8, 2, generator=g, dtype=D64) * 3
    y = torch.randint(2, (8,), generator=g)
    loss = DKDLoss(alpha=0.7, beta=8.0, temperature=4.0, warmup=0)
    with caplog.at_level("WARNING", logger="kd_lightning.distill.dkd"):
        tckd, nckd = dkd_parts(z_s, z_t, y, 4.0)
        total = loss(z_s, z_t, y)
        loss(z_s, z_t, y)
    assert nckd.item() == 0.0
    (grad_n,) = torch.autograd.grad(nckd, z_s, retain_graph=True)
    assert torch.equal(grad_n, torch.zeros_like(grad_n))
    torch.testing.assert_close(tckd, KDLoss(4.0)(z_s, z_t), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(total, 0.7 * KDLoss(4.0)(z_s, z_t), rtol=1e-12, atol=1e-14)
    assert [r.getMessage() for r in caplog.records] == [BINARY_WARNING]  # once, not per call


def test_dkd_extreme_logits_stay_finite():
    # torch.log of the binary b gives -inf here (p_target underflows); the log-space form does not.
    z_s = torch.tensor([[-200.0, 200.0, 0.0], [300.0, -300.0, 1.0]], requires_grad=True)
    z_t = torch.tensor([[200.0, -200.0, 0.0], [-300.0, 300.0, 1.0]])
    tckd, nckd = dkd_parts(z_s, z_t, torch.tensor([0, 0]), 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(z_s.grad).all()


def test_dkd_warmup_is_linear_over_epochs():
    loss = DKDLoss(warmup=20)
    assert [loss.warmup_factor(e) for e in (0, 9, 19, 50)] == [0.05, 0.5, 1.0, 1.0]
    assert DKDLoss(warmup=0).warmup_factor(0) == 1.0


def test_dkd_memory_is_bounded_by_the_logits():
    z_s = torch.empty(256, 1000, device="meta", requires_grad=True)
    z_t = torch.empty(256, 1000, device="meta")
    y = torch.zeros(256, dtype=torch.long, device="meta")
    with _LargestTensor() as mode:
        sum(dkd_parts(z_s, z_t, y, 4.0)).backward()
    assert mode.largest <= z_s.numel()


# ---------------------------------------------------------------- RKD


def _ref_rkd(s, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Park et al.: distances / mean distance, cosines of all triples, smooth L1, plain loops."""

    def dist(x):
        b = x.shape[0]
        d = torch.stack(
            [
                torch.stack(
                    [
                        torch.sqrt(((x[i] - x[j]) ** 2).sum()) if i != j else x.new_zeros(())
                        for j in range(b)
                    ]
                )
                for i in range(b)
            ]
        )
        return d / (d.sum() / (b * (b - 1)))

    def angle(x):
        b = x.shape[0]
        out = x.new_zeros(b, b, b)
        for a in range(b):
            for j in range(b):
                for k in range(b):
                    if j == a or k == a:
                        continue
                    u, v = x[j] - x[a], x[k] - x[a]
                    out[a, j, k] = (u @ v) / torch.sqrt((u @ u) * (v @ v))
        return out

    def smooth_l1(a, b):
        d = (a - b).abs()
        return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()

    with torch.no_grad():
        d_t, a_t = dist(t), angle(t)
    return smooth_l1(dist(s), d_t), smooth_l1(angle(s), a_t)


def test_rkd_matches_reference_values_and_gradients():
    g = _gen(6)
    s = torch.randn(5, 7, generator=g, dtype=D64) * 0.5
    t = torch.randn(5, 11, generator=g, dtype=D64) * 4 + 3  # other width, scale and offset
    dist, angle = rkd_parts(s, t)
    ref_d, ref_a = _ref_rkd(s, t)
    torch.testing.assert_close(dist, ref_d, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(angle, ref_a, rtol=1e-9, atol=1e-12)
    loss = RKDLoss()
    _assert_same_grad(
        lambda x: loss(x, t), lambda x: 25 * _ref_rkd(x, t)[0] + 50 * _ref_rkd(x, t)[1], s
    )


def test_rkd_is_zero_for_scaled_embeddings_and_finite_for_tiny_batches():
    s = torch.randn(6, 4, dtype=D64)
    dist, angle = rkd_parts(s, 3.0 * s + 1.0)  # distances/mean and angles are scale-free
    assert dist.item() == pytest.approx(0, abs=1e-12) and angle.item() == pytest.approx(
        0, abs=1e-12
    )
    one = torch.randn(1, 4, requires_grad=True)
    dist, angle = rkd_parts(one, torch.randn(1, 8))
    (dist + angle).backward()
    assert dist.item() == 0.0 and torch.isfinite(one.grad).all()
    dup = torch.randn(1, 4).repeat(4, 1).requires_grad_(True)  # identical samples
    dist, angle = rkd_parts(dup, torch.randn(4, 8))
    (dist + angle).backward()
    assert torch.isfinite(dist + angle) and torch.isfinite(dup.grad).all()


@pytest.mark.parametrize(("b", "d_s", "d_t"), [(64, 512, 2048), (256, 64, 96)])
def test_rkd_never_forms_the_pairwise_difference_tensor(b, d_s, d_t):
    s = torch.empty(b, d_s, device="meta", requires_grad=True)
    t = torch.empty(b, d_t, device="meta")
    with _LargestTensor() as mode:
        sum(rkd_parts(s, t)).backward()
    # The reference builds B x B x D (8.4e6 at 64 x 2048); the B^3 triple cosines (1.7e7 at 256)
    # exist one block of anchors at a time: at most 2^18 cosines (4 anchors x 256 x 256).
    assert mode.largest <= max(1 << 18, b * d_t)


def _plain_rkd_angle(s, t) -> torch.Tensor:
    """The angle term as plain autograd ops on the full (B, B, B) cosines, from the Gram matrix."""

    def cosines(x):
        x = x - x.mean(dim=0, keepdim=True)
        gram = x @ x.t()
        diag = gram.diagonal()
        sq = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2.0 * gram).clamp_min(0.0)
        sq = sq.masked_fill(torch.eye(x.shape[0], dtype=torch.bool), 0.0)
        inner = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + diag.view(-1, 1, 1)
        norm = sq.clamp_min(1e-12).sqrt()
        inv = torch.where(norm > 1e-6, 1.0 / norm, torch.zeros_like(norm))
        return (inner * inv.unsqueeze(2) * inv.unsqueeze(1)).clamp(-1.0, 1.0)

    with torch.no_grad():
        cos_t = cosines(t)
    return F.smooth_l1_loss(cosines(s), cos_t)


@pytest.mark.parametrize("b", [2, 3, 17, 130])
def test_rkd_blocked_angle_matches_plain_autograd(b):
    g = _gen(b)
    s = torch.randn(b, 6, generator=g, dtype=D64)
    t = torch.randn(b, 9, generator=g, dtype=D64) * 3
    if b >= 17:
        s[2] = s[0]  # duplicate embeddings: zero-norm differences, cosine 0
        s[5:9] = s[4]
        s[12] = 2.0 * s[13] - s[14]  # collinear: cosines at +-1, where the clamp acts
        t[b - 1] = t[1]
        t[10] = 2.0 * t[11] - t[12]  # collinear teacher triple: cosines at +-1
    ours = rkd_parts(s, t)[1]
    torch.testing.assert_close(ours, _plain_rkd_angle(s, t), rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(rkd_parts(s, t)[1], ours, rtol=1e-12, atol=1e-15)
    ours_s, plain_s = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    rkd_parts(ours_s, t)[1].backward()
    _plain_rkd_angle(plain_s, t).backward()
    if b > 2:  # B = 2: every cosine is 0 or 1, the gradient is rounding noise
        assert ours_s.grad.abs().sum() > 1e-6
    torch.testing.assert_close(ours_s.grad, plain_s.grad, rtol=1e-9, atol=1e-15)


# ---------------------------------------------------------------- CRD


def _crd(n=40, k=8, d_s=6, d_t=10, labels=None, **kw) -> CRDLoss:
    loss = CRDLoss(num_negatives=k, feat_dim=4, **kw)
    loss.build({"avgpool": torch.Size((2, d_s, 1, 1))}, {"avgpool": torch.Size((2, d_t, 1, 1))})
    if labels is None:
        labels = torch.arange(n) % 2
    loss.allocate(n, labels)
    return loss


def _ref_crd(loss: CRDLoss, f_s, f_t, idx, mem_s, mem_t, z=None):
    """Tian et al. NCE with the reference's eps; Z from this batch when not given."""
    n, k, tau = mem_s.shape[0], idx.shape[1] - 1, loss.temperature

    def embed(head, f):
        v = f @ head.linear.weight.t() + head.linear.bias
        return v / torch.sqrt((v * v).sum(1, keepdim=True))

    v_s, v_t = embed(loss.embed_s, f_s), embed(loss.embed_t, f_t)
    e_s = torch.exp(torch.einsum("bkd,bd->bk", mem_t[idx], v_s) / tau)
    e_t = torch.exp(torch.einsum("bkd,bd->bk", mem_s[idx], v_t) / tau)
    z_s, z_t = (e_s.mean() * n, e_t.mean() * n) if z is None else z
    out = []
    for p in (e_s / z_s, e_t / z_t):
        pn = k / n
        d1 = torch.log(p[:, 0] / (p[:, 0] + pn + 1e-7))
        d0 = torch.log(pn / (p[:, 1:] + pn + 1e-7))
        out.append(-(d1.sum() + d0.sum()) / p.shape[0])
    return out[0], out[1], (z_s, z_t)


def test_crd_matches_reference_values_gradients_and_updates_the_bank():
    torch.manual_seed(0)
    loss = _crd().double().train()
    f_s = torch.randn(5, 6, generator=_gen(7), dtype=D64)
    f_t = torch.randn(5, 10, generator=_gen(8), dtype=D64)
    ind, y = torch.tensor([3, 0, 17, 8, 33]), torch.tensor([1, 0, 1, 0, 1])
    idx = loss.sample(ind, y)
    assert idx.shape == (5, 9) and torch.equal(idx[:, 0], ind)
    assert (loss.labels[idx[:, 1:]] != y.view(-1, 1)).all()  # negatives from the other class
    mem_s, mem_t = loss.memory_s.clone(), loss.memory_t.clone()
    ref_s, ref_t, z = _ref_crd(loss, f_s, f_t, idx, mem_s, mem_t)
    got_s, got_t = loss(f_s, f_t, ind, y, contrast=idx)
    torch.testing.assert_close(got_s, ref_s, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_t, ref_t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.z_s, z[0].detach())
    # Bank moved toward the batch (momentum 0.5, renormalised) only at the batch's rows.
    changed = (loss.memory_s != mem_s).any(1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(ind.tolist())
    assert torch.allclose(loss.memory_s[ind].norm(dim=1), torch.ones(5, dtype=D64))
    # Second call: Z stays fixed; gradients equal the reference's (through both heads).
    z_before = loss.z_s.clone()
    mem_s, mem_t = loss.memory_s.clone(), loss.memory_t.clone()
    loss.eval()  # no bank update, so the reference sees the same memory
    w = loss.embed_s.linear.weight
    got = sum(loss(f_s, f_t, ind, y, contrast=idx))
    (g_ours,) = torch.autograd.grad(got, w)
    ref = sum(_ref_crd(loss, f_s, f_t, idx, mem_s, mem_t, z=(loss.z_s, loss.z_t))[:2])
    (g_ref,) = torch.autograd.grad(ref, w)
    assert torch.equal(loss.z_s, z_before) and g_ours.abs().sum() > 0
    # Log-space NCE vs the reference's ratios: equal up to float64 rounding of exp/log.
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-7, atol=1e-9)
    assert torch.equal(loss.memory_s, mem_s)


def test_crd_bank_is_bounded_and_scores_use_the_smaller_intermediate():
    # PneumoniaMNIST-sized bank: N = 4708, d = 128, K = 4096, batch 64.
    n, k, b = 4708, 4096, 64
    loss = CRDLoss(num_negatives=k)
    loss.build({"avgpool": torch.Size((2, 512))}, {"avgpool": torch.Size((2, 2048))})
    loss.allocate(n, torch.arange(n) % 2)
    assert bank_megabytes(n, 128) == pytest.approx(4.598, abs=1e-3)
    f_s = torch.randn(b, 512, requires_grad=True)
    f_t = torch.randn(b, 2048)
    ind, y = torch.randint(n, (b,)), torch.randint(2, (b,))
    with _LargestTensor() as mode:
        sum(loss(f_s, f_t, ind, y)).backward()
    # The reference's gathered rows would be B x (K+1) x d = 3.4e7 floats.
    assert mode.largest <= max(b * n, n * 128, b * (k + 1))


def test_crd_state_round_trips_through_a_state_dict():
    loss = _crd().train()
    loss(
        torch.randn(4, 6),
        torch.randn(4, 10),
        torch.tensor([1, 2, 3, 4]),
        torch.tensor([1, 0, 1, 0]),
    )
    state = loss.state_dict()
    assert {"memory_s", "memory_t", "labels", "z_s", "z_t"} <= set(state)
    fresh = CRDLoss(num_negatives=8, feat_dim=4)
    fresh.build({"avgpool": torch.Size((2, 6))}, {"avgpool": torch.Size((2, 10))})
    fresh.load_state_dict(state)  # allocates the bank from the saved shape
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    other = _crd(n=50)
    with pytest.raises(ValueError, match=r"checkpoint's CRD bank has shape \(40, 4\)"):
        other.load_state_dict(state)


def test_crd_refuses_missing_indices_and_a_bank_larger_than_the_data():
    with pytest.raises(
        ValueError, match=r"num_negatives=64 is not smaller than the training set \(40"
    ):
        _crd(n=40, k=64)
    with pytest.raises(ValueError, match="batch has no indices; set data.return_index=true"):
        _crd()(torch.randn(2, 6), torch.randn(2, 10), None, torch.tensor([0, 1]))
    two_items = [(torch.zeros(1, 4, 4), 0)] * 10
    with pytest.raises(ValueError, match=r"items must be \(image, label, index\), got 2-item"):
        _crd().bind_data(two_items)
    with pytest.raises(ValueError, match="exceeds max_bank_mb=0.001"):
        _crd(max_bank_mb=0.001)


# ---------------------------------------------------------------- precision and bad options


def _all_losses_fp32():
    g = _gen(9)
    fit = _built_fitnets(c_s=4, c_t=6, hw_s=(4, 4), hw_t=(4, 4))
    crd = _crd()
    crd.eval()
    f4s, f4t = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 6, 4, 4, generator=g)
    e_s, e_t = torch.randn(4, 6, generator=g), torch.randn(4, 10, generator=g)
    z_s, z_t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    ind = torch.tensor([0, 1, 2, 3])
    contrast = crd.sample(ind, y % 2)  # fixed negatives: every call sees the same rows
    return {
        "fitnets": lambda c: fit.hint(c(f4s), c(f4t)),
        "at": lambda c: ATLoss().pair_loss(c(f4s), c(f4t)),
        "dkd": lambda c: DKDLoss(warmup=0)(c(z_s), c(z_t), y),
        "rkd": lambda c: RKDLoss()(c(e_s), c(e_t)),
        "crd": lambda c: sum(crd(c(e_s), c(e_t), ind, y % 2, contrast=contrast)),
    }


@pytest.mark.parametrize("name", ["fitnets", "at", "dkd", "rkd", "crd"])
def test_computed_in_float32_under_bf16_autocast(name):
    fn = _all_losses_fp32()[name]
    fp32 = fn(lambda x: x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = fn(lambda x: x)
        bf16 = fn(lambda x: x.bfloat16())
    assert same.dtype == torch.float32 and bf16.dtype == torch.float32
    torch.testing.assert_close(same, fp32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bf16, fp32, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (
            lambda: FitNetsLoss(connector="conv3x3"),
            r"unknown FitNets connector='conv3x3'; valid: conv_bn",
        ),
        (lambda: FitNetsLoss(hint_layer=2), r"unknown FitNets option hint_layer=2; valid: student"),
        (lambda: FitNetsLoss(weight=-1.0), r"FitNets weight=-1.0: expected a finite number >= 0"),
        (lambda: ATLoss(beta=float("nan")), r"AT beta=nan: expected a finite number >= 0"),
        (lambda: ATLoss(betta=5), r"unknown AT option betta=5"),
        (lambda: ATLoss(pairs=[]), r"AT pairs=\[\]: expected a non-empty list"),
        (lambda: DKDLoss(temperature=0.0), r"DKD temperature=0.0: expected a finite number > 0"),
        (lambda: DKDLoss(beta=float("inf")), r"DKD beta=inf: expected a finite number >= 0"),
        (lambda: DKDLoss(warmup=-1), r"DKD warmup=-1: expected an integer"),
        (lambda: RKDLoss(angle_weight=-50), r"RKD angle_weight=-50: expected a finite number >= 0"),
        (lambda: CRDLoss(negatives="exact"), r"unknown CRD negatives='exact'; valid: other_class"),
        (
            lambda: CRDLoss(temperature=-0.07),
            r"CRD temperature=-0.07: expected a finite number > 0",
        ),
        (lambda: CRDLoss(momentum=1.0), r"CRD momentum=1.0: expected a number in \[0, 1\)"),
    ],
)
def test_bad_options_raise_one_line(factory, match):
    with pytest.raises(ValueError, match=match) as info:
        factory()
    assert "\n" not in str(info.value)


def test_embedding_methods_refuse_unpooled_layers():
    with pytest.raises(ValueError, match=r"RKD layer 'avgpool' gives shape \(2, 8, 4, 4\)"):
        RKDLoss().build({"avgpool": torch.Size((2, 8, 4, 4))}, {"avgpool": torch.Size((2, 8))})
    assert math.isfinite(bank_megabytes(1, 1))


def test_at_warns_about_pairs_with_a_one_pixel_map(caplog):
    loss = ATLoss([{"student": "l4", "teacher": "l4"}, {"student": "l3", "teacher": "l3"}])
    with caplog.at_level("WARNING", logger="kd_lightning.distill.feature"):
        loss.build(
            {"l4": torch.Size((2, 8, 1, 1)), "l3": torch.Size((2, 8, 2, 2))},
            {"l4": torch.Size((2, 8, 2, 2)), "l3": torch.Size((2, 8, 2, 2))},
        )
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["AT pair l4"]
    x = torch.rand(2, 8, 1, 1)
    assert loss.pair_loss(x, torch.rand(2, 8, 2, 2)).item() == 0.0
