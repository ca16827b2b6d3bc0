import math

import pytest
import torch

from molre.errors import ModelError
from molre.models import MoLRE, molre_param_count
from molre.models.lora import LoRALinear
from molre.models.molre import balance_loss


def _randomise(m: MoLRE, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)


def test_zero_b_returns_w0_x_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    m = MoLRE(32, 48, experts=4, rank=3, router_hidden=16, base_layer=base)
    x = torch.randn(10, 32)
    assert torch.equal(m(x), base(x))
    identity = MoLRE(32, experts=4, rank=3, router_hidden=16)  # features placement: W0 = I
    assert torch.equal(identity(x), x)


def test_matches_explicit_sum_over_experts():
    torch.manual_seed(1)
    m = MoLRE(24, experts=5, rank=4, router_hidden=8)
    _randomise(m)
    x = torch.randn(7, 24)
    g = m.route(x)
    expected = x + sum(g[:, i : i + 1] * (x @ m.A[i].t() @ m.B[i].t()) for i in range(5))
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.sum(-1), torch.ones(7))


def test_k1_constant_router_equals_lora_update():
    torch.manual_seed(2)
    base = torch.nn.Linear(16, 20)
    m = MoLRE(16, 20, experts=1, rank=4, router_hidden=8, base_layer=base, scale=2.0)
    _randomise(m)
    lora = LoRALinear(base, rank=4, alpha=8.0)  # scaling 8/4 = 2
    with torch.no_grad():
        lora.lora_A.weight.copy_(m.A[0])
        lora.lora_B.weight.copy_(m.B[0])
    x = torch.randn(6, 16)
    assert torch.allclose(m.route(x), torch.ones(6, 1))  # softmax over one expert is constant 1
    torch.testing.assert_close(m(x), lora(x), rtol=1e-5, atol=1e-6)


def test_gradients_reach_router_and_experts():
    torch.manual_seed(3)
    m = MoLRE(16, experts=3, rank=2, router_hidden=8)
    _randomise(m)
    m(torch.randn(5, 16)).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_works_on_token_batches_and_stores_router_weights():
    m = MoLRE(16, experts=3, rank=2, router_hidden=8)
    out = m(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 16)
    assert m.last_router_weights.shape == (2, 5, 3) and not m.last_router_weights.requires_grad


@pytest.mark.parametrize("d", [768, 1024, 1152])
def test_param_count_matches_formula_and_paper(d):
    m = MoLRE(d)  # K=6, r=8, d_h=256 (paper)
    n = sum(p.numel() for p in m.parameters())
    assert n == molre_param_count(d)
    if d == 768:  # experts 6*(8*768*2) = 73,728 + router 768*256+256+256*6+6 = 198,406
        assert n == 272_134
    # Table 2 reports 0.28M / 0.37M / 0.41M: the counts rounded up to 0.01M
    assert math.ceil(n / 1e4) / 100 == {768: 0.28, 1024: 0.37, 1152: 0.41}[d]


def test_top_k_keeps_k_experts_and_renormalises():
    torch.manual_seed(4)
    m = MoLRE(16, experts=6, rank=2, router_hidden=8, top_k=2)
    g = m.route(torch.randn(9, 16))
    assert ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(9))


def test_balance_loss_is_one_when_uniform_and_larger_when_collapsed():
    uniform = torch.full((8, 4), 0.25)
    uniform[torch.arange(8), torch.arange(8) % 4] += 1e-3  # break argmax ties evenly
    assert balance_loss(uniform, 4).item() == pytest.approx(1.0, abs=1e-2)
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    assert balance_loss(collapsed, 4).item() > 3.5


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ModelError, match="must equal d_in"):
        MoLRE(16, 20)
    with pytest.raises(ModelError, match="top_k=7"):
        MoLRE(16, experts=6, top_k=7)
    with pytest.raises(ModelError, match="width 16"):
        MoLRE(16)(torch.randn(3, 15))


def test_route_by_slice_gates_every_token_of_a_slice_from_its_mean_token():
    torch.manual_seed(5)
    base = torch.nn.Linear(16, 20)
    m = MoLRE(16, 20, experts=3, rank=2, router_hidden=8, base_layer=base, scale=2.0, route_by="slice")
    _randomise(m)
    direct = m(torch.randn(4, 5, 16))  # called directly, before the classifier said anything: a slice per row
    assert m.last_router_weights.shape == (4, 3) and direct.shape == (4, 5, 20)
    x = torch.randn(6, 5, 16)  # 3 slices, each split over 2 leading rows (DaViT windows), 5 tokens per row
    m.route_items = 3
    out = m(x)
    assert m.rows_per_item == 2  # kept: later forwards (any batch) need no slice count
    g = m.route(x.reshape(3, 10, 16).mean(dim=1))  # [3, K]: one gate per slice
    for row in range(6):
        delta = sum(g[row // 2, i] * (x[row] @ m.A[i].t() @ m.B[i].t()) for i in range(3))
        torch.testing.assert_close(out[row], base(x[row]) + 2.0 * delta, rtol=1e-5, atol=1e-5)
    assert m.last_router_weights.shape == (3, 3)
    m.route_items = None
    torch.testing.assert_close(m(x[:4]), out[:4])  # 2 slices of the same layer, grouped as before
    flat = torch.randn(4, 16)  # slice features [N, d]: every row is a slice, as with route_by=token
    m.route_by = "token"
    by_token = m(flat)
    m.route_by = "slice"
    torch.testing.assert_close(m(flat), by_token)
    with pytest.raises(ModelError, match="groups of 2 rows, but its input has 5 rows"):
        m(x[:5])
    fresh = MoLRE(16, 20, experts=3, rank=2, router_hidden=8, base_layer=base, route_by="slice")
    fresh.route_items = 4
    with pytest.raises(ModelError, match="4 slices, but its input has 6 rows"):
        fresh(x)
    with pytest.raises(ModelError, match="route_by"):
        MoLRE(16, route_by="volume")
