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
