"""FP8 frozen linears (molre.models.fp8): numerics against nn.Linear, conversion of a classifier, DDP, compile.

``torch._scaled_mm`` runs on CPU, so the numerics are the ones a GPU computes up to accumulation order; e4m3
keeps 3 mantissa bits, so a product of rounded operands sits ~2^-4 / sqrt(3) ~ 3.6 % (relative, in norm) from
the exact one for Gaussian data: the bounds below are 5 %.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from molre.config import build_config
from molre.errors import ConfigError
from molre.models import build_model
from molre.models.fp8 import (
    FP8_MAX,
    FrozenFp8Linear,
    convert_frozen_linears,
    fp8_eligible,
    quantize_rows,
)
from molre.models.runtime import prepare_runtime
from molre.train.checkpoint import trained_state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _frozen_linear(d_in=256, d_out=384, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)


def test_rows_are_scaled_to_e4m3s_range_and_round_within_its_precision():
    torch.manual_seed(0)
    v = torch.randn(40, 96) * torch.logspace(-3, 3, 40)[:, None]  # rows six orders of magnitude apart
    v[7] = 0.0
    q, scale = quantize_rows(v)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (40, 1) and torch.isfinite(scale).all()
    back = q.float() * scale
    assert back[7].abs().max() == 0  # a zero row stays zero (no 0/0)
    assert (scale.log2() == scale.log2().round()).all()  # powers of two: dividing by them is exact
    top = q.float().abs().amax(1)[torch.arange(40) != 7]
    assert (top >= FP8_MAX / 2).all() and (top <= FP8_MAX).all()  # each row's amax lands in [224, 448]
    normal = v.abs() >= scale * 2.0**-6  # e4m3's normal range (its smallest normal is 2^-6)
    assert ((back - v).abs() <= 2.0**-4 * v.abs() + 1e-30)[normal].all()  # half a unit in the 3-bit mantissa


@pytest.mark.parametrize("lead", [(2, 64), (3, 67)])  # 128 rows, and 201: padded to 208 for the product
def test_forward_and_input_gradient_match_the_linear_within_fp8_precision(lead):
    lin = _frozen_linear()
    fp8 = FrozenFp8Linear(lin)
    x = torch.randn(*lead, 256, requires_grad=True)
    dy = torch.randn(*x.shape[:-1], 384)
    y = fp8(x)
    (gx,) = torch.autograd.grad(y, x, dy)
    y_ref = lin(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert y.shape == y_ref.shape and y.dtype == torch.float32 and gx.dtype == torch.float32
    assert _rel(y, y_ref) < 0.05 and _rel(gx, gx_ref) < 0.05


def test_under_bf16_autocast_it_gives_what_autocast_gives_a_linear():
    lin, x = _frozen_linear(), torch.randn(32, 256, requires_grad=True)
    fp8 = FrozenFp8Linear(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = fp8(x), lin(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert _rel(y, y_ref) < 0.05
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32  # the input's dtype, as autocast's linear would give


def test_a_trainable_bias_gets_its_exact_gradient_and_buffers_none():
    lin = _frozen_linear()
    lin.bias.requires_grad_(True)
    fp8 = FrozenFp8Linear(lin)
    x, dy = torch.randn(48, 256), torch.randn(48, 384)
    fp8(x).backward(dy)
    assert torch.allclose(fp8.bias.grad, dy.sum(0), atol=1e-5)  # d(xW^T + b)/db = sum of dy
    assert all(not b.requires_grad for b in fp8.buffers())
    assert [n for n, _ in fp8.named_parameters()] == ["bias"]
    assert fp8.state_dict().keys() == {"bias"}  # the FP8 copies are derived, not saved


def test_only_plain_frozen_linears_with_sizes_a_multiple_of_16_are_eligible():
    assert fp8_eligible(_frozen_linear())
    assert not fp8_eligible(nn.Linear(256, 384))  # trainable
    assert not fp8_eligible(_frozen_linear(250, 384))  # cuBLAS: multiples of 16
    mha = nn.MultiheadAttention(64, 4).requires_grad_(False)
    assert not fp8_eligible(mha.out_proj)  # its owner reads .weight directly
    assert not fp8_eligible(nn.Conv2d(16, 16, 3).requires_grad_(False))


def _classifier(**backbone):
    torch.manual_seed(0)
    cfg = build_config({"backbone": {"preset": "tiny-vit", **backbone}, "data": {"num_slices": 4}})
    model = build_model(cfg)
    for m in model.molre_modules():
        nn.init.normal_(m.B, std=0.1)  # trained-looking experts, so their path shows in the output
    return model


def test_converting_a_classifier_swaps_the_frozen_base_and_keeps_what_trains():
    ref = _classifier()
    model = copy.deepcopy(ref)
    names = convert_frozen_linears(model)
    kinds = {n.rsplit(".", 1)[-1] if "base_layer" not in n else n.rsplit(".", 2)[-2] for n in names}
    assert {"qkv", "proj", "fc1", "fc2"} <= kinds  # LoRA's base layers and the MLPs of every block
    assert all(isinstance(model.get_submodule(n), FrozenFp8Linear) for n in names)
    assert trained_state(model).keys() == trained_state(ref).keys()  # checkpoints unchanged
    x = torch.rand(2, 3, 4, 64, 64)
    out, out_ref = model(x), ref(x)
    assert _rel(out, out_ref) < 0.05
    out.square().mean().backward()
    out_ref.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    compared = 0
    for name, p_ref in ref.named_parameters():
        if p_ref.requires_grad and p_ref.grad is not None and p_ref.grad.norm() > 0:
            cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), p_ref.grad.flatten(), dim=0)
            # LoRA, MoLRE, pooling, head learn what they learn on the exact base. The pooling query's gradient
            # is carried by the differences between the slices' features, a few % of the features of a random
            # net, so FP8's ~1 % feature error shows more there (0.95 measured)
            assert cos > (0.9 if name == "pool.query" else 0.99), name
            compared += 1
    assert compared >= len(names) // 2  # at least the LoRA pairs of the attention linears


def test_a_fully_fine_tuned_backbone_has_nothing_to_convert():
    assert convert_frozen_linears(_classifier(finetune="full")) == []


def test_ddp_leaves_the_fp8_buffers_alone():
    model = _classifier()
    convert_frozen_linears(model)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        fp8_buffers = {id(b) for m in model.modules() if isinstance(m, FrozenFp8Linear) for b in m.buffers()}
        assert fp8_buffers and not fp8_buffers & {id(b) for b in ddp.modules_buffers}
        ddp(torch.rand(1, 3, 4, 64, 64)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_prepare_runtime_converts_on_request_and_the_compiled_step_trains():
    """What a GPU worker runs: FP8 frozen linears, the rest bf16 under autocast, each block compiled whole
    (``fullgraph``: the FP8 product must not break a block's graph)."""
    train = {"frozen_matmul": "fp8", "precision": "bf16"}
    tree = {"backbone": {"preset": "tiny-vit"}, "data": {"num_slices": 4}, "train": train}
    cfg = build_config(tree)
    torch.manual_seed(0)
    model = build_model(cfg)
    done = prepare_runtime(model, cfg, "cpu", compile="regional", backend="aot_eager", fullgraph=True)
    assert done["fp8_frozen_linears"] > 0 and done["compiled_regions"] > 0 and done["bf16_frozen_tensors"] > 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.rand(2, 3, 4, 64, 64), torch.zeros(2, 75)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    default = build_config({**tree, "train": {}})
    assert prepare_runtime(build_model(default), default, "cpu")["fp8_frozen_linears"] == 0


def test_frozen_matmul_setting_is_checked():
    with pytest.raises(ConfigError, match="frozen_matmul"):
        build_config({"train": {"frozen_matmul": "fp4"}})


def _has_fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _has_fp8_gpu(), reason="needs a GPU with FP8 tensor cores")
def test_on_an_fp8_gpu_cublas_gives_what_the_cpu_gives():
    """cuBLAS's row-wise kernels (fast accumulation in the forward) against the CPU's products, and a compiled
    block under bf16 autocast: run on the lent GPU (`pytest tests/models/test_fp8.py`), skipped elsewhere."""
    lin = _frozen_linear(768, 3072)
    cpu, gpu = FrozenFp8Linear(lin), FrozenFp8Linear(copy.deepcopy(lin).cuda())
    x = torch.randn(8 * 201, 768)  # 1,608 token rows: a multiple of 8, padded to 1,616 for cuBLAS
    dy = torch.randn(8 * 201, 3072)
    xc = x.clone().requires_grad_(True)
    xg = x.cuda().requires_grad_(True)
    yc, yg = cpu(xc), gpu(xg)
    yc.backward(dy)
    yg.backward(dy.cuda())
    assert _rel(yg.cpu(), yc) < 0.01 and _rel(xg.grad.cpu(), xc.grad) < 0.01  # same operands, another order
    assert _rel(yg.cpu(), lin(x)) < 0.05
    cfg = build_config({"backbone": {"preset": "tiny-vit"}, "data": {"num_slices": 4},
                        "train": {"frozen_matmul": "fp8"}})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    done = prepare_runtime(model, cfg, "cuda", fullgraph=True)  # auto: bf16, regional Inductor compile
    assert done["fp8_frozen_linears"] > 0 and done["compile"] == "regional"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(torch.rand(2, 3, 4, 64, 64, device="cuda"))
    logits.float().square().mean().backward()
    assert torch.isfinite(logits).all()
