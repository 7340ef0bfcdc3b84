"""The run's settings, read from Flower's run config (``[tool.flwr.app.config]``), one dataclass per concern.

Keys are hyphenated; nested TOML tables flatten with dots (``unlearn.method``). Every
setting is a dataclass field whose metadata names its run-config key and says what it
does; each dataclass validates its own fields, and :class:`ExperimentConfig` holds the
rules that combine them. The configuration reference (``docs/configuration.md``) is
generated from these fields: ``python -m fed_unlearn.config``. Method-specific settings
(``puf.*``, ...) live in each method's own settings class.

=============== ==============================================================
concern         keys
=============== ==============================================================
data            ``seed``, ``task``, ``dataset``, ``data-dir``, ``model``, ``partitioner``, ...
federation      ``num-server-rounds``, ``node-wait-seconds``, ``round-timeout``, ``client-threads``
training        ``local-epochs``, ``batch-size``, ``lr``, ``momentum``, ``weight-decay``, ``fastclip.*``
request         ``unlearn.*``: method, who, what, when, calibration, recovery
output          ``results-dir``, ``gold-cache-dir``, ``relearn-max-steps``
service         ``service.*``
=============== ==============================================================
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from .data import DATASETS, PARTITIONERS
from .deletion import DeletionRequest
from .models import MODELS
from .settings import read_settings, setting
from .training import TrainSettings

RECOVERY_MODES = ("validation", "fixed", "until-gold")
MODES = ("experiment", "service")
FALLBACKS = ("wait", "fine-tune", "not")
#: Bumped when the gold federation's procedure changes (besides the code fingerprint in every key).
GOLD_FORMAT_VERSION = 1
BUILTIN_TASK = "fed_unlearn.task"


def _check(key: str, value: float, ok: bool, want: str) -> None:
    if not (math.isfinite(value) and ok):
        raise ValueError(f"run-config '{key}' must be a finite number {want}, got {value!r}")


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


# -- the concerns --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """The model and every client's data."""

    seed: int = setting(0, "seed", "seeds the model, the partitions, every minibatch order and the sample selections")
    task: str = setting(
        BUILTIN_TASK, "task", "the task module giving the model and the data (`load_model`, `load_data`)"
    )
    dataset: str = setting("mnist-5k", "dataset", "built-in task: " + ", ".join(sorted(DATASETS)))
    data_dir: str = setting("", "data-dir", "folder of on-disk datasets (Fashion-MNIST default: Debian's)")
    model: str = setting("mlp", "model", "built-in task: " + ", ".join(sorted(MODELS)))
    partitioner: str = setting("iid", "partitioner", "how the data is split over clients: " + ", ".join(PARTITIONERS))
    dirichlet_alpha: float = setting(
        0.5, "dirichlet-alpha", "label skew of the `dirichlet` partitioner (smaller: more)"
    )
    holdout_fraction: float = setting(
        0.2, "holdout-fraction", "each client's held-out share (test data, MIA non-members)"
    )
    unique_class: int = setting(0, "unique-class", "the `unique-class` partitioner: the class only client 0 holds")
    label_noise: float = setting(
        0.0,
        "label-noise",
        "share of the noisy clients' labels (train and held-out) changed to another class (0 = none)",
    )
    noisy_clients: str = setting("0", "label-noise-clients", "the clients whose labels `label-noise` changes")

    def __post_init__(self) -> None:
        _check("unique-class", self.unique_class, self.unique_class >= 0, ">= 0")
        _check("label-noise", self.label_noise, 0 <= self.label_noise <= 1, "in [0, 1]")
        try:
            _ = self.noisy_client_ids
        except ValueError:
            raise ValueError(
                f"label-noise-clients must be client ids, comma-separated, got {self.noisy_clients!r}"
            ) from None
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset '{self.dataset}'; valid: {', '.join(sorted(DATASETS))}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model '{self.model}'; valid: {', '.join(sorted(MODELS))}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"unknown partitioner '{self.partitioner}'; valid: {', '.join(PARTITIONERS)}")
        _check("dirichlet-alpha", self.dirichlet_alpha, self.dirichlet_alpha > 0, "> 0")
        _check("holdout-fraction", self.holdout_fraction, 0 < self.holdout_fraction < 1, "in (0, 1)")

    @property
    def builtin(self) -> bool:
        """Whether the project's own task (``model`` on ``dataset``) is used."""
        return self.task == BUILTIN_TASK

    @property
    def noisy_client_ids(self) -> tuple[int, ...]:
        """The client ids of ``label-noise-clients``."""
        return tuple(int(c) for c in str(self.noisy_clients).split(",") if c.strip())

    def key(self) -> dict[str, Any]:
        """What determines every client's data (part of the cache keys)."""
        common: dict[str, Any] = {
            "seed": self.seed,
            "data_dir": self.data_dir,
            "partitioner": self.partitioner,
            "dirichlet_alpha": self.dirichlet_alpha,
            "holdout_fraction": self.holdout_fraction,
        }
        if self.partitioner == "unique-class":
            common["unique_class"] = self.unique_class
        if self.label_noise > 0:
            common["label_noise"] = [self.label_noise, list(self.noisy_client_ids)]
        return {**common, "dataset": self.dataset} if self.builtin else {**common, "task": self.task}


