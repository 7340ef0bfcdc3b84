"""Names shared by the ServerApp and the ClientApp (message actions, config keys, reply records).

Pure constants, no Flower import: both apps and the tests agree on them from here.
"""

from __future__ import annotations

#: The roles a client may play in an unlearning round (see :mod:`fed_unlearn.unlearning.base`).
ROLES = ("retain", "forget")
#: Reply record names per role: (ArrayRecord key, MetricRecord key). The retain role uses
#: the names Flower's FedAvg expects, so an ordinary round's reply is a plain FedAvg reply.
ROLE_KEYS = {"retain": ("arrays", "metrics"), "forget": ("forget-arrays", "forget-metrics")}
#: Data parts a client trains on: everything, the samples it keeps, the samples to forget.
DATA_PARTS = ("all", "retain", "forget")
