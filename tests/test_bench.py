"""The benchmark harness (bench/run.py) at toy sizes: valid JSON lines, sane fields, BENCHMARKS.md tables.

Correctness of the harness only: no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run

    return run


def _rows(text: str, only_json: bool = False) -> list[dict]:
    """Every stdout line parsed as one JSON object (``only_json``: skip lines Ray's log monitor prints)."""
    lines = [line for line in text.splitlines() if line.strip() and (not only_json or line.startswith("{"))]
    assert lines, "no output"
    return [json.loads(line) for line in lines]  # every stdout line is one JSON object


def test_cpu_suite_toy_size_prints_json_and_writes_tables(bench, tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# molre benchmarks\n\n## On-device augmentation\n\nkept as is\n")
    results = tmp_path / "results.json"
    common = ["--suite", "cpu", "--quick", "--md", str(md), "--results", str(results), "--write"]
    assert bench.main([*common, "--cases", "model_step,blocks"]) == 0
    rows = _rows(capsys.readouterr().out)
    by_case = {r["case"] for r in rows}
    assert {"machine", "model_step", "model_step_ratio", "blocks_step", "blocks_overhead"} <= by_case
    for r in rows:
        assert len(r["loadavg"]) == 3 and r["suite"] == "cpu-quick"
    steps = [r for r in rows if r["case"] == "model_step"]
    # fp32 on CPU: peer+ (bf16 frozen weights, fused AdamW on CUDA) would be the peer, so it is left out
    assert {(r["impl"], r["mode"]) for r in steps} == {("molre", "eager"), ("peer", "eager")}
    for r in steps:
        assert r["slices_per_s"] > 0 and r["gflop_per_slice_step"] > 0 and r["peak_mem_mib"] > 0
        assert r["mem_method"] == "rss-sampled" and r["steps_timed"] == 2 and r["flop_basis"] == "meta"
    # same backbone, same pooling/head: the counted FLOPs differ only by MoLRE on the features (< 5 % here)
    molre, peer = (next(r for r in steps if r["impl"] == i) for i in ("molre", "peer"))
    assert molre["gflop_per_slice_step"] == pytest.approx(peer["gflop_per_slice_step"], rel=0.05)
    assert molre["trainable_params"] > peer["trainable_params"]  # + MoLRE (experts + router)

    text = md.read_text()
    assert "## On-device augmentation\n\nkept as is" in text
    assert "## Model step and training throughput" in text
    assert text.count("<!-- bench/run.py cpu: begin -->") == 1
    assert "| tiny-vit | 1x4x64^2 | molre | eager |" in text and "**MoLRE `blocks` placement" in text


def test_runs_of_other_cases_merge_into_the_tables(bench, tmp_path, capsys):
    md, results = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    common = ["--suite", "cpu", "--quick", "--md", str(md), "--results", str(results), "--write"]
    assert bench.main([*common, "--cases", "augment"]) == 0
    (aug,) = [r for r in _rows(capsys.readouterr().out) if r["case"] == "augment"]
    assert aug["molre_ms_per_volume"] > 0 and aug["monai_cpu_ms_per_volume"] > 0
    # a second run of another case keeps the first run's table (results are merged per case)
    assert bench.main([*common, "--cases", "flops", "--shape", "dinov3-base=1x1"]) == 0
    flops = [r for r in _rows(capsys.readouterr().out) if r["case"] == "flops"]  # counted on the meta device
    (base,) = flops
    assert 60 < base["molre_gflop_per_slice_step"] < 90  # ViT-B/16 at 224^2: ~73 GFLOP fwd + bwd (issue 8)
    # MoLRE in the attention linears: routed per slice (default) costs more than LoRA, per token more still
    assert base["lora_gflop_per_slice_step"] < base["blocks_gflop_per_slice_step"]
    assert base["blocks_gflop_per_slice_step"] < base["blocks_token_gflop_per_slice_step"]
    assert base["blocks_flop_overhead_pct"] < 10 < base["blocks_token_flop_overhead_pct"]  # issue 8: <= 10 %
    text = md.read_text()
    assert text.count("<!-- bench/run.py cpu: begin -->") == 1
    assert "**Augmentation per volume**" in text and "**FLOPs per slice-step**" in text
    assert set(json.loads(results.read_text())) == {"augment", "flops"}


def test_step_variants_regional_compile_and_ablations_at_toy_size(bench, capsys):
    """The GPU suite's variants on CPU: bf16 autocast, regional compile (aot_eager: no C++ build), fast paths off."""
    from model_step import model_step_case

    cpu, shape = bench.torch.device("cpu"), bench.StepShape("tiny-vit", 1, 2)
    timing = {"rounds": 1, "repeats": 1, "warmup": 1, "precision": "bf16"}  # bf16 autocast on CPU
    timing["compile_kwargs"] = {"backend": "aot_eager"}
    rows = model_step_case(shape, cpu, modes=("eager", "regional"), ablations=True, fp8=True, **timing)
    steps = {(r["impl"], r["mode"]): r for r in rows if r["case"] == "model_step"}
    assert set(steps) == {("molre", "eager"), ("peer", "eager"), ("peer+", "eager"), ("molre", "regional"),
                          ("peer", "regional"), ("peer+", "regional"), ("molre-fp8", "eager"),
                          ("molre-fp8", "regional"), ("molre-fp32-frozen", "eager"),
                          ("molre-recompute", "eager"), ("molre-fused-adamw", "eager")}  # fmt: skip
    assert not any("error" in r for r in rows)
    # one FLOP basis: the implementation's meta-device count, whatever the mode, precision or FP8 padding
    molre_flops = {steps[i, m]["gflop_per_slice_step"] for i, m in steps if i.startswith("molre")}
    peer_flops = {steps[i, m]["gflop_per_slice_step"] for i, m in steps if i.startswith("peer")}
    assert len(molre_flops) == len(peer_flops) == 1 and molre_flops.pop() > peer_flops.pop() > 0
    assert steps["molre-fp8", "eager"]["achieved_vs_bf16_peak"] is False
    (summary,) = [r for r in rows if r["case"] == "model_step_ratio"]
    assert summary["bf16"] and summary["molre_over_peer_regional"] > 0
    assert summary["molre_over_peerplus_regional"] > 0 and summary["best_molre_over_best_peerplus"] > 0
    assert summary["speedup_vs_fp32-frozen"] > 0 and summary["speedup_vs_fused-adamw"] > 0
    assert summary["speedup_vs_recompute"] > 0  # activation checkpointing: what it costs
    assert summary["fp8_over_molre_regional"] > 0 and summary["best_fp8_over_best_peer"] > 0
    text = bench.render_block("cpu", {"model_step": {"rows": rows, "command": "c", "date": "d", "machine": {
        "cpu": "x", "cores": 2, "threads": 2, "torch": "t"}}})  # fmt: skip
    assert "| tiny-vit | 1x2x64^2 | fp32-frozen |" in text and "| molre over | eager | regional |" in text
    assert "| tiny-vit | 1x2x64^2 | peer+ |" in text and "fp8 / molre, regional" in text
    capsys.readouterr()


def _step_row(preset: str, impl: str = "molre", mode: str = "eager", sps: float = 10.0, **extra) -> dict:
    return {"case": "model_step", "preset": preset, "input": "1x1", "impl": impl, "mode": mode,
            "slices_per_s": sps, "step_ms": 100 / sps, "step_ms_min": 100 / sps, "cpu_ms_per_step": 100 / sps,
            "loadavg": [1, 1, 1], **extra}  # fmt: skip


def test_a_restricted_run_keeps_the_rows_of_the_variants_it_did_not_measure(bench, tmp_path):
    path, machine = (
        tmp_path / "r.json",
        {"case": "machine", "gpu": "H100", "cpu": "x", "cores": 16, "torch": "t"},
    )
    first = [machine, _step_row("a"), _step_row("a", "peer"), _step_row("b"), _step_row("b", "peer", sps=5.0)]
    bench.merge_results(path, first, "all")
    # a run of b's compiled mode: b's eager rows stay, and the ratios are recomputed from the merged rows
    merged = bench.merge_results(path, [machine, _step_row("b", mode="compiled", sps=20.0),
                                        _step_row("b", "peer", "compiled", sps=20.0)], "b compiled", keep_other=True)  # fmt: skip
    steps = [
        (r["preset"], r["impl"], r["mode"]) for r in merged["model_step"]["rows"] if r["case"] == "model_step"
    ]
    assert steps == [("a", "molre", "eager"), ("a", "peer", "eager"), ("b", "molre", "eager"),
                     ("b", "peer", "eager"), ("b", "molre", "compiled"), ("b", "peer", "compiled")]  # fmt: skip
    ratio = {r["preset"]: r for r in merged["model_step"]["rows"] if r["case"] == "model_step_ratio"}
    assert ratio["b"]["molre_over_peer_eager"] == 2.0 and ratio["b"]["molre_over_peer_compiled"] == 1.0
    assert merged["model_step"]["command"] == "all; b compiled"
    # a new row of a stored key replaces it; an unrestricted run replaces the case; so does another machine
    again = bench.merge_results(path, [machine, _step_row("a", sps=1.0)], "a", keep_other=True)["model_step"]
    assert [
        r["slices_per_s"] for r in again["rows"] if r.get("preset") == "a" and r.get("impl") == "molre"
    ] == [1.0]
    assert [r["preset"] for r in bench.merge_results(path, [machine, _step_row("b")], "b")["model_step"]["rows"]
            if r["case"] == "model_step"] == ["b"]  # fmt: skip
    other = {**machine, "gpu": "H200"}
    merged = bench.merge_results(path, [other, _step_row("c")], "c", keep_other=True)
    assert [r["preset"] for r in merged["model_step"]["rows"] if r["case"] == "model_step"] == ["c"]


def test_a_killed_run_keeps_what_it_finished(bench, tmp_path, monkeypatch, capsys):
    """Results are merged after every step shape: a case that dies after its first shape keeps that shape."""
    md, results = tmp_path / "B.md", tmp_path / "gpu.json"

    def run_case(case, suite, device, args, common):
        yield [{"case": "model_step", "preset": "a", "input": "1x1", "impl": i, "mode": "eager",
                "slices_per_s": 1.0, "step_ms": 1.0, "step_ms_min": 1.0, "cpu_ms_per_step": 1.0, "gflop_per_slice_step": 1.0,
                "achieved_gflops": 1.0, "peak_mem_mib": 1.0, "mem_method": "m", "loadavg": [1, 1, 1]}
               for i in ("molre", "peer")]  # fmt: skip
        assert results.exists()  # written before the next shape starts
        raise SystemExit("killed at the stage's time limit")

    monkeypatch.setattr(bench, "run_case", run_case)
    with pytest.raises(SystemExit):
        bench.main(["--suite", "gpu", "--cases", "model_step", "--device", "cpu", "--md", str(md),
                    "--results", str(results)])  # fmt: skip
    kept = json.loads(results.read_text())["model_step"]["rows"]
    assert {r["case"] for r in kept} == {"model_step", "model_step_ratio"} and len(kept) == 3
    assert "| a | 1x1 | peer | 1.00x (1.00x; 1.00x) | 1.00x |" in md.read_text()
    capsys.readouterr()


def test_stage_files_of_a_device_session_fold_into_the_suite_results(bench, tmp_path):
    """bench/gpu_session.sh writes one results file per stage; --merge folds them in and rewrites the tables."""
    machine = {"case": "machine", "cpu": "x", "cores": 16, "threads": 16, "torch": "t", "gpu": "H100"}

    def stage(name, command, rows):
        path = tmp_path / name
        path.write_text(json.dumps({rows[0]["case"]: {"rows": rows, "command": command, "date": "2026-11-24",
                                                      "machine": machine}}))  # fmt: skip
        return path

    aug = {"case": "augment", "shape": [2, 4, 4], "batch": 1, "device": "cuda", "molre_ms_per_volume": 0.5,
           "monai_cpu_ms_per_volume": 500.0, "monai_over_molre": 1000.0}  # fmt: skip
    flops = {"case": "flops", "preset": "a", "input": "1x1"}
    files = [
        stage("1.json", "python bench/run.py --suite gpu --cases augment --results /o/1.json --md /tmp/1.md",
              [{**aug, "loadavg": [1, 1, 1]}, {**aug, "loadavg": [2, 2, 2]}]),  # same row twice: kept once
        stage("2.json", "python bench/run.py --suite gpu --cases flops --results /o/2.json", [flops]),
        stage("3.json", "python bench/run.py --suite gpu --cases flops --shape b=1x1",
              [{**flops, "preset": "b"}, {**flops, "preset": "old", "new": True}]),
    ]  # fmt: skip
    results, md = tmp_path / "gpu.json", tmp_path / "B.md"
    results.write_text(json.dumps({
        "flops": {"rows": [{**flops, "preset": "old"}, {**flops, "preset": "kept"}], "command": "old",
                  "date": "2026-11-22", "machine": machine},
        "features": {"rows": [], "command": "kept"}}))  # fmt: skip
    merged = bench.merge_stage_files(results, files)
    assert [r["loadavg"] for r in merged["augment"]["rows"]] == [[1, 1, 1]]
    # the stages' rows replace the stored rows of their keys; the stored rows of other keys stay
    assert [(r["preset"], r.get("new")) for r in merged["flops"]["rows"]] == [
        ("old", True), ("kept", None), ("a", None), ("b", None)]  # fmt: skip
    assert merged["flops"]["command"] == (
        "old; python bench/run.py --suite gpu --cases flops; python bench/run.py --suite gpu --cases flops --shape b=1x1"
    )
    assert merged["flops"]["date"] == "2026-11-22..2026-11-24"
    assert merged["augment"]["command"] == "python bench/run.py --suite gpu --cases augment"
    assert merged["features"]["command"] == "kept" and json.loads(results.read_text()) == merged
    del merged["flops"], merged["features"]
    results.write_text(json.dumps(merged))
    assert (
        bench.main(["--suite", "gpu", "--merge", str(files[0]), "--results", str(results), "--md", str(md)])
        == 0
    )
    assert "| 2x4x4 | 1 | cuda | 0.5 | - | - | 500.0 | 1000.0x | - | 1.0 |" in md.read_text()


def test_a_regional_stage_merged_into_the_gpu_results_keeps_the_other_variants(bench, tmp_path):
    """The audit's case: a stage of dinov3-base in regional mode only must leave the compiled peer and the
    other presets' rows in place (it used to replace the whole model_step case)."""
    machine = {"case": "machine", "cpu": "x", "cores": 16, "threads": 16, "torch": "t", "gpu": "H100"}
    stored = [_step_row(p, i, m, sps=s, input="8x32x224^2") for p, s in (("dinov3-base", 10.0), ("dinov3-large", 4.0))
              for m in ("eager", "compiled", "regional") for i in ("molre", "peer")]  # fmt: skip
    results = tmp_path / "gpu.json"
    results.write_text(json.dumps({"model_step": {"rows": stored, "command": "old", "date": "2026-11-22",
                                                  "machine": machine}}))  # fmt: skip
    fresh = [
        {**_step_row("dinov3-base", i, "regional", sps=12.0), "input": "8x32x224^2"}
        for i in ("molre", "peer+")
    ]
    fresh.append({"case": "model_step", "preset": "dinov3-base", "input": "8x32x224^2", "impl": "molre-fp8",
                  "mode": "regional", "error": "RuntimeError: boom", "loadavg": [1, 1, 1]})  # fmt: skip
    stage = tmp_path / "gpu-1.json"
    stage.write_text(json.dumps({"model_step": {"rows": fresh, "command": "new --results /o/gpu-1.json",
                                                "date": "2026-11-24", "machine": machine}}))  # fmt: skip
    merged = bench.merge_stage_files(results, [stage])["model_step"]["rows"]
    kept = {(r["preset"], r["impl"], r["mode"]): r for r in merged if r["case"] == "model_step"}
    assert len(kept) == 12 + 2  # every stored variant (molre regional replaced) + peer+ and the FP8 error
    assert kept["dinov3-base", "molre", "regional"]["slices_per_s"] == 12.0
    assert kept["dinov3-base", "peer", "compiled"]["slices_per_s"] == 10.0  # the compiled peer stays
    assert "error" in kept["dinov3-base", "molre-fp8", "regional"]
    ratios = {r["preset"]: r for r in merged if r["case"] == "model_step_ratio"}
    assert ratios["dinov3-base"]["molre_over_peer_compiled"] == 1.0
    assert ratios["dinov3-base"]["molre_over_peer_regional"] == 1.2  # new molre over the stored peer
    assert ratios["dinov3-base"]["molre_over_peerplus_regional"] == 1.0
    assert "fp8_over_peer_regional" not in ratios["dinov3-base"] and "dinov3-large" in ratios


def test_gpu_suite_quick_on_cpu_isolates_a_failing_variant(bench, tmp_path, monkeypatch, capsys):
    """The GPU suite's step, blocks, flops and augment cases at toy size on CPU; FP8's matmul made to fail: its
    variant gets an error row, molre and the peer keep theirs and their ratios (the Ray cases: the slow test)."""
    import molre.models.fp8 as fp8

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: _scaled_mm not supported here")

    monkeypatch.setattr(fp8, "scaled_matmul", broken)
    md, results = tmp_path / "B.md", tmp_path / "gpu.json"
    args = ["--suite", "gpu", "--quick", "--device", "cpu", "--shape", "tiny-vit=1x2", "--cases",
            "flops,model_step,blocks,augment", "--md", str(md), "--results", str(results), "--write"]  # fmt: skip
    assert bench.main(args) == 1  # a failed variant is a failure of the run, not of its figures
    rows = _rows(capsys.readouterr().out)
    assert {"machine", "flops", "model_step", "model_step_ratio", "blocks_step", "blocks_overhead",
            "augment"} == {r["case"] for r in rows}  # fmt: skip
    steps = {(r["impl"], r["mode"]): r for r in rows if r["case"] == "model_step"}
    # eager on CPU: molre, peer, FP8, recompute and fused AdamW; no peer+ (fp32: it is the peer)
    assert set(steps) == {("molre", "eager"), ("peer", "eager"), ("molre-fp8", "eager"),
                          ("molre-recompute", "eager"), ("molre-fused-adamw", "eager")}  # fmt: skip
    assert steps["molre-fp8", "eager"]["error"].startswith("RuntimeError: simulated")
    assert all("error" not in r and r["slices_per_s"] > 0 for k, r in steps.items() if k[0] != "molre-fp8")
    (ratio,) = [r for r in rows if r["case"] == "model_step_ratio"]
    assert ratio["molre_over_peer_eager"] > 0 and ratio["speedup_vs_fused-adamw"] > 0
    assert not any(k.startswith(("fp8_", "best_fp8")) for k in ratio)
    (flops,) = [r for r in rows if r["case"] == "flops"]  # the step rows' GFLOP are the flops case's counts
    assert steps["molre", "eager"]["flops_per_step"] / 2 / 1e9 == pytest.approx(
        flops["molre_gflop_per_slice_step"], abs=5e-4)  # fmt: skip
    (blocks,) = [r for r in rows if r["case"] == "blocks_overhead"]
    assert blocks["slice_flop_overhead_pct"] == pytest.approx(flops["blocks_flop_overhead_pct"], abs=0.01)
    (aug,) = [r for r in rows if r["case"] == "augment"]
    assert aug["molre_fullres_warp_ms_per_volume"] > 0 and aug["monai_over_molre_fullres"] > 0
    text = md.read_text()
    assert (
        "Variant `molre-fp8` / `eager` of tiny-vit 1x2x64^2 (model_step) failed: `RuntimeError: simulated"
        in text
    )
    assert "| tiny-vit | 1x2x64^2 | peer | " in text and "warp only, full-res field" in text
    stored = json.loads(results.read_text())
    assert {(r["impl"], "error" in r) for r in stored["model_step"]["rows"] if r["case"] == "model_step"} == {
        ("molre", False), ("peer", False), ("molre-fp8", True), ("molre-recompute", False),
        ("molre-fused-adamw", False)}  # fmt: skip


def test_step_case_skips_ablations_without_eager_and_variants_past_the_deadline(bench, monkeypatch, capsys):
    import time

    import model_step

    timed = []

    def fake_measure(variants, batch, device, rounds, repeats, warmup, deadline=None):
        for v in variants:
            timed.append((v.impl, v.mode))
            v.times, v.cpu_times, v.memory = [0.1], [0.1], {"peak_bytes": 1, "method": "fake"}

    cpu, shape = bench.torch.device("cpu"), bench.StepShape("tiny-vit", 1, 2)
    monkeypatch.setattr(model_step, "measure", fake_measure)
    rows = model_step.model_step_case(shape, cpu, modes=("compiled",), ablations=True, precision="bf16")
    assert timed == [
        ("molre", "compiled"),
        ("peer", "compiled"),
        ("peer+", "compiled"),
    ]  # no eager: no ablations
    assert {r["case"] for r in rows} == {"model_step", "model_step_ratio"}
    monkeypatch.undo()
    # past the deadline: every variant is skipped with an error row, none is warmed up or timed
    rows = model_step.model_step_case(shape, cpu, modes=("eager",), deadline=time.time() - 1)
    assert [r["error"].startswith("skipped:") for r in rows] == [True, True]
    capsys.readouterr()


def _options(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"shape": None, "no_compile": False, "modes": None, "epoch_train": None,
                                 "fp8": False, "no_fp8": False, "no_ablations": False, "no_peer_plus": False,
                                 "features_train": None, **given})  # fmt: skip


def test_suite_options_pick_modes_and_epoch_size(bench):
    suite = bench.apply_options(bench.suite_config("gpu", quick=False), _options(modes=["eager", "regional"]))
    assert suite.modes == ("eager", "regional") and suite.epoch["counts"]["train"] == 64
    suite = bench.apply_options(bench.suite_config("gpu", quick=False), _options(epoch_train=192))
    assert suite.modes == bench.MODES and suite.epoch["counts"] == {"train": 192, "val": 8}
    assert suite.fp8  # the gpu suite measures molre-fp8 by default; the cpu suite on request
    assert not bench.suite_config("cpu", quick=False).fp8
    assert bench.apply_options(bench.suite_config("cpu", quick=False), _options(fp8=True)).fp8
    suite = bench.apply_options(
        bench.suite_config("gpu", quick=False), _options(no_fp8=True, no_ablations=True)
    )
    assert not suite.fp8 and not suite.ablations and suite.peer_plus
    assert not bench.apply_options(
        bench.suite_config("gpu", quick=False), _options(no_peer_plus=True)
    ).peer_plus
    suite = bench.apply_options(bench.suite_config("gpu", quick=False), _options(features_train=512))
    assert suite.features["counts"] == {"train": 512, "val": 16}
    shape = bench.parse_shape("dinov3-large=4x32")
    suite = bench.apply_options(bench.suite_config("gpu", quick=False), _options(shape=[shape]))
    assert suite.steps == suite.blocks == [shape]
    with pytest.raises(SystemExit):
        bench.main(["--suite", "gpu", "--modes", "eager,fast"])


def test_unknown_case_and_bad_shape_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--suite", "cpu", "--cases", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--suite", "cpu", "--shape", "tiny-vit=2by8"])
    assert bench.parse_shape("medgemma=1x8@448") == bench.StepShape("medgemma", 1, 8, 448)