@dataclass(frozen=True)
class FederationConfig:
    """How long the federation runs and waits."""

    num_server_rounds: int = setting(15, "num-server-rounds", "T: rounds in all, unlearning and recovery included")
    node_wait_seconds: float = setting(
        120.0, "node-wait-seconds", "how long the server waits for the clients to connect"
    )
    round_timeout: float = setting(600.0, "round-timeout", "seconds to wait for the replies of one round")
    client_threads: int = setting(1, "client-threads", "torch threads per client process")

    def __post_init__(self) -> None:
        _check("num-server-rounds", self.num_server_rounds, self.num_server_rounds >= 1, ">= 1")
        _check("node-wait-seconds", self.node_wait_seconds, self.node_wait_seconds > 0, "> 0")
        _check("round-timeout", self.round_timeout, self.round_timeout > 0, "> 0")
        _check("client-threads", self.client_threads, self.client_threads >= 1, ">= 1")


@dataclass(frozen=True)
class FastClipConfig:
    """Spectral-norm clipping of every affine layer during local training (the gold trains with it too)."""

    bound: float = setting(0.0, "fastclip.bound", "clip every affine layer's spectral norm at this bound (0 = off)")
    every: int = setting(50, "fastclip.every", "... every this many local steps and at the end of local training")

    def __post_init__(self) -> None:
        _check("fastclip.bound", self.bound, self.bound >= 0, ">= 0")
        _check("fastclip.every", self.every, self.every >= 1, ">= 1")


@dataclass(frozen=True)
class RequestConfig:
    """The deletion request: who, what, when, with which method, and when recovery stops."""

    method: str = setting("puf", "unlearn.method", "the unlearning method (docs/methods.md)")
    departing: tuple[int, ...] = setting(
        (0,), "unlearn.departing", "client ids that leave or delete samples: '0' or '0,3'"
    )
    round: int = setting(6, "unlearn.round", "d: rounds 1..d-1 with everyone, d unlearns, d+1.. recover")
    deletion: DeletionRequest = field(default_factory=DeletionRequest)
    calibrate: bool = setting(True, "unlearn.calibrate", "scale the step on the forgetting clients' own data")
    memorisation_z: float = setting(
        2.0,
        "unlearn.memorisation-z",
        "calibration keeps the model unless the forget set is this many standard errors more member-like "
        "than held-out data (loss-attack AUC or accuracy)",
    )
    support_floor: float = setting(
        0.01,
        "unlearn.support-floor",
        "a departing client's class of which the clients who stay hold less than this fraction is forgotten "
        "too (0 = off)",
    )
    utility_tolerance: float = setting(
        0.05,
        "unlearn.utility-tolerance",
        "how much (relative) the data that stays may lose to a step the remaining clients' evaluation sizes, "
        "or to a calibrated step longer than the method's own",
    )
    recovery: str = setting("validation", "unlearn.recovery", "when recovery stops: " + ", ".join(RECOVERY_MODES))
    recovery_tolerance: float = setting(0.01, "unlearn.recovery-tolerance", "accuracy gap counted as recovered")
    recovery_patience: int = setting(
        2, "unlearn.recovery-patience", "validation: rounds without improvement, then stop"
    )
    augment: str = setting("none", "unlearn.augment", "augmentation of local training after the request")

    def __post_init__(self) -> None:
        from .augment import MODES as AUGMENT_MODES

        if self.recovery not in RECOVERY_MODES:
            raise ValueError(f"unlearn.recovery must be one of {', '.join(RECOVERY_MODES)}, got '{self.recovery}'")
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"unlearn.augment must be one of {', '.join(AUGMENT_MODES)}, got '{self.augment}'")
        _check("unlearn.recovery-tolerance", self.recovery_tolerance, 0 <= self.recovery_tolerance < 1, "in [0, 1)")
        _check("unlearn.recovery-patience", self.recovery_patience, self.recovery_patience >= 1, ">= 1")
        _check("unlearn.memorisation-z", self.memorisation_z, self.memorisation_z >= 0, ">= 0")
        _check("unlearn.utility-tolerance", self.utility_tolerance, self.utility_tolerance >= 0, ">= 0")
        _check("unlearn.support-floor", self.support_floor, 0 <= self.support_floor < 1, "in [0, 1)")


