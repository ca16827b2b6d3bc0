"""One training run end to end in a real local Ray: 2 CPU workers (gloo DDP), tiny ViT, tiny shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from molre.config import build_config
from molre.data import shards, storage
from molre.errors import DataError, ModelError
from molre.train.checkpoint import read_state
from molre.train.run import prepare, train

pytestmark = pytest.mark.slow


def _cfg(data_uri: str, storage_dir: Path, name: str, **extra):
    tree = {
        "backbone": {"preset": "tiny-vit"},
        "data": {"uri": data_uri},
        "optim": {"lr_head": 1e-2, "lr_adapter": 1e-3},
        "train": {"max_epochs": 4, "min_epochs": 0, "batch_size": 2, "seed": 7, "run_name": name,
                  "storage": str(storage_dir)},
        "scaling": {"num_workers": 2, "max_failures": 1},
    }  # fmt: skip
    for key, value in extra.items():
        tree[key] = {**tree.get(key, {}), **value}
    return build_config(tree)


def _history(result) -> list[dict]:
    return read_state(result.checkpoint_path).history


DROPOUT = {"lora": {"dropout": 0.2}, "molre": {"dropout": 0.2}}  # so that a resumed epoch draws masks too


@pytest.fixture(scope="module")
def steady(ray_local, tiny_dataset, tmp_path_factory):
    """One uninterrupted 2-worker run with dropout: the reference a repeat and a resumed run must equal."""
    storage_dir = tmp_path_factory.mktemp("steady")
    return train(_cfg(tiny_dataset, storage_dir, "repeat-a", adapter=DROPOUT)), storage_dir


def test_two_workers_learn_and_a_fixed_seed_repeats(steady, tiny_dataset, tmp_path):
    first, storage_dir = steady
    assert first.best_metric > 0.6  # three planted findings; chance is 0.5
    assert first.metrics["val/volumes"] == 24  # every validation volume scored exactly once across 2 workers
    assert [h["epoch"] for h in _history(first)] == [0, 1, 2, 3]
    second = train(_cfg(tiny_dataset, tmp_path, "repeat-b", adapter=DROPOUT))
    for a, b in zip(_history(first), _history(second), strict=True):
        assert a["val/mean_auc"] == pytest.approx(b["val/mean_auc"], abs=1e-9)
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)
    ckpt = Path(first.checkpoint_path)
    assert {"best.safetensors", "model.safetensors", "optimizer.pt", "config.yaml", "setup.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert any((storage_dir / "repeat-a" / "tensorboard").iterdir())


def test_fp8_frozen_matmuls_train_under_ddp(ray_local, tiny_dataset, tmp_path):
    # two gloo workers: DDP must leave the FP8 buffers alone (gloo cannot even broadcast e4m3 tensors)
    result = train(_cfg(tiny_dataset, tmp_path, "fp8", train={"frozen_matmul": "fp8"}))
    assert result.best_metric > 0.6  # learns the planted findings on an e4m3 base
    assert [h["epoch"] for h in _history(result)] == [0, 1, 2, 3]


def test_killed_worker_resumes_from_checkpoint_and_finished_run_is_not_retrained(
    steady, tiny_dataset, tmp_path
):
    marker = tmp_path / "killed.txt"
    fault = {"epoch": 1, "step": 1, "rank": 1, "marker": str(marker)}
    result = train(_cfg(tiny_dataset, tmp_path, "faulty", adapter=DROPOUT), fault=fault)
    assert marker.exists()  # the worker really was killed mid-epoch 1
    assert [h["epoch"] for h in _history(result)] == [0, 1, 2, 3]  # epoch 1 redone once, none counted twice
    for resumed, uninterrupted in zip(_history(result), _history(steady[0]), strict=True):  # as without it
        assert resumed["val/mean_auc"] == pytest.approx(uninterrupted["val/mean_auc"], abs=1e-9)
        assert resumed["train/loss"] == pytest.approx(uninterrupted["train/loss"], rel=1e-6)
    checkpoints = sorted(p.name for p in (tmp_path / "faulty").glob("checkpoint_*"))
    again = train(_cfg(tiny_dataset, tmp_path, "faulty", adapter=DROPOUT))
    assert again.checkpoint_path == result.checkpoint_path  # restored, and nothing new was trained or saved
    assert sorted(p.name for p in (tmp_path / "faulty").glob("checkpoint_*")) == checkpoints
    assert [h["epoch"] for h in _history(again)] == [0, 1, 2, 3]


def test_checkpoint_of_another_preset_is_refused(ray_local, tiny_dataset, tmp_path):
    train(_cfg(tiny_dataset, tmp_path, "preset-a", train={"max_epochs": 1}))
    other = _cfg(
        tiny_dataset, tmp_path, "preset-a", backbone={"preset": "tiny-davit"}, scaling={"max_failures": 0}
    )
    with pytest.raises(Exception, match="trained with preset tiny-vit, this config asks for tiny-davit"):
        train(other)


def test_bad_inputs_name_what_is_wrong(tiny_dataset, tmp_path):
    with pytest.raises(ModelError, match="cannot take the volume grid"):
        prepare(_cfg(tiny_dataset, tmp_path, "x", backbone={"preset": "tiny-vit3d"}, data={"num_slices": 6}))
    bad = tmp_path / "bad-schema"
    _copy_with_broken_schema(tiny_dataset, bad)
    with pytest.raises(DataError, match=r"train/shard-0.parquet: missing column 'known'"):
        prepare(_cfg(str(bad), tmp_path, "x"))
    empty = tmp_path / "empty-val"
    _copy_without_split(tiny_dataset, empty, "val")
    with pytest.raises(DataError, match="split 'val' is empty"):
        prepare(_cfg(str(empty), tmp_path, "x"))


def _copy_with_broken_schema(src: str, dst: Path) -> None:
    manifest = shards.read_manifest(src)
    for info in manifest.shards:
        table = shards.read_shard(storage.join(src, info.path))
        if info.split == "train":
            table = table.drop_columns(["known"])
        out = dst / info.path
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        info.sha256, info.bytes = storage.sha256(str(out)), out.stat().st_size
    (dst / "manifest.json").write_text(manifest.to_json())


def _copy_without_split(src: str, dst: Path, split: str) -> None:
    manifest = shards.read_manifest(src)
    manifest.shards = [s for s in manifest.shards if s.split != split]
    for info in manifest.shards:
        out = dst / info.path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(storage.read_bytes(storage.join(src, info.path)))
    (dst / "manifest.json").write_text(manifest.to_json())


def test_an_odd_train_split_loses_no_volume_to_the_workers(ray_local, tmp_path):
    from tests.tiny_data import write_tiny_dataset

    data = write_tiny_dataset(str(tmp_path / "odd"), counts={"train": 9, "val": 4})
    # rfs_threshold ~0: every repeat factor is 1, so an epoch trains each study once
    cfg = _cfg(data, tmp_path, "odd", data={"rfs_threshold": 1e-6}, train={"max_epochs": 1})
    assert _history(train(cfg))[0]["train/volumes"] == 10  # 9 + the first repeated for 2 workers (was 8)