@pytest.mark.slow
def test_ray_cases_at_toy_size(bench, ray_local, tmp_path, capsys):
    """The full Ray Train epoch case and the cached-feature trial case, on the session's local Ray."""
    md = tmp_path / "B.md"
    args = ["--suite", "cpu", "--quick", "--cases", "train_epoch,features", "--md", str(md),
            "--results", str(tmp_path / "r.json"), "--write"]  # fmt: skip
    assert bench.main(args) == 0
    rows = {r["case"]: r for r in _rows(capsys.readouterr().out, only_json=True)}
    epoch, feats = rows["train_epoch"], rows["features"]
    assert epoch["workers"] == 1 and epoch["epochs_timed"] == 1 and epoch["epoch_volumes_per_s"] > 0
    assert epoch["epoch_over_step"] > 0 and epoch["step_volumes_per_s"] > 0
    assert (
        epoch["train_cached"] and epoch["worker_volumes_per_s"] > 0
    )  # epoch 1 replayed the rows read in epoch 0
    # the judged epoch figure: the worker's train pass over the pure step; the fixed per-epoch cost apart
    assert epoch["train_volumes_per_s"] > 0 and epoch["train_over_step"] > 0 and epoch["train_s"] > 0
    assert epoch["val_s"] > 0 and epoch["epoch_fixed_s"] == pytest.approx(
        epoch["epoch_s"] - epoch["train_s"], abs=0.01
    )
    assert epoch["train_steps_per_epoch"] >= 1
    assert feats["cached_trial_s"] > 0 and feats["e2e_trial_s"] > 0 and feats["e2e_over_cached"] > 0
    # per trial, per epoch and the fixed start-up apart, with the trial's length
    assert feats["e2e_epoch_over_cached_epoch"] > 0 and feats["e2e_fixed_s"] > 0
    assert feats["epochs_run"] == feats["epochs"] == 2 and feats["train_volumes"] == 6
    text = md.read_text()
    assert "**Full Ray Train epoch vs the pure step**" in text and "train pass / step" in text
    assert "per epoch: e2e / cached" in text


