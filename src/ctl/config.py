"""One typed configuration for the whole pipeline.

Every knob lives here, grouped by pipeline stage. A config round-trips through JSON
(the run folder keeps one) and accepts dotted overrides such as ``train.lr=3e-4``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

VARIANTS = ("global", "local", "full", "full-no-category")


@dataclass
class DataConfig:
    root: str = ""  # an STL-format folder: pairs JSON lines, category map, images/
    domain: str = ""  # "fashion" or "home"; empty = the only *-cat.json in root
    min_crop_px: int = 32  # scene crops whose shorter side is below this are skipped
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test, by scene
    seed: int = 0


@dataclass
class FeatureConfig:
    backbone: str = "resnet50"
    weights: str = ""  # a state-dict file; empty = the backbone's default pretrained weights
    image_size: int = 224
    batch_size: int = 32
    cache_dir: str = "~/.cache/ctl/features"
    num_workers: int = 2  # threads decoding JPEGs while the backbone runs


@dataclass
class ModelConfig:
    variant: str = "full"
    embed_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.3
    per_location: bool = False  # one local head per map location instead of one shared head


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    margin: float = 0.2
    patience: int = 5  # epochs without a better validation AUC before stopping
    seed: int = 0
    device: str = "cpu"


@dataclass
class EvalConfig:
    num_negatives: int = 99  # HR@K and MRR rank the positive among up to this many negatives
    fitb_negatives: int = 3
    hit_ks: tuple[int, ...] = (1, 10)
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.variant not in VARIANTS:
            raise ValueError(f"model.variant={self.model.variant!r}: choose one of {', '.join(VARIANTS)}")
        if len(self.data.split) != 3 or abs(sum(self.data.split) - 1) > 1e-6 or min(self.data.split) < 0:
            raise ValueError(f"data.split={self.data.split}: three non-negative shares summing to 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            values = dict(raw.get(f.name, {}))
            unknown = set(values) - {g.name for g in dataclasses.fields(section_cls)}
            if unknown:
                raise ValueError(f"unknown config keys in [{f.name}]: {', '.join(sorted(unknown))}")
            hints = typing.get_type_hints(section_cls)
            sections[f.name] = section_cls(**{k: _coerce(v, hints[k]) for k, v in values.items()})
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {', '.join(sorted(unknown))}")
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        from ctl.io import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def override(self, assignments: list[str]) -> Config:
        """A copy with ``section.key=value`` assignments applied (values parsed as JSON when they can be)."""
        raw = self.to_dict()
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            section, _, name = key.strip().partition(".")
            if not sep or not name or section not in raw or name not in raw[section]:
                raise ValueError(f"bad override {assignment!r}: expected section.key=value with a known key")
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            if isinstance(raw[section][name], str) and not isinstance(parsed, str):
                parsed = value  # a text field keeps the text, even one like 2024 or true
            raw[section][name] = parsed
        return Config.from_dict(raw)


def _coerce(value, hint):
    """JSON has no tuples; turn lists back into the tuple a field declares."""
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value
