"""The experiment on the models federations train: a ResNet with BatchNorm, the same with GroupNorm, bf16 LoRA.

Each runs the whole experiment (original, request, gold, unlearning, recovery, report) with
PUF and with a method whose forgetting client runs a local routine; in process, and the
BatchNorm ResNet once more through ``flwr run`` on Ray.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_experiment import run  # noqa: E402
from test_simulation_e2e import launch  # noqa: E402

TIER = "integration"  # see tests/conftest.py; every test here is marked e2e (a minute in all)

SMALL = {"dataset": "digits", "unlearn.round": 3, "num-server-rounds": 4, "unlearn.recovery": "fixed"}
SETTINGS = {
    "resnet-bn": {"local-epochs": 1, "lr": 0.05},
    "resnet-gn": {"local-epochs": 1, "lr": 0.05},
    "lora-vit": {"local-epochs": 3, "lr": 0.2},  # only the adapters and the head learn
}


def check(res: dict) -> None:
    report = res["report"]
    for name in ("original", "unlearned", "gold"):
        for key in ("test-acc", "forget-acc", "kl-forget", "l2-to-gold"):
            assert math.isfinite(report[name][key]), (name, key)
    assert res["train-history"]["4"]["clients"] == 2  # the departed client no longer trains
    assert report["unlearned"]["test-acc"] > 0.3  # the model still works after the unlearning round


@pytest.mark.e2e
@pytest.mark.parametrize(
    "model, method",
    [
        ("resnet-bn", "puf"),
        ("resnet-bn", "gradient-ascent"),
        ("resnet-gn", "puf"),
        ("resnet-gn", "sragu"),
        ("lora-vit", "puf"),
        ("lora-vit", "gradient-ascent"),
    ],
)
def test_the_experiment_runs_on_the_model(default_run_config, tmp_path, model, method):
    rc = {**default_run_config, **SMALL, **SETTINGS[model], "model": model, "unlearn.method": method}
    res, grid = run(rc, 3, tmp_path)
    check(res)
    if method != "puf":
        assert "train.unlearn" in grid.sent  # the departing client ran the method's routine
    if model == "lora-vit":
        # only the adapters and the head travel: a few thousand numbers, not the frozen base
        layers = {layer["layer"] for layer in res["unlearning"]["layers"]}
        assert layers and all("lora" in name or "classifier" in name for name in layers)


@pytest.mark.e2e
def test_the_batchnorm_resnet_runs_through_flwr_run_on_ray(tmp_path):
    config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in SMALL.items())
    proc = launch(tmp_path, f"{config} model='resnet-bn' local-epochs=1 lr=0.05")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res_file,) = tmp_path.glob("*/results.json")
    check(json.loads(res_file.read_text()))
