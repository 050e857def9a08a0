"""The Triton ops of fastprune: ``fastprune::triton_select``, ``triton_prune``,
``triton_prune_padded`` (kernels in ``pi05_fastprune.kernels.prune_triton``).

The C++ ``fastprune::{select, prune, prune_padded}`` with ``backend="triton"`` call them through
the dispatcher on CPU tensors (the interpreter); on CUDA tensors they replay the launch plan
recorded for the call (``triton_record`` below). Their argument orders:

    triton_select(patches, task, task_mask, patch_mask, mask_voters) -> idx
    triton_prune(patches, task, task_mask, patch_mask, keep_tokens, mask_voters)
        -> (pruned, kept_mask, kept_idx, counts)              # K = max(1, max counts)
    triton_prune_padded(patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters)
        -> (pruned, kept_mask, kept_idx, counts)              # K = max_tokens, no host sync

Registration:
- real Triton (no ``TRITON_INTERPRET=1``): ``triton_select`` and ``triton_prune_padded`` are
  ``torch.library.triton_op`` s whose kernels are launched through ``wrap_triton``, so
  ``torch.compile``/Inductor sees (and can schedule) the kernels. ``triton_prune`` has a
  data-dependent K that it reads on the host, which a traced body cannot do: it is a plain
  ``custom_op`` (opaque to Inductor) whose fake returns an unbacked K, so one compiled graph
  serves every kept count.
- ``TRITON_INTERPRET=1`` (CPU tests): all three are plain ``custom_op`` s (``triton_op`` does
  not trace under the interpreter).
- eager calls: each op also has a kernel at the CUDA (and CPU) dispatch key, its body with plain
  launches, which takes precedence over custom_op's wrapped CompositeExplicitAutograd kernel.
- autograd: ``triton_prune`` and ``triton_prune_padded`` pass the gradient of ``pruned`` to the
  kept patch rows (``_rows_backward``), as csrc/prune_autograd.cpp does for the C++ ops.
- ``triton_record(op, ...)`` (CUDA): ``select``, ``prune`` or ``prune_padded`` run through the
  eager launch code while it records them, storing the call's launch plan in the C++ op library.
  The C++ ``fastprune::select``/``prune``/``prune_padded`` call it on CUDA when they have no plan
  for a call's key; with one, they replay it (csrc/triton_plan.h).
- triton not installed: nothing is registered (``HAVE_TRITON`` is False).

The Python API (``prune_tokens``/``select_tokens``) routes eager calls itself (``call``): to the
C++ op's plan replay on CUDA where it can, else to the launch code without the dispatcher.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from pi05_fastprune.prune import _prune_fake, _prune_padded_fake, _select_fake, check_inputs

__all__ = ["HAVE_TRITON", "INTERPRET", "call"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    from pi05_fastprune.kernels import prune_triton as _k
except Exception:  # no triton (or one this code cannot import): register nothing
    _k = None

HAVE_TRITON = _k is not None


def _bodies(wrap):
    """The three ops' bodies, launching through ``wrap`` (``wrap_triton`` for the traced ops,
    identity for eager launches)."""

    def triton_select(
        patches: torch.Tensor,
        task: torch.Tensor,
        task_mask: Optional[torch.Tensor] = None,
        patch_mask: Optional[torch.Tensor] = None,
        mask_voters: bool = False,
    ) -> torch.Tensor:
        check_inputs(patches, task, task_mask, patch_mask)
        return _k.select(patches, task, task_mask, patch_mask, mask_voters, wrap=wrap)

    # dynamic K: one host read, always opaque (no wrap_triton)
    def triton_prune(
        patches: torch.Tensor,
        task: torch.Tensor,
        task_mask: Optional[torch.Tensor] = None,
        patch_mask: Optional[torch.Tensor] = None,
        keep_tokens: Optional[int] = None,
        mask_voters: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        check_inputs(patches, task, task_mask, patch_mask, keep_tokens)
        return tuple(_k.prune(patches, task, task_mask, patch_mask, keep_tokens, mask_voters))

    # static K = max_tokens, no host sync
    def triton_prune_padded(
        patches: torch.Tensor,
        task: torch.Tensor,
        task_mask: Optional[torch.Tensor],
        patch_mask: Optional[torch.Tensor],
        keep_tokens: Optional[int],
        max_tokens: int,
        mask_voters: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        check_inputs(patches, task, task_mask, patch_mask, keep_tokens, max_tokens)
        return tuple(
            _k.prune_padded(patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters, wrap=wrap)
        )

    return {"triton_select": triton_select, "triton_prune": triton_prune, "triton_prune_padded": triton_prune_padded}


# Keeps the eager kernels registered (a Library's registrations go with it).
_EAGER_LIB: list = []


def _register() -> None:
    use_triton_op = not INTERPRET and hasattr(torch.library, "triton_op")
    bodies = _bodies(torch.library.wrap_triton if use_triton_op else _k._identity)
    ops = {}
    for name, body in bodies.items():
        traced = use_triton_op and name != "triton_prune"
        define = torch.library.triton_op if traced else torch.library.custom_op
        ops[name] = define(f"fastprune::{name}", body, mutates_args=())

    # ---- fakes (a triton_op's fake is its own body traced with fake tensors; the opaque
    # custom ops need one): the fastprune:: fakes of prune.py, whose arguments come in the same
    # order (their trailing `backend` keeps its default).
    if not use_triton_op:
        ops["triton_select"].register_fake(_select_fake)
        ops["triton_prune_padded"].register_fake(_prune_padded_fake)
    ops["triton_prune"].register_fake(_prune_fake)
    for name in ("triton_prune", "triton_prune_padded"):
        ops[name].register_autograd(_rows_backward, setup_context=_save_rows)

    # ---- eager kernels at the device keys. custom_op registers its body at
    # CompositeExplicitAutograd behind Python wrappers (aliasing checks, _disable_dynamo,
    # triton_op's wrap switch); run 5 measured the op's layers at ~53 µs of a 194 µs eager call.
    # A CUDA-key kernel takes precedence on CUDA tensors and runs the launchers directly. (CPU
    # too: the interpreter's tensors, and bench/host_prune.py --fake-driver.) The Autograd
    # wrapper, the fakes and triton_op's tracing rules stay as they are.
    lib = torch.library.Library("fastprune", "IMPL")
    for name, body in (_bodies(_k._identity) if use_triton_op else bodies).items():
        for key in ("CPU", "CUDA"):
            lib.impl(name, body, key)
    _EAGER_LIB.append(lib)

    # ---- the recording launch code of the C++ ops' launch plans (csrc/triton_plan.h): on CUDA,
    # fastprune::select / prune / prune_padded with backend="triton" replay the plan of the call's
    # key, and without one call this, which runs the call and stores its plan.
    rec = torch.library.Library("fastprune", "FRAGMENT")
    rec.define("triton_record(str op, Tensor patches, Tensor task, Tensor? task_mask, Tensor? patch_mask, "
               "int? keep_tokens, int? max_tokens, bool mask_voters) -> Tensor[]")
    rec.impl("triton_record", record, "CUDA")
    _EAGER_LIB.append(rec)


def _save_rows(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])  # kept_mask, kept_idx
    ctx.patches_shape = inputs[0].shape
    ctx.num_inputs = len(inputs)


def _rows_backward(ctx, grad_pruned, *_):
    """The pruned rows are copies of ``patches[kept_idx]`` (padding rows zero): their gradient
    goes back to those rows, none to task (the selection is piecewise constant), as
    csrc/prune_autograd.cpp gives the C++ ops. Kept indices are distinct per sample, so the
    scatter adds nothing but padding's zeros twice."""
    kept_mask, kept_idx = ctx.saved_tensors
    rows = grad_pruned.masked_fill(~kept_mask.unsqueeze(-1), 0)
    grad = rows.new_zeros(ctx.patches_shape).scatter_add_(1, kept_idx.unsqueeze(-1).expand_as(rows), rows)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


