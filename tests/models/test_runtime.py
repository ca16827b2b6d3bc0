"""Device settings of a built classifier (molre.models.runtime): bf16 frozen weights, regional compile, TF32."""

from __future__ import annotations

import copy

import pytest
import torch

from molre.config import build_config
from molre.errors import ModelError
from molre.models import build_model
from molre.models.runtime import (
    attention_blocks,
    cast_frozen_weights,
    checkpoint_blocks,
    compile_classifier,
    compile_mode,
    compile_regions,
    prepare_runtime,
    set_tf32,
)


def _model(**adapter):
    torch.manual_seed(0)
    model = build_model(build_config({"backbone": {"preset": "tiny-vit"}, "adapter": adapter}))
    for m in model.molre_modules():
        torch.nn.init.normal_(m.B, std=0.1)  # trained-looking experts, so their path is visible in the output
    return model


@pytest.mark.parametrize("placement", ["features", "blocks"])
def test_bf16_frozen_weights_give_the_same_bits_as_autocast_casting_them(placement):
    fp32 = _model(molre={"placement": placement})
    bf16 = copy.deepcopy(fp32)
    assert cast_frozen_weights(bf16) > 0
    for name, p in bf16.named_parameters():
        frozen_weight = not p.requires_grad and ("qkv" in name or "proj" in name or "fc" in name)
        assert p.dtype == (torch.bfloat16 if frozen_weight else torch.float32), name  # norms, adapters: fp32
    x = torch.rand(2, 3, 4, 64, 64)
    outs, grads = [], []
    for model in (fp32, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        outs.append(out)
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_regional_compile_compiles_each_attention_block_and_keeps_the_math():
    eager = _model(molre={"placement": "blocks"})
    compiled = copy.deepcopy(eager)
    regions = compile_classifier(compiled, "regional", backend="aot_eager")  # no C++ toolchain needed
    assert regions == ["blocks.0", "blocks.1"]
    x = torch.rand(2, 3, 4, 64, 64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in compiled.parameters() if p.requires_grad)
    assert (
        compiled.aux_loss() is not None
    )  # the MoLRE modules inside compiled blocks still record their routing


@pytest.mark.parametrize("mode", ["regional", "model"])
def test_a_batch_of_another_size_leaves_full_batches_on_their_static_graph(mode):
    """With Dynamo's automatic dynamic shapes, one short batch made every later full batch run a dynamic-shape
    graph (the benchmark's pure step ran the static one): compiled graphs are static, one per shape."""
    torch._dynamo.reset()
    graphs, calls = [], []

    def recording_backend(gm, example_inputs):  # notes each graph's dynamism and which graph serves a call
        index = len(graphs)
        graphs.append(any(isinstance(a, torch.SymInt) for a in example_inputs)
                      or any(isinstance(d, torch.SymInt) for a in example_inputs
                             if isinstance(a, torch.Tensor) for d in a.shape))  # fmt: skip

        def run(*args):
            calls.append(index)
            return gm.forward(*args)

        return run

    model = _model()
    compile_classifier(model, mode, backend=recording_backend)
    served = []
    for batch in (3, 2, 3):  # full, the epoch's short last batch, full again (1 would be specialised anyway)
        start = len(calls)
        model(torch.rand(batch, 3, 4, 64, 64)).sum().backward()
        served.append(set(calls[start:]))
    assert graphs and not any(graphs)  # no dynamic-shape graph at all
    assert served[2] == served[0] and not served[1] & served[0]


def test_attention_blocks_find_wrapped_linears_of_every_architecture():
    davit = build_model(build_config({"backbone": {"preset": "tiny-davit"}}))
    blocks = attention_blocks(davit.backbone.net, ("attn.qkv", "attn.proj"))
    assert (
        blocks[:2] == ["stages.0.blocks.0.0", "stages.0.blocks.0.1"] and len(blocks) == 8
    )  # spatial, channel
    vit3d = build_model(build_config({"backbone": {"preset": "tiny-vit3d"}}))
    assert attention_blocks(vit3d.backbone.net, ("attn.qkv", "attn.out_proj")) == ["blocks.0", "blocks.1"]
    # DaViT's stages differ in shape: static graphs, one per stage, under a raised recompile limit
    limit = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        assert compile_regions(davit.backbone.net, ("attn.qkv", "attn.proj"), backend="aot_eager") == blocks
        assert torch._dynamo.config.recompile_limit == 64
    finally:
        torch._dynamo.config.recompile_limit = limit


def test_prepare_runtime_follows_the_config_and_the_device():
    assert compile_mode("auto", "cuda") == "regional" and compile_mode("auto", "cpu") == "off"
    model = _model()
    done = prepare_runtime(model, build_config({}), "cpu")  # auto: fp32, eager on CPU
    assert done == {"bf16_autocast": False, "bf16_frozen_tensors": 0, "fp8_frozen_linears": 0, "compile": "off",
                    "compiled_regions": 0, "checkpointed_blocks": 0}  # fmt: skip
    done = prepare_runtime(model, build_config({"train": {"precision": "bf16"}}), "cpu")
    assert (
        done["bf16_autocast"] and done["bf16_frozen_tensors"] == 16
    )  # 2 blocks x 6 linears + patch conv + bias
    assert build_config({"train": {"compile": True}}).train.compile == "regional"


def test_set_tf32_switches_matmul_and_conv_precision():
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        set_tf32(False)
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def _step(model, x, seed=2) -> tuple[int, dict]:
    """One forward + backward: the bytes autograd kept for the backward, and the gradients."""
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(seed)  # the same dropout draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()
    return kept[0], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("preset", "slices", "kept_at_most"),
    [("tiny-vit", 4, 0.2), ("tiny-davit", 4, 0.15), ("tiny-vit3d", 8, 0.8)],
)
def test_activation_checkpointing_keeps_the_gradients_and_drops_the_block_activations(
    preset, slices, kept_at_most
):
    """Non-reentrant recompute replays dropout (LoRA dropout 0.1 here): the same gradients, bit for bit, from a
    fraction of the saved activations (the blocks' inside is recomputed; 3D: the tiny MONAI ViT's patch
    embedding and head keep most of it)."""
    tree = {
        "backbone": {"preset": preset},
        "adapter": {"lora": {"dropout": 0.1}},
        "data": {"num_slices": slices},
    }
    x = torch.rand(2, 3, slices, 64, 64)
    results = {}
    for recompute in (False, True):
        cfg = build_config({**tree, "train": {"activation_checkpointing": recompute}})
        torch.manual_seed(0)
        model = build_model(cfg).train()
        assert prepare_runtime(model, cfg, "cpu")["checkpointed_blocks"] == (
            len(attention_blocks(model.backbone.net, model.backbone.preset.lora_targets)) if recompute else 0
        )
        results[recompute] = _step(model, x)
    (plain_bytes, plain), (recomputed_bytes, recomputed) = results[False], results[True]
    assert recomputed.keys() == plain.keys() and all(torch.equal(recomputed[n], plain[n]) for n in plain)
    assert recomputed_bytes < kept_at_most * plain_bytes


