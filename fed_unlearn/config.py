"""The experiment's settings, read from Flower's run config (``[tool.flwr.app.config]``).

Keys are hyphenated; nested TOML tables flatten with dots (``unlearn.method``).
Method-specific settings (``puf.*``) are read by the method's own config dataclass.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .data import DATASETS, PARTITIONERS
from .deletion import DeletionRequest, request_from_run_config
from .models import MODELS
from .training import TrainSettings

RECOVERY_MODES = ("validation", "fixed", "until-gold")

#: Bumped when the gold federation's procedure changes, so stale caches are not reused.
GOLD_FORMAT_VERSION = 1


def parse_client_ids(value: str | int) -> tuple[int, ...]:
    """Parse ``"3"``, ``"1,4"`` or ``3`` into sorted unique client ids.

    Raises
    ------
    ValueError
        On anything that is not a comma-separated list of non-negative integers.
    """
    if isinstance(value, bool):
        raise ValueError(f"unlearn.departing must be client ids like '3' or '1,4', got {value!r}")
    if isinstance(value, int):
        items = [value]
    else:
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"unlearn.departing must be client ids like '3' or '1,4', got {value!r}") from None
    if any(i < 0 for i in items):
        raise ValueError(f"client ids are >= 0, got {value!r}")
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class ExperimentConfig:
    """All non-method settings of a federated-unlearning experiment.

    Attributes
    ----------
    seed : int
        Seeds the model initialisation, the partitioning and every client's minibatches.
    dataset, data_dir : str
        Dataset name (see :data:`fed_unlearn.data.DATASETS`) and folder for on-disk ones.
    task : str
        The task module giving the model and the data (``fed_unlearn.task`` = the built-in
        ``model`` on the built-in ``dataset``; see :mod:`fed_unlearn.task`).
    model : str
        ``mlp`` or ``cnn`` (built-in task).
    partitioner, dirichlet_alpha, holdout_fraction :
        How data is split across clients and into each client's train / held-out parts.
    num_server_rounds : int
        Total rounds ``T`` of the federation, the unlearning round and recovery included:
        the cap on recovery.
    train : TrainSettings
        Local SGD settings, the same for every client and round.
    method : str
        Unlearning method name (``unlearn.method``).
    departing : tuple of int
        Client (partition) ids that leave (``unlearn.departing``, e.g. ``"3"`` or ``"1,4"``);
        in the ``samples`` scenario the clients that delete part of their data; empty in the
        ``class`` scenario (every client deletes the class, nobody leaves).
    deletion : DeletionRequest
        What is forgotten: whole clients, samples inside clients, or a class
        (``unlearn.scenario``, ``unlearn.selection``, ``unlearn.fraction``, ``unlearn.class``).
    departure_round : int
        Round ``d`` in which the unlearning happens: rounds ``1..d-1`` train with every
        client (the model after round ``d-1`` is the *original* model), round ``d``
        unlearns, rounds ``d+1..T`` recover over the remaining clients. The gold
        federation trains the original's ``d-1`` rounds from the same initial model
        and seeds, without the departing clients.
    recovery : {"validation", "fixed", "until-gold"}
        When recovery stops. ``validation`` (default, gold-free): once the remaining
        clients' held-out accuracy is back within ``recovery_tolerance`` of the pre-request
        model's, or has stopped improving for ``recovery_patience`` rounds; ``fixed``: runs
        to ``T``; ``until-gold``: an *oracle* for ablations, stops at the gold's accuracy
        (information no real federation has).
    recovery_patience : int
        Rounds without improvement (by more than 0.001) after which ``validation`` stops.
    calibrate : bool
        Calibrate the unlearning step on the forgetting clients' own data
        (:mod:`fed_unlearn.calibration`, ``unlearn.calibrate``).
    recovery_tolerance : float
        Accuracy gap to gold (absolute) counted as recovered.
    augment : str
        Data augmentation of local training and of AMUN's / TRW's fine-tuning from the
        deletion request on (``unlearn.augment``: ``none``, ``shift``, ``trivial``); the
        gold trains without it.
    fastclip_bound, fastclip_every :
        FastClip spectral-norm clipping during all local training (``fastclip.bound``, 0 =
        off, and ``fastclip.every`` steps); the gold trains with the same clipping.
    results_dir : str
        Where ``results.json`` and ``accuracy.png`` go (a sub-folder per experiment).
    gold_cache_dir : str
        Where gold federations are cached, keyed by :meth:`gold_key`.
    relearn_max_steps : int
        Cap of the relearn-time probe on the departing clients (0 disables it).
    client_threads : int
        torch threads per client process (1 avoids oversubscription under Ray).
    node_wait_seconds : float
        How long the server waits for every client to connect.
    round_timeout : float
        Seconds to wait for the replies of one round.
    """

    seed: int = 0
    task: str = "fed_unlearn.task"
    dataset: str = "mnist-5k"
    data_dir: str = ""
    model: str = "mlp"
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    holdout_fraction: float = 0.2
    num_server_rounds: int = 15
    train: TrainSettings = field(default_factory=TrainSettings)
    method: str = "puf"
    departing: tuple[int, ...] = (0,)
    departure_round: int = 6
    deletion: DeletionRequest = field(default_factory=DeletionRequest)
    recovery: str = "validation"
    recovery_tolerance: float = 0.01
    recovery_patience: int = 2
    calibrate: bool = True
    augment: str = "none"
    fastclip_bound: float = 0.0
    fastclip_every: int = 50
    results_dir: str = "results"
    gold_cache_dir: str = "results/gold-cache"
    relearn_max_steps: int = 500
    client_threads: int = 1
    node_wait_seconds: float = 120.0
    round_timeout: float = 600.0

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset '{self.dataset}'; valid: {', '.join(sorted(DATASETS))}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model '{self.model}'; valid: {', '.join(sorted(MODELS))}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"unknown partitioner '{self.partitioner}'; valid: {', '.join(PARTITIONERS)}")
        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        if self.deletion.scenario == "class" and self.departing:
            raise ValueError(
                "the class scenario removes a class from every client: unlearn.departing must be empty "
                f"(got {list(self.departing)})"
            )
        if self.deletion.scenario == "samples" and not self.departing:
            raise ValueError("sample deletion needs the requesting client ids in unlearn.departing")
        round_ok = 2 <= self.departure_round <= self.num_server_rounds
        if (self.departing or self.deletion.scenario == "class") and not round_ok:
            raise ValueError(
                f"unlearn.round {self.departure_round} is impossible: it must be in "
                f"[2, num-server-rounds={self.num_server_rounds}] (round 1 has nothing to unlearn; "
                "a departure after the last round never happens)"
            )
        from .augment import MODES as AUGMENT_MODES

        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"unlearn.augment must be one of {', '.join(AUGMENT_MODES)}, got '{self.augment}'")
        if self.fastclip_bound < 0 or self.fastclip_every < 1:
            raise ValueError(
                f"fastclip needs bound >= 0 and every >= 1, got {self.fastclip_bound}, {self.fastclip_every}"
            )
        if self.recovery not in RECOVERY_MODES:
            raise ValueError(f"unlearn.recovery must be one of {', '.join(RECOVERY_MODES)}, got '{self.recovery}'")
        if not 0 <= self.recovery_tolerance < 1:
            raise ValueError(f"unlearn.recovery-tolerance must be in [0, 1), got {self.recovery_tolerance}")
        if self.relearn_max_steps < 0:
            raise ValueError(f"relearn-max-steps must be >= 0, got {self.relearn_max_steps}")
        if self.client_threads < 1:
            raise ValueError(f"client-threads must be >= 1, got {self.client_threads}")

    def _check_numbers(self) -> None:
        """Every number finite and in range, naming its run-config key."""
        t = self.train
        checks = [
            ("lr", t.lr, lambda v: v > 0, "> 0"),
            ("momentum", t.momentum, lambda v: v >= 0, ">= 0"),
            ("weight-decay", t.weight_decay, lambda v: v >= 0, ">= 0"),
            ("local-epochs", t.epochs, lambda v: v >= 1, ">= 1"),
            ("batch-size", t.batch_size, lambda v: v >= 1, ">= 1"),
            ("dirichlet-alpha", self.dirichlet_alpha, lambda v: v > 0, "> 0"),
            ("holdout-fraction", self.holdout_fraction, lambda v: 0 < v < 1, "in (0, 1)"),
            ("fastclip.bound", self.fastclip_bound, lambda v: v >= 0, ">= 0"),
            ("fastclip.every", self.fastclip_every, lambda v: v >= 1, ">= 1"),
            ("node-wait-seconds", self.node_wait_seconds, lambda v: v > 0, "> 0"),
            ("round-timeout", self.round_timeout, lambda v: v > 0, "> 0"),
            ("unlearn.recovery-tolerance", self.recovery_tolerance, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("relearn-max-steps", self.relearn_max_steps, lambda v: v >= 0, ">= 0"),
            ("unlearn.recovery-patience", self.recovery_patience, lambda v: v >= 1, ">= 1"),
            ("client-threads", self.client_threads, lambda v: v >= 1, ">= 1"),
        ]
        for key, value, ok, want in checks:
            if not math.isfinite(value) or not ok(value):
                raise ValueError(f"run-config '{key}' must be a finite number {want}, got {value!r}")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ExperimentConfig:
        """Read the experiment settings from a Flower run config; missing keys keep defaults.

        Raises
        ------
        ValueError
            On a value of the wrong type or an impossible combination, naming the key.
        """
        d = cls()
        t = TrainSettings()

        def get(key: str, default: Any) -> Any:
            value = rc.get(key, default)
            if (
                isinstance(default, int)
                and not isinstance(default, bool)
                and isinstance(value, float)
                and value.is_integer()
            ):
                value = int(value)  # "3.0" where a count is expected
            if isinstance(default, bool) or isinstance(value, bool):
                ok = isinstance(value, bool) and isinstance(default, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float))
                value = float(value) if ok else value
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise ValueError(f"run-config '{key}' must be {type(default).__name__}, got {value!r}")
            return value

        deletion = request_from_run_config(rc)
        departing = parse_client_ids(rc.get("unlearn.departing", ",".join(map(str, d.departing))))
        if deletion.scenario == "class" or rc.get("mode") == "service":
            # class: every client deletes the class, nobody leaves; service: requests arrive at run time
            departing = ()
        return cls(
            seed=get("seed", d.seed),
            task=get("task", d.task),
            dataset=get("dataset", d.dataset),
            data_dir=get("data-dir", d.data_dir),
            model=get("model", d.model),
            partitioner=get("partitioner", d.partitioner),
            dirichlet_alpha=get("dirichlet-alpha", d.dirichlet_alpha),
            holdout_fraction=get("holdout-fraction", d.holdout_fraction),
            num_server_rounds=get("num-server-rounds", d.num_server_rounds),
            train=TrainSettings(
                epochs=get("local-epochs", t.epochs),
                batch_size=get("batch-size", t.batch_size),
                lr=get("lr", t.lr),
                momentum=get("momentum", t.momentum),
                weight_decay=get("weight-decay", t.weight_decay),
            ),
            method=get("unlearn.method", d.method),
            departing=departing,
            departure_round=get("unlearn.round", d.departure_round),
            deletion=deletion,
            recovery=get("unlearn.recovery", d.recovery),
            recovery_tolerance=get("unlearn.recovery-tolerance", d.recovery_tolerance),
            recovery_patience=get("unlearn.recovery-patience", d.recovery_patience),
            calibrate=get("unlearn.calibrate", d.calibrate),
            augment=get("unlearn.augment", d.augment),
            fastclip_bound=get("fastclip.bound", d.fastclip_bound),
            fastclip_every=get("fastclip.every", d.fastclip_every),
            results_dir=get("results-dir", d.results_dir),
            gold_cache_dir=get("gold-cache-dir", d.gold_cache_dir),
            relearn_max_steps=get("relearn-max-steps", d.relearn_max_steps),
            client_threads=get("client-threads", d.client_threads),
            node_wait_seconds=get("node-wait-seconds", d.node_wait_seconds),
            round_timeout=get("round-timeout", d.round_timeout),
        )

    @property
    def gold_rounds(self) -> int:
        """Rounds of the gold federation: the original model's ``d - 1``."""
        return self.departure_round - 1

    def involved(self, clients: Iterable[int]) -> tuple[int, ...]:
        """The clients that hold data to forget: the departing/requesting ones, or all (class scenario)."""
        return tuple(sorted(clients)) if self.deletion.scenario == "class" else tuple(self.departing)

    @property
    def leaving(self) -> tuple[int, ...]:
        """The clients that leave the federation (whole-client deletion only)."""
        return tuple(self.departing) if self.deletion.clients_leave else ()

    def data_key(self) -> dict[str, Any]:
        """Settings that determine every client's data."""
        if self.task != "fed_unlearn.task":
            return {
                "task": self.task,
                "seed": self.seed,
                "data_dir": self.data_dir,
                "partitioner": self.partitioner,
                "dirichlet_alpha": self.dirichlet_alpha,
                "holdout_fraction": self.holdout_fraction,
            }
        return {
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "partitioner": self.partitioner,
            "dirichlet_alpha": self.dirichlet_alpha,
            "holdout_fraction": self.holdout_fraction,
            "seed": self.seed,
        }

    def gold_key(
        self, num_clients: int, forget_digests: Mapping[int, str] | None = None, architecture: str = ""
    ) -> str:
        """Hash of everything the gold federation depends on (cache key).

        ``forget_digests`` (client id -> :func:`~fed_unlearn.deletion.mask_digest`) pin the
        exact deleted samples when they were chosen with the model (sample deletion);
        ``architecture`` is the task's model fingerprint (a task module of your own).
        """
        from .gold_cache import code_fingerprint

        payload: dict[str, Any] = {
            "version": GOLD_FORMAT_VERSION,
            **self.data_key(),
            "model": self.model,
            "rounds": self.gold_rounds,
            "train": asdict(self.train),
            "excluded": list(self.leaving),
            "num_clients": num_clients,
            "code": code_fingerprint(),
        }
        if self.task != "fed_unlearn.task":
            payload["architecture"] = architecture
        if self.fastclip_bound > 0:  # the gold trains with the same clipping
            payload["fastclip"] = [self.fastclip_bound, self.fastclip_every]
        if self.deletion.scenario != "client":  # keeps the keys of client-level golds unchanged
            payload["deletion"] = self.deletion.to_dict()
            payload["forget"] = {str(c): d for c, d in sorted((forget_digests or {}).items())}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def original_key(self, num_clients: int, architecture: str = "") -> str:
        """Hash of everything the original federation (rounds ``1..d-1`` with everyone) depends on.

        The same for every method and every deletion of a (data, model, seed) setting: the
        methods that need nothing from those rounds share one cached run.
        """
        from .gold_cache import code_fingerprint

        payload: dict[str, Any] = {
            "kind": "original",
            **self.data_key(),
            "model": self.model,
            "rounds": self.gold_rounds,
            "train": asdict(self.train),
            "num_clients": num_clients,
            "code": code_fingerprint(),
            "architecture": architecture,
            "fastclip": [self.fastclip_bound, self.fastclip_every],
        }
        return "original-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of the settings."""
        out = asdict(self)
        out["departing"] = list(self.departing)
        out["deletion"] = self.deletion.to_dict()
        return out