def test_multi_fidelity_bench_scores_points_over_seeds_and_sizes_the_seed_noise(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import multifidelity_bench as mfb
    import pandas as pd

    table = pd.DataFrame({
        "point": ["a", "a", "b", "b", "c"],
        "status": ["TERMINATED"] * 4 + ["ERROR"],
        "val/best_mean_auc": [0.60, 0.64, 0.70, 0.70, 0.99],
    })  # fmt: skip
    scores = mfb.point_scores(table, "val/best_mean_auc")
    assert scores.to_dict() == pytest.approx({"a": 0.62, "b": 0.70})  # failed trials do not count
    noise = mfb.seed_noise(table, "val/best_mean_auc")
    std_a = 0.04 / 2**0.5  # sample std of (0.60, 0.64)
    assert noise["grid_seed_std"] == pytest.approx(std_a / 2, abs=1e-4)  # mean over a (std_a) and b (0)
    assert noise["grid_mean_stderr"] == pytest.approx(std_a / 2**0.5 / 2, abs=1e-4)
    assert mfb.seed_noise(table.iloc[[0, 2]], "val/best_mean_auc") == {}  # one seed per point: no estimate


def test_confirm_curve_gives_each_confirm_top_its_exact_gap_and_estimated_cost(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import multifidelity_bench as mfb
    import pandas as pd

    grid = pd.DataFrame({  # end to end, two seeds per point: b is the best; d's second seed failed
        "point": ["a", "a", "b", "b", "c", "c", "d", "d"],
        "status": ["TERMINATED"] * 7 + ["ERROR"],
        "val/best_mean_auc": [0.60, 0.60, 0.70, 0.70, 0.64, 0.66, 0.50, None],
        "seconds": [10.0, 10.0, 30.0, 30.0, 20.0, 20.0, 40.0, 5.0],
    })  # fmt: skip
    screen = pd.Series({"a": 0.80, "b": 0.60, "c": 0.75, "d": 0.55})  # the screen ranks a, c, b, d
    curve = mfb.confirm_curve(grid, "val/best_mean_auc", screen, screen_wall=16.0, grid_wall=320.0)
    assert [k for k, _, _ in curve] == [1, 2, 3, 4]
    assert [gap for _, gap, _ in curve] == pytest.approx([0.10, 0.05, 0.0, 0.0])  # b is reached at k = 3
    # wall = 2 x summed trial time (320 / 160): a costs 20 s of trials, + c 40, + b 60, + d 40
    assert [ratio for _, _, ratio in curve] == pytest.approx([0.175, 0.425, 0.8, 1.05])


@pytest.mark.slow
def test_trial_startup_bench_runs_screen_trials_in_one_reused_actor_or_one_each(
    monkeypatch, ray_local, tiny_dataset, tmp_path
):
    monkeypatch.syspath_prepend(str(BENCH))
    import trial_startup

    from molre.tune.space import SweepSpec

    spec = SweepSpec.model_validate({
        "name": "startup",
        "base": {"backbone": {"preset": "tiny-vit", "finetune": "frozen"},
                 "train": {"max_epochs": 2, "min_epochs": 0, "batch_size": 4}},
        "space": {"loss.gamma": {"choice": [0.0, 2.0]}},  # two trials: enough to tell a reused actor
        "search": {"algorithm": "grid"},
        "resources": {"num_workers": 1, "max_concurrent_trials": 1},
    })  # fmt: skip
    off, on = (
        trial_startup.run_stage(spec, "screen", reuse, tiny_dataset, str(tmp_path)) for reuse in (False, True)
    )
    assert off["finished"] == on["finished"] == 2
    assert off["processes"] == 2 and on["processes"] == 1  # a fresh actor per trial, or one for all
    assert on["mean_best_auc"] == off["mean_best_auc"]  # the trials compute the same either way


def test_fp8_numerics_pairs_the_two_arms_seed_by_seed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import pandas as pd
    from fp8_numerics import paired_difference, per_finding_difference

    rows = [{"status": "TERMINATED", "config/train.frozen_matmul": arm, "config/train.seed": seed,
             "val/best_mean_auc": auc, "auc/f1": auc, "auc/f2": 0.5}
            for arm, seed, auc in [("auto", 0, 0.70), ("fp8", 0, 0.71), ("auto", 1, 0.60), ("fp8", 1, 0.58),
                                   ("auto", 2, 0.65), ("fp8", 2, float("nan"))]]  # fmt: skip
    rows.append({**rows[0], "config/train.seed": 3, "status": "ERROR"})  # an arm that failed: seed left out
    table = pd.DataFrame(rows)
    out = paired_difference(table, "val/best_mean_auc")
    assert out["seeds"] == [0, 1] and out["seeds_left_out"] == 2
    assert out["diff_per_seed"] == [0.01, -0.02] and out["diff_mean"] == pytest.approx(-0.005)
    assert out["auto_seed_std"] == pytest.approx(0.0707, abs=1e-4)
    per_finding = per_finding_difference(table)
    assert per_finding["finding_max"] == "f1" and per_finding["finding_abs_diff_max"] == pytest.approx(0.015)
    with pytest.raises(ValueError, match="fp8"):
        paired_difference(table[table["config/train.frozen_matmul"] == "auto"], "val/best_mean_auc")


def test_saved_activations_counts_what_checkpointing_removes(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    from saved_activations import main

    assert main(["--preset", "tiny-cnn3d", "--input", "8", "64", "64"]) == 0
    [row] = _rows(capsys.readouterr().out)
    assert (
        row["preset"] == "tiny-cnn3d" and row["input"] == [1, 3, 8, 64, 64] and row["recomputed_regions"] == 4
    )
    assert 0 < row["checkpointed_packed_mib"] < row["plain_packed_mib"]
    assert 0 < row["unique_ratio"] < 1
