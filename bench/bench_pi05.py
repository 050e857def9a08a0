#!/usr/bin/env python
"""End-to-end benchmark of pi0.5 inference with LightVLA visual-token pruning.

    python bench/bench_pi05.py                  # full size, bf16, GPU: every provider, cases, phase
    python bench/bench_pi05.py --short          # bench/gpu_check: B=1, implicit + budget128, few reps
    python bench/bench_pi05.py --quick          # dummy size on the CPU, eager, seconds (CI smoke test)
    python bench/bench_pi05.py --profile ...    # for nsys/ncu (NVTX ranges, no timing)

The model is ``Pi05(config, device, seed)`` with a random init (full size: SigLIP So400m,
Gemma-2B prefix LLM, Gemma-300M expert; bf16 on the GPU). Providers:

- ``unpruned-compiled``       no pruning; ``sample_actions`` compiled (``--compile-mode``,
                               ``dynamic=True``). The harness also replays it as a CUDA graph
                               (``graph_us``): the unpruned baseline with CUDA graphs.
- ``seed-eager``              the seed's integration: the model's pruning call replaced by
                               ``reference.prune_ref`` (the [B, N, N] score, host syncs), the
                               whole model eager (the seed turned torch.compile off when pruning).
- ``fastprune-dynamic``       ``torch.ops.fastprune`` inside the compiled ``sample_actions``,
                               data-dependent kept count K (one host read of K).
- ``fastprune-static-graph``  ``token_prune_max_tokens`` (static cap: exactly M rows, no sync),
                               compiled with ``--static-compile-mode`` (``reduce-overhead``:
                               CUDA graphs, on the GPU).

Cases (``--cases``): ``implicit`` (no budget: the structured inputs keep ~100 of 768 image
tokens; the static cap is ``--cap``, 128) and ``budget64/128/256`` (``token_prune_keep_tokens``
= k; static cap = k). ``unpruned-compiled`` does not depend on the case: it is measured once
per batch size (case ``unpruned``) and is the baseline of every case.

**Structured case.** A random-init SigLIP does not produce scene-like features: implicit
pruning of its output keeps ~670 of 768 tokens. So the model's ``embed_images`` and
``embed_prompt`` are wrapped on the instance (see :func:`install_structured_inputs`): the
real SigLIP + projector (and the prompt embedding) still run on real images / tokens, and
their outputs are then replaced by ``pi05_fastprune.structured.structured_inputs`` patch /
prompt embeddings with ``torch.where(flag, real, structured)``, ``flag`` a False device
tensor. The select keeps the vision compute in the compiled graph (an unused result would be
removed as dead code) at the cost of one elementwise select over ``[B, 768, D]``. Everything
downstream (pruning, prefix LLM, KV cache, denoising) sees the structured embeddings; the
vision phase is timed on the real images.

Per (provider, case, batch) rows (``--out``/results.json, results.md):
- ``phase=sample_actions``: the model's ``sample_actions`` (``--steps`` Euler steps),
  ``first_call_s`` = wall time of the first call (compile included for compiled providers).
- phases, each measured separately: ``vision`` (``Pi05.embed_images``: SigLIP + projector on
  the real images), ``prune`` (the pruning op alone: ``prune_ref`` / ``fastprune.prune_tokens``
  on the structured embeddings), ``prefix`` (``prefix_kv_cache``: the prefix through the LLM,
  filling the KV cache), ``denoise`` (the Euler loop of the action expert over that cache).
  Compiled providers time compiled phase functions (``--phase-compile``, default mode,
  ``dynamic=True``, shared by the compiled providers); ``--no-phase-compile`` (``--short``)
  times them eager. ``prune`` is the op called eagerly in every provider (same kernels).
- ``kept`` (kept image tokens per sample), ``prefix_len`` (rows of the prefix, padding rows
  of the static cap included), ``kv_mib`` (the KV cache's bytes).
Summary (results.json ``summary``, results.md): per case and provider the times above, the
prune op's share of ``sample_actions``, the speedup over ``unpruned-compiled`` and the
targets (H100, full size, bf16): fastprune at ~100 kept tokens (case ``implicit``)
>= 1.5x faster than unpruned, prune op < 1 % of end-to-end -> PASS/FAIL (``n/a`` elsewhere).

Timing: the shared harness (bench/harness.py): CUDA events via ``do_bench`` on the GPU
(median, 20/80 %), host latency, CUDA-graph replay where a call can be captured; CPU
``perf_counter``. NVTX ranges ``<provider>/<warmup|time|host|graph>/<phase>``. A failure in
one provider is recorded in its row (``error``) and the run goes on. ``--budget-s`` stops
starting new blocks once the next one would not fit (compile time estimated from the
compiles so far); results are written after every block, and on SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as H  # noqa: E402

import pi05_fastprune  # noqa: E402,F401
from pi05_fastprune import reference as R  # noqa: E402
from pi05_fastprune.model import IMAGE_KEYS, Pi05, Pi05Config, euler_timesteps  # noqa: E402
from pi05_fastprune.prune import prune_tokens  # noqa: E402
from pi05_fastprune.pruner import ImageTokenPruner  # noqa: E402
from pi05_fastprune.structured import structured_inputs  # noqa: E402

try:
    from pi05_fastprune import triton_ops  # noqa: F401  (registers fastprune::triton_*)
except Exception:  # pragma: no cover - depends on the machine
    pass

PROVIDERS = ("unpruned-compiled", "seed-eager", "fastprune-dynamic", "fastprune-static-graph")
# Order of the end-to-end blocks: what the targets need first (under a time budget).
E2E_ORDER = ("fastprune-dynamic", "unpruned-compiled", "seed-eager", "fastprune-static-graph")
PHASES = ("vision", "prune", "prefix", "denoise")
CASES = ("implicit", "budget64", "budget128", "budget256")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
TARGET_SPEEDUP = 1.5
TARGET_PRUNE_SHARE = 0.01
# Valid prompt tokens of the structured prompt: 48 of 200 at full size keeps 114 of 768
# (seed 0); the dummy's 48-token prompt with 13 valid keeps 94.
VALID_PROMPT = {"full": 48, "dummy": 13}


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    pruning: bool
    seed_pruner: bool = False
    static: bool = False
    compiled: bool = False


PROVIDER_SPECS = {
    "unpruned-compiled": Provider("unpruned-compiled", pruning=False, compiled=True),
    "seed-eager": Provider("seed-eager", pruning=True, seed_pruner=True),
    "fastprune-dynamic": Provider("fastprune-dynamic", pruning=True, compiled=True),
    "fastprune-static-graph": Provider("fastprune-static-graph", pruning=True, static=True, compiled=True),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    keep: Optional[int]  # token_prune_keep_tokens
    cap: int  # token_prune_max_tokens of the static provider


def make_case(name: str, cap: int) -> Case:
    if name == "implicit":
        return Case(name, None, cap)
    if name.startswith("budget") and name[6:].isdigit():
        k = int(name[6:])
        return Case(name, k, k)
    raise ValueError(f"unknown case {name!r}: implicit or budget<k>")


# ----------------------------------------------------------------------------- model pieces


class SeedStylePruner(ImageTokenPruner):
    """The seed's eval pruning: ``reference.prune_ref`` (full [B, N, N] score, host syncs),
    installed as ``model.token_pruner`` so that ``embed_prefix`` calls it where it calls
    the fused op."""

    def prune(self, image_patches, task_tokens, *, task_token_mask=None, patch_token_mask=None, keep_tokens=None):
        if self.training:
            return super().prune(image_patches, task_tokens, task_token_mask=task_token_mask,
                                 patch_token_mask=patch_token_mask)
        core = self.core
        out = R.prune_ref(image_patches, task_tokens, task_token_mask, patch_token_mask,
                          core.budget(image_patches.shape[1], keep_tokens), core.mask_voters, core.max_tokens)
        core.record((image_patches, task_tokens, task_token_mask, patch_token_mask), counts=out.counts,
                    kept_idx=out.kept_idx, kept_mask=out.kept_mask)
        return out.pruned, out.kept_mask


def install_structured_inputs(model: Pi05, patches: torch.Tensor, task: torch.Tensor) -> None:
    """Wrap ``model.embed_images`` / ``model.embed_prompt`` (instance attributes, so the
    compiled ``_sample`` traces them): the real computation runs, then its output is
    replaced by the structured embeddings via ``torch.where`` on a False device flag (not
    foldable, so the vision tower stays in the compiled graph)."""
    flag = torch.zeros((), dtype=torch.bool, device=patches.device)
    real_images, real_prompt = model.embed_images, model.embed_prompt

    def embed_images(images, img_masks):
        embs, pad = real_images(images, img_masks)
        return torch.where(flag, embs, patches), pad

    def embed_prompt(lang_tokens):
        return torch.where(flag, real_prompt(lang_tokens), task)

    model.embed_images = embed_images
    model.embed_prompt = embed_prompt


def model_inputs(config: Pi05Config, batch: int, size: str, device: torch.device, seed: int):
    """Real images and prompt tokens, and the structured embeddings that replace their
    embeddings. The prompt mask is the structured one (``VALID_PROMPT[size]`` valid)."""
    llm, vis = config.llm, config.vision
    T, Tv = config.max_token_len, VALID_PROMPT[size]
    g = torch.Generator().manual_seed(seed)
    S = vis.image_size
    images = [(torch.rand(batch, 3, S, S, generator=g) * 2 - 1).to(device) for _ in IMAGE_KEYS]
    img_masks = [torch.ones(batch, dtype=torch.bool, device=device) for _ in IMAGE_KEYS]
    patches, task, task_mask, patch_mask = structured_inputs(
        batch=batch, n_cameras=len(IMAGE_KEYS), patches_per_camera=vis.num_patches, prompt_len=T,
        valid_prompt=Tv, width=llm.width, dtype=config.torch_dtype, device=device, seed=seed)
    lang_tokens = (torch.randint(1, config.vocab_size, (batch, T), generator=g).to(device) * task_mask)
    noise = torch.randn(batch, config.action_horizon, config.action_dim, generator=g).to(device)
    return dict(images=images, img_masks=img_masks, lang_tokens=lang_tokens, lang_masks=task_mask, noise=noise,
                patches=patches, task=task, task_mask=task_mask, patch_mask=patch_mask)


def kv_bytes(cache) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)


def params_b(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e9


# ----------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.t0 = time.perf_counter()
        self.h = H.Harness("pi05", device, quick=args.quick or args.short, profile=args.profile,
                           graph=not args.no_graph, graph_inner=1, host_reps=12, cpu_reps=12,
                           rep_ms=args.rep_ms, warmup_ms=min(25.0, args.rep_ms / 4))
        self.meta: dict[str, Any] = {"args": vars(args), "compile_s": {}, "skipped": [], "blocks": []}
        self.out = pathlib.Path(args.out) if args.out else H.default_out_dir("pi05")
        self.compile_estimate_s = 0.0  # largest first-call time of a compiled sample_actions so far
        self.compiled: dict[str, Callable] = {}
        self.phase_fns: dict[str, Callable] = {}
        self.info: dict[tuple, dict] = {}  # (B, provider, case) -> kept / prefix_len / kv_mib

    # ------------------------------------------------------------------ setup

    def build(self) -> None:
        a = self.args
        base = Pi05Config.dummy() if a.size == "dummy" else Pi05Config()
        config = dataclasses.replace(base, dtype=DTYPES[a.dtype], pytorch_compile_mode=None,
                                     token_pruning_enabled=False)
        t = time.perf_counter()
        self.model = Pi05(config, device=self.device, seed=a.seed).eval()
        H._sync(self.device)
        build_s = time.perf_counter() - t
        if a.from_checkpoint:
            self.meta["checkpoint"] = self.reload_from_checkpoint(a.from_checkpoint)
        self.meta["model"] = {
            "size": a.size, "dtype": config.dtype, "params_b": round(params_b(self.model), 3),
            "build_s": round(build_s, 2), "llm": config.llm._asdict(),
            "expert": config.expert._asdict(), "vision": config.vision._asdict(),
            "image_tokens": config.num_image_tokens, "prompt_len": config.max_token_len,
            "valid_prompt": VALID_PROMPT[a.size], "steps": a.steps, "action_horizon": config.action_horizon,
        }
        self.fast_pruner = self.model.token_pruner
        self.seed_pruner = SeedStylePruner(config.llm.width).eval()  # the model is in eval mode
        self.schedule = euler_timesteps(a.steps)
        print(f"[pi05] model {a.size} {config.dtype} on {self.device}: {self.meta['model']['params_b']} B params, "
              f"built in {self.meta['model']['build_s']} s; compile {'on' if a.compile else 'off'} "
              f"(e2e {a.compile_mode!r}, static {a.static_compile_mode!r}, phases "
              f"{a.compile_mode if a.phase_compile and a.compile else 'eager'})", flush=True)

    def reload_from_checkpoint(self, path: str) -> dict:
        """Writes the model in openpi's layout (``save_openpi``), then benchmarks the model that
        ``Pi05.from_openpi`` loads from it (memory-mapped, straight onto the device)."""
        t = time.perf_counter()
        self.model.save_openpi(path)
        save_s = time.perf_counter() - t
        config = self.model.config
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        self.model = Pi05.from_openpi(path, config=config, device=self.device).eval()
        H._sync(self.device)
        info = {"path": path, "bytes": os.path.getsize(path), "save_s": round(save_s, 2),
                "load_s": round(time.perf_counter() - t, 2)}
        print(f"[pi05] checkpoint {info['bytes'] / 2**30:.2f} GiB: saved in {info['save_s']} s, "
              f"loaded in {info['load_s']} s", flush=True)
        return info

    def compile_mode(self, p: Provider) -> Optional[str]:
        if not (p.compiled and self.args.compile):
            return None
        return self.args.static_compile_mode if p.static else self.args.compile_mode

    def compile_label(self, mode: Optional[str]) -> str:
        if mode is None:
            return "eager"
        return f"backend={self.args.compile_backend}" if self.args.compile_backend else mode

    def compile(self, fn: Callable, mode: str) -> Callable:
        kw = dict(dynamic=True, fullgraph=True)  # as Pi05 compiles sample_actions
        if self.args.compile_backend:  # a wiring check (e.g. aot_eager on the CPU): no mode then
            return torch.compile(fn, backend=self.args.compile_backend, **kw)
        return torch.compile(fn, mode=mode, **kw)

    def configure(self, p: Provider, case: Case) -> None:
        """Config, pruner and compiled entry of provider ``p`` at ``case`` on the one model."""
        m, cfg = self.model, self.model.config
        cfg.token_pruning_enabled = p.pruning
        cfg.token_prune_keep_tokens = case.keep if p.pruning else None
        cfg.token_prune_keep_ratio = None
        cfg.token_prune_max_tokens = case.cap if p.static else None
        m.token_pruner = self.seed_pruner if p.seed_pruner else self.fast_pruner
        mode = self.compile_mode(p)
        if mode is None:
            m._sample_compiled = m._sample
        else:
            if mode not in self.compiled:
                self.compiled[mode] = self.compile(m._sample, mode)
            m._sample_compiled = self.compiled[mode]

    def phase_fn(self, name: str, compiled: bool) -> Callable:
        key = f"{name}:{'compiled' if compiled else 'eager'}"
        if key not in self.phase_fns:
            m, (dt, times) = self.model, self.schedule

            def vision(images, img_masks):
                return Pi05.embed_images(m, images, img_masks)  # the real path, not the wrapper

            def denoise(cache, pad, pos, noise):  # Pi05._denoise after the cache
                x_t = noise.to(m.action_in.weight.dtype)
                for t in times:
                    timestep = torch.full((noise.shape[0],), t, dtype=torch.float32, device=noise.device)
                    x_t = x_t + dt * m.denoise_step(cache, pad, pos, x_t, timestep)
                return x_t

            fn = {"vision": vision, "prefix": m.prefix_kv_cache, "denoise": denoise}[name]
            if compiled:
                fn = self.compile(fn, self.args.compile_mode)
            self.phase_fns[key] = fn
        return self.phase_fns[key]

    # ------------------------------------------------------------------ blocks

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, label: str, compiles: int) -> bool:
        """Whether a block with ``compiles`` fresh compiles fits in ``--budget-s``."""
        budget = self.args.budget_s
        if budget is None:
            return True
        # The first compile is the slowest (cold Triton kernels); later ones reuse kernels.
        need = compiles * self.compile_estimate_s * 0.9 + 10.0
        if self.elapsed() + need <= budget:
            return True
        why = f"time budget: {self.elapsed():.0f}s elapsed + ~{need:.0f}s needed > {budget:.0f}s"
        print(f"[pi05] skip {label}: {why}", flush=True)
        self.meta["skipped"].append({"block": label, "reason": why})
        return False

    def config_of(self, B: int, p: Provider, case: str, phase: str, compiled: Optional[str]) -> dict:
        c = {"size": self.args.size, "dtype": self.args.dtype, "B": B, "case": case, "phase": phase,
             "compile": self.compile_label(compiled)}
        c.update(self.info.get((B, p.name, case), {}))
        return c

    def error_row(self, p: Provider, config: dict, e: BaseException) -> None:
        row = {"bench": "pi05", "provider": p.name, **config, "error": f"{type(e).__name__}: {e}"[:500],
               "traceback": traceback.format_exc()[-2000:]}
        print(f"[pi05] {p.name}/{config.get('case')}/{config.get('phase')}: ERROR {row['error'][:200]}", flush=True)
        self.h.rows.append(row)
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:
                pass

    def measure(self, p: Provider, config: dict, fn: Callable, graph: bool) -> dict:
        phase = config["phase"]

        def call():
            with H.nvtx_range(phase, color="orange"):
                return fn()

        return self.h.measure(p.name, config, call, graph=graph)

    def e2e(self, B: int, p: Provider, case: Case, inp: dict) -> None:
        """sample_actions of provider ``p`` (first call = compile), and its prune op."""
        label = "unpruned" if not p.pruning else case.name
        mode = self.compile_mode(p)
        try:
            self.configure(p, case)
            m = self.model
            # Eager prefix: kept tokens, prefix length, KV-cache size (also the phases' inputs).
            prefix = m.embed_prefix(inp["images"], inp["img_masks"], inp["lang_tokens"], inp["lang_masks"])
            cache = m.prefix_kv_cache(*prefix)
            info = {"prefix_len": int(prefix[0].shape[1]), "kv_mib": round(kv_bytes(cache) / 2**20, 3)}
            if p.pruning:
                kept = m.token_pruner.core.last_kept_per_sample.tolist()
            else:
                kept = inp["patch_mask"].sum(-1).tolist()
            info["kept"] = kept[0] if len(kept) == 1 else "/".join(map(str, kept))
            self.info[(B, p.name, label)] = info
            inp.setdefault("prefix", {})[(p.name, label)] = (prefix, cache)
            args = (inp["images"], inp["img_masks"], inp["lang_tokens"], inp["lang_masks"])

            def sample():
                return m.sample_actions(*args, noise=inp["noise"], num_steps=self.args.steps)

            t = time.perf_counter()
            out = sample()
            H._sync(self.device)
            first = time.perf_counter() - t
            if mode is not None:
                self.compile_estimate_s = max(self.compile_estimate_s, first)
                self.meta["compile_s"][f"{p.name}/{label}/B{B}"] = round(first, 2)
            finite = bool(torch.isfinite(out).all())
        except Exception as e:
            self.error_row(p, self.config_of(B, p, label, "sample_actions", mode), e)
            return
        config = self.config_of(B, p, label, "sample_actions", mode)
        config.update(first_call_s=round(first, 3), finite=finite)
        # A host sync (dynamic K, prune_ref) cannot be captured; reduce-overhead graphs itself.
        graph = not p.pruning and mode not in (None, "reduce-overhead")
        self.measure(p, config, sample, graph=graph)
        if p.pruning:
            self.prune_phase(B, p, case, inp)

    def prune_phase(self, B: int, p: Provider, case: Case, inp: dict) -> None:
        pat, task, tm, pm = inp["patches"], inp["task"], inp["task_mask"], inp["patch_mask"]
        config = self.config_of(B, p, case.name, "prune", "eager")
        if p.seed_pruner:
            fn = lambda: R.prune_ref(pat, task, tm, pm, case.keep, False, None)  # noqa: E731
        else:
            cap = case.cap if p.static else None
            fn = lambda: prune_tokens(pat, task, task_mask=tm, patch_mask=pm, keep_tokens=case.keep,  # noqa: E731
                                      max_tokens=cap)
        try:
            fn()
        except Exception as e:
            self.error_row(p, config, e)
            return
        self.measure(p, config, fn, graph=p.static)

    def phases(self, B: int, p: Provider, case: Case, inp: dict, vision: bool) -> None:
        """vision / prefix / denoise of provider ``p`` at ``case``, each timed alone."""
        label = "unpruned" if not p.pruning else case.name
        compiled = self.compile_mode(p) is not None and self.args.phase_compile
        mode = self.args.compile_mode if compiled else None
        graph = p.name in ("unpruned-compiled", "fastprune-static-graph")
        stored = inp.get("prefix", {}).get((p.name, label))
        if stored is None:
            return  # its end-to-end block failed or was skipped
        (embs, pad, att, pos), cache = stored
        calls = {
            "vision": (self.phase_fn("vision", compiled), (inp["images"], inp["img_masks"])),
            "prefix": (self.phase_fn("prefix", compiled), (embs, pad, att, pos)),
            "denoise": (self.phase_fn("denoise", compiled), (cache, pad, pos, inp["noise"])),
        }
        for phase, (fn, fargs) in calls.items():
            if phase == "vision" and not vision:
                continue
            config = self.config_of(B, p, label, phase, mode)
            call = (lambda f=fn, a=fargs: f(*a))
            try:
                t = time.perf_counter()
                call()
                H._sync(self.device)
                config["first_call_s"] = round(time.perf_counter() - t, 3)
            except Exception as e:
                self.error_row(p, config, e)
                continue
            self.measure(p, config, call, graph=graph)

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        a = self.args
        cases = [make_case(c, a.cap) for c in a.cases]
        providers = [PROVIDER_SPECS[n] for n in E2E_ORDER if n in a.providers]
        for B in a.batch:
            inp = model_inputs(self.model.config, B, a.size, self.device, a.seed)
            install_structured_inputs(self.model, inp["patches"], inp["task"])
            compiled_phases_done = False
            for ci, case in enumerate(cases):
                for p in providers:
                    if not p.pruning and ci > 0:
                        continue  # unpruned: once per batch size
                    label = f"B{B}/{p.name}/{'unpruned' if not p.pruning else case.name}/sample_actions"
                    if not self.fits(label, 1 if self.compile_mode(p) else 0):
                        continue
                    self.block(label, lambda: self.e2e(B, p, case, inp))
                for p in providers:
                    if not p.pruning and ci > 0:
                        continue
                    compiled = self.compile_mode(p) is not None and a.phase_compile
                    label = f"B{B}/{p.name}/{'unpruned' if not p.pruning else case.name}/phases"
                    if not self.fits(label, 1 if compiled and not compiled_phases_done else 0):
                        continue
                    self.block(label, lambda: self.phases(B, p, case, inp, vision=ci == 0))
                    compiled_phases_done |= compiled
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def block(self, label: str, fn: Callable[[], None]) -> None:
        t = time.perf_counter()
        fn()
        self.meta["blocks"].append({"block": label, "seconds": round(time.perf_counter() - t, 2)})
        self.write(final=False)

    # ------------------------------------------------------------------ output

    def write(self, final: bool) -> None:
        self.meta["elapsed_s"] = round(self.elapsed(), 2)
        if self.args.compile:
            try:
                from torch._dynamo.utils import counters

                self.meta["graph_breaks"] = {k: v for k, v in counters["graph_break"].items()}
                self.meta["dynamo_frames"] = dict(counters["frames"])
            except Exception:
                pass
        summary = summarize(self.h.rows, self.device, self.args)
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"bench": "pi05", "environment": self.h.env, "quick": self.h.quick, "profile": self.h.profile,
                   "final": final, "meta": self.meta, "summary": summary, "rows": self.h.rows}
        (self.out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
        (self.out / "results.md").write_text(self.h.markdown() + "\n" + summary_markdown(summary, self.meta))
        if final:
            if not self.h.profile:
                self.h.plot(self.out, ["B", "case"], x="phase")
            print(f"[pi05] wrote {self.out}/results.json, results.md", flush=True)


# ----------------------------------------------------------------------------- summary


def _time(row: Optional[dict]) -> Optional[float]:
    return None if row is None else row.get("median_us")


def summarize(rows: list[dict], device: torch.device, args) -> dict:
    """Per (B, case): per provider sample_actions and phase times (ms, device median), prefix,
    KV cache, kept tokens, the prune op's share and the speedup over unpruned-compiled; the
    targets checked at case ``implicit``."""
    applicable = device.type == "cuda" and args.size == "full" and args.dtype == "bf16"
    by = {}
    for r in rows:
        if "error" in r or "median_us" not in r:
            continue
        by[(r["B"], r["provider"], r["case"], r["phase"])] = r
    out: dict = {"targets_applicable": applicable,
                 "targets_note": "H100, full size, bf16: fastprune (case implicit, ~100 kept) sample_actions "
                                 f">= {TARGET_SPEEDUP}x faster than unpruned-compiled; prune op < "
                                 f"{TARGET_PRUNE_SHARE:.0%} of sample_actions",
                 "cases": []}
    batches = sorted({r["B"] for r in rows if "B" in r})
    cases = [c for c in args.cases]
    for B in batches:
        base = by.get((B, "unpruned-compiled", "unpruned", "sample_actions"))
        base_us, base_graph = _time(base), (base or {}).get("graph_us")
        for case in cases:
            entry = {"B": B, "case": case, "providers": []}
            for name in PROVIDERS:
                label = "unpruned" if name == "unpruned-compiled" else case
                e2e = by.get((B, name, label, "sample_actions"))
                if e2e is None and not any(k[:3] == (B, name, label) for k in by):
                    continue
                ph = {f"{ph}_ms": None if (x := _time(by.get((B, name, label, ph)))) is None else x / 1e3
                      for ph in PHASES}
                if ph["vision_ms"] is None:  # vision is timed in the first case only
                    v = next((r for k, r in by.items() if k[0] == B and k[1] == name and k[3] == "vision"), None)
                    ph["vision_ms"] = None if v is None else v["median_us"] / 1e3
                sample_us = _time(e2e)
                src = e2e or next(r for k, r in by.items() if k[:3] == (B, name, label))
                p = {"provider": name, "compile": (e2e or {}).get("compile"), "kept": src.get("kept"),
                     "prefix_len": src.get("prefix_len"), "kv_mib": src.get("kv_mib"),
                     "sample_ms": None if sample_us is None else sample_us / 1e3,
                     "sample_graph_ms": None if not (e2e or {}).get("graph_us") else e2e["graph_us"] / 1e3,
                     "first_call_s": (e2e or {}).get("first_call_s"), **ph}
                known = [v for k, v in ph.items() if v is not None]
                p["phase_sum_ms"] = sum(known) if len(known) == len(ph) or (name == "unpruned-compiled" and len(known) == 3) else None
                p["prune_share"] = (ph["prune_ms"] * 1e3 / sample_us) if (ph["prune_ms"] is not None and sample_us) else None
                p["speedup_vs_unpruned"] = (base_us / sample_us) if (base_us and sample_us) else None
                p["speedup_vs_unpruned_graph"] = (base_graph / sample_us) if (base_graph and sample_us) else None
                if name.startswith("fastprune") and case == "implicit":
                    p["target_speedup"] = _verdict(p["speedup_vs_unpruned"], lambda x: x >= TARGET_SPEEDUP, applicable)
                    p["target_prune_share"] = _verdict(p["prune_share"], lambda x: x < TARGET_PRUNE_SHARE, applicable)
                entry["providers"].append(p)
            if entry["providers"]:
                out["cases"].append(entry)
    return out


def _verdict(value: Optional[float], ok: Callable[[float], bool], applicable: bool) -> str:
    if value is None:
        return "not measured"
    if not applicable:
        return "n/a (" + ("PASS" if ok(value) else "FAIL") + " at this size/device; target is H100 full bf16)"
    return "PASS" if ok(value) else "FAIL"


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if pct:
            return f"{100 * v:.2f} %"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return str(v)


def summary_markdown(summary: dict, meta: dict) -> str:
    lines = ["## Summary (ms: device median on CUDA, perf_counter median on CPU)", "",
             f"Targets ({'applicable' if summary['targets_applicable'] else 'not applicable here'}): "
             f"{summary['targets_note']}.", ""]
    cols = ["provider", "compile", "kept", "prefix_len", "kv_mib", "sample_ms", "sample_graph_ms", "vision_ms",
            "prune_ms", "prefix_ms", "denoise_ms", "phase_sum_ms", "prune_share", "speedup_vs_unpruned",
            "speedup_vs_unpruned_graph", "first_call_s", "target_speedup", "target_prune_share"]
    for entry in summary["cases"]:
        lines += [f"### B={entry['B']}, case {entry['case']}", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join("---" for _ in cols) + "|"]
        for p in entry["providers"]:
            lines.append("| " + " | ".join(_fmt(p.get(c), pct=c == "prune_share") for c in cols) + " |")
        lines.append("")
    m = meta.get("model", {})
    if m:
        lines.append(f"Model: {m.get('size')} ({m.get('params_b')} B params, {m.get('dtype')}), built in "
                     f"{m.get('build_s')} s; {m.get('steps')} Euler steps.")
    if meta.get("graph_breaks"):
        lines.append("Graph breaks (torch._dynamo counters): " + "; ".join(
            f"{n}x {k.splitlines()[0][:120]}" for k, n in meta["graph_breaks"].items()))
    if meta.get("compile_s"):
        lines.append("First call (compile) seconds: " + ", ".join(f"{k} {v}" for k, v in meta["compile_s"].items()))
    for s in meta.get("skipped", []):
        lines.append(f"Skipped {s['block']}: {s['reason']}")
    lines.append(f"Elapsed {meta.get('elapsed_s')} s.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: dummy size, eager, 2 steps, few reps")
    ap.add_argument("--short", action="store_true",
                    help="gpu_check: B=1, cases implicit,budget128, eager phases, few reps")
    ap.add_argument("--size", choices=("full", "dummy"), default=None, help="full (default on CUDA) or dummy (default on the CPU and with --quick)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="bf16 on GPU, fp32 on CPU by default")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1)")
    ap.add_argument("--cases", default=None, help=f"comma-separated, default {','.join(CASES)}")
    ap.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--cap", type=int, default=128, help="static cap (max_tokens) of the implicit case")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default 10; --quick 2)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled providers")
    ap.add_argument("--static-compile-mode", default=None,
                    help="mode of fastprune-static-graph (default reduce-overhead on CUDA, else --compile-mode)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                    help="everything eager (default on CPU and with FASTPRUNE_TORCH_COMPILE=0)")
    ap.add_argument("--compile", dest="compile", action="store_true", help="compile on the CPU too (slow)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend instead of a mode (e.g. aot_eager: checks the compiled "
                         "wiring on the CPU in seconds; the timings then mean little)")
    ap.add_argument("--phase-compile", action=argparse.BooleanOptionalAction, default=None,
                    help="time the compiled providers' phases compiled (default on, off with --short)")
    ap.add_argument("--from-checkpoint", metavar="PATH", default=None,
                    help="write the random model to PATH with save_openpi, time Pi05.from_openpi, "
                         "and benchmark the loaded model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default bench/out/pi05-<time>)")
    ap.add_argument("--profile", action="store_true", help="run each config a few times for nsys/ncu; no timing")
    ap.add_argument("--no-graph", action="store_true", help="skip CUDA-graph replay timing")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench rep time (default 300; --short 100)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no block that would end after this many seconds (compile time estimated)")
    args = ap.parse_args(argv)

    device = H.pick_device(args.device)
    args.size = args.size or ("full" if device.type == "cuda" and not args.quick else "dummy")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.batch = [int(b) for b in (args.batch or "1").split(",")]
    default_cases = "implicit,budget128" if (args.quick or args.short) else ",".join(CASES)
    args.cases = [c for c in (args.cases or default_cases).split(",") if c]
    args.providers = [p for p in (args.providers or ",".join(PROVIDERS)).split(",") if p]
    for p in args.providers:
        if p not in PROVIDER_SPECS:
            ap.error(f"unknown provider {p!r}; known: {', '.join(PROVIDERS)}")
    for c in args.cases:
        make_case(c, args.cap)
    args.steps = args.steps or (2 if args.quick else 10)
    if args.compile is None:
        args.compile = device.type == "cuda" and os.environ.get("FASTPRUNE_TORCH_COMPILE", "1") != "0"
    if args.static_compile_mode is None:
        args.static_compile_mode = "reduce-overhead" if device.type == "cuda" else args.compile_mode
    if args.phase_compile is None:
        args.phase_compile = not args.short
    args.rep_ms = args.rep_ms or (100.0 if (args.short or args.quick) else 300.0)

    if args.compile:
        cfg = torch._dynamo.config
        # Every (provider, case) is a compiled entry of the same Pi05._sample code object.
        if hasattr(cfg, "recompile_limit"):
            cfg.recompile_limit = max(64, cfg.recompile_limit)
        cfg.cache_size_limit = max(64, cfg.cache_size_limit)
        if hasattr(cfg, "accumulated_cache_size_limit"):
            cfg.accumulated_cache_size_limit = max(512, cfg.accumulated_cache_size_limit)
    torch.set_grad_enabled(False)

    bench = Bench(args, device)
    print(f"[pi05] device {device}, size {args.size}, dtype {args.dtype}, B {args.batch}, cases {args.cases}, "
          f"providers {args.providers}, steps {args.steps}, budget {args.budget_s}", flush=True)

    def on_term(signum, frame):  # gpu_check's timeout: keep what was measured
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        bench.build()
        bench.run()
    except BaseException as e:  # recorded; the partial results are still written
        bench.meta["fatal"] = f"{type(e).__name__}: {e}"[:500]
        bench.meta["fatal_traceback"] = traceback.format_exc()[-3000:]
        print(f"[pi05] stopped: {bench.meta['fatal']}", flush=True)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        bench.write(final=True)
    print(bench.h.markdown())
    print(summary_markdown(summarize(bench.h.rows, device, args), bench.meta))
    failed = [r for r in bench.h.rows if "error" in r]
    if "fatal" in bench.meta:
        return 2
    return 1 if failed and args.quick else 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
