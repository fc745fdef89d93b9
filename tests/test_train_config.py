"""The training config: YAML + dotted overrides, round trip, and clear errors for bad values."""

from __future__ import annotations

import math

import pytest
import yaml

from train.config import ConfigError, TrainConfig, dump_yaml, from_dict, load_config
from train.optimizer import make_schedule
from wuneng_jax.sharding import DEFAULT_RULES

BASE = {
    "run_dir": "runs/x",
    "model": "qwen2_tiny",
    "steps": 100,
    "global_batch_size": 8,
    "seq_len": 32,
    "data": {"store": "data/s"},
}


def test_defaults_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(
        path,
        [
            "optimizer.lr=1e-3",  # YAML 1.1 reads this as a string; coerced to float
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "model.num_layers=3",  # a preset name becomes {preset: ..., num_layers: 3}
            "rules.embed=null",
            "data.prepare=stdlib",
            "checkpoint.keep_every=50",
        ],
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.optimizer.lr == 1e-3 and cfg.mesh.sizes() == (-1, 2, 2, 1)
    assert cfg.model == {"preset": "qwen2_tiny", "num_layers": 3}
    assert cfg.data.prepare == ("stdlib",) and cfg.checkpoint.keep_every == 50
    rules = dict(cfg.rules)
    assert rules["embed"] is None and len(cfg.rules) == len(DEFAULT_RULES)
    assert rules["activation_batch"] == ("data", "fsdp")
    assert cfg.tokens_per_step == 8 * 32
    # the dumped YAML is the whole config and reads back to an equal config
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_rules_list_is_the_whole_table():
    cfg = from_dict({**BASE, "rules": [["activation_batch", ["data"]], ["embed", "fsdp"]]})
    assert cfg.rules == (("activation_batch", ("data",)), ("embed", "fsdp"))


@pytest.mark.parametrize(
    "override, field",
    [
        ("optimizer.lrr=1", "optimizer.lrr"),  # unknown key (with a suggestion)
        ("optimizer.schedule=cosin", "optimizer.schedule"),
        ("mesh.data=0", "mesh.data"),
        ("steps=abc", "steps"),
        ("steps=0", "steps"),
        ("grad_accum_steps=3", "grad_accum_steps"),  # does not divide the batch
        ("rules.embed=model", "rules.embed"),  # not a mesh axis
        ("dtype=float16", "dtype"),
        ("remat=some", "remat"),
        ("z_loss=-1", "z_loss"),
        ("log.progress=maybe", "log.progress"),
        ("distributed.process_id=1", "distributed"),  # partial explicit start-up
        ("data.store=", "data.store"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        load_config(BASE, [override])


def test_missing_required_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="`steps`: is required"):
        load_config({k: v for k, v in BASE.items() if k != "steps"})
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(BASE, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="did you mean `optimizer.lr`"):
        load_config(BASE, ["optimizer.lrr=1"])


def _closed_form(kind, count, peak=1.0, floor=0.1, warmup=10, total=100, decay_fraction=0.2):
    if count < warmup:
        return peak * (count + 1) / warmup
    if kind == "cosine":
        p = min(max((count - warmup) / (total - warmup - 1), 0.0), 1.0)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if kind == "wsd":
        d = round(decay_fraction * total)
        start = total - d
        if count < start:
            return peak
        return peak + (floor - peak) * min((count - start + 1) / d, 1.0)
    return peak


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules_match_closed_form(kind):
    cfg = load_config(
        BASE,
        [
            f"optimizer.schedule={kind}",
            "optimizer.lr=1.0",
            "optimizer.min_lr_ratio=0.1",
            "optimizer.warmup_steps=10",
        ],
    )
    sched = make_schedule(cfg.optimizer, 100)
    for count in [0, 5, 9, 10, 11, 50, 79, 80, 81, 95, 99, 150]:
        assert float(sched(count)) == pytest.approx(_closed_form(kind, count), rel=1e-5, abs=1e-7), count
    # the schedule ends at the floor (decaying schedules) and starts above zero
    assert float(sched(0)) == pytest.approx(0.1)
    if kind != "constant":
        assert float(sched(99)) == pytest.approx(0.1, rel=1e-5)
