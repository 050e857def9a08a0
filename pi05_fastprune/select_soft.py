"""The training op: a fused straight-through selection with autograd and seeded noise.

``torch.ops.fastprune.select_soft`` (schema in csrc/fastprune.cpp) computes, per row ``i``,
``selected[b, i] = patches[b, idx[b, i]]`` with ``idx = argmax_j score' `` and
``score' = score + noise_scale * U`` on allowed columns (SPEC "Training"). Its gradient is the
autograd of the seed's ``(hard + soft - soft.detach()) @ patches`` with ``soft = softmax(score')``,
w.r.t. ``patches`` and ``task``, through the whole scoring chain; the backward op
``fastprune::select_soft_backward`` recomputes the scores tile by tile from the row
log-sum-exp ``lse`` that the forward returns, so nothing ``[B, N, N]`` is kept.

Noise: ``U`` is Philox4x32-10 with key ``seed[0]`` and counter ``(i*N + j, b, seed[1])``
(``seed`` an int64 ``[2]`` tensor (seed, offset)), first word as ``(x >> 8) * 2**-24``; the
backward regenerates it. Tests may pass the ``[B, N, N]`` U[0,1) tensor instead (``noise``).
``noise_scale`` is a one-element tensor so that torch.compile does not specialise on its value
(the noise schedule changes it every step).

Implementations: CPU in C++ (csrc/select_soft_cpu.cpp); CUDA tensors go to the Triton kernels
(kernels/select_soft_triton.py), which ``backend="triton"`` also reaches on CPU tensors under
``TRITON_INTERPRET=1`` through ``fastprune::triton_select_soft{,_backward}``.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from pi05_fastprune import _C  # noqa: F401  (registers torch.ops.fastprune)
from pi05_fastprune.prune import check_inputs, resolve_backend

__all__ = ["select_soft", "draw_seed", "philox_uniform", "HAVE_TRITON"]


# ----------------------------------------------------------------------------- noise


_PHILOX_A, _PHILOX_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_M32 = np.uint64(0xFFFFFFFF)


def philox_uniform(seed: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """The noise ``U [B, N, N]`` (float32, CPU) that ``seed`` (int64 ``[2]``: seed, offset) stands
    for: the reference the C++ and Triton generators are tested against (numpy, small shapes)."""
    s = seed.detach().to("cpu", torch.int64).reshape(2).numpy().view(np.uint64)
    k0, k1 = s[0] & _M32, s[0] >> np.uint64(32)
    i = np.arange(N, dtype=np.uint64)[:, None]
    j = np.arange(N, dtype=np.uint64)[None, :]
    out = np.empty((B, N, N), dtype=np.float32)
    for b in range(B):
        c0 = (i * np.uint64(N) + j) & _M32
        c1 = np.full_like(c0, b) & _M32
        c2 = np.full_like(c0, s[1] & _M32)
        c3 = np.full_like(c0, s[1] >> np.uint64(32))
        key0, key1 = k0, k1
        for _ in range(10):
            p0 = _PHILOX_A * c0
            p2 = _PHILOX_B * c2
            n0 = (p2 >> np.uint64(32)) ^ c1 ^ key0
            n2 = (p0 >> np.uint64(32)) ^ c3 ^ key1
            c1, c3 = p2 & _M32, p0 & _M32
            c0, c2 = n0, n2
            key0 = (key0 + _KEY_A) & _M32
            key1 = (key1 + _KEY_B) & _M32
        out[b] = (c0 >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return torch.from_numpy(out)


def draw_seed(device: Union[torch.device, str], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh (seed, offset) int64 ``[2]`` tensor on ``device``, drawn from ``generator`` (or the
    device's default generator), so ``torch.manual_seed`` / a seeded generator make runs
    reproducible. On CUDA it is drawn on the device: no host sync."""
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device)


# ----------------------------------------------------------------------------- checks and fakes