MODES = ("experiment", "service")
FALLBACKS = ("wait", "fine-tune", "not")


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of a deployed federation serving erasure requests (``mode = "service"``, keys ``service.*``).

    Attributes
    ----------
    state_dir : str
        Where the journal (requests + checkpoint, one SQLite file), the audit reports
        and ``service.json`` live. A restarted server resumes from it.
    sites_file : str
        The site registry (site name -> authenticated node id, partition id); empty =
        trust the site each node names (simulation, trusted loopback tests).
    erase_sites : str
        Operator requests made through the run config: comma-separated site names.
    recovery_rounds : int
        Ordinary rounds after the unlearning round before a request counts as recovered.
    fallback : {"wait", "fine-tune", "not"}
        What to do when the site to forget does not take part in its unlearning round
        ``fallback_after`` times: keep the request open and report it (``wait``), or
        serve it without the site, data-free (``fine-tune``: the others continue without
        it; ``not``: weight negation, then the others train).
    fallback_after : int
        Failed attempts before the fallback applies.
    audit_gold : bool
        Train a gold federation (retrain without the site from the initial model) for
        the audit report; otherwise the audit is the leakage audit alone.
    max_strikes : int
        Invalid training replies (NaN/inf, wrong shapes or dtypes, records not asked for)
        after which a site is excluded from the federation (0 = never); each one is journaled.
    """

    state_dir: str = "results/service"
    sites_file: str = ""
    erase_sites: str = ""
    recovery_rounds: int = 2
    fallback: str = "wait"
    fallback_after: int = 2
    audit_gold: bool = False
    max_strikes: int = 3

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"service.fallback must be one of {', '.join(FALLBACKS)}, got '{self.fallback}'")
        if self.recovery_rounds < 0 or self.fallback_after < 1 or self.max_strikes < 0:
            raise ValueError(
                f"service needs recovery-rounds >= 0, fallback-after >= 1 and max-strikes >= 0; got {self}"
            )
        if not self.state_dir:
            raise ValueError("service.state-dir must name a folder")

    @property
    def erase_list(self) -> tuple[str, ...]:
        """The sites named in ``erase_sites``."""
        return tuple(s.strip() for s in self.erase_sites.split(",") if s.strip())


def mode_of(rc: Mapping[str, Any]) -> str:
    """The run's mode (``mode`` key), validated."""
    mode = rc.get("mode", "experiment")
    if mode not in MODES:
        raise ValueError(f"run-config 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    return str(mode)
