"""pi0.5-like prefix embeddings for tests, benchmarks and the demo.

Gaussian noise is a poor stand-in: every patch looks different, so almost every row votes
for a patch of its own and the pruner keeps ~670 of 768. Real camera patches share a scene
(a few dominant directions) and the prompt talks about a few objects that occupy a few
patches; then the prompt-conditioned queries agree on those objects and implicit pruning
keeps roughly 60-150 of 768. This generator builds exactly that.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def structured_inputs(
    batch: int = 1,
    n_cameras: int = 3,
    patches_per_camera: int = 256,
    prompt_len: int = 200,
    valid_prompt: int = 48,
    width: int = 2048,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
    seed: int = 0,
    absent_cameras: tuple[tuple[int, int], ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(patches [B, N, D], task [B, T, D], task_mask [B, T], patch_mask [B, N])``.

    Each camera sees a scene spanned by a handful of directions; a few objects (each a
    direction of its own) cover small patch blobs; the prompt mentions some of them.
    ``absent_cameras`` lists ``(sample, camera)`` pairs whose patches are masked out and
    zeroed, as pi0.5 does for a missing camera.
    """
    g = torch.Generator().manual_seed(seed)
    B, C, P, D = batch, n_cameras, patches_per_camera, width
    N = C * P
    n_scene, n_objects = 6, 32
    scene = torch.randn(B, C, n_scene, D, generator=g)
    objects = torch.randn(B, n_objects, D, generator=g)
    # Patches: a scene mixture plus per-patch texture; objects on blobs of 3-8 patches.
    mix = torch.randn(B, C, P, n_scene, generator=g).softmax(-1) * 3.0
    patches = mix @ scene + 3.0 * torch.randn(B, C, P, D, generator=g)
    for b in range(B):
        for o in range(n_objects):
            cam = int(torch.randint(C, (1,), generator=g))
            start = int(torch.randint(P - 8, (1,), generator=g))
            size = int(torch.randint(3, 9, (1,), generator=g))
            weight = 1.5 + torch.rand(size, 1, generator=g)
            patches[b, cam, start : start + size] += weight * objects[b, o]
    patches = patches.reshape(B, N, D)

    # Prompt: words about a subset of the objects, plus generic words; padded to prompt_len.
    T, V = prompt_len, min(valid_prompt, prompt_len)
    mentioned = torch.randint(n_objects, (B, V), generator=g)
    about = torch.rand(B, V, 1, generator=g) < 0.35
    task = torch.where(about, objects.gather(1, mentioned[..., None].expand(B, V, D)), 0.0)
    task = task + 0.8 * torch.randn(B, V, D, generator=g)
    task = torch.cat([task, 0.5 * torch.randn(B, T - V, D, generator=g)], dim=1) * math.sqrt(D) / 8
    task_mask = torch.arange(T)[None, :].expand(B, T) < V

    patch_mask = torch.ones(B, N, dtype=torch.bool)
    for b, cam in absent_cameras:
        patch_mask[b, cam * P : (cam + 1) * P] = False
        patches[b, cam * P : (cam + 1) * P] = 0.0
    # Fresh tensors (copy=True), not views of the generator's work buffers.
    to = dict(device=device, copy=True)
    return (
        patches.to(dtype=dtype, **to),
        task.to(dtype=dtype, **to),
        task_mask.to(**to),
        patch_mask.to(**to),
    )
