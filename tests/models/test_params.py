import json

import pytest

from molre.cli import main
from molre.models.backbones import PAPER_PRESETS
from molre.models.params import count_params


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
