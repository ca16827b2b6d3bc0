"""The benchmark harness (bench/run.py) at toy sizes: valid JSON lines, sane fields, BENCHMARKS.md tables.

Correctness of the harness only: no timing is asserted.
"""

from __future__ import annotations

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
    assert {(r["impl"], r["mode"]) for r in steps} == {("molre", "eager"), ("peer", "eager")}
    for r in steps:
        assert r["slices_per_s"] > 0 and r["gflop_per_slice_step"] > 0 and r["peak_mem_mib"] > 0
        assert r["mem_method"] == "rss-sampled" and r["steps_timed"] == 2
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
    rows = model_step_case(shape, cpu, modes=("eager", "regional"), ablations=True, **timing)
    steps = {(r["impl"], r["mode"]): r for r in rows if r["case"] == "model_step"}
    assert set(steps) == {("molre", "eager"), ("peer", "eager"), ("molre", "regional"), ("peer", "regional"),
                          ("molre-fp32-frozen", "eager"), ("molre-fused-adamw", "eager")}  # fmt: skip
    molre_flops = {steps["molre", m]["gflop_per_slice_step"] for m in ("eager", "regional")}
    assert len(molre_flops) == 1  # counted once, on the eager twin
    (summary,) = [r for r in rows if r["case"] == "model_step_ratio"]
    assert summary["bf16"] and summary["molre_over_peer_regional"] > 0
    assert summary["speedup_vs_fp32-frozen"] > 0 and summary["speedup_vs_fused-adamw"] > 0
    text = bench.render_block("cpu", {"model_step": {"rows": rows, "command": "c", "date": "d", "machine": {
        "cpu": "x", "cores": 2, "threads": 2, "torch": "t"}}})  # fmt: skip
    assert "| tiny-vit | 1x2x64^2 | fp32-frozen |" in text and "molre / peer, regional" in text
    capsys.readouterr()


def test_a_run_of_one_shape_keeps_the_other_shapes_rows(bench, tmp_path):
    path, machine = tmp_path / "r.json", {"case": "machine"}
    row = lambda preset: {"case": "model_step", "preset": preset, "input": "1x1"}  # noqa: E731
    bench.merge_results(path, [machine, row("a"), row("b")], "all")
    merged = bench.merge_results(path, [machine, row("b")], "only b", keep_shapes=True)
    assert [r["preset"] for r in merged["model_step"]["rows"]] == ["a", "b"]
    assert merged["model_step"]["command"] == "all; only b"
    assert [
        r["preset"] for r in bench.merge_results(path, [machine, row("b")], "b")["model_step"]["rows"]
    ] == ["b"]


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
    assert feats["cached_trial_s"] > 0 and feats["e2e_trial_s"] > 0 and feats["e2e_over_cached"] > 0
    assert "**Full Ray Train epoch vs the pure step**" in md.read_text()