def _check(patches, task, task_mask, patch_mask, noise_scale, seed, noise) -> None:
    """ValueError naming the argument and the shapes seen (as csrc/select_soft_cpu.cpp's checks)."""
    check_inputs(patches, task, task_mask, patch_mask)
    B, N, _ = patches.shape
    if noise_scale is not None and noise_scale.numel() != 1:
        raise ValueError(f"noise_scale must be a one-element tensor, got shape {tuple(noise_scale.shape)}")
    if noise_scale is not None and noise_scale.device != patches.device:
        raise ValueError(f"noise_scale is on {noise_scale.device}, patches on {patches.device}")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 2):
        raise ValueError(f"seed must be an int64 tensor of 2 elements (seed, offset), got {seed.dtype} {tuple(seed.shape)}")
    if noise is not None:
        if noise.dim() != 3 or tuple(noise.shape) != (B, N, N):
            raise ValueError(f"noise must be [{B}, {N}, {N}] for patches {tuple(patches.shape)}, got shape {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise ValueError(f"noise must be floating point, got {noise.dtype}")
        if noise.device != patches.device:
            raise ValueError(f"noise is on {noise.device}, patches on {patches.device}")
    if noise_scale is not None and noise is None and seed is None:
        raise ValueError("noise_scale without noise needs a seed tensor")


def _lse_dtype(patches):
    return torch.float64 if patches.dtype == torch.float64 else torch.float32


def _check_backward(grad, patches, idx, lse) -> None:
    """The backward's own arguments: the forward's outputs for these patches."""
    if grad.shape != patches.shape or grad.dtype != patches.dtype:
        raise ValueError(f"grad must match patches {tuple(patches.shape)} {patches.dtype}, "
                         f"got {tuple(grad.shape)} {grad.dtype}")
    for name, t, dtype in (("idx", idx, torch.int64), ("lse", lse, _lse_dtype(patches))):
        if t.shape != patches.shape[:2]:
            raise ValueError(f"{name} must be {list(patches.shape[:2])}, got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


@torch.library.register_fake("fastprune::select_soft")
def _select_soft_fake(patches, task, task_mask=None, patch_mask=None, noise_scale=None, seed=None, noise=None,
                      backend="auto"):
    _check(patches, task, task_mask, patch_mask, noise_scale, seed, noise)
    B, N, _ = patches.shape
    return (
        torch.empty_like(patches, memory_format=torch.contiguous_format),
        patches.new_empty(B, N, dtype=torch.int64),
        patches.new_empty(B, N, dtype=_lse_dtype(patches)),
    )


@torch.library.register_fake("fastprune::select_soft_backward")
def _select_soft_backward_fake(grad, patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse,
                               backend="auto"):
    _check(patches, task, task_mask, patch_mask, noise_scale, seed, noise)
    _check_backward(grad, patches, idx, lse)
    return (
        torch.empty_like(patches, memory_format=torch.contiguous_format),
        torch.empty_like(task, memory_format=torch.contiguous_format),
    )


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    patches, task, task_mask, patch_mask, noise_scale, seed, noise, backend = inputs
    _, idx, lse = output
    ctx.save_for_backward(patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse)
    ctx.backend = backend
    ctx.mark_non_differentiable(idx, lse)


def _backward(ctx, grad_selected, grad_idx, grad_lse):
    patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse = ctx.saved_tensors
    need_p, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_selected is None or not (need_p or need_t):
        return (None,) * 8
    gp, gt = torch.ops.fastprune.select_soft_backward(
        grad_selected.contiguous(), patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse,
        ctx.backend,
    )
    return gp if need_p else None, gt if need_t else None, None, None, None, None, None, None


torch.library.register_autograd("fastprune::select_soft", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- Triton


try:
    from pi05_fastprune.kernels import select_soft_triton as _tk
except Exception:  # no triton (or one this code cannot import): CUDA tensors have no kernel
    _tk = None

HAVE_TRITON = _tk is not None

if HAVE_TRITON:
    # Plain custom ops (opaque to Inductor; triton_op does not trace under the interpreter and
    # the launcher reads the largest valid prompt length on the host).
    @torch.library.custom_op("fastprune::triton_select_soft", mutates_args=())
    def _triton_select_soft(
        patches: torch.Tensor,
        task: torch.Tensor,
        task_mask: Optional[torch.Tensor] = None,
        patch_mask: Optional[torch.Tensor] = None,
        noise_scale: Optional[torch.Tensor] = None,
        seed: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check(patches, task, task_mask, patch_mask, noise_scale, seed, noise)
        if patches.dtype == torch.float64:
            raise ValueError("patches is float64: the Triton select_soft computes in float32 (float64 runs on backend='cpu')")
        return _tk.select_soft_fwd(patches, task, task_mask, patch_mask, noise_scale, seed, noise)

    @_triton_select_soft.register_fake
    def _(patches, task, task_mask=None, patch_mask=None, noise_scale=None, seed=None, noise=None):
        return _select_soft_fake(patches, task, task_mask, patch_mask, noise_scale, seed, noise)

    @torch.library.custom_op("fastprune::triton_select_soft_backward", mutates_args=())
    def _triton_select_soft_backward(
        grad: torch.Tensor,
        patches: torch.Tensor,
        task: torch.Tensor,
        task_mask: Optional[torch.Tensor],
        patch_mask: Optional[torch.Tensor],
        noise_scale: Optional[torch.Tensor],
        seed: Optional[torch.Tensor],
        noise: Optional[torch.Tensor],
        idx: torch.Tensor,
        lse: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(patches, task, task_mask, patch_mask, noise_scale, seed, noise)
        _check_backward(grad, patches, idx, lse)
        return _tk.select_soft_bwd(grad, patches, task, task_mask, patch_mask, noise_scale, seed, noise,
                                   idx=idx, lse=lse)

    @_triton_select_soft_backward.register_fake
    def _(grad, patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse):
        return _select_soft_backward_fake(grad, patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse)

    # CUDA tensors: the Triton kernels (there is no CUDA C++ kernel of the training op).
    _lib = torch.library.Library("fastprune", "IMPL")

    def _cuda_backend(backend: str) -> None:
        if backend == "cpu":
            raise RuntimeError("fastprune: backend='cpu' needs CPU tensors, got CUDA tensors")

    def _select_soft_cuda(patches, task, task_mask=None, patch_mask=None, noise_scale=None, seed=None, noise=None,
                          backend="auto"):
        _cuda_backend(backend)
        return _triton_select_soft(patches, task, task_mask, patch_mask, noise_scale, seed, noise)

    def _select_soft_backward_cuda(grad, patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse,
                                   backend="auto"):
        _cuda_backend(backend)
        return _triton_select_soft_backward(grad, patches, task, task_mask, patch_mask, noise_scale, seed, noise,
                                            idx, lse)

    _lib.impl("select_soft", _select_soft_cuda, "CUDA")
    _lib.impl("select_soft_backward", _select_soft_backward_cuda, "CUDA")


# ----------------------------------------------------------------------------- API


def select_soft(
    patches: torch.Tensor,
    task: torch.Tensor,
    *,
    task_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    noise_scale: Union[None, float, torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training straight-through selection (the seed's ``select_soft`` fused), sequence length kept.

    Returns ``(selected [B, N, D], idx [B, N] int64)``: row ``i`` of ``selected`` is
    ``patches[b, idx[b, i]]`` with ``idx = argmax_j (score + noise_scale * U)`` over allowed
    columns, and its gradient (w.r.t. ``patches`` and ``task``) is that of
    ``softmax(score') @ patches`` plus the straight-through identity on the chosen rows.

    ``noise_scale``: None or 0 for no noise, a float, or a one-element tensor (preferred under
    torch.compile: a float is specialised per value). ``noise``: an explicit ``[B, N, N]``
    U[0, 1) tensor, scaled by ``noise_scale`` (then ``generator`` is unused). Otherwise the
    noise is regenerated from a (seed, offset) pair drawn from ``generator`` (default: the
    device's generator); ``seed`` (int64 ``[2]``) may be given directly instead. Under
    ``torch.compile(dynamic=True)`` a ``seed`` passed in at a batch of 2 shares the batch's size
    symbol (dynamo's duck sizing), and the next batch size compiles again;
    ``torch._dynamo.mark_static(seed, 0)`` avoids it.
    """
    if isinstance(noise_scale, torch.Tensor):
        ns = noise_scale.to(device=patches.device, dtype=torch.float32)
    elif noise_scale:
        ns = torch.tensor(float(noise_scale), dtype=torch.float32, device=patches.device)
    else:
        ns = None
    if ns is not None and noise is None and seed is None:
        seed = draw_seed(patches.device, generator)
    if ns is None:
        seed = noise = None
    backend = resolve_backend(backend, patches.device)
    _check(patches, task, task_mask, patch_mask, ns, seed, noise)  # names a noise_scale of more than one element
    if ns is not None:
        ns = ns.reshape(())
    selected, idx, _ = torch.ops.fastprune.select_soft(patches, task, task_mask, patch_mask, ns, seed, noise, backend)
    return selected, idx
