"""Data augmentation for the local unlearning / fine-tuning steps (Falcao & Cordeiro).

Reference: A. M. C. Falcao, F. R. Cordeiro, "Data Augmentation Improves Machine
Unlearning" (SIBGRAPI 2025, arXiv:2508.18502): augmenting the data of the unlearning
and fine-tuning steps lowers the Average Gap to the retrained model, most with
TrivialAugment. Modes (run-config ``unlearn.augment``):

* ``none``: no augmentation (the default; also what the gold federation trains with);
* ``shift``: each image translated by up to ``max(1, round(H / 14))`` pixels in each
  direction (zero padding, random crop): the classic 2 pixels on 28x28 MNIST-like images,
  1 pixel on 8x8 digits (2 pixels there is a quarter of the image and wrecks the model);
* ``trivial``: TrivialAugmentWide (Müller & Hutter 2021, torchvision's implementation):
  one randomly chosen operation with a random magnitude per image, on the image as
  8-bit pixels.

Images only (``(N, C, H, W)`` in ``[0, 1]``); seeded, so a run is reproducible. Applied
after the deletion request (unlearning round and recovery) to ordinary local training
and to the descent-type routines (AMUN's and TRW's fine-tuning); gradient ascent on the
forget set is never augmented (it would push away from points that are not in it).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

MODES = ("none", "shift", "trivial")


def augment_batch(x: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """An augmented copy of the batch ``x`` (``(N, C, H, W)`` in ``[0, 1]``); ``mode`` from :data:`MODES`.

    Raises
    ------
    ValueError
        On an unknown mode or a batch that is not images.
    """
    if mode not in MODES:
        raise ValueError(f"unknown augmentation '{mode}'; valid: {', '.join(MODES)}")
    if mode == "none":
        return x
    if x.ndim != 4:
        raise ValueError(f"augmentation needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    if mode == "shift":
        n, _, h, w = x.shape
        r = max(1, round(h / 14))  # the same relative shift as 2 px on 28 px
        padded = F.pad(x, (r, r, r, r))
        dy = torch.randint(0, 2 * r + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * r + 1, (n,), generator=gen)
        return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    from torchvision.transforms import v2

    op = v2.TrivialAugmentWide()
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = torch.stack([op(img) for img in pixels])
    return out.to(x.dtype) / 255.0
