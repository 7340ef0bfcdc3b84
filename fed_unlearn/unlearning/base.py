"""What every unlearning method tells the strategy, independent of Flower.

A method decides three things about the *unlearning round* (the first round after
a deletion request): who trains, what the clients holding the data to forget are
asked to do, and how the replies are combined into the next global model. Every
other round is the wrapped strategy's ordinary round over the clients still in the
federation, and the strategy keeps no per-client history, so a method must work from that round's
replies alone. Two baselines bend these rules and say so: ``retrain`` and
``federaser`` take several server rounds (:attr:`UnlearningMethod.num_rounds`), and
FedEraser keeps per-client history through :meth:`UnlearningMethod.observe`, inside
its own object (its memory is reported by :meth:`UnlearningMethod.history_bytes`).

Roles. In the unlearning round a client may play two roles: the *retain* role
(ordinary local training on the data it keeps: all of it for a client not named in
the request, its retained part for a client deleting samples or a class) and the
*forget* role (training or the method's local routine on its forget set). The
departing clients of a whole-client deletion have only the forget role. Methods see
the retain-role replies as ``remaining`` and the forget-role replies as ``departing``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np

from ..aggregation import ClientUpdate, Weights
from ..deletion import SCENARIOS, DeletionRequest
from ..settings import config_from_run_config


@dataclass
class RoutineInput:
    """What a forgetting client's local routine (``train.unlearn``) works with.

    Attributes
    ----------
    model : torch.nn.Module
        The received global model; the routine changes it in place and the client sends it back.
    forget : (x, y)
        The client's samples to forget.
    heldout : (x, y)
        The client's held-out samples of the classes in ``forget`` (the "never seen" reference).
    settings : dataclass
        The method's settings, as the server sent them with the instruction.
    instruction : Mapping
        The whole instruction (method-specific keys such as SRAGU's stability weights).
    seed : int
        Seeds the routine's minibatches and noise.
    retain : (x, y), optional
        The client's retained samples, when it stays in the federation.
    last_local : Mapping, optional
        The client's own last locally trained model and ``last_local_n`` its example count
        (kept only for methods with :attr:`UnlearningMethod.client_keeps_last_local`).
    augment : str
        Data augmentation of any fine-tuning the routine does.
    """

    model: Any
    forget: tuple[np.ndarray, np.ndarray]
    heldout: tuple[np.ndarray, np.ndarray]
    settings: Any
    instruction: Mapping[str, Any]
    seed: int
    retain: tuple[np.ndarray, np.ndarray] | None = None
    last_local: Mapping[str, np.ndarray] | None = None
    last_local_n: int = 0
    augment: str = "none"


#: A forgetting client's local routine: ``routine(input) -> metrics`` (scalars or lists of floats).
ClientRoutine = Callable[[RoutineInput], dict[str, Any]]


@dataclass(frozen=True)
class NoSettings:
    """A method without settings."""


class UnlearningMethod(ABC):
    """Base class of the unlearning methods; subclasses declare everything about themselves.

    A method module defines one subclass, decorated with
    :func:`fed_unlearn.unlearning.register_method`, that sets the class attributes below;
    the strategy, the client helpers, the harness and the service read them from the
    registry, so adding a method touches only its own module (and its test).
    """

    #: Registry name, also the run-config prefix of the method's settings (``<name>.<field>``).
    name: ClassVar[str]
    #: The settings dataclass (fields with defaults; read from ``<name>.*`` run-config keys).
    config_class: ClassVar[type] = NoSettings
    #: Deletion scenarios the method serves (``client``, ``samples``, ``class``).
    scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    #: Whether a long-running erasure service may use it (one round, no stored history, no retraining).
    serves_online: ClassVar[bool] = True
    #: Whether it keeps per-client update history on the server (reported by :meth:`history_bytes`).
    keeps_history: ClassVar[bool] = False
    #: The forgetting clients' local routine (``train.unlearn``); ``None`` = they need no code of ours.
    client_routine: ClassVar[ClientRoutine | None] = None
    #: Whether clients keep their own last local model in their node state for the routine.
    client_keeps_last_local: ClassVar[bool] = False
    #: Whether the strategy may scale the departing clients' unlearning step down to what
    #: their own data says is enough (:mod:`fed_unlearn.calibration`).
    calibratable: ClassVar[bool] = True

    #: Set by the strategy: the forget-role clients serve ONE request spread over them
    #: (a class removed from every client) rather than one request each (whole clients,
    #: or samples of several clients); methods that add local motions average them then.
    joint_request: bool = False

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> UnlearningMethod:
        """Build the method with its settings from ``<name>.<field>`` run-config keys (defaults otherwise).

        Raises
        ------
        ValueError
            On a setting of the wrong type or out of range, naming the key.
        """
        return cls(config_from_run_config(cls.config_class, run_config, cls.name))

    def settings(self) -> dict[str, Any]:
        """The method's settings as ``<name>.<field>`` keys (sent to clients that run its routine)."""
        if not is_dataclass(self.config):
            return {}
        return {f"{self.name}.{f.name.replace('_', '-')}": getattr(self.config, f.name) for f in fields(self.config)}

    @property
    def num_rounds(self) -> int:
        """Server rounds the unlearning takes (1 for every method but the multi-round baselines)."""
        return 1

    def rounds_needed(self, rounds_before: int) -> int:
        """Unlearning rounds the method will take when the request comes after ``rounds_before`` rounds."""
        return self.num_rounds

    def begin(  # noqa: B027  (an optional hook: most methods need no set-up)
        self, requests: Sequence[int], leave: bool, request: DeletionRequest | None = None
    ) -> None:
        """Called once, before the first unlearning round, with the clients being served.

        ``leave``: whether they leave the federation (whole-client deletion); ``request``:
        what is deleted, when known (a class-unlearning method reads the class from it).
        """

    def observe(  # noqa: B027  (an optional hook: history-free methods keep nothing)
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> None:
        """Ordinary-round hook: the round's starting model and its validated replies.

        The strategy calls it after every ordinary (non-unlearning) round. The default
        keeps nothing: methods must work without history. FedEraser overrides it.
        """

    def history_bytes(self) -> int:
        """Bytes of per-client history the method keeps (0 for history-free methods)."""
        return 0

    def remaining_config(self) -> dict[str, Any]:
        """Extra settings sent with the retain role's training in an unlearning round."""
        return {}

    @property
    @abstractmethod
    def remaining_clients_train(self) -> bool:
        """Whether the remaining clients also train in the unlearning round."""

    @property
    def departing_clients_train(self) -> bool:
        """Whether the departing clients are sent an instruction in the unlearning round."""
        return True

    def prepare_global(self, global_weights: Weights) -> Weights:
        """The model sent out in the unlearning round (default: the global model unchanged)."""
        return global_weights

    @property
    def departing_task(self) -> str:
        """Message action for departing clients: ``train`` (an ordinary round) or ``unlearn`` (the routine)."""
        return "unlearn" if type(self).client_routine is not None else "train"

    def departing_config(self, global_weights: Weights) -> dict[str, Any]:
        """Extra settings sent to the departing clients with their instruction.

        For ``departing_task == "unlearn"`` the client runs :attr:`client_routine` of the
        method named in ``unlearn-method`` with the settings sent here.
        """
        return {"unlearn-method": self.name, **self.settings()}

    @abstractmethod
    def aggregate(
        self,
        global_weights: Weights,
        remaining: Sequence[ClientUpdate],
        departing: Sequence[ClientUpdate],
    ) -> dict[str, np.ndarray]:
        """Combine the unlearning round's replies into the next global model."""


class RemainingOnlyMethod(UnlearningMethod):
    """A method whose unlearning round(s) only the remaining clients train in (fine-tune, NoT, retrain, FedEraser)."""

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return True

    @property
    def departing_clients_train(self) -> bool:  # noqa: D102
        return False


class LocalRoutineMethod(UnlearningMethod):
    """A method whose forgetting clients run a local routine (``train.unlearn``) and whose motion the server applies.

    The remaining clients do not train in the unlearning round; the new global model is
    :func:`apply_departing_motion` of the forget-role replies.
    """

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return False

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        return apply_departing_motion(global_weights, [], departing, self.joint_request)


def forget_loss(model: Any, forget: tuple[np.ndarray, np.ndarray]) -> float:
    """Mean cross-entropy of ``model`` on the forget set (the routines report it before and after)."""
    from ..metrics import cross_entropy
    from ..training import predict_logits

    return float(np.mean(cross_entropy(predict_logits(model, forget[0]), forget[1])))


def apply_departing_motion(
    global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate], joint: bool = False
) -> dict[str, np.ndarray]:
    """``w + sum_{u in U} c_u (theta_u - w) + sum_{k in S} (n_k / N_S) (w_k - w)``.

    The combination for methods whose forget-role clients run a local unlearning routine.
    Separate requests (``joint = False``: whole clients, or samples of several clients):
    ``c_u = 1``, each request's unlearning motion is applied in full and concurrent ones
    add up. One request spread over clients (``joint = True``: a class removed from every
    client): ``c_u = m_u / M``, the forget-set-weighted mean of the local motions, i.e.
    federated averaging of one unlearning step. Plus a FedAvg step of the remaining
    clients if any trained in that round.
    """
    from ..aggregation import weighted_delta_sum

    if not departing:
        raise ValueError("needs at least one departing client's update")
    dep = sorted(departing, key=lambda u: u.client_id)
    locals_ = [u.weights for u in dep]
    m = float(sum(u.num_examples for u in dep))
    coefs = [u.num_examples / m for u in dep] if joint else [1.0] * len(dep)
    rem = sorted(remaining, key=lambda u: u.client_id)
    if rem:
        n_s = float(sum(u.num_examples for u in rem))
        locals_ += [u.weights for u in rem]
        coefs += [u.num_examples / n_s for u in rem]
    step = weighted_delta_sum(locals_, coefs, global_weights)
    return {k: (np.asarray(g, np.float64) + step[k]).astype(np.asarray(g).dtype) for k, g in global_weights.items()}
