"""The ops under torch.library.opcheck and torch.compile(fullgraph=True, dynamic=True)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import pi05_fastprune as fp
from pi05_fastprune.structured import structured_inputs


def small_inputs(batch=2, seed=0, dtype=torch.float32, absent=()):
    return structured_inputs(
        batch=batch, n_cameras=2, patches_per_camera=64, prompt_len=24, valid_prompt=12,
        width=64, dtype=dtype, seed=seed, absent_cameras=absent,
    )


OPCHECK_CASES = {
    "plain": dict(),
    "absent_camera": dict(absent=((1, 0),)),
    "bf16": dict(dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    patches, task, task_mask, patch_mask = small_inputs(**OPCHECK_CASES[case])
    torch.library.opcheck(torch.ops.fastprune.select.default, (patches, task, task_mask, patch_mask, True, "cpu"))
    torch.library.opcheck(torch.ops.fastprune.prune.default, (patches, task, task_mask, patch_mask, None, False, "cpu"))
    torch.library.opcheck(torch.ops.fastprune.prune.default, (patches, task, None, patch_mask, 9, True, "auto"))
    torch.library.opcheck(
        torch.ops.fastprune.prune_padded.default, (patches, task, task_mask, patch_mask, None, 16, False, "cpu")
    )
    # With inputs that need gradients: the autograd registration and its backward.
    patches, task = patches.clone().requires_grad_(True), task.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fastprune.prune.default, (patches, task, task_mask, patch_mask, 9, False, "cpu"))
    torch.library.opcheck(
        torch.ops.fastprune.prune_padded.default, (patches, task, task_mask, patch_mask, None, 16, True, "cpu")
    )


def test_compiled_gradient_equals_eager():
    """Under torch.compile the pruned rows' gradient is traced (AOTAutograd) and equal to eager."""
    patches, task, task_mask, patch_mask = small_inputs(batch=3, absent=((1, 0),))
    weight = torch.randn(3, 128, 64, generator=torch.Generator().manual_seed(2))

    def loss(p, max_tokens):
        r = fp.prune_tokens(p, task, task_mask=task_mask, patch_mask=patch_mask, keep_tokens=20, max_tokens=max_tokens)
        return (r.pruned * weight[:, : r.pruned.shape[1]]).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for max_tokens in (None, 32):
        grads = []
        for f in (loss, compiled):
            p = patches.clone().requires_grad_(True)
            f(p, max_tokens).backward()
            grads.append(p.grad)
        assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    torch._dynamo.reset()


def prefix_attention(patches, task, task_mask, patch_mask, wq, wk, wv):
    """Prune, put the kept patches in front of the prompt, run one attention layer."""
    r = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
    x = torch.cat([r.pruned, task], dim=1)
    valid = torch.cat([r.kept_mask, task_mask], dim=1)
    q, k, v = x @ wq, x @ wk, x @ wv
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=valid[:, None, None, :])
    return out[:, 0] * valid[..., None], r.counts


def test_compile_once_across_kept_counts():
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(prefix_attention, backend=backend, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 64, generator=g) / 8 for _ in range(3)]
    kept = set()
    for i in range(21):
        inputs = small_inputs(batch=2 + i % 3, seed=i)
        out, counts = compiled(*inputs, *weights)
        ref, ref_counts = prefix_attention(*inputs, *weights)
        assert torch.equal(counts, ref_counts)
        torch.testing.assert_close(out, ref)
        kept.add(int(counts.max()))
    assert len(kept) >= 10, kept
    assert backend.frame_count == 1
    assert sum(counters["graph_break"].values()) == 0


def test_compile_static_cap():
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("inductor")

    def capped(patches, task, task_mask, patch_mask):
        r = fp.prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, max_tokens=32)
        return r.pruned.sum(-1), r.kept_idx, r.counts

    compiled = torch.compile(capped, backend=backend, fullgraph=True, dynamic=True)
    for i in range(4):
        inputs = small_inputs(batch=2 + i % 2, seed=i)
        for a, b in zip(compiled(*inputs), capped(*inputs)):
            torch.testing.assert_close(a, b)
    assert backend.frame_count == 1


@pytest.mark.parametrize("budget", ["keep_tokens", "max_tokens", "keep_ratio"])
def test_compile_once_across_budgets(budget):
    """The budgets are SymInt in the schema: 12 keep_tokens / max_tokens values, and one keep_ratio
    over 12 N (its k = ceil(r N) changing with N), compile once. As `int`, each value compiled
    again, and fullgraph=True failed at the 9th (the recompile limit). (A Python float itself is
    specialised: each keep_ratio value compiles once.)"""
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("inductor")

    def pruned(patches, task, value):
        r = fp.prune_tokens(patches, task, **{budget: value}, backend="cpu")
        return r.pruned.sum(-1), r.kept_idx, r.counts

    compiled = torch.compile(pruned, backend=backend, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        N = 20 + i
        patches, task = torch.randn(2, N, 16, generator=g), torch.randn(2, 7, 16, generator=g)
        value = 0.3 if budget == "keep_ratio" else i + 2
        for a, b in zip(compiled(patches, task, value), pruned(patches, task, value)):
            torch.testing.assert_close(a, b)
        if i == 0:
            # The first call may trace twice (keep_ratio: dynamo restarts once to specialise the float).
            first = backend.frame_count
    assert backend.frame_count == first
