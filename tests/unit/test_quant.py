import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from kd_lightning.distill.quant import (
    DifferentiableQuantizer,
    UniformQuantizer,
    attach_quantizers,
    bucket_scale,
    detach_quantizers,
    quantize_tensor,
    quantized_parameters,
    uniform_codes,
)
from kd_lightning.distill.quant_pack import (
    pack_codes,
    pack_quantized,
    packed_nbytes,
    unpack_codes,
    unpack_quantized,
)


def _weights(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.1


def _tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
        nn.Linear(10, 2),
    )


def _fp32_nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("scaling", ["minmax", "absmax"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_distinct_levels_per_bucket_at_most_2_pow_bits(bits, scaling):
    w = _weights(64 * 256)
    q = quantize_tensor(w, bits=bits, scaling=scaling, bucket_size=256).view(-1, 256)
    counts = [row.unique().numel() for row in q]
    assert max(counts) <= 2**bits
    # 8-bit buckets of 256 gaussian values use many levels; coarse grids use (almost) all of them.
    assert max(counts) >= min(2**bits, 100)


@pytest.mark.parametrize("scaling", ["minmax", "absmax"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_within_half_step_per_bucket(bits, scaling):
    w = _weights(10 * 256, seed=1)
    w[5] = 3.0  # one outlier bucket with a much larger alpha
    q = quantize_tensor(w, bits=bits, scaling=scaling, bucket_size=256)
    _, alpha, _ = bucket_scale(w, scaling, 256)
    err = (q - w).abs().view(-1, 256)
    bound = alpha / (2 * (2**bits - 1))
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-7)
    # The bound is (nearly) attained: the error is really governed by the bucket's alpha.
    assert torch.all(err.amax(dim=1, keepdim=True) >= 0.5 * bound)


def test_minmax_and_absmax_scale_definitions():
    w = torch.tensor([-0.5, 0.25, 1.0, 0.0])
    v, alpha, beta = bucket_scale(w, "minmax", None)
    assert alpha.item() == 1.5 and beta.item() == -0.5
    assert torch.allclose(v.view(-1), torch.tensor([0.0, 0.5, 1.0, 1 / 3]))
    v, alpha, beta = bucket_scale(w, "absmax", None)
    assert alpha.item() == 2.0 and beta.item() == -1.0
    assert torch.allclose(v.view(-1), torch.tensor([0.25, 0.625, 1.0, 0.5]))


@pytest.mark.parametrize("scaling", ["minmax", "absmax"])
def test_padded_bucketing_equals_quantizing_buckets_separately(scaling):
    w = _weights(1000, seed=2) + 0.05  # 1000 = 3 * 256 + 232: the last bucket is padded
    whole = quantize_tensor(w, bits=3, scaling=scaling, bucket_size=256)
    parts = torch.cat(
        [quantize_tensor(c, bits=3, scaling=scaling, bucket_size=None) for c in w.split(256)]
    )
    assert torch.equal(whole, parts)
    v, alpha, beta = bucket_scale(w, scaling, 256)
    assert v.shape == (4, 256)
    last = w[768:]
    if scaling == "minmax":
        assert alpha[-1].item() == pytest.approx((last.max() - last.min()).item())
        assert beta[-1].item() == last.min().item()
    else:
        assert beta[-1].item() == -last.abs().max().item()


def test_bucket_larger_than_tensor_and_none_agree():
    w = _weights(300, seed=3).view(3, 100)
    assert torch.equal(
        quantize_tensor(w, bits=4, bucket_size=4096), quantize_tensor(w, bits=4, bucket_size=None)
    )


@pytest.mark.parametrize("scaling", ["minmax", "absmax"])
def test_constant_bucket_round_trips_exactly(scaling):
    w = _weights(4 * 16, seed=4)
    w[16:32] = 0.3712
    w[32:48] = 0.0
    w[48:64] = -1.25
    q = quantize_tensor(w, bits=2, scaling=scaling, bucket_size=16)
    assert torch.isfinite(q).all()
    assert torch.equal(q[16:], w[16:])
    assert torch.equal(quantize_tensor(torch.zeros(7), bits=4, scaling=scaling), torch.zeros(7))


def test_stochastic_rounding_is_unbiased():
    bits, draws = 2, 40_000
    s = 2**bits - 1
    v = torch.linspace(0, 1, 33)
    g = torch.Generator().manual_seed(0)
    codes = uniform_codes(v.expand(draws, -1), bits, stochastic=True, generator=g)
    # Every draw is one of the two neighbouring levels.
    assert torch.all((codes == torch.floor(v * s)) | (codes == torch.ceil(v * s)))
    # std of one draw <= 1/(2s), so 6 sigma of the mean over `draws` is a safe tolerance.
    tol = 6 / (2 * s * draws**0.5)
    assert torch.allclose((codes / s).mean(dim=0), v, atol=tol, rtol=0)
    # and it is not deterministic rounding: a level-midpoint value splits about half/half
    mid = uniform_codes(torch.full((draws,), 0.5 / s), bits, stochastic=True, generator=g)
    assert 0.45 < mid.mean().item() < 0.55


def test_stochastic_only_in_training_mode():
    lin = nn.Linear(64, 32)
    torch.nn.utils.parametrize.register_parametrization(
        lin, "weight", UniformQuantizer(bits=2, stochastic=True)
    )
    torch.manual_seed(0)
    a, b = lin.weight.clone(), lin.weight.clone()
    assert not torch.equal(a, b)
    lin.eval()
    det = quantize_tensor(lin.parametrizations.weight.original.detach(), bits=2)
    assert torch.equal(lin.weight, det) and torch.equal(lin.weight, lin.weight)


def test_ste_gradient_equals_gradient_wrt_quantized_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", UniformQuantizer(bits=3))
    x = torch.randn(2, 4, 9, 9)
    (conv(x) ** 2).sum().backward()
    original = conv.parametrizations.weight.original
    wq = quantize_tensor(original.detach(), bits=3).requires_grad_()
    (F.conv2d(x, wq, conv.bias.detach()) ** 2).sum().backward()
    assert torch.allclose(original.grad, wq.grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(original.detach(), wq.detach())  # the forward really was quantized


def test_differentiable_points_start_at_quantiles():
    w = _weights(1000, seed=5).view(10, 100)
    quant = DifferentiableQuantizer(w, bits=3, scaling="minmax", bucket_size=256)
    v, _, _ = bucket_scale(w, "minmax", 256)
    expected = torch.quantile(v.reshape(-1)[:1000], torch.linspace(0, 1, 8))
    assert quant.points.shape == (8,)
    assert torch.allclose(quant.points.detach(), expected, atol=1e-6)
    assert quant.points[0].item() == 0.0 and quant.points[-1].item() == pytest.approx(1.0)


def test_differentiable_gradients_points_and_weights():
    w = _weights(600, seed=6).view(6, 100).requires_grad_()
    quant = DifferentiableQuantizer(w, bits=2, scaling="absmax", bucket_size=256)
    with torch.no_grad():
        quant.points.add_(torch.tensor([0.01, -0.02, 0.03, 0.0]))  # points move off quantiles
    upstream = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    w_hat = quant(w)
    (w_hat * upstream).sum().backward()

    v, alpha, beta = bucket_scale(w.detach(), "absmax", 256)
    v, a = v.reshape(-1)[:600], alpha.expand(-1, 256).reshape(-1)[:600]
    idx = (v.unsqueeze(1) - quant.points.detach()).abs().argmin(dim=1)  # brute-force nearest
    expected = torch.zeros(4).index_add_(0, idx, a * upstream.reshape(-1))
    assert torch.allclose(quant.points.grad, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad, upstream)  # straight-through to the weights
    values = quant.points.detach()[idx] * a + beta.expand(-1, 256).reshape(-1)[:600]
    assert torch.allclose(w_hat.detach().reshape(-1), values)
    assert w_hat.detach().unique().numel() <= 4 * 3  # 4 points x 3 buckets


def test_attach_resnet18_skips_first_last_and_trains_full_precision():
    torch.manual_seed(0)
    model = resnet18(num_classes=2)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    names = attach_quantizers(model, bits=4, bucket_size=256)
    assert "conv1" not in names and "fc" not in names
    assert len(names) == n_layers - 2 and "layer1.0.conv1" in names
    assert "layer4.1.conv2" in names and "layer2.0.downsample.0" in names

    conv = model.layer1[0].conv1
    original = conv.parametrizations.weight.original
    assert torch.equal(conv.weight, quantize_tensor(original.detach(), bits=4, bucket_size=256))
    before = original.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2)
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert original.grad is not None
    opt.step()
    assert not torch.equal(original.detach(), before)
    assert list(quantized_parameters(model)) == []


def test_attach_differentiable_exposes_points_and_rejects_double_attach():
    model = _tiny_net()
    names = attach_quantizers(model, bits=2, mode="differentiable")
    assert names == ["2", "4", "7"]  # first conv "0" and last linear "8" skipped
    points = list(quantized_parameters(model))
    assert len(points) == 3 and all(p.shape == (4,) for p in points)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in points)
    model(torch.randn(1, 3, 12, 12)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in points)
    with pytest.raises(ValueError, match="already quantized"):
        attach_quantizers(model)


def test_detach_leaves_quantized_plain_weights():
    model = _tiny_net()
    attach_quantizers(model, bits=3, stochastic=True, skip_first_last=False)
    model.train()
    expected = quantize_tensor(model[2].parametrizations.weight.original.detach(), bits=3)
    names = detach_quantizers(model)
    assert names == ["0", "2", "4", "7", "8"]
    assert not torch.nn.utils.parametrize.is_parametrized(model[2])
    assert isinstance(model[2].weight, nn.Parameter)
    assert torch.equal(model[2].weight.detach(), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_pack_codes_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes.to(torch.uint8))


@pytest.mark.parametrize("bits,limit", [(4, 0.16), (8, 0.3)])
def test_pack_unpack_resnet18_exact_and_small(bits, limit):
    torch.manual_seed(0)
    model = resnet18(num_classes=2)
    attach_quantizers(model, bits=bits, bucket_size=256)
    model.eval()
    packed = pack_quantized(model)
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    state = unpack_quantized(torch.load(buffer, weights_only=True))

    detached = copy.deepcopy(model)
    detach_quantizers(detached)
    reference = detached.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    plain = resnet18(num_classes=2)
    plain.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(plain.eval()(x), model(x), atol=1e-5)

    fp32 = _fp32_nbytes(reference)
    assert packed_nbytes(packed) < limit * fp32
    full = io.BytesIO()
    torch.save(reference, full)
    assert buffer.getbuffer().nbytes < limit * full.getbuffer().nbytes + 100_000


def test_pack_unpack_differentiable_exact():
    model = _tiny_net()
    attach_quantizers(model, bits=3, mode="differentiable", bucket_size=64)
    with torch.no_grad():
        for p in quantized_parameters(model):
            p.mul_(0.97)  # trained points are no longer the quantiles
    state = unpack_quantized(pack_quantized(model))
    detach_quantizers(model)
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_bad_arguments_raise_value_error_naming_the_value():
    w = torch.randn(10)
    with pytest.raises(ValueError, match="bits=9"):
        quantize_tensor(w, bits=9)
    with pytest.raises(ValueError, match="bits=1"):
        UniformQuantizer(bits=1)
    with pytest.raises(ValueError, match="scaling='linear'"):
        quantize_tensor(w, scaling="linear")
    with pytest.raises(ValueError, match="mode='kmeans'"):
        attach_quantizers(_tiny_net(), mode="kmeans")
    with pytest.raises(ValueError, match="bucket_size=0"):
        attach_quantizers(_tiny_net(), bucket_size=0)
    with pytest.raises(ValueError, match="stochastic=True"):
        attach_quantizers(_tiny_net(), mode="differentiable", stochastic=True)
    with pytest.raises(ValueError, match="format="):
        unpack_quantized({"float": {}})


def test_detaching_a_deepcopy_leaves_the_source_quantized():
    model = _tiny_net()
    attach_quantizers(model, bits=2)
    copied = copy.deepcopy(model)
    detach_quantizers(copied)
    # torch shares the Parametrized* class between copies; the source must keep its quantizers.
    assert torch.nn.utils.parametrize.is_parametrized(model[2], "weight")
    assert type(copied[2]) is nn.Conv2d and type(model[2]) is not nn.Conv2d
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(model(x), copied(x))