@dataclass(frozen=True)
class OutputConfig:
    """Where results go, and the relearn probe of the report."""

    results_dir: str = setting("results", "results-dir", "results.json, accuracy.png, table.md (one folder each)")
    gold_cache_dir: str = setting("results/gold-cache", "gold-cache-dir", "cache of gold and original federations")
    relearn_max_steps: int = setting(500, "relearn-max-steps", "cap of the relearn-time probe (0 = off)")

    def __post_init__(self) -> None:
        _check("relearn-max-steps", self.relearn_max_steps, self.relearn_max_steps >= 0, ">= 0")


@dataclass(frozen=True)
class AuditConfig:
    """The strong leakage audit: calibrated per-sample attacks (RMIA, LiRA) read at low false-positive rates."""

    references: int = setting(
        0, "audit.references", "reference federations on random halves of the data (even; 0 = off; 4-8 is typical)"
    )
    gold_twin: bool = setting(
        False,
        "audit.gold-twin",
        "a second gold with other seeds: how far retraining itself lands from the gold (KL, disagreement)",
    )

    def __post_init__(self) -> None:
        if self.references < 0 or self.references % 2:
            raise ValueError(
                f"run-config 'audit.references' must be 0 or an even number (each sample is in exactly half "
                f"of the reference federations), got {self.references}"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of a run but the method's own, by concern; the rules that combine them.

    Rounds: ``1..d-1`` train with every client (the model after round ``d-1`` is the
    *original*), round ``d = request.round`` unlearns (several for the multi-round
    baselines), rounds ``d+1..T`` recover over the remaining clients. The gold federation
    trains the original's ``d-1`` rounds from the same initial model and seeds, without the
    deleted data.
    """

    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    fastclip: FastClipConfig = field(default_factory=FastClipConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        d, r = self.request.deletion, self.request
        if d.joint and r.departing:
            raise ValueError(
                "the class scenario removes a class from every client: unlearn.departing must be empty "
                f"(got {list(r.departing)})"
            )
        if d.scenario == "samples" and not r.departing:
            raise ValueError("sample deletion needs the requesting client ids in unlearn.departing")
        if (r.departing or d.joint) and not 2 <= r.round <= self.federation.num_server_rounds:
            raise ValueError(
                f"unlearn.round {r.round} is impossible: it must be in "
                f"[2, num-server-rounds={self.federation.num_server_rounds}] (round 1 has nothing to unlearn; "
                "a departure after the last round never happens)"
            )

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ExperimentConfig:
        """Read every section from a Flower run config; missing keys keep their defaults.

        Raises
        ------
        ValueError
            On a value of the wrong type, out of range, or an impossible combination, naming the key.
        """
        deletion = read_settings(DeletionRequest, rc)
        departing = parse_client_ids(rc.get("unlearn.departing", "0"))
        if deletion.joint or rc.get("mode") == "service":
            # class: every client deletes the class, nobody leaves; service: requests arrive at run time
            departing = ()
        return cls(
            data=read_settings(DataConfig, rc),
            federation=read_settings(FederationConfig, rc),
            train=read_settings(TrainSettings, rc),
            fastclip=read_settings(FastClipConfig, rc),
            request=read_settings(RequestConfig, rc, departing=departing, deletion=deletion),
            output=read_settings(OutputConfig, rc),
            audit=read_settings(AuditConfig, rc),
        )

    @property
    def gold_rounds(self) -> int:
        """Rounds of the gold federation: the original model's ``d - 1``."""
        return self.request.round - 1

    def involved(self, clients: Iterable[int]) -> tuple[int, ...]:
        """The clients that hold data to forget: the departing/requesting ones, or all (class scenario)."""
        return tuple(sorted(clients)) if self.request.deletion.joint else tuple(self.request.departing)

    @property
    def leaving(self) -> tuple[int, ...]:
        """The clients that leave the federation (whole-client deletion only)."""
        return tuple(self.request.departing) if self.request.deletion.clients_leave else ()

    def _common_key(self, num_clients: int) -> dict[str, Any]:
        from .gold_cache import code_fingerprint

        return {
            **self.data.key(),
            "model": self.data.model,
            "rounds": self.gold_rounds,
            "train": settings_dict(self.train),
            "num_clients": num_clients,
            "code": code_fingerprint(),
        }

    def gold_key(
        self, num_clients: int, forget_digests: Mapping[int, str] | None = None, architecture: str = ""
    ) -> str:
        """Hash of everything the gold federation depends on (cache key).

        ``forget_digests`` (client id -> :func:`~fed_unlearn.deletion.mask_digest`) pin the
        exact deleted samples when they were chosen with the model (sample deletion);
        ``architecture`` is the task's model fingerprint (a task module of your own).
        """
        payload: dict[str, Any] = {
            "version": GOLD_FORMAT_VERSION,
            **self._common_key(num_clients),
            "excluded": list(self.leaving),
        }
        if not self.data.builtin:
            payload["architecture"] = architecture
        if self.fastclip.bound > 0:  # the gold trains with the same clipping
            payload["fastclip"] = [self.fastclip.bound, self.fastclip.every]
        if not self.request.deletion.clients_leave:
            payload["deletion"] = self.request.deletion.to_dict()
            payload["forget"] = {str(c): d for c, d in sorted((forget_digests or {}).items())}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def original_key(self, num_clients: int, architecture: str = "") -> str:
        """Hash of everything the original federation (rounds ``1..d-1`` with everyone) and its record depend on.

        The model is the same for every deletion of a (data, model, seed) setting, but its
        per-round record is not: every round's evaluation reports forgetting and held-out
        accuracy on the parts the deletion defines (the clients that stay, the samples that
        go). So the deletion and who asks are part of the key, and the methods that need
        nothing from those rounds share one cached run per deletion.
        """
        payload = {
            "kind": "original",
            **self._common_key(num_clients),
            "architecture": architecture,
            "fastclip": [self.fastclip.bound, self.fastclip.every],
            "deletion": self.request.deletion.to_dict(),
            "departing": list(self.request.departing),
        }
        return "original-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def reference_key(
        self, num_clients: int, index: int, count: int, architecture: str = "", members: Sequence[int] = ()
    ) -> str:
        """Hash of everything reference federation ``index`` of ``count`` depends on (not the deletion).

        ``members``: the client ids that train it, when not all of them.
        """
        payload: dict[str, Any] = {
            "kind": "reference",
            **self._common_key(num_clients),
            "architecture": architecture,
            "fastclip": [self.fastclip.bound, self.fastclip.every],
            "reference": [index, count],
        }
        if members:
            payload["members"] = [int(c) for c in members]
        return "reference-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The settings as run-config keys (what a results file records)."""
        out: dict[str, Any] = {}
        for section in (
            self.data,
            self.federation,
            self.train,
            self.fastclip,
            self.request,
            self.output,
            self.audit,
            self.request.deletion,
        ):
            out.update(settings_dict(section))
        out["unlearn.departing"] = list(self.request.departing)
        return out


