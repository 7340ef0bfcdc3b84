"""Run-config parsing and the refusal of impossible experiments."""

from dataclasses import fields, replace
from pathlib import Path

import pytest
import tomllib

from fed_unlearn.config import (
    REFERENCE_BEGIN,
    REFERENCE_END,
    SECTIONS,
    DataConfig,
    ExperimentConfig,
    RequestConfig,
    parse_client_ids,
    reference_table,
)

TIER = "unit"  # see tests/conftest.py

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
    assert cfg.request.departing == (0,) and cfg.request.method == "puf" and cfg.data.dataset == "mnist-5k"
    assert cfg.gold_rounds == cfg.request.round - 1
    # every section's defaults are pyproject's, and every keyed setting is a pyproject key
    assert cfg == ExperimentConfig()
    for concern, cls in SECTIONS:
        for f in fields(cls):
            if "key" in f.metadata:
                assert f.metadata["key"] in rc, f"{f.metadata['key']} ({concern}) missing from pyproject"
    assert set(ExperimentConfig().to_dict()) <= set(rc)


def test_the_configuration_reference_is_generated_from_the_settings():
    doc = (PYPROJECT.parent / "docs" / "configuration.md").read_text()
    block = doc.split(REFERENCE_BEGIN)[1].split(REFERENCE_END)[0].strip()
    assert block == reference_table(), "run: python -m fed_unlearn.config --update docs/configuration.md"
    rc = flat(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    documented = {row.split("`")[1] for row in block.splitlines()[2:]}
    assert documented == set(rc), set(rc) ^ documented


@pytest.mark.parametrize("value, ids", [("3", (3,)), ("4, 1,4", (1, 4)), (2, (2,)), ("", ())])
def test_parse_client_ids(value, ids):
    assert parse_client_ids(value) == ids


@pytest.mark.parametrize("value", ["a", "1;2", "-1", True])
def test_parse_client_ids_rejects(value):
    with pytest.raises(ValueError):
        parse_client_ids(value)


@pytest.mark.parametrize(
    "rc, msg",
    [
        ({"unlearn.round": 16, "num-server-rounds": 15}, "after the last round"),
        ({"unlearn.round": 1}, "round 1 has nothing to unlearn"),
        ({"unlearn.recovery": "forever"}, "unlearn.recovery"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"model": "resnet"}, "unknown model"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"lr": float("nan")}, "'lr' must be a finite number"),
        ({"local-epochs": 0}, "epochs"),
        ({"num-server-rounds": 2.5}, "'num-server-rounds' must be an integer"),
        ({"unlearn.calibrate": 1}, "'unlearn.calibrate' must be true or false"),
        ({"holdout-fraction": 1.0}, "holdout-fraction"),
    ],
)
def test_impossible_configs_are_refused(rc, msg):
    with pytest.raises(ValueError, match=msg):
        ExperimentConfig.from_run_config(rc)


def test_gold_key_depends_on_what_gold_depends_on():
    base = ExperimentConfig()
    assert base.gold_key(5) == ExperimentConfig().gold_key(5)
    assert base.gold_key(5) != base.gold_key(6)
    assert base.gold_key(5) != ExperimentConfig(request=RequestConfig(departing=(1,))).gold_key(5)
    assert base.gold_key(5) != ExperimentConfig(request=RequestConfig(round=4)).gold_key(5)
    assert base.gold_key(5) != ExperimentConfig(data=DataConfig(seed=1)).gold_key(5)
    # recovery settings, the method and the length of the run do not change the gold federation
    later = ExperimentConfig.from_run_config(
        {"unlearn.recovery": "fixed", "unlearn.method": "sragu", "num-server-rounds": 30, "unlearn.calibrate": False}
    )
    assert base.gold_key(5) == later.gold_key(5)
    assert base.original_key(5) == later.original_key(5) != replace(base, data=DataConfig(seed=2)).original_key(5)
    # the original's per-round record reports on the parts the deletion defines: one cache entry per deletion
    other = ExperimentConfig.from_run_config({"unlearn.scenario": "samples", "unlearn.selection": "high-loss"})
    assert base.original_key(5) != other.original_key(5)
    assert base.original_key(5) != ExperimentConfig(request=RequestConfig(departing=(1,))).original_key(5)


def test_every_method_setting_is_a_run_config_key_with_the_same_default():
    """`flwr run --run-config` refuses keys missing from pyproject: every method knob must be there."""
    from dataclasses import MISSING, fields

    from fed_unlearn.unlearning import METHODS

    rc = flat(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    for name, cls in METHODS.items():
        for f in fields(cls.config_class):
            key = f"{name}.{f.name.replace('_', '-')}"
            assert key in rc, f"{key} missing from [tool.flwr.app.config]"
            default = f.default if f.default is not MISSING else f.default_factory()
            assert rc[key] == pytest.approx(default), key
    for key in ("unlearn.scenario", "unlearn.selection", "unlearn.fraction", "unlearn.class"):
        assert key in rc


def test_scenarios_from_the_run_config():
    cls = ExperimentConfig.from_run_config({"unlearn.scenario": "class", "unlearn.class": 4})
    assert (
        cls.request.departing == ()
        and cls.request.deletion.removed_classes == (4,)
        and cls.involved([0, 1, 2]) == (0, 1, 2)
    )
    assert cls.leaving == ()
    smp = ExperimentConfig.from_run_config({"unlearn.scenario": "samples", "unlearn.departing": "2"})
    assert smp.involved([0, 1, 2]) == (2,) and smp.leaving == ()
    assert ExperimentConfig().leaving == (0,)
    with pytest.raises(ValueError, match="needs the requesting client"):
        ExperimentConfig.from_run_config({"unlearn.scenario": "samples", "unlearn.departing": ""})
    with pytest.raises(ValueError, match="unlearn.fraction"):
        ExperimentConfig.from_run_config({"unlearn.scenario": "samples", "unlearn.fraction": 1.5})
    # the gold depends on what is deleted, and on exactly which samples when the model chose them
    base = ExperimentConfig.from_run_config({"unlearn.scenario": "samples", "unlearn.selection": "high-loss"})
    assert base.gold_key(5, {0: "aa"}) != base.gold_key(5, {0: "bb"}) != ExperimentConfig().gold_key(5)


def test_service_settings_are_run_config_keys_and_validated():
    from dataclasses import fields

    from fed_unlearn.config import ServiceConfig, mode_of
    from fed_unlearn.unlearning.base import config_from_run_config

    rc = flat(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    for f in fields(ServiceConfig):
        key = f"service.{f.name.replace('_', '-')}"
        assert key in rc and rc[key] == getattr(ServiceConfig(), f.name), key
    assert mode_of(rc) == "experiment" and mode_of({"mode": "service"}) == "service"
    with pytest.raises(ValueError, match="'mode'"):
        mode_of({"mode": "batch"})
    with pytest.raises(ValueError, match="service.fallback"):
        config_from_run_config(ServiceConfig, {"service.fallback": "retrain"}, "service")
    assert ServiceConfig(erase_sites=" a, b,").erase_list == ("a", "b")
    # in a service, requests arrive at run time: unlearn.departing does not apply
    assert ExperimentConfig.from_run_config({"mode": "service", "num-server-rounds": 2}).request.departing == ()
