import json

import pytest

from molre.cli import main
from molre.models.backbones import PAPER_PRESETS
from molre.models.params import PAPER_TABLE2, count_params, format_table, table_rows


@pytest.mark.parametrize("name", [p for p in PAPER_PRESETS if p != "deepcntd"])
def test_molre_share_stays_below_half_a_percent(name):
    row = count_params(name)
    assert row["molre"] > 0 and row["molre_share"] < 0.005
    # 2D presets fine-tune with LoRA; Pillar0-HeadCT is fully fine-tuned, as in the paper
    assert (row["trainable"] < row["total"]) == (name != "pillar0-headct")


def test_dinov3_base_counts():
    row = count_params("dinov3-base")
    assert row["molre"] == 272_134
    # LoRA r=8 on qkv + proj of 12 blocks: 12 * 8 * ((768 + 2304) + (768 + 768)) = 442,368;
    # head 768*75 + 75 = 57,675; pooling query 768
    assert row["trainable"] == 442_368 + 272_134 + 57_675 + 768


def test_params_cli_json(capsys):
    assert main(["params", "--preset", "medgemma", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"preset", "total", "trainable", "molre", "molre_share"}
    assert row["molre"] == 407_302
    assert main(["params", "--all"]) == 0
    table = capsys.readouterr().out
    assert all(p in table for p in PAPER_PRESETS)
    # ours (0.001M) | paper | diff for the total and for MoLRE, beside each other
    assert "| 86.414M | 86.6M | -0.2% |" in table and "| 0.272M | 0.28M | -2.8% |" in table
    assert "| 418.854M | 431.1M | -2.8% |" in table and "| 350.566M | 364.3M | -3.8% |" in table
    assert "| 117.969M | 113.9M | +3.6% |" in table and "| 7.375M | 6.9M | +6.9% |" in table
    # the paper rounds MoLRE up to 0.01M: ours rounded the same way are the paper's figures
    assert (
        "dinov3-base 0.28M, dinov3-large 0.37M, medimageinsight 0.37M, medgemma 0.41M, pillar0-headct 0.41M"
        in table
    )
    assert "(all as in the paper)" in table and "pillar0-headct and deepcntd: stand-in architectures" in table
    assert main(["params", "--all", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["medgemma"]["paper_total"] == 431_100_000 and rows["deepcntd"]["paper_molre"] is None


def test_paper_table2_figures():
    assert set(PAPER_TABLE2) == set(PAPER_PRESETS)
    totals = {p: t / 1e6 for p, (t, _) in PAPER_TABLE2.items()}
    assert totals == {"dinov3-base": 86.6, "dinov3-large": 305.2, "medimageinsight": 364.3,
                      "medgemma": 431.1, "pillar0-headct": 113.9, "deepcntd": 6.9}  # fmt: skip
    assert [m for _, m in PAPER_TABLE2.values()] == [280_000, 370_000, 370_000, 410_000, 410_000, None]


def test_table_rows_differences_come_from_the_paper_figures(monkeypatch):
    monkeypatch.setitem(PAPER_TABLE2, "dinov3-base", (80_000_000, 300_000))
    row, tiny = table_rows(["dinov3-base", "tiny-vit"])
    assert (row["paper_total"], row["paper_molre"]) == (80_000_000, 300_000)
    assert row["total_diff"] == pytest.approx((86_414_161 - 80_000_000) / 80_000_000)
    assert row["molre_diff"] == pytest.approx((272_134 - 300_000) / 300_000)
    table = format_table([row, tiny])
    assert "| 86.414M | 80.0M | +8.0% |" in table and "| 0.272M | 0.30M | -9.3% |" in table
    assert "differs from the paper for dinov3-base" in table  # 0.28M rounded up vs 0.30M
    # a preset outside the paper has no paper figures and no differences
    assert tiny["paper_total"] is tiny["total_diff"] is tiny["paper_molre"] is tiny["molre_diff"] is None
    assert f"| {tiny['preset']} | test | 0.185M | - | - |" in table


def test_blocks_placement_counts_do_not_depend_on_routing_granularity():
    from molre.config import build_config
    from molre.models import molre_param_count
    from molre.models.params import count_config_params

    counts = [count_config_params(build_config({"backbone": {"preset": "dinov3-base"},
                                                "adapter": {"molre": {"placement": "blocks", "route_by": r}}}))
              for r in ("slice", "token")]  # fmt: skip
    assert counts[0] == counts[1]
    # one MoLRE per qkv (768 -> 2304) and proj (768 -> 768) of 12 blocks; the router is d -> 256 -> K either way
    per_block = molre_param_count(768, d_out=2304) + molre_param_count(768)
    assert (
        counts[0]["molre"] == 12 * per_block == 7_415_952
    )  # (147,456 + 198,406) + (73,728 + 198,406) per block
