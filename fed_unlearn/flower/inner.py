"""What the wrapped strategy is, seen through Flower's differential-privacy wrappers.

:class:`~fed_unlearn.flower.Unlearning` hosts the unlearning round inside the strategy a
federation already runs. How the round's model enters that strategy depends on what the
strategy does with replies, and Flower's DP wrappers
(``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``) hide it behind their
own ``strategy`` attribute. :func:`describe` looks through any number of them and says:

* **aggregation**: ``mean`` (the new model is the weighted mean of the replies: FedAvg,
  FedProx), ``optimizer`` (a server optimizer applied to the weighted mean: FedAdam,
  FedYogi, FedAdagrad, FedAvgM), ``robust`` (FedMedian, FedTrimmedAvg, Krum, MultiKrum,
  Bulyan) or ``reweighted`` (QFedAvg and any other rule of its own);
* **DP**: the innermost DP wrapper, whose clipping norm bounds every reply's update,
  whether the clipping happens on the server or on the clients, and whether an accountant
  tracks the privacy spent;
* **minimums**: every node-count attribute along the chain (``min_available_nodes``,
  ``min_train_nodes``, ``min_evaluate_nodes`` of the strategy, ``num_sampled_clients`` of
  each DP wrapper), which the wrapper lowers when nodes leave.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from .reproducible import ReproducibleFedAvg

#: Strategies that aggregate robustly: the unlearning correction is added after their aggregation.
ROBUST_AGGREGATORS: tuple[type, ...] = (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan)
#: Strategies whose models are not arrays: unlearning by pseudo-gradients cannot apply.
UNSUPPORTED: tuple[type, ...] = (FedXgbBagging, FedXgbCyclic)
#: Flower's DP wrappers: (class, where the clipping happens).
DP_WRAPPERS: tuple[tuple[type, str], ...] = (
    (DifferentialPrivacyServerSideFixedClipping, "server"),
    (DifferentialPrivacyServerSideAdaptiveClipping, "server"),
    (DifferentialPrivacyClientSideFixedClipping, "client"),
    (DifferentialPrivacyClientSideAdaptiveClipping, "client"),
)
#: Node-count attributes of a strategy and of a DP wrapper.
STRATEGY_MINIMUMS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")
DP_MINIMUMS = ("num_sampled_clients",)


def dp_clipping(strategy: Any) -> str | None:
    """``"server"`` or ``"client"`` for one of Flower's DP wrappers, else ``None``."""
    for cls, where in DP_WRAPPERS:
        if isinstance(strategy, cls):
            return where
    return None


def chain(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy``, then every strategy the DP wrappers around it wrap, outermost first."""
    seen: set[int] = set()
    current: Any = strategy
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "strategy", None) if dp_clipping(current) else None


def is_plain_mean(strategy: Strategy) -> bool:
    """Whether the strategy's new model is the example-weighted mean of the replies (FedAvg, FedProx)."""
    agg = type(strategy).aggregate_train
    return isinstance(strategy, FedAvg) and (agg is FedAvg.aggregate_train or agg is ReproducibleFedAvg.aggregate_train)


@dataclass(frozen=True)
class Inner:
    """What :func:`describe` found.

    Attributes
    ----------
    base : Strategy
        The innermost strategy (the one that aggregates).
    aggregation : {"mean", "optimizer", "robust", "reweighted"}
    dp : Strategy or None
        The innermost DP wrapper around ``base``.
    dp_clipping : {"server", "client"} or None
    """

    base: Strategy
    aggregation: str
    dp: Strategy | None
    dp_clipping: str | None

    @property
    def accountant(self) -> Any:
        """The privacy accountant of the DP wrapper, if any."""
        return getattr(self.dp, "accountant", None) if self.dp is not None else None

    @property
    def clipping_norm(self) -> float | None:
        """The DP wrapper's clipping norm now (the adaptive ones change it every round)."""
        if self.dp is None:
            return None
        value = getattr(self.dp, "clipping_norm", None)
        return float(value) if isinstance(value, (int, float)) else None


def describe(strategy: Strategy) -> Inner:
    """Look through Flower's DP wrappers to the strategy that aggregates (module docstring)."""
    links = list(chain(strategy))
    base = links[-1]
    dps = [s for s in links if dp_clipping(s)]
    dp = dps[-1] if dps else None
    if isinstance(base, (FedOpt, FedAvgM)):
        aggregation = "optimizer"
    elif isinstance(base, ROBUST_AGGREGATORS):
        aggregation = "robust"
    elif is_plain_mean(base):
        aggregation = "mean"
    else:
        aggregation = "reweighted"
    return Inner(base, aggregation, dp, dp_clipping(dp) if dp is not None else None)


def minimum_slots(strategy: Strategy) -> list[tuple[Strategy, str]]:
    """Every node-count attribute along the DP chain: ``(object, attribute name)`` pairs."""
    slots: list[tuple[Strategy, str]] = []
    for link in chain(strategy):
        names = DP_MINIMUMS if dp_clipping(link) else STRATEGY_MINIMUMS
        slots += [(link, n) for n in names if isinstance(getattr(link, n, None), int)]
    return slots


def reset_server_momentum(strategy: Strategy) -> bool:
    """Drop a server optimizer's first moment (FedOpt family, FedAvgM) behind any DP wrapper; whether there was one."""
    base = describe(strategy).base
    if isinstance(base, FedOpt):
        had = bool(base.m_t)
        base.m_t = None
        return had
    if isinstance(base, FedAvgM):
        had = base.momentum_vector is not None
        base.momentum_vector = None
        return had
    return False
