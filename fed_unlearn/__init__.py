"""fed-unlearn: federated unlearning for Flower federations.

The library is pure PyTorch/NumPy: data, models, training, the unlearning math and
the metrics. Flower plumbing lives in the ``server`` and ``clients`` packages.
"""

__version__ = "0.1.0"
