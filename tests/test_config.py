"""Run-config parsing and the refusal of impossible experiments."""

import tomllib
from pathlib import Path

import pytest

from fed_unlearn.config import ExperimentConfig, parse_client_ids

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_pyproject_defaults_parse_and_match_dataclass_defaults():
    rc = flat(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    cfg = ExperimentConfig.from_run_config(rc)
    assert cfg.departing == (0,) and cfg.method == "puf" and cfg.dataset == "mnist-5k"
    assert cfg.gold_rounds == cfg.departure_round - 1
    defaults = ExperimentConfig()
    assert (cfg.model, cfg.train, cfg.num_server_rounds, cfg.recovery) == (defaults.model, defaults.train, defaults.num_server_rounds, defaults.recovery)


@pytest.mark.parametrize("value, ids", [("3", (3,)), ("4, 1,4", (1, 4)), (2, (2,)), ("", ())])
def test_parse_client_ids(value, ids):
    assert parse_client_ids(value) == ids


@pytest.mark.parametrize("value", ["a", "1;2", "-1", True])
def test_parse_client_ids_rejects(value):
    with pytest.raises(ValueError):
        parse_client_ids(value)


@pytest.mark.parametrize("rc, msg", [
    ({"unlearn.round": 16, "num-server-rounds": 15}, "after the last round"),
    ({"unlearn.round": 1}, "round 1 has nothing to unlearn"),
    ({"unlearn.recovery": "forever"}, "unlearn.recovery"),
    ({"dataset": "imagenet"}, "unknown dataset"),
    ({"model": "resnet"}, "unknown model"),
    ({"lr": "fast"}, "'lr' must be float"),
    ({"local-epochs": 0}, "epochs"),
    ({"num-server-rounds": 2.5}, "'num-server-rounds' must be int"),
])
def test_impossible_configs_are_refused(rc, msg):
    with pytest.raises(ValueError, match=msg):
        ExperimentConfig.from_run_config(rc)


def test_gold_key_depends_on_what_gold_depends_on():
    base = ExperimentConfig()
    assert base.gold_key(5) == ExperimentConfig().gold_key(5)
    assert base.gold_key(5) != base.gold_key(6)
    assert base.gold_key(5) != ExperimentConfig(departing=(1,)).gold_key(5)
    assert base.gold_key(5) != ExperimentConfig(departure_round=4).gold_key(5)
    assert base.gold_key(5) != ExperimentConfig(seed=1).gold_key(5)
    # recovery settings and the method do not change the gold federation
    assert base.gold_key(5) == ExperimentConfig(recovery="fixed", method="puf", num_server_rounds=30).gold_key(5)
