"""Layer-wise spectral-norm clipping of affine layers (FastClip-style smoothness control).

Reference: A. Boroojeny, M. Telgarsky, H. Sundaram, "Spectrum Extraction and Clipping for
Implicitly Linear Layers" (AISTATS 2024): clip the singular values of every affine layer
at ``c`` during training, so the network's Lipschitz constant is controlled — the
smoothness condition under which AMUN's adversarial examples are close to the samples
they come from.

* ``nn.Linear``: the exact clip by SVD, ``W <- U min(S, c) V^T``: singular values above
  ``c`` become ``c``, the others are left alone.
* ``nn.Conv2d``: the layer's *actual* linear map (kernel with its stride, padding and
  dilation, on the input size the layer sees) is not its kernel matrix, so its largest
  singular value ``sigma_1`` is found by power iteration on the map and its adjoint
  (the adjoint through ``torch.func.vjp``, exact for any padding/stride). The clip is
  then ``W <- W * c / sigma_1`` when ``sigma_1 > c`` (the whole spectrum scaled: a
  kernel edit cannot remove one rank-1 component of a convolution's map exactly).

During federated training (run-config ``fastclip.bound > 0``) every client clips its
model every ``fastclip.every`` local steps and at the end of its local training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def clip_singular_values(w: torch.Tensor, bound: float) -> torch.Tensor:
    """``U min(S, bound) V^T`` of a 2-D matrix (float64 SVD, returned in ``w``'s dtype)."""
    if w.ndim != 2:
        raise ValueError(f"needs a matrix, got shape {tuple(w.shape)}")
    if not bound > 0:
        raise ValueError(f"the clip bound must be > 0, got {bound}")
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return (u @ torch.diag(torch.clamp(s, max=bound)) @ vh).to(w.dtype)


def conv_operator_norm(
    conv: nn.Conv2d, input_shape: Sequence[int], iters: int = 500, seed: int = 0, tol: float = 1e-10
) -> float:
    """Largest singular value of the linear map ``x -> conv(x)`` (no bias) on inputs of ``input_shape``.

    ``input_shape`` is ``(C, H, W)`` of one input. Power iteration on ``A^T A``.
    """
    w = conv.weight.detach().double()

    def op(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn((1, *input_shape), generator=gen, dtype=torch.float64)
    v /= torch.linalg.norm(v)
    sigma = 0.0
    for _ in range(iters):
        out, vjp = torch.func.vjp(op, v)[:2]
        (back,) = vjp(out)
        norm = torch.linalg.norm(back)
        if norm == 0:
            return 0.0
        v = back / norm
        new = float(torch.linalg.norm(op(v)))
        if abs(new - sigma) <= tol * max(new, 1e-12):
            return new
        sigma = new
    return sigma


def layer_input_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The per-example input shape every ``nn.Conv2d`` of ``model`` sees (one dummy forward pass)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape[1:])))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
    return shapes


@torch.no_grad()
def clip_model(
    model: nn.Module, bound: float, input_shape: Sequence[int], conv_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, float]:
    """Clip every Linear (exact SVD) and Conv2d (operator-norm scaling) of ``model`` at ``bound``, in place.

    Returns the largest singular value of each layer *before* clipping.
    """
    if not bound > 0:
        raise ValueError(f"the clip bound must be > 0, got {bound}")
    shapes = conv_shapes if conv_shapes is not None else layer_input_shapes(model, input_shape)
    before: dict[str, float] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            before[name] = float(torch.linalg.matrix_norm(m.weight.double(), ord=2))
            if before[name] > bound:
                m.weight.copy_(clip_singular_values(m.weight, bound))
        elif isinstance(m, nn.Conv2d):
            sigma = conv_operator_norm(m, shapes[name])
            before[name] = sigma
            if sigma > bound:
                m.weight.mul_(bound / sigma)
    return before


def spectral_norms(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """Largest singular value of every affine layer's map (Linear: matrix norm; Conv2d: operator norm)."""
    shapes = layer_input_shapes(model, input_shape)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
        elif isinstance(m, nn.Conv2d):
            out[name] = conv_operator_norm(m, shapes[name])
    return out


def explicit_conv_matrix(conv: nn.Conv2d, input_shape: Sequence[int]) -> np.ndarray:
    """The conv's linear map as an explicit matrix (columns = images of basis vectors); for tests on small inputs."""
    n = int(np.prod(input_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    out = F.conv2d(basis, conv.weight.detach().double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.reshape(n, -1).T.numpy()
