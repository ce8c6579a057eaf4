import json

import pytest

from ctl.config import VARIANTS, Config, DataConfig, ModelConfig


def test_defaults_are_valid():
    cfg = Config()
    assert cfg.model.variant in VARIANTS
    assert len(cfg.data.split) == 3
    assert sum(cfg.data.split) == pytest.approx(1.0)
    assert min(cfg.data.split) >= 0
    assert cfg.eval.fitb_negatives <= cfg.eval.num_negatives
    assert all(k >= 1 for k in cfg.eval.hit_ks)


def test_json_round_trip_keeps_tuples(tmp_path):
    cfg = Config().override(["data.split=[0.6, 0.2, 0.2]", "eval.hit_ks=[1, 5, 20]", "model.variant=local", "train.lr=0.01"])
    path = tmp_path / "sub" / "config.json"
    cfg.save(path)
    assert json.loads(path.read_text())["model"]["variant"] == "local"

    loaded = Config.load(path)
    assert loaded == cfg
    assert loaded.data.split == (0.6, 0.2, 0.2)
    assert isinstance(loaded.data.split, tuple)
    assert loaded.eval.hit_ks == (1, 5, 20)
    assert isinstance(loaded.eval.hit_ks, tuple)
    assert loaded.model.variant == "local"
    assert loaded.train.lr == 0.01


def test_partial_dict_keeps_other_defaults():
    cfg = Config.from_dict({"train": {"epochs": 3}})
    assert cfg.train.epochs == 3
    assert cfg.train.lr == Config().train.lr
    assert cfg.model == ModelConfig()


def test_int_given_for_float_field_becomes_float():
    cfg = Config.from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_override_parses_values():
    base = Config()
    cfg = base.override(
        [
            "train.lr=3e-4",
            "train.epochs=7",
            "model.per_location=true",
            "eval.hit_ks=[1,3]",
            "features.backbone=resnet18",
            "data.root=/some/where/stl",
        ]
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.model.per_location is True
    assert cfg.eval.hit_ks == (1, 3)
    assert cfg.features.backbone == "resnet18"
    assert cfg.data.root == "/some/where/stl"
    # override returns a copy
    assert base.train.lr == Config().train.lr
    assert base.features.backbone == Config().features.backbone


def test_override_keeps_numeric_looking_strings_as_strings():
    # A domain or path that looks like a number must stay the string the field declares.
    cfg = Config().override(["data.domain=2024", "data.root=123", "train.device=null"])
    assert cfg.data.domain == "2024"
    assert cfg.data.root == "123"
    assert cfg.train.device == "null"


def test_override_accepts_json_quoted_strings():
    cfg = Config().override(['features.backbone="efficientnet-lite0"', 'data.root="/data/my stl"', 'data.domain="2024"'])
    assert cfg.features.backbone == "efficientnet-lite0"
    assert cfg.data.root == "/data/my stl"
    assert cfg.data.domain == "2024"


@pytest.mark.parametrize(
    "assignment, fragment",
    [
        ("train.nope=1", "train.nope"),
        ("nosection.lr=1", "nosection.lr"),
        ("train=1", "train=1"),
        ("train.lr", "train.lr"),
    ],
)
def test_override_rejects_unknown_or_malformed(assignment, fragment):
    with pytest.raises(ValueError) as err:
        Config().override([assignment])
    message = str(err.value)
    assert fragment in message
    assert "section.key=value" in message


def test_from_dict_rejects_unknown_keys_and_sections():
    with pytest.raises(ValueError, match=r"unknown config keys in \[model\]: bogus"):
        Config.from_dict({"model": {"bogus": 1}})
    with pytest.raises(ValueError, match="unknown config sections: extra"):
        Config.from_dict({"extra": {}})


def test_invalid_variant_rejected():
    with pytest.raises(ValueError, match="model.variant='nope'.*global"):
        Config(model=ModelConfig(variant="nope"))
    with pytest.raises(ValueError, match="variant"):
        Config().override(["model.variant=attention"])


@pytest.mark.parametrize("split", [(0.5, 0.5), (0.5, 0.3, 0.3), (1.2, -0.1, -0.1), (0.8, 0.1, 0.1, 0.0)])
def test_invalid_split_rejected(split):
    with pytest.raises(ValueError, match="data.split"):
        Config(data=DataConfig(split=split))


def test_invalid_split_rejected_from_override_and_file(tmp_path):
    with pytest.raises(ValueError, match="data.split"):
        Config().override(["data.split=[0.9, 0.2, 0.0]"])
    path = tmp_path / "c.json"
    raw = Config().to_dict()
    raw["data"]["split"] = [0.5, 0.5]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="data.split"):
        Config.load(path)
