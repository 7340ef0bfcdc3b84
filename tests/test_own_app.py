"""fed-unlearn in a Flower app of someone else's (tests/own_app): its own model, data split and metric names.

The ClientApp of tests/own_app imports nothing from fed-unlearn; its ServerApp wraps a stock
Flower strategy with :class:`fed_unlearn.flower.Unlearning` and runs Flower's own
``Strategy.start()``. In process here (seconds); through ``flwr run`` on Ray in the slow tier.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedProx

from fed_unlearn.flower import InProcessGrid, Unlearning

TIER = "integration"  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
APP = Path(__file__).resolve().parent / "own_app"
sys.path.insert(0, str(APP))

from ownapp import client_app as plain  # noqa: E402
from ownapp import client_app_helper as helped  # noqa: E402
from ownapp.server_app import main as own_server  # noqa: E402
from ownapp.task import Net  # noqa: E402

NODES = 4
CONFIG = {
    "num-server-rounds": 8,
    "local-epochs": 2,
    "lr": 0.05,
    "departure-round": 4,
    "departing": 0,
    "method": "puf",
    "scenario": "client",
    "strategy": "fedavg",
}


class OrderedGrid(InProcessGrid):
    """Replies in node order (so a bare strategy and a wrapped one sum the same replies in the same order)."""

    def send_and_receive(self, messages, *, timeout=None):
        return sorted(super().send_and_receive(messages, timeout=timeout), key=lambda m: m.metadata.src_node_id)


def run(tmp_path: Path, app, **overrides) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rc = {**CONFIG, **overrides, "results": str(tmp_path / "out.json")}
    grid = OrderedGrid(app, NODES, rc)
    own_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return json.loads((tmp_path / "out.json").read_text())


def check_departure(res: dict, tolerance: float = 0.01) -> None:
    orig, unl, gold, kept = res["original"], res["unlearned"], res["gold"], res["kept-unlearning-round"]
    # the departed partition's training data: the original memorised it; the unlearning round pulls it below
    # what the same round without the request gives (the step the remaining clients' evaluation allows)
    assert orig["forget-acc"] - gold["forget-acc"] > 0.01 and unl["forget-acc"] < kept["forget-acc"]
    # at the end, against a gold and a federation without the request trained as long: closer to the gold
    rec, gold_end, kept = res["recovered"], res["gold-end"], res["kept-end"]
    assert kept["forget-acc"] - gold_end["forget-acc"] > 0.01
    assert abs(rec["forget-acc"] - gold_end["forget-acc"]) < abs(kept["forget-acc"] - gold_end["forget-acc"])
    # the others recover: test accuracy within the tolerance of the gold's
    assert rec["test-acc"] >= gold_end["test-acc"] - tolerance
    # the departed node is sent nothing after its unlearning round, neither training nor evaluation
    node, d = res["departing-node"], CONFIG["departure-round"]
    after = [(t, r) for t, n, r in res["sent"] if n == node and r > d]
    assert not after, after
    assert any(n == node and r == d for _, n, r in res["sent"])  # it did take part in its unlearning round
    assert res["departed"] == [node]


def test_a_plain_app_departs_a_client_named_by_its_node_config_with_puf(tmp_path):
    res = run(tmp_path, plain.app)
    check_departure(res)
    # the user's own metric names come back aggregated, every round
    for r in range(1, CONFIG["num-server-rounds"] + 1):
        assert "train_loss" in res["train-metrics"][str(r)] and "train-loss" not in res["train-metrics"][str(r)]
        assert {"eval_acc", "eval_loss"} <= set(res["evaluate-metrics"][str(r)])
    assert 0.5 < res["evaluate-metrics"][str(CONFIG["num-server-rounds"])]["eval_acc"] <= 1.0


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedtrimmedavg"])
def test_the_wrapper_around_fedprox_fedadam_and_a_robust_aggregator(tmp_path, strategy):
    res = run(tmp_path, plain.app, strategy=strategy)
    # PUF's negated pseudo-gradient went through the wrapped aggregation (and FedAdam's optimizer): the departed
    # client's forget accuracy falls below what the same round without the request gives
    orig, unl, gold, kept = res["original"], res["unlearned"], res["gold"], res["kept-unlearning-round"]
    assert orig["forget-acc"] > gold["forget-acc"] and unl["forget-acc"] < kept["forget-acc"] - 0.005
    assert not [r for _, n, r in res["sent"] if n == res["departing-node"] and r > CONFIG["departure-round"]]


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedProx(proximal_mu=0.01, min_available_nodes=NODES),
        lambda: FedAdam(eta=0.01, eta_l=0.05, min_available_nodes=NODES),
    ],
)
def test_ordinary_rounds_of_a_wrapped_strategy_are_the_bare_strategy_bit_for_bit(make):
    import random

    import torch

    torch.manual_seed(0)
    initial = ArrayRecord(Net().state_dict())
    out = []
    for wrap in (False, True):
        random.seed(0)
        grid = OrderedGrid(plain.app, NODES, CONFIG)
        strategy = make()
        if wrap:
            strategy = Unlearning(strategy, "puf")
            strategy.request_unlearning(0, round=3)  # a request not due yet changes nothing before its round
        seen: dict[int, dict] = {}

        def keep(rnd, arrays, seen=seen):
            seen[rnd] = {k: v.numpy() for k, v in arrays.items()}

        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=3,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=keep,
        )
        out.append(seen[2])
    for k in out[0]:
        np.testing.assert_array_equal(out[0][k], out[1][k])


def test_the_helpers_run_sragu_and_sample_deletion(tmp_path):
    # 40 forget samples: their loss is 0.6 standard errors below the held-out loss, which the default
    # memorisation test (1.0) reads as chance and keeps the model; at 0 any lower loss is memorised
    res = run(tmp_path / "sragu", helped.app, method="sragu", **{"memorisation-z": 0.0})
    orig, unl, gold, kept = res["original"], res["unlearned"], res["gold"], res["kept-unlearning-round"]
    assert orig["forget-acc"] > gold["forget-acc"] and unl["forget-acc"] < kept["forget-acc"] - 0.005  # SRAGU ascended
    assert res["recovered"]["test-acc"] >= res["gold-end"]["test-acc"] - 0.01
    node = res["departing-node"]
    assert ("train.unlearn", node, CONFIG["departure-round"]) in [tuple(s) for s in res["sent"]]
    smp = run(tmp_path / "samples", helped.app, scenario="samples")
    node = smp["departing-node"]
    d = CONFIG["departure-round"]
    sent = [tuple(s) for s in smp["sent"]]
    # the deletion request reaches the node, it plays both roles in the unlearning round, then trains on what it keeps
    assert ("query.forget", node, 0) in sent and ("train.unlearn", node, d) in sent
    assert all(("train.retain", node, r) in sent for r in range(d + 1, CONFIG["num-server-rounds"] + 1))
    assert smp["departed"] == [] and smp["retain-only"] == [node]
    # the user's metric names still come back in the rounds where the helper trains that node
    assert "train_loss" in smp["train-metrics"][str(CONFIG["num-server-rounds"])]


def test_a_plain_client_is_refused_a_method_that_needs_a_client_routine_before_its_round(tmp_path):
    with pytest.raises(ValueError, match=r"cannot serve sragu's client routine.*train\.unlearn.*add_unlearning"):
        run(tmp_path, plain.app, method="sragu")


# -- the project's own experiment on someone else's model and data ------------------------------
TASK = """
import numpy as np
import torch
from functools import lru_cache