def record(op, patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters) -> list[torch.Tensor]:
    """``op`` ("select", "prune" or "prune_padded", inputs checked by the caller) through the eager launch
    code, storing the launch plan it recorded (if it has one, ``prune_triton.plan_of``) for the
    call's key in the C++ op library."""
    with _k.recording() as rec:
        if op == "select":
            outputs = [_k.select(patches, task, task_mask, patch_mask, mask_voters)]
        elif op == "prune":
            outputs = list(_k.prune(patches, task, task_mask, patch_mask, keep_tokens, mask_voters))
        else:
            outputs = list(_k.prune_padded(patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters))
    plan = _k.plan_of(rec, (patches, task, task_mask, patch_mask), outputs)
    if plan is not None:
        torch.ops.fastprune._triton_plan_put(op, patches, task, task_mask, patch_mask, keep_tokens, max_tokens,
                                             mask_voters, plan)
    return outputs


if HAVE_TRITON and not hasattr(torch.ops.fastprune, "triton_select"):
    _register()


@functools.lru_cache(maxsize=None)
def _replays_on_cuda() -> bool:
    """Whether the op library has its CUDA kernels, and so replays the Triton backend's launch
    plans on CUDA tensors (only with CUDA torch and nvcc at build time)."""
    return not INTERPRET and torch._C._dispatch_has_kernel_for_dispatch_key("fastprune::prune_padded", "CUDA")


