import json

import pytest
import torch

import ctl.train
from ctl.train import RunError, load_run, train


def test_run_folder_holds_what_a_run_needs(prepared, tmp_path):
    cfg = prepared.cfg.override(["train.epochs=3"])
    run = train(cfg, prepared.dataset, prepared.features, tmp_path / "run", progress=False)
    for name in ("config.json", "categories.json", "backbone.json", "best.pt", "last.pt", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert all(0.0 <= r["val_auc"] <= 1.0 and r["loss"] >= 0 for r in log)
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["name"] == "efficientnet-lite0"
    assert json.loads((tmp_path / "run" / "categories.json").read_text()) == prepared.dataset.category_names
    best = max(log, key=lambda r: r["val_auc"])
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == best["epoch"]
    loaded = load_run(tmp_path / "run")
    assert loaded.config == cfg
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name


def test_interrupted_training_resumes_to_the_same_model(prepared, tmp_path, monkeypatch):
    cfg = prepared.cfg.override(["train.epochs=4", "train.patience=10"])
    whole = train(cfg, prepared.dataset, prepared.features, tmp_path / "whole", progress=False)

    real_evaluate, calls = ctl.train.evaluate, []

    def interrupt_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ctl.train, "evaluate", interrupt_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, prepared.dataset, prepared.features, tmp_path / "resumed", progress=False)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(ctl.train, "evaluate", real_evaluate)
    resumed = train(cfg, prepared.dataset, prepared.features, tmp_path / "resumed", progress=False)

    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() != ""
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_auc"] for r in resumed_log] == pytest.approx([r["val_auc"] for r in whole_log], abs=1e-6)
    for name, value in whole.model.state_dict().items():
        assert torch.allclose(value.float(), resumed.model.state_dict()[name].float(), atol=1e-5), name


def test_a_run_folder_refuses_other_settings(prepared, tmp_path):
    train(prepared.cfg.override(["train.epochs=1"]), prepared.dataset, prepared.features, tmp_path / "run", progress=False)
    with pytest.raises(RunError, match=r"train.lr: 0.001 -> 0.5"):
        train(prepared.cfg.override(["train.epochs=1", "train.lr=0.5"]), prepared.dataset, prepared.features, tmp_path / "run", progress=False)


def test_a_finished_run_can_train_longer(prepared, tmp_path):
    for epochs in (1, 2):
        train(prepared.cfg.override([f"train.epochs={epochs}"]), prepared.dataset, prepared.features, tmp_path / "run", progress=False)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_run(tmp_path / "run").config.train.epochs == 2


def test_loading_a_folder_without_a_model_says_what_to_do(tmp_path):
    with pytest.raises(RunError, match="ctl train --run"):
        load_run(tmp_path)


@pytest.mark.parametrize("variant", ["global", "local", "full-no-category"])
def test_every_variant_and_the_per_location_heads_train_and_reload(prepared, tmp_path, variant):
    cfg = prepared.cfg.override([f"model.variant={variant}", "model.per_location=true", "train.epochs=1"])
    run = train(cfg, prepared.dataset, prepared.features, tmp_path / "run", progress=False)
    assert run.model.variant == variant
    assert load_run(tmp_path / "run").config.model.per_location