def test_checkpointed_blocks_compile_and_keep_the_math():
    eager = _model(molre={"placement": "blocks"})
    recomputed = copy.deepcopy(eager)
    assert checkpoint_blocks(recomputed.backbone.net, ("attn.qkv", "attn.proj")) == ["blocks.0", "blocks.1"]
    compile_classifier(recomputed, "regional", backend="aot_eager")
    x = torch.rand(2, 3, 4, 64, 64)
    with torch.no_grad():  # validation: nothing recomputed
        torch.testing.assert_close(recomputed(x), eager(x), rtol=1e-5, atol=1e-5)
    (_, want), (_, got) = _step(eager, x), _step(recomputed, x)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_recomputes_the_dense_layers_of_a_3d_densenet():
    """tiny-cnn3d (MONAI DenseNet, fully fine-tuned, BatchNorm everywhere): each dense layer is recomputed, with the
    same gradients and running statistics (a plain recompute would update BatchNorm's a second time) and the same
    parameter names, from a fraction of the saved activations (1.7 -> 1.0 MiB here; the stem keeps most of it)."""
    tree = {"backbone": {"preset": "tiny-cnn3d"}, "adapter": {"kind": "none"}, "data": {"num_slices": 8}}
    x = torch.rand(2, 3, 8, 64, 64)
    results = {}
    for recompute in (False, True):
        cfg = build_config({**tree, "train": {"activation_checkpointing": recompute}})
        torch.manual_seed(0)
        model = build_model(cfg).train()
        layers = prepare_runtime(model, cfg, "cpu")["checkpointed_blocks"]
        assert layers == (4 if recompute else 0)  # 2 blocks x 2 dense layers
        results[recompute] = (*_step(model, x), model)
    (plain_bytes, plain, plain_model), (recomputed_bytes, recomputed, model) = results[False], results[True]
    assert recomputed.keys() == plain.keys() and len(plain) > 20  # the whole net trains
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6)
    stats = plain_model.state_dict()
    assert model.state_dict().keys() == stats.keys()  # checkpoints load either way
    for name, value in model.state_dict().items():  # running_mean / var, num_batches_tracked: updated once
        torch.testing.assert_close(value, stats[name], rtol=1e-5, atol=1e-6, msg=name)
    assert recomputed_bytes < 0.65 * plain_bytes
    with torch.no_grad():  # validation: the plain forward
        torch.testing.assert_close(model.eval()(x), plain_model.eval()(x))


def test_activation_checkpointing_needs_attention_blocks_or_dense_layers():
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3), torch.nn.BatchNorm3d(8), torch.nn.ReLU())
    with pytest.raises(
        ModelError, match="recomputes attention blocks or MONAI dense layers; Sequential has neither"
    ):
        checkpoint_blocks(net, ())


def test_checkpointed_dense_layers_compile_and_update_the_running_stats_once():
    """Compiled (the whole net: a CNN has no attention blocks), AOTAutograd recomputes the tagged layers without
    the eager restore of BatchNorm's buffers: the plain model's gradients and buffers, from 1.7 MiB saved instead
    of compiled plain's 2.5 (2.05 when Dynamo is handed the restoring context_fn, which it takes for a selective
    checkpointing policy in place of its recompute-everything one)."""
    cfg = build_config({"backbone": {"preset": "tiny-cnn3d"}, "adapter": {"kind": "none"}})
    torch.manual_seed(0)
    eager = build_model(cfg).train()
    plain, recomputed = copy.deepcopy(eager), copy.deepcopy(eager)
    assert len(checkpoint_blocks(recomputed.backbone.net, ())) == 4
    for model in (plain, recomputed):
        assert compile_classifier(model, "regional", backend="aot_eager") == [""]
    x = torch.rand(2, 3, 8, 64, 64)
    (_, want), (plain_bytes, _), (recomputed_bytes, got) = (_step(m, x) for m in (eager, plain, recomputed))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6)
    stats = eager.state_dict()
    for name, value in recomputed.state_dict().items():
        torch.testing.assert_close(value, stats[name], rtol=1e-5, atol=1e-6, msg=name)
    assert recomputed_bytes < 0.75 * plain_bytes
