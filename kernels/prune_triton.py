"""Fused Triton kernels of the fastprune eval ops (SPEC "Scoring", "Selection", "Output").

Three kernels per call, nothing else launched (no fill: see ``_arrive_tagged``), through the
SPEC identity ``idx[i] = argmax_j sum_t A[i,t] S[j,t]``:

1. ``_scores_kernel``   grid (row tiles, D slices, B): one pass over ``patches`` (row norms on the
   fly), ``S = rms(P) rms(T)^T`` over the prompt tokens up to the last valid one (zeros at invalid
   ones), and ``A' = exp(S_i / sqrt(D) - m_i)`` with ``m_i`` the row max over valid tokens (the
   softmax without its positive row scale, which does not move an argmax), both written
   ``[B, N, TS]`` (rows padded to TS, T rounded up to 16) as the fp16 halves ``hi + lo`` that
   the select kernel's product takes (``_s_rows``). At B=1 the serial loop over D bounds this
   kernel, so D is split into ``ksplit`` slices: each program writes its slice's partial dot
   products and sums of squares, and the last slice of a row tile to arrive (a tagged arrival
   counter that needs no zeroing) adds them in slice order, so S does not depend on the order of
   arrival. It also initialises this call's merge keys and counters.
2. ``_select_kernel``   grid (row tiles x column splits, B): ``C = A' S^T`` tile by tile and
   an online row argmax over the split's column tiles, packed into one
   int64 key per (row, best column) so that ``atomic_max`` merges the splits independently of
   launch order (higher score first, then lower column; NaN as -inf). The last program of a
   sample (a per-sample arrival counter) finishes the sample: decodes the row argmax, and for
   ``select`` writes it; for ``prune`` counts votes (a histogram in the program), keeps
   (implicit or budget, optional cap, deterministic ties), prefix-sums the keep mask into the
   output order and writes ``counts``.
3. ``_gather_kernel``   grid (output row blocks, D blocks, B): copies the kept raw patch rows
   in increasing index, zero padding, ``kept_mask`` and ``kept_idx``.

``prune`` reads ``K = max(1, max counts)`` on the host between 2 and 3 (its only sync);
``prune_padded`` (``K = max_tokens``) and ``select`` never sync. Nothing ``N x N`` or ``N x D``
lives in global memory: the largest buffers are ``S`` and ``A'`` (``N x TS``, 4 bytes an entry) and
S's partials (``ksplit x N x TS``). Every load is upcast to
fp32 before arithmetic (16-bit inputs of ``S``'s ``tl.dot`` stay 16-bit on the GPU: their
products are exact in the fp32 accumulator; ``A' S^T`` multiplies fp16 halves ``hi + lo`` of its
fp32 operands, ~22 bits, see ``_tile_product``); offsets are int64.

The launchers take a ``wrap`` callable (``torch.library.wrap_triton`` inside a
``triton_op``, identity otherwise) so the same code serves eager, the interpreter and Inductor.
Eager launches go through a per-specialisation cache (``_CachedLaunch``). Inside ``recording()``
an eager call also notes its allocations and launches, from which ``plan_of`` builds the
launch plan that the C++ ops replay on CUDA (csrc/triton_plan.h).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import threading
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# fp32 tl.dot precision of the S product of fp32 inputs (_Cfg.dot_prec, a tuning() parameter):
# "tf32x3" (three tf32 tensor-core products, close to fp32) or "ieee" (exact fp32 FMA); 16-bit
# inputs use the native tensor-core dot. (The select kernel's A' S^T has its own, _Cfg.sel_prec.
# As that product, tf32x3 was 1.6x (B=1) to 2.7x (B=64) faster than ieee on an H200 with the
# same selections, run 4's sweep.)
DOT_PREC = "tf32x3"

__all__ = ["select", "prune", "prune_padded", "INTERPRET"]


# --------------------------------------------------------------------------- device helpers


# The scores kernel's row-tile arrival counters are pairs of int64 words ``TAG << 16 | arrivals``
# that need no zeroing before the kernel (a 4th launch, the fill, until v60), whatever the
# allocator hands out, in eager calls, under torch.compile and in CUDA-graph replays alike. A word
# whose top 48 bits are not the tag counts as no arrival, and the last slice to arrive leaves both
# words fresh (``TAG << 16``). A stale tagged word with a nonzero count could only come from a
# call still in flight, whose memory no other call is given; other data matches the tag with odds
# of 2^-48 per word. (kernels/prune_cuda.cu's arrive_tagged is the same protocol.)
ARRIVAL_TAG: tl.constexpr = tl.constexpr(0x5A17C3E90B6D)


@triton.jit
def _arrive_tagged(counter, n):
    """One program's arrival at the tagged counter ``counter[0:2]`` of ``n`` arrivals (see
    ARRIVAL_TAG): whether it is the last, which leaves both words fresh for the next call on this
    memory (a CUDA-graph replay). Every atomic is acq_rel at gpu scope (after a CTA barrier: it
    releases the program's stores and acquires those of the programs before it).

    First an atomic add on the first word: where it was fresh, as the previous call on this
    memory left it (a CUDA-graph replay, a repeated eager call), the add's result counts the
    arrivals: one round trip, as an untagged counter. Where it lacked the tag, every arrival of
    the call finds it so (an add reaches the top bits only by a carry), and they count on the
    second word instead, by compare-and-swap: one expecting a fresh word, then with the word
    found, until it lands, which counts a word without the tag as no arrival."""
    fresh = tl.full([], ARRIVAL_TAG, tl.int64) << 16
    seen = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if (seen >> 16) == ARRIVAL_TAG:
        arrived = seen & 0xFFFF
    else:
        expect = fresh
        new = fresh + 1
        seen = tl.atomic_cas(counter + 1, expect, new, sem="acq_rel", scope="gpu")
        while seen != expect:
            expect = seen
            new = tl.where((seen >> 16) == ARRIVAL_TAG, seen + 1, fresh + 1)
            seen = tl.atomic_cas(counter + 1, expect, new, sem="acq_rel", scope="gpu")
        arrived = (new & 0xFFFF) - 1
    last = arrived == n - 1
    if last:
        tl.store(counter, fresh)
        tl.store(counter + 1, fresh)
    return last


@triton.jit
def _prompt_extent(TMASK, b, T, HAS_TMASK: tl.constexpr, BLOCK_TALL: tl.constexpr):
    """(t_end, all_valid): one past the last valid prompt token of sample b, and whether the
    sample has no valid token (then every token counts, SPEC)."""
    if HAS_TMASK:
        t = tl.arange(0, BLOCK_TALL)
        mk = tl.load(TMASK + b * T + t, mask=t < T, other=0) != 0
        last = tl.max(tl.where(mk, t + 1, 0), 0)  # 0 when no token is valid: one reduction for both
        all_valid = last == 0
        t_end = tl.where(all_valid, T, last)
    else:
        all_valid = True
        t_end = T
    return t_end, all_valid


@triton.jit
def _r4(x):
    return (x + 3) // 4 * 4


# The call's scratch is one fp32 buffer (one allocation: every torch.empty costs the eager call
# ~2.6 µs of host time on an H200 machine, run5/host), whose regions the kernels derive from
# (B, N, TS): the int32 regions first (their place depends on B and N alone, which the gather
# knows), then the fp32 ones, then the score kernel's arrival counters (int64, tagged).
# Regions start on 16-byte boundaries. _scratch_sizes sizes them.
@triton.jit
def _i32_scratch(WS, B, N):
    """int32: merge keys [B, N] (int64) | order [B, N] (the select kernel's vote counts, then its
    kept list) | per-sample arrival counters [B], kmax."""
    bn = B.to(tl.int64) * N
    WSI = WS.to(tl.pointer_type(tl.int32), bitcast=True)
    KEYS = WS.to(tl.pointer_type(tl.int64), bitcast=True)
    ORDER = WSI + _r4(2 * bn)
    COUNTER = ORDER + _r4(bn)
    KMAX = COUNTER + B
    return KEYS, ORDER, COUNTER, KMAX


@triton.jit
def _f32_scratch(WS, B, N, TS, KSPLIT: tl.constexpr, n_tiles):
    """fp32, after the int32 regions: S [B, N, TS] and A' [B, N, TS] (each row as 2 TS fp16
    halves: _s_rows) | with a D split, the slices' dot products [KSPLIT, B, N, TS], patch sums of
    squares [KSPLIT, B, N], prompt sums of squares [KSPLIT, B, n_tiles, TS], and the row-tile
    arrival counters [B, n_tiles, 2] (int64, tagged: ARRIVAL_TAG). TS is the token stride, T
    rounded up to 16 (_Cfg.ts)."""
    bn = B.to(tl.int64) * N
    S = WS + _r4(2 * bn) + _r4(bn) + _r4(B + 1)
    A = S + _r4(bn * TS)
    SP = A + _r4(bn * TS)
    SSP = SP + _r4(KSPLIT * bn * TS)
    SST = SSP + _r4(KSPLIT * bn)
    ARRIVED = (SST + _r4(KSPLIT * B * n_tiles * TS)).to(tl.pointer_type(tl.int64), bitcast=True)
    return S, A, SP, SSP, SST, ARRIVED


@triton.jit
def _s_rows(S, b, N, TS, rows64):
    """fp16 pointers to rows ``rows64`` of sample b's S (or A'), [len, 1]: a row takes the TS fp32
    slots of its place in the region as 2 TS fp16 values, the hi halves of S * 2^-S_SHIFT (of A')
    and then their lo halves (_split_f16), so that the select kernel's product loads its fp16
    operands as they are (PERF_LOG v64, v67). TS is a multiple of 16: both halves start 32-byte
    aligned."""
    S16 = S.to(tl.pointer_type(tl.float16), bitcast=True)
    return S16 + b * N * (2 * TS) + rows64[:, None] * (2 * TS)


def _scratch_sizes(B: int, N: int, TS: int, ksplit: int, n_tiles: int) -> tuple[int, int, int]:
    """Host side of _i32_scratch/_f32_scratch: (elements of the buffer, offset of the row-tile
    arrival counters (the buffer's end without a D split), offset of kmax)."""
    r4 = lambda x: -(-x // 4) * 4  # noqa: E731
    bn = B * N
    counter = r4(2 * bn) + r4(bn)
    a_at = counter + r4(B + 1) + r4(bn * TS)
    if ksplit == 1:
        return a_at + bn * TS, a_at + bn * TS, counter + B
    arrived = a_at + r4(bn * TS) + r4(ksplit * bn * TS) + r4(ksplit * bn) + r4(ksplit * B * n_tiles * TS)
    return arrived + 4 * B * n_tiles, arrived, counter + B


@triton.jit
def _valid_tokens(TMASK, b, T, tt, all_valid, HAS_TMASK: tl.constexpr):
    vt = tt < T
    if HAS_TMASK:
        mk = tl.load(TMASK + b * T + tt, mask=vt, other=0) != 0
        vt = vt & (mk | all_valid)
    return vt


# --------------------------------------------------------------------------- kernel 1


@triton.jit
def _split_f16(x):
    """fp32 ``x`` as ``hi + lo``, two fp16 tiles: 22 significant bits where |x| is in fp16's
    normal range, and an absolute error under 3e-8 below it."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _store_halves(R, b, N, TS, rows64, rmask, tt, x):
    """Stores the tile ``x`` (rows ``rows64``, tokens ``tt``) of sample b's S or A' region as its
    fp16 halves (_s_rows, _split_f16)."""
    hi, lo = _split_f16(x)
    at = _s_rows(R, b, N, TS, rows64) + tt[None, :]
    m = rmask[:, None] & (tt < TS)[None, :]
    tl.store(at, hi, mask=m)
    tl.store(at + TS, lo, mask=m)


@triton.jit
def _load_halves(R, b, N, TS, idx, imask, tt):
    """Rows ``idx`` of sample b's S or A' region at tokens ``tt`` as their fp16 halves (hi, lo)
    (_s_rows; 0 outside). The bound is the row's TS tokens, a multiple of 16 like the halves'
    starts, so the loads are 16-byte vectors."""
    at = _s_rows(R, b, N, TS, idx.to(tl.int64)) + tt[None, :]
    m = imask[:, None] & (tt < TS)[None, :]
    return tl.load(at, mask=m, other=0.0), tl.load(at + TS, mask=m, other=0.0)


@triton.jit
def _s_of(hi, lo, S_SHIFT: tl.constexpr):
    """S in fp32 from its halves (22 significant bits)."""
    return (hi.to(tl.float32) + lo.to(tl.float32)) * (1 << S_SHIFT)


@triton.jit
def _store_a(A, b, N, TS, rows64, rmask, tt, vt, s, scale, m):
    """Writes a tile of A' = exp(S / sqrt(D) - m) from the S tile ``s`` and the final row max
    ``m`` (0 at invalid tokens and on the row padding): the softmax without its positive row
    scale, which does not move an argmax, as fp16 halves for the select kernel's product. A' is
    in [0, 1]."""
    a = tl.where(vt[None, :] & rmask[:, None], tl.exp((s * scale).to(tl.float32) - m[:, None]), 0.0)
    _store_halves(A, b, N, TS, rows64, rmask, tt, a)


@triton.jit
def _store_s(S, A, b, N, TS, D, rows64, rmask, tt, vt, acc, ssp, sst, scale, m, t_end,
             BLOCK_T: tl.constexpr, S_SHIFT: tl.constexpr):
    """Writes a tile of S from its dot products and sums of squares (0 at invalid tokens and on
    the row padding up to TS) as the fp16 halves of S * 2^-S_SHIFT; returns the row max ``m`` of
    S / sqrt(D) over valid tokens, updated with the tile. Where the prompt range is this one tile
    (pi0.5), the row max is final: it also writes the tile's A' from S in registers (otherwise
    _store_a_rest does, after the last tile)."""
    rp = 1.0 / tl.sqrt(ssp / D + 1e-6)
    rt = 1.0 / tl.sqrt(sst / D + 1e-6)
    s = tl.where(vt[None, :], acc * rp[:, None] * rt[None, :], 0.0)
    _store_halves(S, b, N, TS, rows64, rmask, tt, s * (1.0 / (1 << S_SHIFT)))
    # Inductor passes a Python float to a user kernel as fp64: cast back so m stays fp32.
    m = tl.maximum(m, tl.max(tl.where(vt[None, :], (s * scale).to(tl.float32), float("-inf")), 1))
    if t_end <= BLOCK_T:
        _store_a(A, b, N, TS, rows64, rmask, tt, vt, s, scale, m)
    return m


@triton.jit
def _store_a_rest(S, A, b, N, T, TS, rows64, rmask, TMASK, all_valid, t_end, scale, m,
                  HAS_TMASK: tl.constexpr, BLOCK_T: tl.constexpr, S_SHIFT: tl.constexpr):
    """Where the prompt range spans more than one token tile, A' of every tile, from S's halves
    as stored, once the row max ``m`` is final (_store_s writes a single tile's A'). The CTA
    barrier makes the program's S stores visible to the threads that read them here."""
    if t_end > BLOCK_T:
        tl.debug_barrier()
        for t0 in range(0, t_end, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            vt = _valid_tokens(TMASK, b, T, tt, all_valid, HAS_TMASK)
            hi, lo = _load_halves(S, b, N, TS, rows64, rmask, tt)
            _store_a(A, b, N, TS, rows64, rmask, tt, vt, _s_of(hi, lo, S_SHIFT), scale, m)


@triton.jit
def _k_tile(base, ok, k0, d_hi, BLOCK_K: tl.constexpr, CG: tl.constexpr = False):
    """Columns [k0, k0 + BLOCK_K) of the rows at ``base`` (a [rows, 1] pointer tile), zeros on
    rows that are not ``ok`` and past the slice end ``d_hi``; with ``CG``, cached in L2 only.
    (triton 3.6 takes no empty string for the cache modifier.)"""
    kk = k0 + tl.arange(0, BLOCK_K)
    mask = ok[:, None] & (kk < d_hi)[None, :]
    if CG:
        x = tl.load(base + kk[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(base + kk[None, :], mask=mask, other=0.0)
    return x


@triton.jit
def _dot_t(x, y, acc, DOT_NATIVE: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + x y^T."""
    if DOT_NATIVE:
        return tl.dot(x, tl.trans(y), acc)
    return tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), acc, input_precision=DOT_PREC)


@triton.jit
def _ssq_init(rows: tl.constexpr, BLOCK_K: tl.constexpr, SSQ_MMA: tl.constexpr):
    """The zero partial sums of squares of ``rows`` rows that _scores_step adds to: [rows, rows]
    Gram matrices with SSQ_MMA, else [rows, BLOCK_K / 8] per-thread groups."""
    return tl.zeros([rows, rows if SSQ_MMA else BLOCK_K // 8], tl.float32)


@triton.jit
def _ssq_total(x, SSQ_MMA: tl.constexpr):
    """The row sums of squares [rows] out of _scores_step's partials ``x``: a Gram matrix's
    diagonal (SSQ_MMA), else the sum of the groups."""
    if SSQ_MMA:
        i = tl.arange(0, x.shape[0])
        return tl.sum(tl.where(i[:, None] == i[None, :], x, 0.0), 1)
    return tl.sum(x, 1)


@triton.jit
def _scores_step(p, q, ps, qs, acc, ssp, sst, DOT_NATIVE: tl.constexpr, DOT_PREC: tl.constexpr,
                 SSQ_MMA: tl.constexpr):
    """One D step of the scores kernel: the dot products of the patch and prompt tiles ``p`` and
    ``q`` added to ``acc``, and their sums of squares to ``ssp``/``sst`` (_ssq_init).

    SSQ_MMA: as the Gram matrices p p^T and q q^T, whose diagonals are the sums (_ssq_total), on
    the tensor cores beside the product. In the loop without PREFETCH (_Cfg sets none with it) the
    tiles are then operands of MMAs only, never read into registers, so triton's pipeline at 2+
    stages gives them a buffer per stage (the race of PERF_LOG v58 needs a tile read both ways)
    and every load of the step is an asynchronous copy (with SSQ_LOADS the sums' own loads wait
    out an L2 round trip each step; sm_90 TTGIR). The tensor cores do 3x the product's work,
    which the memory-bound 64-row tiles leave idle.

    Else from ``ps`` and ``qs`` (``p`` and ``q`` themselves, or the same tiles loaded again, see
    SSQ_LOADS), into partial sums of shape [rows, G], G = BLOCK_K / 8: a row's 8 consecutive
    elements of a thread's load are one group, so each thread adds its own elements and no step
    shuffles across lanes (per-step row sums took 64 shuffles a step, PERF_LOG v65). The reshape
    keeps every element's place (no ``can_reorder``: with it, triton reinterprets the thread's
    registers under another layout, and the groups mix rows; GPU run 13, PERF_LOG v71)."""
    if SSQ_MMA:
        ssp = _dot_t(p, p, ssp, DOT_NATIVE, DOT_PREC)
        sst = _dot_t(q, q, sst, DOT_NATIVE, DOT_PREC)
    else:
        G: tl.constexpr = ssp.shape[1]
        xp = ps.to(tl.float32)
        xq = qs.to(tl.float32)
        ssp += tl.sum(tl.reshape(xp * xp, [xp.shape[0], G, xp.shape[1] // G]), 2)
        sst += tl.sum(tl.reshape(xq * xq, [xq.shape[0], G, xq.shape[1] // G]), 2)
    return _dot_t(p, q, acc, DOT_NATIVE, DOT_PREC), ssp, sst


@triton.jit
def _scores_kernel(
    P, TK, TMASK, WS,
    N, T, TS, D, kchunk, scale,
    KSPLIT: tl.constexpr, HAS_TMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_TALL: tl.constexpr, DOT_NATIVE: tl.constexpr, DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr,
    SSQ_LOADS: tl.constexpr, SSQ_MMA: tl.constexpr, S_SHIFT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    ks = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_tiles = tl.num_programs(0)
    B = tl.num_programs(2)
    S, A, SP, SSP, SST, ARRIVED = _f32_scratch(WS, B, N, TS, KSPLIT, n_tiles)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    p_base = P + b * N * D + rows64[:, None] * D
    d_lo = ks * kchunk
    d_hi = tl.minimum(d_lo + kchunk, D)
    part = ks.to(tl.int64) * B + b  # this program's slice of sample b
    if PREFETCH:
        # The first D steps' patch tiles do not depend on the prompt range: they load before the
        # range's reductions, and serve the first steps of every token tile.
        p_first = _k_tile(p_base, rmask, d_lo, d_hi, BLOCK_K)
        if PREFETCH == 2:
            p_second = _k_tile(p_base, rmask, d_lo + BLOCK_K, d_hi, BLOCK_K)
    t_end, all_valid = _prompt_extent(TMASK, b, T, HAS_TMASK, BLOCK_TALL)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # One tile of prompt tokens covers pi0.5 (valid tokens are a prefix): one pass over patches.
    for t0 in range(0, t_end, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        vt = _valid_tokens(TMASK, b, T, tt, all_valid, HAS_TMASK)
        tin = tt < TS  # the scratch rows, padding included (zeros: masked prompt rows load as 0)
        t_base = TK + b * T * D + tt.to(tl.int64)[:, None] * D
        acc = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        ssp = _ssq_init(BLOCK_M, BLOCK_K, SSQ_MMA)
        sst = _ssq_init(BLOCK_T, BLOCK_K, SSQ_MMA)
        if PREFETCH:
            # Each D step's tiles load PREFETCH steps ahead (zeros past the slice), so that their
            # round trip overlaps the arithmetic of the steps before. At 1 stage (the default: run
            # 4's sweep measured triton's own 2-4 stage pipelining slower here) nothing else
            # overlaps them.
            # The tiles in flight are (p, q) for this step and, two steps ahead, (p1, q1) next.
            p = p_first
            q = _k_tile(t_base, vt, d_lo, d_hi, BLOCK_K)
            if PREFETCH == 2:
                p1 = p_second
                q1 = _k_tile(t_base, vt, d_lo + BLOCK_K, d_hi, BLOCK_K)
            for k0 in range(d_lo, d_hi, BLOCK_K):
                p_ahead = _k_tile(p_base, rmask, k0 + PREFETCH * BLOCK_K, d_hi, BLOCK_K)
                q_ahead = _k_tile(t_base, vt, k0 + PREFETCH * BLOCK_K, d_hi, BLOCK_K)
                acc, ssp, sst = _scores_step(p, q, p, q, acc, ssp, sst, DOT_NATIVE, DOT_PREC, SSQ_MMA)
                if PREFETCH == 2:
                    p, q, p1, q1 = p1, q1, p_ahead, q_ahead
                else:
                    p, q = p_ahead, q_ahead
        else:
            for k0 in range(d_lo, d_hi, BLOCK_K):
                p = _k_tile(p_base, rmask, k0, d_hi, BLOCK_K)
                q = _k_tile(t_base, vt, k0, d_hi, BLOCK_K)
                if SSQ_LOADS:
                    # The sums of squares from loads of their own (another cache policy, so they
                    # are not merged with the operands'): at 2+ stages, an operand tile that is
                    # also read into registers gets one shared-memory buffer too few in triton's
                    # pipeline (3.7.1's sm_90 TTGIR; the race was seen with 3.6 on an H200), and
                    # the next tiles' copies overwrite the buffer the asynchronous warpgroup MMA
                    # still reads (PERF_LOG v58).
                    ps = _k_tile(p_base, rmask, k0, d_hi, BLOCK_K, True)
                    qs = _k_tile(t_base, vt, k0, d_hi, BLOCK_K, True)
                    acc, ssp, sst = _scores_step(p, q, ps, qs, acc, ssp, sst, DOT_NATIVE, DOT_PREC, SSQ_MMA)
                else:
                    acc, ssp, sst = _scores_step(p, q, p, q, acc, ssp, sst, DOT_NATIVE, DOT_PREC, SSQ_MMA)
        ssp = _ssq_total(ssp, SSQ_MMA)
        sst = _ssq_total(sst, SSQ_MMA)
        if KSPLIT == 1:
            m = _store_s(S, A, b, N, TS, D, rows64, rmask, tt, vt, acc, ssp, sst, scale, m, t_end, BLOCK_T, S_SHIFT)
        else:
            tl.store(SP + part * N * TS + rows64[:, None] * TS + tt[None, :], acc, mask=rmask[:, None] & tin[None, :])
            tl.store(SST + (part * n_tiles + pid_m) * TS + tt, sst, mask=tin)
            if t0 == 0:
                tl.store(SSP + part * N + rows64, ssp, mask=rmask)
    # Pointers computed where they are used: kernel arguments sit in constant memory, computed
    # pointers in registers, which the loop above needs.
    KEYS, ORDER, COUNTER, KMAX = _i32_scratch(WS, B, N)
    if KSPLIT == 1:
        _store_a_rest(S, A, b, N, T, TS, rows64, rmask, TMASK, all_valid, t_end, scale, m, HAS_TMASK, BLOCK_T, S_SHIFT)
    else:
        # The last slice of this row tile to arrive adds the slices in order (the same memory
        # order as the select kernel's finishing step: CTA barrier, an acq_rel gpu-scope
        # arrival; the partials are then read from L2, never a stale L1 line).
        tl.debug_barrier()
        if _arrive_tagged(ARRIVED + (b * n_tiles + pid_m) * 2, KSPLIT):
            for t0 in range(0, t_end, BLOCK_T):
                tt = t0 + tl.arange(0, BLOCK_T)
                vt = _valid_tokens(TMASK, b, T, tt, all_valid, HAS_TMASK)
                tin = tt < TS
                acc = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
                sst = tl.zeros([BLOCK_T], tl.float32)
                # The patch sums load beside the partials, again per token tile (pi0.5 has one):
                # summed before this loop, their adds waited an L2 round trip ahead of every
                # partial's load (sm_90 SASS).
                ssp = tl.zeros([BLOCK_M], tl.float32)
                for k in tl.static_range(KSPLIT):
                    kp = k * B + b
                    acc += tl.load(SP + kp * N * TS + rows64[:, None] * TS + tt[None, :],
                                   mask=rmask[:, None] & tin[None, :], other=0.0, cache_modifier=".cg")
                    sst += tl.load(SST + (kp * n_tiles + pid_m) * TS + tt, mask=tin, other=0.0, cache_modifier=".cg")
                    ssp += tl.load(SSP + kp * N + rows64, mask=rmask, other=0.0, cache_modifier=".cg")
                m = _store_s(S, A, b, N, TS, D, rows64, rmask, tt, vt, acc, ssp, sst, scale, m, t_end, BLOCK_T,
                             S_SHIFT)
            _store_a_rest(S, A, b, N, T, TS, rows64, rmask, TMASK, all_valid, t_end, scale, m, HAS_TMASK, BLOCK_T,
                          S_SHIFT)

    # This call's merge state: keys below every real score, zero vote counts and counters.
    if ks == 0:
        key_init = tl.full([BLOCK_M], -2147483648, tl.int64) << 32
        tl.store(KEYS + b * N + rows64, key_init, mask=rmask)
        tl.store(ORDER + b * N + rows64, tl.zeros([BLOCK_M], tl.int32), mask=rmask)  # vote counts
        if pid_m == 0:
            tl.store(COUNTER + b, 0)
            if b == 0:
                tl.store(KMAX, 0)


# --------------------------------------------------------------------------- kernel 2


# The column of a row with no allowed column yet (above every column index).
NO_COLUMN: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def _row_key(best_s, best_c):
    """The int64 merge key of a row's best (score, column) (_merge_best): a larger key is a
    higher score, or the same score at a lower column; -0.0 and +0.0 are one score. A row with no
    allowed column (NO_COLUMN) gets the keys' initial minimum, so its atomic_max changes nothing."""
    bits = tl.where(best_s == 0.0, 0.0, best_s).to(tl.int32, bitcast=True)
    rank = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the score; -inf: -2^31 + 2^23 - 1
    key = (rank.to(tl.int64) << 32) - 1 - best_c.to(tl.int64)
    return tl.where(best_c == NO_COLUMN, tl.full(key.shape, -2147483648, tl.int64) << 32, key)


@triton.jit
def _cat_k(x, y):
    """``[x | y]``: two [M, K] tiles side by side along K."""
    return tl.reshape(tl.permute(tl.join(x, y), (0, 2, 1)), (x.shape[0], 2 * x.shape[1]))


@triton.jit
def _a_operand(hi, lo, SEL_PREC: tl.constexpr):
    """The product's operands for A' (see _tile_product) from its fp16 halves as kernel 1 stores
    them (_store_a): the halves (hi, lo); for "f16x4" the halves side by side,
    ``[hi | lo | hi | lo]``, as both; otherwise A' in fp32 as both."""
    if SEL_PREC != "f16x3" and SEL_PREC != "f16x4":
        hi = hi.to(tl.float32) + lo.to(tl.float32)
        lo = hi
    if SEL_PREC == "f16x4":
        hi = _cat_k(_cat_k(hi, lo), _cat_k(hi, lo))
        lo = hi
    return hi, lo


@triton.jit
def _tile_product(a_hi, a_lo, s_hi, s_lo, acc, SEL_PREC: tl.constexpr, S_SHIFT: tl.constexpr):
    """``acc + A' S_j^T`` of one column tile, A' given by _a_operand and S_j by its fp16 halves
    (_load_halves). "f16x3": three fp16 tensor-core products of the halves (small terms first; the
    dropped lo x lo is ~2^-22 of a term), as close to fp32 as "tf32x3" at half its tensor-core
    work. A' is in [0, 1] and |S| <= D (RMS-normalised rows): S times 2^-S_SHIFT (exact; it scales
    every score of the row alike) stays within 32768, so its halves fit fp16 (largest 65504) at
    every D; kernel 1 stores them so (_store_s), once per S element rather than once per row tile
    that reads it. "f16x4": the four products of the halves, lo x lo included, as one product
    over the halves side by side (4x the tokens): one warpgroup MMA to wait for instead of
    three. Otherwise S_j in fp32 from its halves, at that tl.dot precision."""
    if SEL_PREC == "f16x3":
        acc = tl.dot(a_hi, tl.trans(s_lo), acc)
        acc = tl.dot(a_lo, tl.trans(s_hi), acc)
        acc = tl.dot(a_hi, tl.trans(s_hi), acc)
    elif SEL_PREC == "f16x4":
        # [hi | lo | hi | lo] . [s_lo | s_hi | s_hi | s_lo]: all four products of the halves.
        acc = tl.dot(a_hi, tl.trans(_cat_k(_cat_k(s_lo, s_hi), _cat_k(s_hi, s_lo))), acc)
    else:
        acc = tl.dot(a_hi, tl.trans(_s_of(s_hi, s_lo, S_SHIFT)), acc, input_precision=SEL_PREC)
    return acc


@triton.jit
def _pm_tile(cols, PMASK, b, N, HAS_PMASK: tl.constexpr):
    """The patch mask at columns ``cols`` (False past N), as loaded: _allowed reads it."""
    if HAS_PMASK:
        return tl.load(PMASK + b * N + cols, mask=cols < N, other=0)
    return tl.zeros(cols.shape, tl.int1)


@triton.jit
def _allowed(cols, pm, no_patch, N, HAS_PMASK: tl.constexpr):
    """The columns a row may pick: all; or the valid patches (``pm``: _pm_tile); or column 0
    alone when none is valid."""
    allowed = cols < N
    if HAS_PMASK:
        allowed = allowed & ((pm != 0) | ((cols == 0) & no_patch))
    return allowed


@triton.jit
def _merge_best(best_s, best_c, acc, cols, allowed):
    """The rows' best (score, column) so far, with the scores ``acc`` of the column tile at
    ``cols``: the tile's row maxima over its allowed columns, then the lowest allowed column
    that reaches each (two plain reductions, fp32 then int32; an argmax over an int32 rank of
    every score took about twice the instructions, sm_90 SASS, PERF_LOG v64). A NaN score counts
    as -inf, so it never beats a number; on a tie with -inf the lower column wins. A program
    visits its column tiles in increasing order, so a tie keeps the earlier, lower column; a row
    takes the first tile with an allowed column whatever its score."""
    s = tl.where(allowed[None, :] & (acc == acc), acc, float("-inf"))
    tile_s = tl.max(s, 1)
    cand = tl.where(allowed, cols, NO_COLUMN)
    tile_c = tl.min(tl.where(s == tile_s[:, None], cand[None, :], NO_COLUMN), 1)
    better = (tile_s > best_s) | ((best_c == NO_COLUMN) & (tile_c != NO_COLUMN))
    return tl.where(better, tile_s, best_s), tl.where(better, tile_c, best_c)


@triton.jit
def _select_kernel(
    WS, TMASK, PMASK, COUNTS, IDX,
    N, T, TS, limit, n_split, n_programs,
    HAS_TMASK: tl.constexpr, HAS_PMASK: tl.constexpr, MASK_VOTERS: tl.constexpr,
    SELECT_ONLY: tl.constexpr, BUDGET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_TALL: tl.constexpr, BLOCK_NALL: tl.constexpr, SEARCH_ITERS: tl.constexpr,
    SEL_PREC: tl.constexpr, S_SHIFT: tl.constexpr, A_ONCE: tl.constexpr, S_AHEAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    B = tl.num_programs(1)
    S, A, SP, SSP, SST, ARRIVED = _f32_scratch(WS, B, N, TS, 1, 1)  # no partials here
    row_tile = pid // n_split
    split = pid % n_split
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    # What does not depend on the prompt range loads first, so that its round trip overlaps the
    # range's reductions: the patch mask, and for the one-tile branch below the rows' first
    # token tile of A' and the split's first column tile of S.
    if HAS_PMASK:
        offs = tl.arange(0, BLOCK_NALL)
        pm_all = tl.load(PMASK + b * N + offs, mask=offs < N, other=0) != 0
    if A_ONCE and HAS_TMASK:
        ai_hi, ai_lo = _load_halves(A, b, N, TS, rows64, rmask, tl.arange(0, BLOCK_T))
        cols_first = split * BLOCK_N + tl.arange(0, BLOCK_N)
        if S_AHEAD:
            sj_hi, sj_lo = _load_halves(S, b, N, TS, cols_first, cols_first < N, tl.arange(0, BLOCK_T))
    t_end = _prompt_extent(TMASK, b, T, HAS_TMASK, BLOCK_TALL)[0]

    no_patch = False
    if HAS_PMASK:
        no_patch = tl.sum(pm_all.to(tl.int32), 0) == 0

    best_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_c = tl.full([BLOCK_M], NO_COLUMN, tl.int32)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    if A_ONCE and HAS_TMASK and t_end <= BLOCK_T:
        # One token tile (pi0.5: 48 valid tokens): A' once, for every column tile of the split.
        # (Only with a prompt mask: without one, the compiler's register budget for this branch
        # made the unmasked kernel spill, and pi0.5 always passes a mask.)
        tt = tl.arange(0, BLOCK_T)
        a_hi, a_lo = _a_operand(ai_hi, ai_lo, SEL_PREC)
        pm = _pm_tile(cols_first, PMASK, b, N, HAS_PMASK)
        for ct in range(split, n_col_tiles, n_split):
            cols = ct * BLOCK_N + tl.arange(0, BLOCK_N)
            # The next column tile of the split and its patch mask load before this one's
            # product and merge (zeros past the last), so their L2 round trips overlap them. (The
            # mask loaded in its own iteration, the product waited for it: sm_90 SASS at B=64,
            # where run 11's ncu put 6.6 % of the kernel's warp samples on that wait.)
            cols_next = cols + n_split * BLOCK_N
            pm_next = _pm_tile(cols_next, PMASK, b, N, HAS_PMASK)
            if S_AHEAD:
                s_hi, s_lo = sj_hi, sj_lo
                sj_hi, sj_lo = _load_halves(S, b, N, TS, cols_next, cols_next < N, tt)
            else:
                # The tile loaded where it is multiplied: an MMA operand only, which triton's
                # pipeline at 2+ stages copies ahead into shared memory itself (cp.async), with no
                # registers held for it and no store of them to shared memory.
                s_hi, s_lo = _load_halves(S, b, N, TS, cols, cols < N, tt)
            acc = _tile_product(a_hi, a_lo, s_hi, s_lo, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), SEL_PREC, S_SHIFT)
            best_s, best_c = _merge_best(best_s, best_c, acc, cols, _allowed(cols, pm, no_patch, N, HAS_PMASK))
            pm = pm_next
    else:
        for ct in range(split, n_col_tiles, n_split):
            cols = ct * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < N
            allowed = _allowed(cols, _pm_tile(cols, PMASK, b, N, HAS_PMASK), no_patch, N, HAS_PMASK)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for t0 in range(0, t_end, BLOCK_T):
                tt = t0 + tl.arange(0, BLOCK_T)
                ai_hi, ai_lo = _load_halves(A, b, N, TS, rows64, rmask, tt)
                a_hi, a_lo = _a_operand(ai_hi, ai_lo, SEL_PREC)
                sj_hi, sj_lo = _load_halves(S, b, N, TS, cols, cmask, tt)
                acc = _tile_product(a_hi, a_lo, sj_hi, sj_lo, acc, SEL_PREC, S_SHIFT)
            best_s, best_c = _merge_best(best_s, best_c, acc, cols, allowed)
    KEYS, ORDER, COUNTER, KMAX = _i32_scratch(WS, B, N)  # computed after the loop
    # Relaxed: triton's default (acq_rel) puts a MEMBAR.ALL.GPU before the atomic and a CCTL.IVALL
    # after it (sm_90 SASS); the arrival below already orders the merges.
    tl.atomic_max(KEYS + b * N + rows64, _row_key(best_s, best_c), mask=rmask, sem="relaxed", scope="gpu")

    # Last program of this sample to arrive finishes it (every key of the sample is final).
    # Memory order: the CTA barrier puts every thread's key merge before the arrival, which is
    # one acq_rel gpu-scope atomic (release of this program's merges; in the last program, the
    # acquire of everyone's), the pattern of kernel 1's finishing step and of the CUDA backend.
    # The finishing step then reads the keys from L2 (.cg: never a stale L1 line), all of a
    # thread's loads in flight at once; as acq_rel atomics (until v44) they were one fenced L2
    # round trip after another. Keys and counters are reset by kernel 1 of the same call (stream
    # order: no race, also under CUDA-graph replay).
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNTER + b, 1, sem="acq_rel", scope="gpu")
    if arrived == n_programs - 1:
        offs = tl.arange(0, BLOCK_NALL)
        inb = offs < N
        offs64 = offs.to(tl.int64)
        key = tl.load(KEYS + b * N + offs64, mask=inb, other=0, cache_modifier=".cg")
        low = key - ((key >> 32) << 32)
        two32 = tl.full([BLOCK_NALL], 1, tl.int64) << 32
        # Clamped: every row has an allowed column (column 0 at worst), so the key is never the
        # initial minimum; the clamp only keeps a broken key's index (and vote) in range.
        idx = tl.where(inb, tl.minimum(two32 - 1 - low, N - 1), 0)
        voter = inb
        valid = inb
        if HAS_PMASK:
            pm_all = tl.load(PMASK + b * N + offs64, mask=inb, other=0) != 0
            valid = inb & pm_all
            if MASK_VOTERS:
                voter = valid
        if SELECT_ONLY:
            tl.store(IDX + b * N + offs64, tl.where(voter, idx, -1), mask=inb)
        else:
            # The votes are counted in the order region (zeroed by kernel 1; the kept list
            # overwrites it below): relaxed adds, the CTA barrier, which makes every thread's
            # adds visible to the block, and volatile (L2) reads. tl.histogram counted them in
            # the program with ballots (v22), about 1200 sm_90 instructions per warp at
            # BLOCK_NALL = 1024 on the kernel's serial tail: run 10's ncu had the busiest SM of
            # the pi05 B=1 call active 15.6 k cycles longer than the idlest.
            votes_at = ORDER + b * N
            tl.atomic_add(votes_at + idx, 1, mask=voter, sem="relaxed", scope="gpu")
            tl.debug_barrier()
            votes = tl.load(votes_at + offs64, mask=inb, other=0, volatile=True)
            tl.debug_barrier()  # every count is read before the kept list overwrites the region
            if BUDGET:
                elig = valid
            else:
                elig = valid & (votes > 0)
            elig_i = elig.to(tl.int32)
            n_elig = tl.sum(elig_i, 0)
            keep = elig_i
            if n_elig > limit:
                # Largest vote threshold v with #{eligible, votes >= v} >= limit.
                lo = tl.sum(tl.zeros([BLOCK_NALL], tl.int32), 0)
                hi = lo + N
                for _ in range(SEARCH_ITERS):
                    mid = (lo + hi + 1) // 2
                    c = tl.sum((elig & (votes >= mid)).to(tl.int32), 0)
                    ok = c >= limit
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid - 1)
                gt = elig & (votes > lo)
                n_gt = tl.sum(gt.to(tl.int32), 0)
                eq = (elig & (votes == lo)).to(tl.int32)
                rank = tl.cumsum(eq, 0) - eq  # ties: lower index first
                keep = (gt | ((eq != 0) & (rank < limit - n_gt))).to(tl.int32)
            # The search keeps exactly `limit` (n_gt < limit <= n_gt + ties): no second count.
            cnt = tl.minimum(n_elig, limit)
            pos = tl.cumsum(keep, 0) - 1
            tl.store(ORDER + b * N + pos.to(tl.int64), offs, mask=keep != 0)
            tl.store(COUNTS + b, cnt.to(tl.int64))
            tl.atomic_max(KMAX, cnt, sem="relaxed", scope="gpu")  # read after the kernel


# --------------------------------------------------------------------------- kernel 3


# K never specialises (1 as a constant, divisibility by 16): one compiled kernel for every kept
# count, so that prune's launch plan (csrc/triton_plan.h) replays it with the K read on the host.
@triton.jit(do_not_specialize=["K"])
def _gather_kernel(
    P, WS, COUNTS, OUT, KMASK, KIDX,
    N, D, K,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pr = tl.program_id(0)
    pd = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    KEYS, ORDER, COUNTER, KMAX = _i32_scratch(WS, tl.num_programs(2), N)
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    rin = r < K
    cnt = tl.load(COUNTS + b)
    kept = rin & (r < cnt)
    r64 = r.to(tl.int64)
    # The order entries are loaded beside the count, not masked by it, so the two loads overlap;
    # entries at or past the count are stale and dropped.
    j = tl.load(ORDER + b * N + r64, mask=rin & (r < N), other=0).to(tl.int64)
    j = tl.where(kept, j, 0)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    # A bit-exact row copy: no arithmetic touches the values.
    x = tl.load(P + b * N * D + j[:, None] * D + d[None, :], mask=kept[:, None] & dm[None, :], other=0)
    tl.store(OUT + b * K * D + r64[:, None] * D + d[None, :], x, mask=rin[:, None] & dm[None, :])
    if pd == 0:
        tl.store(KIDX + b * K + r64, j, mask=rin)
        tl.store(KMASK + b * K + r64, kept, mask=rin)


# --------------------------------------------------------------------------- host side


def _identity(kernel):
    return kernel


class _CachedLaunch:
    """``kernel[grid](*args, **kwargs)`` of an eager call that binds through ``JITFunction.run``
    once per specialisation. ``run`` binds and specialises every argument, builds the cache key
    and reads several knobs on every launch: ~10 µs of Python per launch on the CPU machine
    (bench/host_prune.py --fake-driver, launches that run nothing), and about 20 µs per launch
    with the C launcher on the H200 machine's host (run 5's gather row). The first call of a
    specialisation goes through ``run``, which compiles or finds the kernel and launches it;
    later calls launch that compiled kernel as ``run`` does at its end (the body of
    ``CompiledKernel[grid]``, launch hooks included), with the arguments in signature order and
    tensors as their addresses.

    The key is finer than what triton 3.6 and 3.7 specialise arguments on (their
    native_specialize_impl: a tensor's dtype and 16-byte alignment; an int being 1, divisible by
    16, and its width; a float's type): the current device, each tensor's dtype and address
    modulo 16, every other positional argument's value (each launch site passes one type at a
    position), and the constexprs and options. A finer key only sends more first calls through
    ``run``; building it costs half of the exact one (~1.7 against ~3.1 µs per launch here)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = [p.name for p in kernel.params]
        self.compiled = {}

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        # Tensors go to the compiled kernel as their addresses: triton's C launcher takes an int
        # as it is, and for a tensor calls data_ptr() and then cuPointerGetAttribute (a driver
        # query per pointer, 15 per call). The launchers only pass tensors of the patches' GPU.
        flat = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        drv = driver.active
        device = drv.get_current_device()
        key = (device, *[a if a is p else (a.dtype, p & 15) for a, p in zip(args, flat)],  # `a is p`: not a tensor
               *kwargs.items())
        hit = self.compiled.get(key)
        grid3 = grid if len(grid) == 3 else (*grid, 1, 1)[:3]
        if hit is None:
            compiled = self.kernel[grid](*args, **kwargs)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            # With the arguments named at the call (constexprs) in signature order, once.
            hit = self.compiled[key] = (compiled, tuple(kwargs[n] for n in self.names[len(args):]))
        else:
            # What CompiledKernel[grid](*args) runs (triton 3.6 and 3.7), without building its
            # closure or reading the device again.
            compiled, named = hit
            stream = drv.get_current_stream(device)
            runtime = knobs.runtime
            compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(grid3, stream, *flat, *named), runtime.launch_enter_hook,
                         runtime.launch_exit_hook, *flat, *named)
        rec = _recorder.current
        if rec is not None:
            rec.launches.append((hit[0], grid3, flat, hit[1], self.names))


class _Recording:
    """What one eager call allocated and launched, in order (see ``recording``)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []  # torch.empty'd by the call
        # (compiled kernel, grid, positional args, constexprs, parameter names)
        self.launches: list[tuple] = []
        # prune's host read of K: (buffer, byte offset, launches and buffers before it)
        self.k_read: Optional[tuple[torch.Tensor, int, int, int]] = None
        self.k_dims: dict[int, int] = {}  # buffer index -> its K dimension
        self.k_grid: dict[int, tuple[int, int]] = {}  # launch index -> (grid axis of ceil(K / b), b)
        self.uncached = False  # some launch went around the cache (traced, interpreted, wrapped)


class _Recorder(threading.local):
    current: Optional[_Recording] = None  # per thread: another thread's calls are not this one's


_recorder = _Recorder()


@contextlib.contextmanager
def recording():
    """Records this thread's eager allocations and cached launches inside, for
    ``plan_of``."""
    saved, _recorder.current = _recorder.current, _Recording()
    try:
        yield _recorder.current
    finally:
        _recorder.current = saved


def _empty(shape, dtype: torch.dtype, device: torch.device, k_dim: Optional[int] = None) -> torch.Tensor:
    """torch.empty; ``k_dim``: the dimension that is the kept-row count K."""
    t = torch.empty(shape, dtype=dtype, device=device)
    rec = _recorder.current
    if rec is not None:
        if k_dim is not None:
            rec.k_dims[len(rec.buffers)] = k_dim
        rec.buffers.append(t)
    return t


def _read_k(ws: torch.Tensor, at: int) -> int:
    """prune's one host sync: K = max(1, the int32 at element ``at`` of the scratch)."""
    rec = _recorder.current
    if rec is not None:
        rec.k_read = (ws, 4 * at, len(rec.launches), len(rec.buffers))
    return max(1, int(ws[at].view(torch.int32).item()))


def _k_grid(axis: int, block: int) -> None:
    """The next launch's grid has ceil(K / block) programs along ``axis``."""
    rec = _recorder.current
    if rec is not None:
        rec.k_grid[len(rec.launches)] = (axis, block)


# c10::ScalarType codes of the buffers' dtypes (csrc/triton_plan.h reads them).
_SCALAR_TYPE = {torch.int32: 3, torch.int64: 4, torch.float16: 5, torch.float32: 6, torch.bool: 11,
                torch.bfloat16: 15}
# The launch ABI of triton's CUDA launcher that plans replay (triton 3.6 and 3.7 alike): every
# argument that is not a constexpr, in signature order, then the global and the profile scratch
# pointers (null for kernels that need none).
PLAN_TRITON_VERSIONS = ("3.6.", "3.7.")


def plan_of(rec: _Recording, inputs, outputs) -> Optional[list[int]]:
    """The launch plan (csrc/triton_plan.h) of one recorded eager call on ``inputs``
    ``(patches, task, task_mask, patch_mask)`` that returned ``outputs``, or None where a replay
    could not repeat the call: launches that did not all go through the cache, a kernel that
    needs triton's scratch, clusters, cooperative or dependent launches or launch hooks, a
    pointer into memory the call did not allocate (a copied input), another triton's ABI, or
    a launch-parameter sweep (``tuning``) in force."""
    if _tuning or not triton.__version__.startswith(PLAN_TRITON_VERSIONS) or rec.uncached or not rec.launches:
        return None
    if any(getattr(hook, "calls", hook) for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)):
        return None  # a replay calls no hooks (triton 3.6/3.7 keep them in HookChains, empty by default)
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), kind, i)
             for kind, ts in ((0, inputs), (1, rec.buffers)) for i, t in enumerate(ts) if t is not None]

    def where(ptr: int):
        return next(([kind, i, ptr - lo] for lo, hi, kind, i in spans if lo <= ptr < hi), None)

    def buffer_index(t: torch.Tensor) -> Optional[int]:
        return next((i for i, b in enumerate(rec.buffers) if b is t), None)

    k_launch, k_buffer, k_offset, k_buffers = -1, 0, 0, len(rec.buffers)
    if rec.k_read is not None:
        holder, k_offset, k_launch, k_buffers = rec.k_read
        k_buffer = buffer_index(holder)
        if k_buffer is None:
            return None
    plan = [2, len(rec.buffers), len(rec.launches), len(outputs), k_launch, k_buffer, k_offset]
    for i, t in enumerate(rec.buffers):
        if t.dtype not in _SCALAR_TYPE:
            return None
        sizes = list(t.shape)
        if i >= k_buffers:  # allocated after the read: sized by K
            if i not in rec.k_dims:
                return None
            sizes[rec.k_dims[i]] = -1
        plan += [_SCALAR_TYPE[t.dtype], t.dim(), *sizes]
    for n, (compiled, grid, flat, named, names) in enumerate(rec.launches):
        md = compiled.metadata
        if (md.num_ctas != 1 or md.launch_cooperative_grid or md.launch_pdl or md.global_scratch_size
                or md.profile_scratch_size):
            return None
        after_k = k_launch >= 0 and n >= k_launch
        grid = list(grid)
        if after_k and n in rec.k_grid:
            axis, block = rec.k_grid[n]
            grid[axis] = -block
        params = []
        for name, ty, value in zip(names, compiled.src.signature.values(), (*flat, *named)):
            if ty == "constexpr":
                continue
            if ty.startswith("*"):
                at = where(value)
            elif after_k and name == "K" and ty == "i32":
                at = [6, 0, 0]
            elif ty == "i32":
                at = [2, value, 0]
            elif ty == "i64":
                at = [3, value, 0]
            elif ty == "fp32":
                at = [4, int.from_bytes(struct.pack("<f", value), "little", signed=True), 0]
            else:
                at = None
            if at is None:
                return None
            params += at
        params += [5, 0, 0, 5, 0, 0]  # global and profile scratch
        plan += [compiled.function, *grid, 32 * md.num_warps, md.shared, len(params) // 3, *params]
    for t in outputs:
        i = buffer_index(t)
        if i is None:
            return None
        plan.append(i)
    return plan


def _on_patches_device(launcher):
    """``launcher`` run on the CUDA device of its ``patches`` (triton launches on the current
    device), as the CUDA C++ backend's CUDAGuard does."""

    @functools.wraps(launcher)
    def run(patches, *args, **kwargs):
        if patches.is_cuda and patches.device.index != torch.cuda.current_device():
            with torch.cuda.device(patches.device):
                return launcher(patches, *args, **kwargs)
        return launcher(patches, *args, **kwargs)

    return run


def _launcher(wrap: Callable, kernel):
    """``wrap(kernel)``; for an eager launch on a GPU (``wrap`` leaves the kernel as it is), the
    kernel's _CachedLaunch."""
    launcher = wrap(kernel)
    if launcher is kernel and not INTERPRET:
        return _CACHED[kernel.fn]
    rec = _recorder.current
    if rec is not None:
        rec.uncached = True  # a launch the recording cannot see
    return launcher


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # interpreter: a few column splits so the merge is exercised


MAX_KSPLIT = 16  # D slices of the scores kernel at most (_Cfg)

# Launch parameters that bench/tune_triton.py sweeps on a GPU (see tuning()).
TUNABLE = ("bm1", "bk", "ksplit", "warps1", "stages1", "prefetch1", "ssq_loads", "ssq_mma", "maxnreg1", "bm2",
           "bn2", "warps2", "stages2", "maxnreg2", "n_split", "a_once", "s_ahead", "br", "bd", "warps3", "dot_prec",
           "sel_prec")
FLAGS = ("a_once", "s_ahead", "ssq_loads", "ssq_mma")  # 0 or 1
# fp32 dot precisions within SPEC's tolerance: exact FMA, or 3 tf32 tensor-core products
# (plain "tf32" rounds inputs to 10 bits, which can miss SPEC's 1e-3 score margin).
DOT_PRECS = ("ieee", "tf32x3")
# The select kernel's A' S^T product: those, or fp16 products of fp16 halves (_tile_product):
# three, each waited for in turn, or all four as one (f16x4, for the sweep).
SEL_PRECS = ("f16x3", "f16x4") + DOT_PRECS
# The tunable parameters with a fixed set of values (the precisions are strings); the others are
# positive ints.
PRECISIONS = {"dot_prec": DOT_PRECS, "sel_prec": SEL_PRECS}
# prefetch1: the scores kernel's D-step tiles loaded 0, 1 or 2 steps ahead; maxnreg1/2: a
# register cap, 0 for none (ptxas allocates up to 255 per thread).
CHOICES = {**PRECISIONS, **{flag: (0, 1) for flag in FLAGS}, "prefetch1": (0, 1, 2),
           **{cap: range(256) for cap in ("maxnreg1", "maxnreg2")}}
_tuning: tuple = ()  # (name, value) pairs over the defaults of _Cfg, set by tuning()


@contextlib.contextmanager
def tuning(**overrides: int | str):
    """Launch parameters (``TUNABLE``) of every call inside, over the defaults of ``_Cfg``, for
    the GPU sweep of bench/tune_triton.py. None changes a formula; ``bk`` and ``ksplit`` change
    the order in which D is summed, so the float rounding of S."""
    global _tuning
    unknown = sorted(set(overrides) - set(TUNABLE))
    if unknown:
        raise ValueError(f"tuning: unknown launch parameter(s) {unknown}; tunable: {TUNABLE}")
    bad = {k: v for k, v in overrides.items()
           if not (v in CHOICES[k] if k in CHOICES else isinstance(v, int) and v >= 1)}
    if bad:
        raise ValueError(f"tuning: launch parameters must be positive ints ({', '.join(FLAGS)}: 0 or 1; prefetch1: "
                         f"0, 1 or 2; maxnreg1, maxnreg2: 0 (no cap) to 255; dot_prec "
                         f"one of {DOT_PRECS}; sel_prec one of {SEL_PRECS}), got {bad}")
    saved = _tuning
    merged = {**dict(saved), **overrides}
    if merged.get("ssq_loads") and merged.get("ssq_mma"):
        raise ValueError("tuning: ssq_loads and ssq_mma are two sources of the same sums of squares; set one")
    _tuning = tuple(sorted(merged.items()))
    # Launch plans replay what a call launched with the parameters of their recording.
    _clear_plans()
    try:
        yield
    finally:
        _tuning = saved
        _clear_plans()


def _clear_plans() -> None:
    if hasattr(torch.ops.fastprune, "_triton_plans_clear"):  # the op library is loaded
        torch.ops.fastprune._triton_plans_clear()


class _Cfg:
    """Launch parameters of one call (block sizes, warps, stages, column split), from plain ints:
    ``on_gpu`` builds GPU tiles, ``want`` is the number of programs that fills the GPU."""

    def __init__(self, B: int, N: int, D: int, T: int, elem_size: int, on_gpu: bool, want: int, tuned: tuple):
        self.dot_native = on_gpu and elem_size == 2
        self.block_tall = max(16, triton.next_power_of_2(T))
        self.block_nall = max(16, triton.next_power_of_2(N))
        self.search_iters = (N + 1).bit_length() + 1
        if on_gpu:
            # 16-bit inputs: 64-row score tiles wherever they still make a quarter wave of
            # programs. A program loads the prompt tile at every D step whatever its row count, so
            # 16 or 32 rows load it 4 or 2 times as often per patch row, and 64 rows run the
            # warpgroup MMA (sm_90 HGMMA) instead of mma.sync. Run 4's sweep (H200, bf16): 3.0x
            # faster at B=64, 2.2x at B=8, but 0.5-0.6x at B=1 (12-24 row tiles). HGMMA adds in
            # another order than mma.sync, so S's last bits, and selections between near-ties,
            # differ from 16/32-row tiles. (fp32 inputs at 64 rows spill more on sm_90.)
            if elem_size == 2 and B * triton.cdiv(N, 64) >= want // 4:
                self.bm1 = 64
            else:
                self.bm1 = 16 if B * triton.cdiv(N, 16) <= 4 * want else 32
            self.bt = min(64, max(16, triton.next_power_of_2(T)))
            self.bk = 128 if elem_size == 2 else 64
            # Select tiles of 64 rows x 32 columns at 4 warps: run 8's sweep (H200, bf16, tf32x3
            # dots) timed them 1.77x faster than 64 x 64 at 8 warps at pi05 B=64 (141 vs 250 us),
            # 1.25x at B=1 and 1.09x at N=1536, all on the float64 truth. Half the columns per
            # product halve the accumulator, so 4 warps hold it: 128-190 registers at N=768 and no
            # spills (tests/test_triton_sm90.py); at N=1536 the finishing step's 2048-wide arrays
            # take 255 and spill 12 B in implicit mode (the 1.09x above includes that).
            self.bm2, self.bn2 = 64, 32
            # The scores kernel runs 1 stage. Its 64-row tiles at 3 stages (triton's pipeliner
            # copying the next steps' tiles with cp.async) gave wrong S on an H200 with triton 3.6
            # at two of the four D-step counts measured (bk = 128, pi05 bf16): 16 steps (B=64, D
            # in one slice: 162 selections off the float64 truth, not the same twice; run 7) and 4
            # steps (B=8, 4 slices: 175 off; run 12); 8 and 2 steps were right. The cause is not
            # known, so no step count is trusted. 1 stage was right at every shape measured, and
            # 1.56x (B=1) and 1.36x (B=64) faster than 3 with 16/32-row tiles (run 4); at B=64 with
            # 64 rows it costs 1.4x against the wrong 3-stage kernel (119 vs 85 us, run 7).
            self.warps1, self.warps2, self.stages1, self.stages2 = 4, 4, 1, 1
            self.br = 8
            self.bd = min(512 if elem_size == 2 else 256, triton.next_power_of_2(D))
        else:
            # Interpreter: small tiles so odd sizes cross tile edges in tiny tests.
            self.bm1, self.bt, self.bk = 16, 16, 32
            self.bm2, self.bn2 = 16, 16
            self.warps1, self.warps2, self.stages1, self.stages2 = 4, 4, 1, 1
            self.br, self.bd = 8, 32
        self.warps3 = 4
        # The select kernel keeps A' (one prompt tile) across its column tiles (v7, measured with
        # exact fp32 dots). With tf32x3 dots that branch spilled 284 B on sm_90 until v36; the
        # sweep times a_once=0, which recomputes A' per column tile (PERF_LOG v27).
        self.a_once = 1
        # In that branch each column tile of S loads one tile ahead into registers (1), or where
        # it is multiplied (0), for triton's pipeline to copy ahead at 2+ stages (the sweep's).
        self.s_ahead = 1
        # The scores kernel's sums of squares from the operand tiles' own registers (0), or from
        # loads of their own (1): the candidate fix of the 3-stage race (PERF_LOG v58), for the
        # sweep to time and check against the float64 truth.
        self.ssq_loads = 0
        # Or (1) as the diagonals of Gram matrices on the tensor cores, which leaves the tiles
        # to the MMAs alone (_scores_step; no register prefetch then), for the sweep to time at
        # 2-4 stages.
        self.ssq_mma = 0
        # Register caps per thread (ptx .maxnreg) of the scores and select kernels; 0 leaves the
        # count to ptxas, which a cap of 255 does not (pi05 B=64 with masks, sm_90: scores 214
        # registers at 255, 193 with none). An SM holds 64 K registers, so fewer fit more
        # programs of 4 warps per SM: at pi05 B=64 the scores kernel takes 193 (2 programs), 168
        # fits 3 (40 B spilled, outside its D loop); the select kernel takes 120 (4 programs;
        # sm_90 compile, v71).
        self.maxnreg1 = self.maxnreg2 = 0
        self.dot_prec = DOT_PREC
        # The select product as fp16 halves: as close to fp32 as tf32x3 (PERF_LOG v59) with half
        # the tensor-core work, operand loads and stores to shared memory (sm_90 SASS).
        self.sel_prec = "f16x3"
        # |S| <= D: S scaled by 2^-s_shift stays within 32768 for fp16 (0 up to D = 32768).
        self.s_shift = max(0, (D - 1).bit_length() - 15)
        if on_gpu:
            # Split D so that the score programs fill about one wave: their serial loop over D is
            # what bounds them at B=1. Each keeps 2+ BLOCK_K steps, and there are at most
            # MAX_KSPLIT slices: the finishing step unrolls its loads over the slices, and with
            # few rows and a wide D (6 patches of 66000, fp32: 129 slices) the scores kernel took
            # 80 s to compile on the GPU machine (run 13's test_select_product_scales_wide_rows)
            # and spilled 5188 B (sm_90; 16 slices: 2 s here, no spills).
            row_programs = B * triton.cdiv(N, self.bm1)
            self.ksplit = max(1, min(triton.cdiv(want // 2, row_programs), D // (2 * self.bk), MAX_KSPLIT))
        else:
            self.ksplit = 2  # interpreter: the slices' partials are added in every test
        swept = dict(tuned)
        for name, value in swept.items():
            setattr(self, name, value)
        if "prefetch1" not in swept:
            # The scores kernel loads each D step's tiles ahead, in registers, where its tiles have
            # 16 rows (pi05 at B=1): two steps ahead for 16-bit inputs (bf16: 233 registers, no
            # spills, at most 2 programs per SM there; 188 one step ahead, the default until v66),
            # one for fp32 (two spill 40 B). With 32 or 64 rows one step ahead already spills on
            # sm_90 (264-520 B).
            # Not with ssq_mma, whose point is tiles that only the MMAs read.
            self.prefetch1 = (2 if elem_size == 2 else 1) if self.bm1 == 16 and not self.ssq_mma else 0
        # Slices of whole BLOCK_K steps; the last may be shorter, none is empty.
        self.kchunk = triton.cdiv(triton.cdiv(D, self.ksplit), self.bk) * self.bk
        self.ksplit = triton.cdiv(D, self.kchunk)
        if on_gpu and "maxnreg1" not in swept:
            # 16-bit 64-row score programs at 4 warps take 193 registers (2 per SM, pi05 B=64
            # with masks); where there are more of them than 2 per SM hold, a cap of 168 fits 3
            # and so takes fewer waves (the only spills are pointers kept across the D loop, v71).
            # Run 14's sweep (H200, pi05 bf16): 124.5 -> 101.3 µs at B=64 (768 programs); at B=8
            # (192 programs, one wave either way) 23.6 -> 23.5; at 3 stages it cost (0.80x). Decided
            # on the final launch parameters, the sweep's overrides included.
            programs = B * triton.cdiv(N, self.bm1) * self.ksplit
            # Not with ssq_mma: its two Gram accumulators take ~64 registers more (255 at pi05
            # B=64), and a cap of 168 spills 200-350 B.
            one_stage = self.stages1 == 1 and self.prefetch1 == 0 and not self.ssq_mma
            if self.bm1 == 64 and self.warps1 == 4 and elem_size == 2 and one_stage and programs > want:
                self.maxnreg1 = 168
        self.n_score_tiles = triton.cdiv(N, self.bm1)
        # The scratch's token stride: T rounded up to 16. Triton specialises an int argument
        # divisible by 16, so the kernels know that S rows start 64-byte aligned, and load and
        # store them as 16-byte vectors (pi05 B=64 sm_90: the select kernel has 33 global loads in
        # its SASS instead of 93, and 11 % fewer instructions).
        self.ts = triton.cdiv(T, 16) * 16
        self.n_ws, self.arrived_at, self.kmax_at = _scratch_sizes(B, N, self.ts, self.ksplit, self.n_score_tiles)
        n_row_tiles = triton.cdiv(N, self.bm2)
        n_col_tiles = triton.cdiv(N, self.bn2)
        self.n_row_tiles = n_row_tiles
        if "n_split" not in swept:
            # Column splits so that the select programs fill the GPU in one wave of two 4-warp
            # programs per SM (run 10's sweep, pi05 bf16 on an H200: 42.2 -> 30.1 µs at B=8, 30.3
            # -> 26.0 at N=1536, 12.5 -> 12.3 at B=1, against one program per SM); in the
            # interpreter a few splits, so the merge is exercised. Since v64 the kernel takes
            # 96-120 registers, so 4 programs fit an SM: where that wave leaves a row fewer than 4
            # splits, it gets up to 4 (a wave of 4 per SM). Run 14's sweep: B=8, 2 -> 4 splits,
            # 18.0 -> 14.7 µs (6: 16.0); where the wave of 2 already asks for many, more cost (B=1
            # with 1536 patches, 11 -> 22: 11.0 -> 11.8 µs), as each row's merge takes one key
            # per split.
            rows = max(1, n_row_tiles * B)
            self.n_split = max(1, min(n_col_tiles, max(want // rows, min(2 * want // rows, 4))))
        self.n_split = min(self.n_split, n_col_tiles)


_cfg_cached = functools.lru_cache(maxsize=256)(_Cfg)


def _config(patches: torch.Tensor, T, gpu_sms: Optional[int] = None) -> _Cfg:
    """The call's _Cfg, cached per shape and device kind (building one costs ~10 µs of host time).

    ``gpu_sms``: GPU tiles for a GPU with this many SMs whatever the tensors' device (the sm_90
    ahead-of-time compile test records the launches of CPU tensors this way); None: GPU tiles
    only for CUDA tensors outside the interpreter, SMs read from the device.
    """
    # Plain ints: block sizes are compile-time constants (a traced SymInt specialises here).
    B, N, D = (int(x) for x in patches.shape)
    on_gpu = (patches.is_cuda and not INTERPRET) or gpu_sms is not None
    want = 2 * gpu_sms if gpu_sms is not None else _programs_wanted(patches.device)
    return _cfg_cached(B, N, D, int(T), patches.element_size(), on_gpu, want, _tuning)


def _scratch(cfg: _Cfg, dev: torch.device) -> torch.Tensor:
    """The call's scratch. torch.empty launches nothing; kernel 1 initialises the merge state
    (keys and counters), and its own arrival counters (a D split) need no initial value on a GPU
    (ARRIVAL_TAG): there only the counter words ever hold their values in memory that the
    allocator hands out. The interpreter keeps the values it computes in numpy arrays on the
    host heap, which a later torch.empty can return, so a stale arrival count can sit where a
    counter lands (an interpreter test saw one in CI): in the interpreter the host zeroes them."""
    ws = _empty(cfg.n_ws, torch.float32, dev)
    if INTERPRET:
        ws[cfg.arrived_at:].zero_()
    return ws


def _reg_cap(maxnreg: int, wrap: Callable) -> dict:
    """The launch option of a register cap, where one is set and the launch is not through
    ``wrap_triton``: Inductor hands a user kernel's num_warps and num_stages to its compile
    (torch's SPECIAL_CONFIG_NAMES), not maxnreg, so those launches (torch.compile, and the Triton
    ops' autograd path) keep the options they had before the caps; eager calls and the launch
    plans they record take the cap."""
    if not maxnreg or wrap is torch.library.wrap_triton:
        return {}
    return {"maxnreg": maxnreg}


def _run_select(
    patches: torch.Tensor,
    task: torch.Tensor,
    task_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    mask_voters: bool,
    select_only: bool,
    limit: int,
    budget: bool,
    wrap: Callable,
):
    """Kernels 1 and 2 on contiguous inputs. Returns (idx if select_only else counts, the
    scratch (its order region feeds the gather, kmax the host read of prune), cfg)."""
    B, N, D = patches.shape
    T = task.shape[1]
    dev = patches.device
    cfg = _config(patches, T)
    ws = _scratch(cfg, dev)
    # select writes idx [B, N], prune counts [B]; the input stands in for the other, unused.
    out = _empty((B, N) if select_only else (B,), torch.int64, dev)
    tmask = patches if task_mask is None else task_mask.contiguous()
    pmask = patches if patch_mask is None else patch_mask.contiguous()
    scale = 1.0 / math.sqrt(D)

    _launcher(wrap, _scores_kernel)[(cfg.n_score_tiles, cfg.ksplit, B)](
        patches, task, tmask, ws,
        N, T, cfg.ts, D, cfg.kchunk, scale,
        KSPLIT=cfg.ksplit, HAS_TMASK=task_mask is not None,
        BLOCK_M=cfg.bm1, BLOCK_T=cfg.bt, BLOCK_K=cfg.bk, BLOCK_TALL=cfg.block_tall,
        DOT_NATIVE=cfg.dot_native, DOT_PREC=cfg.dot_prec, PREFETCH=cfg.prefetch1,
        SSQ_LOADS=bool(cfg.ssq_loads), SSQ_MMA=bool(cfg.ssq_mma), S_SHIFT=cfg.s_shift,
        num_warps=cfg.warps1, num_stages=cfg.stages1,
        **_reg_cap(cfg.maxnreg1, wrap),
    )
    n_programs = cfg.n_row_tiles * cfg.n_split
    _launcher(wrap, _select_kernel)[(n_programs, B)](
        ws, tmask, pmask, patches if select_only else out, out if select_only else patches,
        N, T, cfg.ts, limit, cfg.n_split, n_programs,
        HAS_TMASK=task_mask is not None, HAS_PMASK=patch_mask is not None,
        MASK_VOTERS=bool(mask_voters), SELECT_ONLY=select_only, BUDGET=budget,
        BLOCK_M=cfg.bm2, BLOCK_N=cfg.bn2, BLOCK_T=cfg.bt, BLOCK_TALL=cfg.block_tall,
        BLOCK_NALL=cfg.block_nall, SEARCH_ITERS=cfg.search_iters, SEL_PREC=cfg.sel_prec, S_SHIFT=cfg.s_shift,
        A_ONCE=bool(cfg.a_once), S_AHEAD=bool(cfg.s_ahead),
        num_warps=cfg.warps2, num_stages=cfg.stages2, **_reg_cap(cfg.maxnreg2, wrap),
    )
    return out, ws, cfg


def _run_gather(patches, ws, counts, K: int, cfg: _Cfg, wrap: Callable):
    B, N, D = patches.shape
    dev = patches.device
    pruned = _empty((B, K, D), patches.dtype, dev, k_dim=1)
    kept_mask = _empty((B, K), torch.bool, dev, k_dim=1)
    kept_idx = _empty((B, K), torch.int64, dev, k_dim=1)
    src, dst = patches, pruned
    if INTERPRET and patches.dtype == torch.bfloat16:
        # The interpreter mishandles bf16 values; the gather only moves bits.
        src, dst = patches.view(torch.int16), pruned.view(torch.int16)
    _k_grid(0, cfg.br)
    _launcher(wrap, _gather_kernel)[(-(-K // cfg.br), -(-D // cfg.bd), B)](
        src, ws, counts, dst, kept_mask, kept_idx,
        N, D, K,
        BLOCK_R=cfg.br, BLOCK_D=cfg.bd,
        num_warps=cfg.warps3,
    )
    return pruned, kept_mask, kept_idx, counts


_CACHED = {} if INTERPRET else {k.fn: _CachedLaunch(k) for k in (_scores_kernel, _select_kernel, _gather_kernel)}


def _empty_outputs(patches: torch.Tensor, K: int):
    B, _, D = patches.shape
    dev = patches.device
    return (
        torch.zeros(B, K, D, dtype=patches.dtype, device=dev),
        torch.zeros(B, K, dtype=torch.bool, device=dev),
        torch.zeros(B, K, dtype=torch.int64, device=dev),
        torch.zeros(B, dtype=torch.int64, device=dev),
    )


@_on_patches_device
def select(patches, task, task_mask=None, patch_mask=None, mask_voters=False, wrap=_identity):
    """Row argmax ``idx [B, N]`` int64 (-1 for non-voters when mask_voters and patch_mask)."""
    B, N, _ = patches.shape
    if B == 0:
        return torch.empty(0, N, dtype=torch.int64, device=patches.device)
    idx, _, _ = _run_select(patches.contiguous(), task.contiguous(), task_mask, patch_mask, mask_voters, True, N,
                            False, wrap)
    return idx


def _limit(N: int, keep_tokens: Optional[int], max_tokens: Optional[int]) -> int:
    limit = N if keep_tokens is None else keep_tokens
    if max_tokens is not None:
        limit = min(limit, max_tokens)
    return limit


@_on_patches_device
def prune(patches, task, task_mask=None, patch_mask=None, keep_tokens=None, mask_voters=False,
          wrap=_identity):
    """Gather-pad to ``K = max(1, max counts)`` rows; reads K on the host once."""
    B, N, _ = patches.shape
    if B == 0:
        return _empty_outputs(patches, 1)
    patches = patches.contiguous()
    counts, ws, cfg = _run_select(
        patches, task.contiguous(), task_mask, patch_mask, mask_voters, False,
        _limit(N, keep_tokens, None), keep_tokens is not None, wrap)
    K = _read_k(ws, cfg.kmax_at)  # the op's one host sync
    return _run_gather(patches, ws, counts, K, cfg, wrap)


@_on_patches_device
def prune_padded(patches, task, task_mask=None, patch_mask=None, keep_tokens=None, max_tokens=1,
                 mask_voters=False, wrap=_identity):
    """Exactly ``max_tokens`` rows; no host sync (CUDA-graph capturable)."""
    B, N, _ = patches.shape
    if B == 0:
        return _empty_outputs(patches, max_tokens)
    patches = patches.contiguous()
    counts, ws, cfg = _run_select(
        patches, task.contiguous(), task_mask, patch_mask, mask_voters, False,
        _limit(N, keep_tokens, max_tokens), keep_tokens is not None, wrap)
    return _run_gather(patches, ws, counts, max_tokens, cfg, wrap)
