from pathlib import Path

import numpy as np
import pytest

from molre.errors import ConfigError
from molre.tune.space import active_keys, grid_points, load_sweep, random_point, run_config_for

SPACES = sorted(Path(__file__).resolve().parents[2].joinpath("search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_loads_samples_and_builds_configs(path):
    assert path.read_text().startswith(
        "# python jobs/sweep.py"
    )  # each file opens with the command that runs it
    spec = load_sweep(path)
    points = grid_points(spec) if spec.search.algorithm == "grid" else [
        random_point(spec, np.random.default_rng(i)) for i in range(8)
    ]  # fmt: skip
    assert points
    for point in points:
        cfg = run_config_for(spec, point, spec.search.seeds[0])
        assert cfg.train.seed == spec.search.seeds[0]


def test_shipped_set_covers_the_issue():
    assert {p.stem for p in SPACES} >= {
        "default",
        "molre_hparams",
        "ablation_lora_vs_molre",
        "paper_table2",
        "placement",
    }


def test_conditional_keys_only_where_the_condition_holds(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: t\n"
        "space:\n"
        "  adapter.kind: {choice: [none, molre]}\n"
        "  adapter.molre.experts: {choice: [2, 4], when: {adapter.kind: molre}}\n"
        "  adapter.molre.rank: {int: [4, 5], when: {adapter.kind: molre}}\n"
        "search: {algorithm: grid}\n"
    )
    points = grid_points(load_sweep(path))
    assert {"adapter.kind": "none"} in points
    assert len(points) == 1 + 2 * 2
    assert all(("adapter.molre.experts" in p) == (p["adapter.kind"] == "molre") for p in points)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = random_point(load_sweep(path), rng)
        assert ("adapter.molre.rank" in p) == (p["adapter.kind"] == "molre")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: t\nspaces: {}\n", "spaces: unknown key"),
        ("name: t\nspace:\n  loss.gamma: {choice: []}\n", "empty choice"),
        ("name: t\nspace:\n  loss.gamma: {float: [3.0, 1.0]}\n", "low 3.0 > high 1.0"),
        (
            "name: t\nspace:\n  adapter.molre.experts: {choice: [2], when: {adapter.kind: molre}}\n",
            "condition on 'adapter.kind', which the space does not define",
        ),
        (
            "name: t\nspace:\n  adapter.molre.expert: {choice: [2]}\n",
            "'adapter.molre.expert' is not a run-config key",
        ),
        (
            "name: t\nspace:\n  adapter.molre.experts: {choice: [0, 2]}\n",
            "adapter.molre.experts: Input should be greater",
        ),
        ("name: t\nbase: {train: {batchsize: 2}}\n", "train.batchsize: unknown key"),
        ("name: t\nspace:\n  loss.gamma: {float: [0, 1], choice: [1]}\n", "give exactly one of"),
        ("name: 'a b'\n", "name: String should match pattern"),
        (
            "name: t\nsearch: {algorithm: grid}\nspace:\n  loss.gamma: {float: [0, 1]}\n",
            "cannot be enumerated",
        ),
        # found by fuzzing (tests/reliability/test_fuzz.py): these escaped as numpy errors or hung
        ("name: t\nspace:\n  loss.gamma: {float: [0.0, .inf]}\n", "bounds must be finite numbers"),
        ("name: t\nspace:\n  loss.gamma: {float: [.nan, 1.0]}\n", "bounds must be finite numbers"),
        ("name: t\nspace:\n  adapter.molre.rank: {int: [4, 99999999999999999999]}\n", "int bounds must lie"),
        (
            "name: t\nsearch: {algorithm: grid}\nspace:\n  adapter.molre.rank: {int: [1, 999999999]}\n",
            "has more than 10000 grid values",
        ),
        ("name: t\nsearch: {seeds: []}\n", "search.seeds: List should have at least 1 item"),
        ("name: t\nbase: " + "[" * 3000 + "\n", "nested too deeply"),
        # numbers and flags do not cross (pydantic's lax mode read true as 1)
        (
            "name: t\nspace:\n  adapter.molre.rank: {int: [1, true]}\n",
            "space.adapter.molre.rank.int.1: expected a number",
        ),
        ("name: t\nsearch: {num_samples: true}\n", "search.num_samples: expected a number, not true/false"),
        ("name: t\nresources: {reuse_actors: 0}\n", "resources.reuse_actors: expected true or false"),
    ],
)
def test_bad_space_fails_before_any_trial_naming_the_problem(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_sweep(path)
    assert str(path) in str(info.value)


def test_overrides_apply_to_the_base(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nbase: {train: {max_epochs: 3}}\n")
    spec = load_sweep(path, ["train.max_epochs=5"])
    assert run_config_for(spec, {}).train.max_epochs == 5


def test_objectives_name_metrics_that_trials_report(tmp_path):
    from molre.tune.space import check_objectives, reported_metrics

    known = reported_metrics()
    assert {"val/best_mean_auc", "val/std_auc", "params/trainable", "auc/acute_infarct"} <= known
    (tmp_path / "s.yaml").write_text("name: t\n")
    spec = load_sweep(tmp_path / "s.yaml")
    for name in (
        "val/n_auc_ge_090",
        "val/auc/midline_shift",
        "router/usage/hemorrhage/3",
        "params/molre_share",
    ):
        spec.search.objectives = [(name, "max")]
        check_objectives(spec, "s.yaml")  # accepted
    for name, hint in [("auc/acute_infract", "did you mean auc/acute_infarct"),
                       ("router/usage/nowhere/0", "not a metric trials report"), ("loss", "not a metric")]:  # fmt: skip
        spec.search.objectives = [(name, "max")]
        with pytest.raises(ConfigError, match=hint):
            check_objectives(spec, "s.yaml")


def test_paper_table2_runs_deepcntd_without_an_adapter():
    spec = load_sweep(Path(__file__).resolve().parents[2] / "search_spaces" / "paper_table2.yaml")
    configs = [run_config_for(spec, p, 0) for p in grid_points(spec)]
    deepcntd = [c for c in configs if c.backbone.preset == "deepcntd"]
    assert [c.adapter.kind for c in deepcntd] == ["none"]  # one point: the Base row, no MoLRE
    kinds = {(c.backbone.preset, c.adapter.kind) for c in configs if c.backbone.preset != "deepcntd"}
    assert len(kinds) == 5 * 2  # the five other presets: Base and +MoLRE each
    assert active_keys(spec, {"backbone.preset": "deepcntd"}) == ["backbone.preset"]  # kind: not searched
    assert active_keys(spec, {"backbone.preset": "medgemma"}) == ["backbone.preset", "adapter.kind"]


@pytest.mark.parametrize("algorithm", ["grid", "optuna"])
def test_a_preset_that_cannot_take_molre_is_refused_at_load(tmp_path, algorithm):
    path = tmp_path / "pairs.yaml"
    path.write_text(
        "name: t\n"
        "space:\n"
        "  backbone.preset: {choice: [tiny-vit, deepcntd]}\n"
        "  adapter.kind: {choice: [none, molre]}\n"
        f"search: {{algorithm: {algorithm}}}\n"
    )
    with pytest.raises(ConfigError, match="preset deepcntd cannot take adapter.kind=molre") as info:
        load_sweep(path)
    message = str(info.value)
    assert str(path) in message and "'backbone.preset': 'deepcntd'" in message and "'molre'" in message


def test_an_unknown_preset_is_refused_at_load(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(
        "name: t\nspace:\n  backbone.preset: {choice: [tiny-vit, dinov3-bas]}\nsearch: {algorithm: grid}\n"
    )
    with pytest.raises(ConfigError, match="unknown backbone preset 'dinov3-bas'") as info:
        load_sweep(path)
    assert str(path) in str(info.value)