from sklearn.datasets import load_digits
from torch import nn


@lru_cache(maxsize=1)
def _digits():
    return load_digits()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 24), nn.Tanh())
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.body(x))


def load_data(partition_id, num_partitions):
    d = _digits()
    x, y = (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    idx = np.array_split(np.arange(len(y)), num_partitions)[partition_id]
    cut = int(0.75 * len(idx))
    return (x[idx[:cut]], y[idx[:cut]]), (torch.from_numpy(x[idx[cut:]]), torch.from_numpy(y[idx[cut:]]))
"""


def test_the_experiment_and_the_harness_run_on_a_task_module_from_outside_the_repo(tmp_path, monkeypatch):
    from simulations.harness import main as harness
    from simulations.inprocess import run_inprocess

    pkg = tmp_path / "pkgs" / "mytask"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(TASK)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    rc = (
        f"task='mytask.task' unlearn.round=3 num-server-rounds=4 unlearn.recovery='fixed' relearn-max-steps=20 "
        f"results-dir='{tmp_path / 'exp'}' gold-cache-dir='{tmp_path / 'gold'}'"
    )
    res = run_inprocess(str(ROOT), 3, rc)
    assert res["config"]["task"] == "mytask.task"
    weights = json.loads(next((tmp_path / "exp").glob("mytask-task_*/results.json")).read_text())
    assert weights["report"]["gold"]["kl-forget"] == 0.0 and weights["unlearning"]["method"] == "puf"
    layers = {layer["layer"] for layer in res["unlearning"]["layers"]}
    assert layers == {"body.1", "body.3", "head"}  # the user's architecture, not the project's MLP
    code = harness(
        [
            "--engine",
            "inprocess",
            "--methods",
            "puf",
            "fine-tune",
            "--scenarios",
            "client",
            "--seeds",
            "0",
            "--num-clients",
            "3",
            "--results-dir",
            str(tmp_path / "h"),
            "--run-config",
            "task='mytask.task' unlearn.round=3 num-server-rounds=4 unlearn.recovery='fixed' relearn-max-steps=0",
        ]
    )
    assert code == 0 and "puf" in (tmp_path / "h" / "harness" / "harness.md").read_text()


def test_the_project_server_refuses_a_plain_client_before_any_training(tmp_path):
    from server.queries import ClientProtocolError
    from server.server_app import run_server as project_server
    from simulations.inprocess import fused_run_config

    bare = ClientApp()
    bare.train()(plain.train)
    bare.evaluate()(plain.evaluate)
    for app, expect in (
        (plain.app, r"missing handlers \['query.info', 'query.forget', 'train.retain'"),
        (bare, r"no query.identify handler"),
    ):
        rc = fused_run_config(str(ROOT), f"dataset='digits' results-dir='{tmp_path / 'r'}'")
        grid = InProcessGrid(app, 3, rc)
        with pytest.raises(ClientProtocolError, match=expect) as err:
            project_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
        assert "3 client(s) cannot take part" in str(err.value) and "add_unlearning" in str(err.value)
        assert str(err.value).count("missing handlers") + str(err.value).count("no query.identify") == 1  # said once
        assert not any(t.startswith("train") for t in grid.sent)


# -- through flwr run on Flower's Ray engine ---------------------------------------------------
def launch(app: Path, tmp_path: Path, clients: int, run_config: str = "") -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "simulations.run_experiment",
        "--app",
        str(app),
        "--num-clients",
        str(clients),
        "--results-dir",
        str(tmp_path),
        "--timeout",
        "900",
    ]
    return subprocess.run(
        cmd + (["--run-config", run_config] if run_config else []),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.e2e
def test_the_plain_app_departs_a_client_through_flwr_run_on_ray(tmp_path):
    out = tmp_path / "out.json"
    proc = launch(APP, tmp_path, NODES, f"results='{out}'")
    assert proc.returncode == 0 and "finished:completed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    check_departure(res)
    for r in range(1, CONFIG["num-server-rounds"] + 1):
        assert "train_loss" in res["train-metrics"][str(r)] and "eval_acc" in res["evaluate-metrics"][str(r)]


@pytest.mark.e2e
def test_the_quickstart_example_runs(tmp_path):
    proc = launch(ROOT / "examples" / "quickstart-unlearning", tmp_path, 3)
    assert proc.returncode == 0 and "finished:completed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "forgot nodes [" in proc.stdout