def settings_dict(section: Any) -> dict[str, Any]:
    """``{run-config key: value}`` of a settings dataclass's keyed fields."""
    return {f.metadata["key"]: getattr(section, f.name) for f in fields(section) if "key" in f.metadata}


@dataclass(frozen=True)
class ServiceConfig:
    """A deployed federation serving erasure requests (``mode = "service"``, keys ``service.*``)."""

    state_dir: str = setting(
        "results/service",
        "service.state-dir",
        "journal (requests + checkpoint), audit reports, service.json; a restart resumes from it",
    )
    sites_file: str = setting(
        "", "service.sites-file", "site registry (site -> authenticated node id, partition); empty = trust the nodes"
    )
    erase_sites: str = setting("", "service.erase-sites", "operator requests through the run config: site names")
    recovery_rounds: int = setting(2, "service.recovery-rounds", "ordinary rounds after unlearning before recovered")
    fallback: str = setting(
        "wait", "service.fallback", "a site absent from its unlearning round: " + ", ".join(FALLBACKS)
    )
    fallback_after: int = setting(2, "service.fallback-after", "failed attempts before the fallback applies")
    audit_gold: bool = setting(False, "service.audit-gold", "also retrain a gold federation for the audit report")
    max_strikes: int = setting(3, "service.max-strikes", "invalid updates after which a site is excluded (0 = never)")

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


