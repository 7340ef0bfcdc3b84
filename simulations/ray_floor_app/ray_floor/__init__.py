"""The floor of a Flower simulation of a PyTorch app (``simulations.bench_mainjob``)."""
