"""python -m pi05_fastprune demo: prune a pi0.5-shaped prefix and say what was kept and how fast."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pi05_fastprune import prune_tokens
from pi05_fastprune.prune import resolve_keep_tokens
from pi05_fastprune.reference import prune_ref
from pi05_fastprune.structured import structured_inputs

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def demo_op(args) -> None:
    dtype = getattr(torch, args.dtype)
    patches, task, task_mask, patch_mask = structured_inputs(
        batch=args.batch, width=args.width, dtype=dtype, device=args.device, seed=args.seed
    )
    B, N, D = patches.shape
    T = task.shape[1]
    kwargs = dict(keep_tokens=args.keep_tokens, keep_ratio=args.keep_ratio, max_tokens=args.max_tokens)
    out = prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, **kwargs)
    per_camera = N // len(CAMERAS)
    print(f"pi0.5 prefix: {B} x ({len(CAMERAS)} cameras x {per_camera} patches + {T} prompt tokens, "
          f"{int(task_mask[0].sum())} valid), width {D}, {args.dtype}, {args.device}")
    for b in range(B):
        kept = out.kept_idx[b][out.kept_mask[b]]
        cams = ", ".join(f"{name}={int(((kept // per_camera) == c).sum())}" for c, name in enumerate(CAMERAS))
        before = N + int(task_mask[b].sum())
        after = int(out.counts[b]) + int(task_mask[b].sum())
        print(f"sample {b}: kept {int(out.counts[b])}/{N} patches ({cams}); "
              f"prefix {before} -> {after} tokens ({100 * (1 - after / before):.1f}% shorter)")
    budget = {k: v for k, v in kwargs.items() if v is not None}
    ref_ms = median_ms(lambda: prune_ref(patches, task, task_mask, patch_mask, resolve_keep_tokens(args.keep_tokens, args.keep_ratio, N), False,
                                         args.max_tokens), args.repeats)
    fast_ms = median_ms(lambda: prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, **kwargs),
                        args.repeats)
    print(f"latency (median of {args.repeats}, mode {budget or 'implicit'}): "
          f"eager reference {ref_ms:.2f} ms, fastprune {fast_ms:.2f} ms ({ref_ms / fast_ms:.1f}x)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pi05_fastprune")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="prune pi0.5-shaped embeddings and time it")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--width", type=int, default=2048)
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--keep-tokens", type=int)
    demo.add_argument("--keep-ratio", type=float)
    demo.add_argument("--max-tokens", type=int)
    demo.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        demo_op(args)


if __name__ == "__main__":
    main()
