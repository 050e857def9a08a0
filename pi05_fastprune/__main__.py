"""python -m pi05_fastprune demo: what LightVLA pruning keeps in a pi0.5 prefix, and how fast;
python -m pi05_fastprune serve: a checkpoint as a policy server for openpi's websocket client.

1. The op on pi0.5-shaped embeddings (3 cameras x 256 patches, a 200-token prompt with 48
   valid, width 2048): kept patches per camera, prefix length before/after, and the latency
   of the seed-style eager pruner against fastprune.
2. The pi0.5 model (dummy size on the CPU by default, `--size pi05` full size): the prefix
   and its KV cache with and without pruning, and `embed_prefix` / `sample_actions` latency.
   With `--checkpoint PATH --tokenizer PATH` the model is a real openpi pi0.5 checkpoint run
   as a policy on a synthetic observation.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time

import torch

from pi05_fastprune.model import IMAGE_KEYS, Pi05, Pi05Config
from pi05_fastprune.policy import ROBOTS, Pi05Policy
from pi05_fastprune.prune import prune_tokens, resolve_keep_tokens
from pi05_fastprune.reference import prune_ref
from pi05_fastprune.structured import structured_inputs

log = logging.getLogger("pi05_fastprune")


def median_ms(fn, repeats: int, device: torch.device) -> float:
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def camera_counts(kept_idx: torch.Tensor, kept_mask: torch.Tensor, per_camera: int) -> str:
    cams = (kept_idx[kept_mask] // per_camera).tolist()
    return ", ".join(f"{name}={cams.count(c)}" for c, name in enumerate(IMAGE_KEYS))


def speed(base_ms: float, ms: float) -> str:
    """``2.1x faster`` or ``1.3x slower``."""
    r = base_ms / ms
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def budget(args) -> dict:
    return dict(keep_tokens=args.keep_tokens, keep_ratio=args.keep_ratio, max_tokens=args.max_tokens)


def demo_op(args, device: torch.device) -> None:
    dtype = getattr(torch, args.dtype)
    patches, task, task_mask, patch_mask = structured_inputs(batch=args.batch, dtype=dtype, device=device)
    B, N, D = patches.shape
    T = task.shape[1]
    out = prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask, **budget(args))
    print(f"[op] pi0.5-shaped prefix: {B} x ({len(IMAGE_KEYS)} cameras x {N // 3} patches + {T} prompt "
          f"tokens, {int(task_mask[0].sum())} valid), width {D}, {args.dtype}, {device}")
    for b in range(B):
        print(f"[op] sample {b}: kept {int(out.counts[b])}/{N} patches "
              f"({camera_counts(out.kept_idx[b], out.kept_mask[b], N // 3)})")
    print(f"[op] prefix length {N + T} -> {out.pruned.shape[1] + T} tokens (the prompt padded to {T}"
          f"{'; the image block padded to the batch most kept' if B > 1 else ''})")
    keep_tokens = resolve_keep_tokens(args.keep_tokens, args.keep_ratio, N)
    ref_ms = median_ms(lambda: prune_ref(patches, task, task_mask, patch_mask, keep_tokens, False, args.max_tokens),
                       args.repeats, device)
    fast_ms = median_ms(lambda: prune_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask,
                                             **budget(args)), args.repeats, device)
    print(f"[op] latency (median of {args.repeats}): seed-style eager {ref_ms:.2f} ms, "
          f"fastprune {fast_ms:.2f} ms ({speed(ref_ms, fast_ms)})")


def kv_cache_mib(model: Pi05, batch: int, length: int) -> float:
    llm = model.config.llm
    itemsize = torch.finfo(model.config.torch_dtype).bits // 8
    return 2 * llm.depth * batch * llm.num_kv_heads * length * llm.head_dim * itemsize / 2**20


def demo_model(args, device: torch.device) -> None:
    config = Pi05Config.dummy() if args.size == "dummy" else Pi05Config()
    compile_mode = "default" if args.compile else None
    config = dataclasses.replace(config, pytorch_compile_mode=compile_mode, token_pruning_enabled=True,
                                 token_prune_keep_tokens=args.keep_tokens, token_prune_keep_ratio=args.keep_ratio,
                                 token_prune_max_tokens=args.max_tokens)
    model = Pi05(config, device=device, seed=args.seed).eval()
    B, S = args.batch, config.vision.image_size
    g = torch.Generator(device=device).manual_seed(args.seed)
    images = [torch.rand(B, 3, S, S, generator=g, device=device) * 2 - 1 for _ in IMAGE_KEYS]
    img_masks = [torch.ones(B, dtype=torch.bool, device=device) for _ in IMAGE_KEYS]
    L, valid = config.max_token_len, 48
    lang_masks = (torch.arange(L, device=device) < valid)[None].expand(B, L)
    lang_tokens = torch.randint(1, config.vocab_size, (B, L), generator=g, device=device) * lang_masks
    inputs = (images, img_masks, lang_tokens, lang_masks)
    noise = torch.randn(B, config.action_horizon, config.action_dim, generator=g, device=device)
    print(f"[model] pi0.5 {args.size} ({config.llm.width}-wide LLM, {config.llm.depth} layers), {config.dtype}, "
          f"{device}, batch {B}, {len(IMAGE_KEYS)} cameras x {config.vision.num_patches} patches + {L} prompt "
          f"tokens ({valid} valid), compile {'on' if args.compile else 'off'}")
    rows = {}
    for pruned in (False, True):
        model.config.token_pruning_enabled = pruned
        with torch.no_grad():
            embs, _, _, _ = model.embed_prefix(*inputs)
        length = embs.shape[1]
        prefix_ms = median_ms(lambda: model.embed_prefix(*inputs), args.repeats, device)
        sample_ms = median_ms(lambda: model.sample_actions(*inputs, noise=noise, num_steps=args.steps),
                              args.repeats, device)
        rows[pruned] = (length, kv_cache_mib(model, B, length), prefix_ms, sample_ms)
        if pruned:
            core = model.token_pruner.core
            for b in range(B):
                kept_idx, kept_mask = core.last_kept_indices_padded[b], core.last_kept_indices_mask[b]
                print(f"[model] sample {b}: kept {int(core.last_kept_per_sample[b])}/{config.num_image_tokens} "
                      f"image tokens ({camera_counts(kept_idx, kept_mask, config.vision.num_patches)})")
    for pruned, (length, kv, prefix_ms, sample_ms) in rows.items():
        print(f"[model] {'pruned  ' if pruned else 'unpruned'}: prefix {length} tokens, KV cache {kv:.2f} MiB, "
              f"embed_prefix {prefix_ms:.1f} ms, sample_actions({args.steps} steps) {sample_ms:.1f} ms")
    print(f"[model] sample_actions {speed(rows[False][3], rows[True][3])} with pruning (median of {args.repeats})")


def load_policy(args, device: torch.device, **kwargs):
    """The checkpoint's ``Pi05Policy`` from the checkpoint arguments (``add_checkpoint_args``)
    and ``kwargs`` for ``Pi05Policy``."""
    policy = Pi05Policy.from_paths(
        args.checkpoint, args.tokenizer, norm_stats=args.norm_stats or ({} if args.no_norm_stats else None),
        device=device, asset_id=args.asset_id, action_horizon=args.action_horizon, action_dims=args.action_dims,
        seed=args.seed, discrete_state_input=args.discrete_state_input, **kwargs,
    )
    if args.action_horizon is None:
        log.warning("openpi's checkpoints hold no action horizon: using %d; pass --action-horizon "
                    "(pi05_libero 10, pi05_droid 15)", policy.model.config.action_horizon)
    policy.model.set_compile_mode("default" if args.compile else None)
    return policy


def demo_checkpoint(args, device: torch.device) -> None:
    policy = load_policy(args, device, num_steps=args.steps)
    policy.set_pruning(enabled=True, keep_tokens=args.keep_tokens, keep_ratio=args.keep_ratio,
                       max_tokens=args.max_tokens)
    batch = [dict(policy.example_observation(args.seed), prompt=args.prompt)] * args.batch
    for pruned in (False, True):
        policy.enable_pruning(pruned)
        out = policy.infer_batch(batch)  # the first call compiles (--compile): not timed
        infer_ms = statistics.median(policy.infer_batch(batch)["policy_timing"]["infer_ms"]
                                     for _ in range(args.repeats))
        kept = out["kept_tokens"]
        kept = None if kept is None else ", ".join(str(k) for k in kept)
        print(f"[policy] {'pruned  ' if pruned else 'unpruned'}: actions {out['actions'].shape}, kept image tokens "
              f"{kept}, infer {infer_ms:.1f} ms ({args.steps} steps, median of {args.repeats})")


def serve(args, device: torch.device) -> None:
    """The checkpoint as a policy server for openpi's websocket client (pi05_fastprune.serve)."""
    from pi05_fastprune.serve import PolicyServer  # needs the serve extra: imported only here

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname).1s] %(message)s")
    policy = load_policy(args, device, robot=args.robot)
    overrides = {}
    if args.token_prune_keep_tokens is not None or args.token_prune_keep_ratio is not None:
        # The budget given replaces the checkpoint's (keep_tokens wins where both are given).
        overrides.update(keep_tokens=args.token_prune_keep_tokens, keep_ratio=args.token_prune_keep_ratio)
    if args.token_prune_max_tokens is not None:
        overrides["max_tokens"] = args.token_prune_max_tokens
    enabled = args.token_pruning
    if enabled is None:  # the checkpoint's setting, or on when a budget is given
        enabled = policy.pruning["enabled"] or bool(overrides)
    policy.set_pruning(enabled=enabled, **overrides)
    metadata = {"action_horizon": policy.model.config.action_horizon, "action_dims": policy.action_dims,
                "pruning": policy.pruning}
    print(f"[serve] warm-up inference: {policy.warmup():.1f} s", flush=True)
    server = PolicyServer(policy, args.host, args.port, metadata)
    print(f"[serve] port {server.port}, pruning {policy.pruning}", flush=True)
    server.serve_forever()