def _plain(t: Optional[torch.Tensor]) -> bool:
    return t is None or type(t) is torch.Tensor


def _contiguous(t: Optional[torch.Tensor]) -> bool:
    return t is None or t.is_contiguous()


# The leading arguments of each op that check_inputs takes (the rest are flags).
_CHECKED = {"select": 4, "prune": 5, "prune_padded": 6}


def call(name: str, *args):
    """``torch.ops.fastprune.triton_<name>(*args)`` for the Python API (``prune_tokens``,
    ``select_tokens``). An eager call on plain tensors skips the Triton op's
    dispatcher and custom_op layers (run 5 measured them at about 50 µs on the H200 machine):
    on CUDA they go to the C++ op, which replays the call's launch plan (csrc/triton_plan.h) where
    the op library has its CUDA kernels; otherwise the launch code runs in Python. Calls that
    something traces or intercepts (torch.compile, export, fake or other tensor subclasses,
    dispatch modes, functorch transforms) go through the Triton op, so Inductor sees the
    kernels, and so do calls whose patches need a gradient (the ops' autograd). The checks are written out, cheapest first: they run on every eager call."""
    if not HAVE_TRITON:
        raise RuntimeError(f"backend='triton' needs triton installed (fastprune::triton_{name} is not registered)")
    patches, task, task_mask, patch_mask = args[:4]
    if (
        type(patches) is torch.Tensor
        and type(task) is torch.Tensor
        and _plain(task_mask)
        and _plain(patch_mask)
        and not (patches.requires_grad and torch.is_grad_enabled())  # the ops' autograd
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0  # no dispatch mode
        and torch._C._functorch.peek_interpreter_stack() is None
    ):
        # Only contiguous inputs have a plan (the launch code copies the others).
        if (patches.is_cuda and _replays_on_cuda() and patches.is_contiguous() and task.is_contiguous()
                and _contiguous(task_mask) and _contiguous(patch_mask)):
            return getattr(torch.ops.fastprune, name)(*args, "triton")  # checks its inputs
        check_inputs(*args[:_CHECKED[name]])
        return getattr(_k, name)(*args)
    return getattr(torch.ops.fastprune, "triton_" + name)(*args)  # its body checks them