# -- the configuration reference ----------------------------------------------------------------------
SECTIONS: tuple[tuple[str, type], ...] = (
    ("data", DataConfig),
    ("federation", FederationConfig),
    ("training", TrainSettings),
    ("training", FastClipConfig),
    ("request", RequestConfig),
    ("request", DeletionRequest),
    ("output", OutputConfig),
    ("audit", AuditConfig),
    ("service", ServiceConfig),
)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return '`"' + ",".join(map(str, value)) + '"`'
    return f"`{json.dumps(value)}`" if isinstance(value, str) else f"`{value}`"


def _attribute_help(cls: type) -> dict[str, str]:
    """First sentence of each field's entry in the numpy-style ``Attributes`` sections of ``cls`` and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = (klass.__dict__.get("__doc__") or "").splitlines()
        starts = [i for i, line in enumerate(lines) if line.strip() == "Attributes"]
        if not starts:
            continue
        names: list[str] = []
        text: list[str] = []
        for line in [*lines[starts[0] + 2 :], ""]:
            stripped = line.strip()
            heads = [h.strip() for h in stripped.split(" : ")[0].split(",")] if " : " in stripped else []
            if (heads and all(h.isidentifier() for h in heads)) or not stripped:
                sentence = " ".join(text).split(". ")[0].rstrip(".").replace("|", "\\|")
                out.update({n: sentence for n in names if sentence})
                names, text = heads, []
                if not stripped:
                    break
            else:
                text.append(stripped)
    return out


def reference_table() -> str:
    """The Markdown reference of every run-config key (docs/configuration.md), generated from the dataclasses."""
    from .unlearning import METHODS

    lines = [
        "| key | default | concern | meaning |",
        "|---|---|---|---|",
        f'| `mode` | `"experiment"` | run | {" or ".join(MODES)} |',
    ]
    for concern, cls in SECTIONS:
        for f in fields(cls):
            if "key" in f.metadata:
                lines.append(f"| `{f.metadata['key']}` | {_show(f.default)} | {concern} | {f.metadata['help']} |")
    for name, method in METHODS.items():
        if is_dataclass(method.config_class):
            helps = _attribute_help(method.config_class)
            for f in fields(method.config_class):
                key = f"{name}.{f.name.replace('_', '-')}"
                lines.append(f"| `{key}` | {_show(f.default)} | method `{name}` | {helps.get(f.name, '')} |")
    return "\n".join(lines)


REFERENCE_BEGIN = "<!-- generated by `python -m fed_unlearn.config --update docs/configuration.md`: begin -->"
REFERENCE_END = "<!-- generated: end -->"


def update_reference(path: str) -> None:
    """Replace the generated block of the Markdown file ``path`` with the current reference table."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, sep, rest = text.partition(REFERENCE_BEGIN)
    _, sep2, tail = rest.partition(REFERENCE_END)
    if not (sep and sep2):
        raise ValueError(f"{path}: no generated block ({REFERENCE_BEGIN} ... {REFERENCE_END})")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{REFERENCE_BEGIN}\n{reference_table()}\n{REFERENCE_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    """``python -m fed_unlearn.config [--update FILE]``: print the run-config reference, or rewrite it in FILE."""
    ap = argparse.ArgumentParser(description="The run-config reference (Markdown), generated from the settings.")
    ap.add_argument("--update", metavar="FILE", help="rewrite the generated block of this Markdown file")
    args = ap.parse_args(argv)
    if args.update:
        try:
            update_reference(args.update)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        print(reference_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