def add_checkpoint_args(p: argparse.ArgumentParser, required: bool, robot: bool) -> None:
    p.add_argument("--checkpoint", required=required, help="openpi pi0.5 model.safetensors (or its directory)")
    p.add_argument("--tokenizer", required=required, help="PaliGemma sentencepiece model file")
    p.add_argument("--norm-stats", help="norm_stats.json (default: <checkpoint>/assets/<asset_id>/)")
    p.add_argument("--no-norm-stats", action="store_true", help="run without normalization")
    p.add_argument("--asset-id")
    p.add_argument("--action-horizon", type=int)
    p.add_argument("--action-dims", type=int)
    p.add_argument("--discrete-state-input", action=argparse.BooleanOptionalAction, default=None,
                   help="the state in the prompt, as the checkpoint was trained (openpi's pi05_libero: no; "
                        "default: yes" + (", or --robot's openpi config)" if robot else ")"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile sample_actions (default: on CUDA only)")
    p.add_argument("--seed", type=int, default=0)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _patches(text: str) -> int:
    """A patch count: 1 to pi0.5's 3 x 256 image tokens."""
    value, most = int(text), Pi05Config().num_image_tokens
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be in [1, {most}] (pi0.5's image tokens), got {value}")
    return value


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pi05_fastprune")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="prune a pi0.5 prefix and time it")
    demo.add_argument("--size", choices=["dummy", "pi05"],
                      help="pi0.5 model size, random weights (default dummy; not with --checkpoint)")
    demo.add_argument("--batch", type=_positive, default=1)
    demo.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                      help="dtype of the op demo's embeddings (default float32; not with --checkpoint)")
    budgets = demo.add_mutually_exclusive_group()
    budgets.add_argument("--keep-tokens", type=_patches, help="budget of kept patches over all cameras")
    budgets.add_argument("--keep-ratio", type=_unit, help="budget as a ratio in (0, 1] of all patches")
    demo.add_argument("--max-tokens", type=_patches, help="static cap on kept patches (CUDA-graph friendly)")
    demo.add_argument("--steps", type=_positive, default=10, help="flow-matching Euler steps (default 10)")
    demo.add_argument("--repeats", type=_positive, default=5, help="timed calls per median (default 5)")
    demo.add_argument("--prompt", default="pick up the red block", help="with --checkpoint: the prompt")
    add_checkpoint_args(demo, required=False, robot=False)
    srv = sub.add_parser("serve", help="serve a checkpoint to openpi's websocket policy client")
    add_checkpoint_args(srv, required=True, robot=True)
    srv.add_argument("--host", default="0.0.0.0")
    srv.add_argument("--port", type=int, default=8000, help="0: a free port (printed)")
    srv.add_argument("--robot", choices=sorted(ROBOTS),
                     help="observations keyed as openpi's client for this robot sends them (default: the "
                          "model's camera names), with openpi's config for it (action dims, state in the prompt)")
    # The seed's serve_policy.py overrides (the budget over all cameras).
    srv.add_argument("--token-prune-keep-ratio", type=float)
    srv.add_argument("--token-prune-keep-tokens", type=int, help="wins over --token-prune-keep-ratio")
    srv.add_argument("--token-prune-max-tokens", type=int, help="static cap on kept patches")
    srv.add_argument("--token-pruning", action=argparse.BooleanOptionalAction, default=None,
                     help="prune (default: the checkpoint's setting, or on when a budget is given)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.cmd == "serve":
        serve(args, device)
        return
    if (args.checkpoint is None) != (args.tokenizer is None):
        parser.error("--checkpoint and --tokenizer go together")
    if args.checkpoint:
        for flag in ("size", "dtype"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} is for the random-weight demo, not with --checkpoint")
        demo_checkpoint(args, device)
        return
    args.size, args.dtype = args.size or "dummy", args.dtype or "float32"
    demo_op(args, device)
    demo_model(args, device)


if __name__ == "__main__":
    main()
