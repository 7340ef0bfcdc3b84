"""Unlearning methods, chosen by name (run-config key ``unlearn.method``).

Each method lives in its own module with a config dataclass whose fields are read
from ``<name>.<field>`` run-config keys.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import amun as _amun
from . import gradient_ascent as _gradient_ascent
from . import ieu as _ieu
from . import projected_ga as _projected_ga
from . import sragu as _sragu
from . import trw as _trw
from .amun import AMUN, AMUNConfig
from .base import UnlearningMethod, config_from_run_config
from .federaser import FedEraser, FedEraserConfig
from .fine_tune import FineTune, FineTuneConfig
from .gradient_ascent import GradientAscent, GradientAscentConfig
from .ieu import IEU, IEUConfig
from .mpru import MPRU, MPRUConfig
from .negation import Negation, NegationConfig
from .projected_ga import PGAConfig, ProjectedGradientAscent
from .puf import PUF, PUFConfig, puf_update
from .retrain import Retrain, RetrainConfig
from .sragu import SRAGU, SRAGUConfig, SpectralPUF, SpectralPUFConfig, sragu_unlearn
from .trw import TRW, TRWConfig

#: name -> (config dataclass, method class); read-only.
METHODS: Mapping[str, tuple[type, type[UnlearningMethod]]] = {
    "puf": (PUFConfig, PUF),
    "sragu": (SRAGUConfig, SRAGU),
    "spectral-puf": (SpectralPUFConfig, SpectralPUF),
    "retrain": (RetrainConfig, Retrain),
    "fine-tune": (FineTuneConfig, FineTune),
    "gradient-ascent": (GradientAscentConfig, GradientAscent),
    "not": (NegationConfig, Negation),
    "federaser": (FedEraserConfig, FedEraser),
    "pga": (PGAConfig, ProjectedGradientAscent),
    "ieu": (IEUConfig, IEU),
    "amun": (AMUNConfig, AMUN),
    "trw": (TRWConfig, TRW),
    "mpru": (MPRUConfig, MPRU),
}

#: Client-side routines of the methods whose forgetting clients run ``train.unlearn``:
#: name -> fn(model, forget, heldout, run_config, instruction, seed, state) -> metrics; read-only.
CLIENT_ROUTINES: Mapping[str, Any] = {
    "sragu": _sragu.client_unlearn,
    "gradient-ascent": _gradient_ascent.client_unlearn,
    "pga": _projected_ga.client_unlearn,
    "ieu": _ieu.client_unlearn,
    "amun": _amun.client_unlearn,
    "trw": _trw.client_unlearn,
}

#: Methods whose clients keep their own last local model (in their Flower Context state).
KEEPS_LAST_LOCAL_MODEL: frozenset[str] = frozenset({"pga"})


def make_method(name: str, run_config: Mapping[str, Any] | None = None) -> UnlearningMethod:
    """Build the method ``name`` with its settings from ``run_config``.

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the valid names) or a
        setting is invalid.
    """
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method '{name}'; valid: {', '.join(sorted(METHODS))}")
    cfg_cls, method_cls = METHODS[name]
    method = method_cls(config_from_run_config(cfg_cls, run_config or {}, name))
    method.configure_from_run(run_config or {})
    return method


__all__ = [
    "AMUN", "CLIENT_ROUTINES", "FedEraser", "MPRU", "TRW", "FineTune", "GradientAscent", "IEU", "KEEPS_LAST_LOCAL_MODEL", "Negation",
    "METHODS", "PUF", "PUFConfig", "ProjectedGradientAscent", "Retrain", "SRAGU", "SRAGUConfig", "SpectralPUF",
    "SpectralPUFConfig", "UnlearningMethod", "make_method", "puf_update", "sragu_unlearn",
]
