"""Triton kernels of the training op ``fastprune::select_soft`` and its backward (SPEC "Training").

Per sample (all fp32 arithmetic; 16-bit operands of the big ``G X^T`` product stay 16-bit on the
GPU, whose products are exact in the fp32 accumulator):

  P = rms(patches), Tn = rms(valid prompt rows), S = P Tn^T [N, Tv], A = softmax(S / sqrt(D)),
  Qr = A Tn, c = rsqrt(mean(Qr^2) + eps), Z = A S^T, score = c Z / sqrt(D)  (== Q P^T / sqrt(D)),
  score' = score + noise_scale * U on allowed columns (U: Philox4x32-10 from a (seed, offset)
  pair, regenerated in the backward; or an explicit tensor), -inf elsewhere.

The valid prompt tokens are compacted first (a stable sort of the mask; one host read of the
largest valid count sizes ``BLOCK_T``), so every ``N x N x T`` product runs over ``Tv`` (pi0.5:
48 of 200), not ``T``.

Forward, two launches: ``_prep_kernel`` (row tiles: S, A, c, row norms) and ``_fwd_kernel``
(row tiles x all column tiles: online argmax and log-sum-exp of score', then the gather of the
chosen raw rows). Nothing ``N x N`` or ``N x D`` is written besides the output.

Backward (``G`` = grad of the output), deterministic (no atomics), nothing ``N x N`` stored:
  1. ``_prep_kernel`` again (cheap: N x Tv x D).
  2. ``_bwd_row_kernel`` (row tiles, loop over column tiles): soft = exp(score' - lse),
     dSoft = G_R X_J^T (the N x N x D product), E = soft * dSoft; accumulates per row
     delta = sum E, u = sum E Z, v = sum soft Z, E S and soft S, so that with
     dScore = E - delta soft (never formed): dc = (u - delta v)/sqrt(D),
     dA_Z = c/sqrt(D) (E S - delta soft S); adds the rms(Qr) and softmax backward and writes
     the row part of dS and delta.
  3. ``_bwd_col_kernel`` (column tiles, loop over row tiles): dZ = c/sqrt(D) soft (dSoft - delta)
     (dSoft recomputed: the second N x N x D product) and dS_J += dZ^T A_R.
  4. ``_bwd_patch_kernel``: dP = dS Tn and the RMSNorm backward; then ``_bwd_direct_kernel`` adds
     the straight-through direct term (the sum of G over the rows that chose a patch, in increasing
     row order through a stable sort, 32 rows at a time, 16 patches per program).
  5. ``_bwd_task_mm_kernel``: MM = A^T diag(k) A ([Tv, Tv] tiles, once per sample);
     ``_bwd_task_kernel`` (D tiles x prompt tiles): dTn = dS^T P - MM Tn; ``_bwd_task_rms_kernel``:
     RMSNorm backward of the prompt rows.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# fp32 tl.dot precision of these kernels: "ieee" (exact fp32 FMA) or "tf32x3" (three tf32
# tensor-core products, close to fp32, fewer spills on sm_90: PERF_LOG lead 6, unmeasured).
# FASTPRUNE_TRITON_TRAIN_DOT_PREC=tf32x3 is that lead's A/B on a GPU (bench_train).


@functools.lru_cache(maxsize=None)
def _dot_prec() -> str:
    # Checked at the first launch: an import error here would only disable the backend.
    prec = os.environ.get("FASTPRUNE_TRITON_TRAIN_DOT_PREC", "ieee")
    if prec not in ("ieee", "tf32x3"):
        raise ValueError(f"FASTPRUNE_TRITON_TRAIN_DOT_PREC must be 'ieee' or 'tf32x3', got {prec!r}")
    return prec


__all__ = ["select_soft_fwd", "select_soft_bwd", "INTERPRET"]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _uniform(SEED, b, rows64, cols64, N):
    """U[b, i, j] in [0, 1): Philox4x32-10, key = seed, counter = (i*N + j, b, offset lo, hi)."""
    seed = tl.load(SEED)
    off = tl.load(SEED + 1).to(tl.uint64, bitcast=True)
    c0 = (rows64[:, None] * N + cols64[None, :]).to(tl.uint32)
    zero = c0 * 0
    c1 = zero + b.to(tl.uint32)
    c2 = zero + (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + (off >> 32).to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return (r0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _noisy_scores(
    z, rs, b, rows64, rmask, cols64, cmask, AL, NS, SEED, NZ, N,
    HAS_NOISE: tl.constexpr, EXPLICIT: tl.constexpr,
):
    """score' of a [rows, cols] tile from Z, the row scales c/sqrt(D) and the noise."""
    sc = z * rs[:, None]
    if HAS_NOISE:
        ns = tl.load(NS)
        if EXPLICIT:
            u = tl.load(
                NZ + b * N * N + rows64[:, None] * N + cols64[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0,
            ).to(tl.float32)
        else:
            u = _uniform(SEED, b, rows64, cols64, N)
        sc = sc + u * ns
    allowed = tl.load(AL + b * N + cols64, mask=cmask, other=0) != 0
    return tl.where(allowed[None, :], sc, float("-inf"))


@triton.jit
def _dot_f32(a, b, acc, DOT_PREC: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


# ----------------------------------------------------------------------------- kernel: prep


@triton.jit
def _prep_kernel(
    P, TK, TOK, CNT, S, A, C, RP, RT,
    N, T, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows64 < N
    tt = tl.arange(0, BLOCK_T)
    cnt = tl.load(CNT + b)
    tv = tt < cnt
    tok = tl.load(TOK + b * BLOCK_T + tt, mask=tv, other=0)
    p_base = P + b * N * D + rows64[:, None] * D
    t_base = TK + b * T * D + tok[:, None] * D

    acc = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
    ssp = tl.zeros([BLOCK_M], tl.float32)
    sst = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk < D
        p = tl.load(p_base + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        q = tl.load(t_base + kk[None, :], mask=tv[:, None] & km[None, :], other=0.0)
        pf = p.to(tl.float32)
        qf = q.to(tl.float32)
        ssp += tl.sum(pf * pf, 1)
        sst += tl.sum(qf * qf, 1)
        if UPCAST:
            acc = _dot_f32(pf, tl.trans(qf), acc, DOT_PREC)
        else:
            acc = tl.dot(p, tl.trans(q), acc)
    rp = 1.0 / tl.sqrt(ssp / D + 1e-6)
    rt = tl.where(tv, 1.0 / tl.sqrt(sst / D + 1e-6), 0.0)
    s = acc * rp[:, None] * rt[None, :]
    s = tl.where(tv[None, :], s, 0.0)
    logit = tl.where(tv[None, :], s * scale, float("-inf"))
    e = tl.exp(logit - tl.max(logit, 1)[:, None])
    a = e / tl.sum(e, 1)[:, None]
    out = b * N * BLOCK_T + rows64[:, None] * BLOCK_T + tt[None, :]
    tl.store(S + out, s, mask=rmask[:, None])
    tl.store(A + out, a, mask=rmask[:, None])

    # |Qr|^2 with Qr = A Tn, Tn = rt * task rows.
    ar = a * rt[None, :]
    ssq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk < D
        qf = tl.load(t_base + kk[None, :], mask=tv[:, None] & km[None, :], other=0.0).to(tl.float32)
        qr = _dot_f32(ar, qf, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), DOT_PREC)
        ssq += tl.sum(qr * qr, 1)
    c = 1.0 / tl.sqrt(ssq / D + 1e-6)
    tl.store(C + b * N + rows64, c, mask=rmask)
    tl.store(RP + b * N + rows64, rp, mask=rmask)
    if pid_m == 0:
        tl.store(RT + b * BLOCK_T + tt, rt)


# ----------------------------------------------------------------------------- kernel: forward


@triton.jit
def _fwd_kernel(
    P, S, A, C, AL, NS, SEED, NZ, OUT, IDX, LSE,
    N, D, scale,
    HAS_NOISE: tl.constexpr, EXPLICIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows64 < N
    tt = tl.arange(0, BLOCK_T)
    a = tl.load(A + b * N * BLOCK_T + rows64[:, None] * BLOCK_T + tt[None, :], mask=rmask[:, None], other=0.0)
    rs = tl.load(C + b * N + rows64, mask=rmask, other=0.0) * scale

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    best = tl.zeros([BLOCK_M], tl.int64)
    for j0 in range(0, N, BLOCK_N):
        cols64 = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols64 < N
        sj = tl.load(S + b * N * BLOCK_T + cols64[:, None] * BLOCK_T + tt[None, :], mask=cmask[:, None], other=0.0)
        z = _dot_f32(a, tl.trans(sj), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PREC)
        sc = _noisy_scores(z, rs, b, rows64, rmask, cols64, cmask, AL, NS, SEED, NZ, N, HAS_NOISE, EXPLICIT)
        tmax = tl.max(sc, 1)
        targ = tl.argmax(sc, 1, tie_break_left=True)
        best = tl.where(tmax > m, j0 + targ.to(tl.int64), best)  # strict: earlier tile wins ties
        m_new = tl.maximum(m, tmax)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(sc - m_safe[:, None]), 1)
        m = m_new
    lse = m + tl.log(l)
    best = tl.minimum(tl.maximum(best, 0), N - 1)
    tl.store(IDX + b * N + rows64, best, mask=rmask)
    tl.store(LSE + b * N + rows64, lse, mask=rmask)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        msk = rmask[:, None] & (kk < D)[None, :]
        v = tl.load(P + b * N * D + best[:, None] * D + kk[None, :], mask=msk, other=0.0)
        tl.store(OUT + b * N * D + rows64[:, None] * D + kk[None, :], v, mask=msk)


# ----------------------------------------------------------------------------- kernel: backward


@triton.jit
def _dsoft_tile(G, P, b, rows64, rmask, cols64, cmask, N, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """dSoft tile = G[rows] X[cols]^T over D (the N x N x D product)."""
    ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk < D
        g = tl.load(G + b * N * D + rows64[:, None] * D + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        x = tl.load(P + b * N * D + cols64[:, None] * D + kk[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
        if UPCAST:
            ds = _dot_f32(g.to(tl.float32), tl.trans(x.to(tl.float32)), ds, DOT_PREC)
        else:
            ds = tl.dot(g, tl.trans(x), ds)
    return ds


@triton.jit
def _bwd_row_kernel(
    G, P, TK, TOK, CNT, S, A, C, RT, AL, NS, SEED, NZ, LSE, DELTA, KC, DS,
    N, T, D, scale,
    HAS_NOISE: tl.constexpr, EXPLICIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows64 < N
    tt = tl.arange(0, BLOCK_T)
    row_off = b * N * BLOCK_T + rows64[:, None] * BLOCK_T + tt[None, :]
    a = tl.load(A + row_off, mask=rmask[:, None], other=0.0)
    c = tl.load(C + b * N + rows64, mask=rmask, other=0.0)
    rs = c * scale
    lse = tl.load(LSE + b * N + rows64, mask=rmask, other=0.0)

    delta = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    v = tl.zeros([BLOCK_M], tl.float32)
    es = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
    ss = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols64 = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols64 < N
        sj = tl.load(S + b * N * BLOCK_T + cols64[:, None] * BLOCK_T + tt[None, :], mask=cmask[:, None], other=0.0)
        z = _dot_f32(a, tl.trans(sj), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PREC)
        sc = _noisy_scores(z, rs, b, rows64, rmask, cols64, cmask, AL, NS, SEED, NZ, N, HAS_NOISE, EXPLICIT)
        soft = tl.where(rmask[:, None], tl.exp(sc - lse[:, None]), 0.0)
        dsoft = _dsoft_tile(G, P, b, rows64, rmask, cols64, cmask, N, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PREC)
        e = soft * dsoft
        delta += tl.sum(e, 1)
        u += tl.sum(e * z, 1)
        v += tl.sum(soft * z, 1)
        es = _dot_f32(e, sj, es, DOT_PREC)
        ss = _dot_f32(soft, sj, ss, DOT_PREC)
    dc = scale * (u - delta * v)
    kc = dc * c * c * c / D

    # (A K)_i with K = Tn Tn^T, as (A Tn) Tn^T over D tiles.
    cnt = tl.load(CNT + b)
    tv = tt < cnt
    tok = tl.load(TOK + b * BLOCK_T + tt, mask=tv, other=0)
    rt = tl.load(RT + b * BLOCK_T + tt)
    ak = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk < D
        q = tl.load(TK + b * T * D + tok[:, None] * D + kk[None, :], mask=tv[:, None] & km[None, :], other=0.0)
        tn = q.to(tl.float32) * rt[:, None]
        qr = _dot_f32(a, tn, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), DOT_PREC)
        ak = _dot_f32(qr, tl.trans(tn), ak, DOT_PREC)

    da = rs[:, None] * (es - delta[:, None] * ss) - kc[:, None] * ak
    dl = a * (da - tl.sum(a * da, 1)[:, None])
    tl.store(DS + row_off, scale * dl, mask=rmask[:, None])
    tl.store(DELTA + b * N + rows64, delta, mask=rmask)
    tl.store(KC + b * N + rows64, kc, mask=rmask)


@triton.jit
def _bwd_col_kernel(
    G, P, S, A, C, AL, NS, SEED, NZ, LSE, DELTA, DS,
    N, D, scale,
    HAS_NOISE: tl.constexpr, EXPLICIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols64 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cmask = cols64 < N
    tt = tl.arange(0, BLOCK_T)
    col_off = b * N * BLOCK_T + cols64[:, None] * BLOCK_T + tt[None, :]
    sj = tl.load(S + col_off, mask=cmask[:, None], other=0.0)

    dsc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    for i0 in range(0, N, BLOCK_M):
        rows64 = (i0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows64 < N
        a = tl.load(A + b * N * BLOCK_T + rows64[:, None] * BLOCK_T + tt[None, :], mask=rmask[:, None], other=0.0)
        rs = tl.load(C + b * N + rows64, mask=rmask, other=0.0) * scale
        lse = tl.load(LSE + b * N + rows64, mask=rmask, other=0.0)
        delta = tl.load(DELTA + b * N + rows64, mask=rmask, other=0.0)
        z = _dot_f32(a, tl.trans(sj), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PREC)
        sc = _noisy_scores(z, rs, b, rows64, rmask, cols64, cmask, AL, NS, SEED, NZ, N, HAS_NOISE, EXPLICIT)
        soft = tl.where(rmask[:, None], tl.exp(sc - lse[:, None]), 0.0)
        dsoft = _dsoft_tile(G, P, b, rows64, rmask, cols64, cmask, N, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PREC)
        dz = soft * (dsoft - delta[:, None]) * rs[:, None]
        dsc = _dot_f32(tl.trans(dz), a, dsc, DOT_PREC)
    prev = tl.load(DS + col_off, mask=cmask[:, None], other=0.0)
    tl.store(DS + col_off, prev + dsc, mask=cmask[:, None])


@triton.jit
def _bwd_patch_kernel(
    P, TK, TOK, CNT, DS, RP, RT, GP,
    N, T, D,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows64 < N
    tt = tl.arange(0, BLOCK_T)
    cnt = tl.load(CNT + b)
    tv = tt < cnt
    tok = tl.load(TOK + b * BLOCK_T + tt, mask=tv, other=0)
    rt = tl.load(RT + b * BLOCK_T + tt)
    dsr = tl.load(DS + b * N * BLOCK_T + rows64[:, None] * BLOCK_T + tt[None, :], mask=rmask[:, None], other=0.0)
    dsr = dsr * rt[None, :]
    rp = tl.load(RP + b * N + rows64, mask=rmask, other=0.0)
    x_base = P + b * N * D + rows64[:, None] * D
    t_base = TK + b * T * D + tok[:, None] * D

    dot = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk < D
        q = tl.load(t_base + kk[None, :], mask=tv[:, None] & km[None, :], other=0.0).to(tl.float32)
        dp = _dot_f32(dsr, q, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), DOT_PREC)
        x = tl.load(x_base + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0).to(tl.float32)
        dot += tl.sum(x * dp, 1)
    coef = rp * rp * rp * dot / D

    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk < D
        msk = rmask[:, None] & km[None, :]
        q = tl.load(t_base + kk[None, :], mask=tv[:, None] & km[None, :], other=0.0).to(tl.float32)
        dp = _dot_f32(dsr, q, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), DOT_PREC)
        x = tl.load(x_base + kk[None, :], mask=msk, other=0.0).to(tl.float32)
        dx = rp[:, None] * dp - x * coef[:, None]
        tl.store(GP + b * N * D + rows64[:, None] * D + kk[None, :], dx, mask=msk)


@triton.jit
def _bwd_direct_kernel(
    G, PERM, START, NSEL, GP,
    N, D,
    BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """GP[b, j, cols] += the sum of G over the rows that chose patch j (the straight-through direct
    term), for BLOCK_J patches and one slice of D: patch j's rows are PERM[start_j : start_j +
    nsel_j] (increasing), added BLOCK_S at a time. Most patches have no row (skipped after the
    block's two vector loads). This was a loop inside the patch kernel, one row per step for every
    64 columns: a chain of max(nsel) x D / 64 pairs of dependent loads in the program holding the
    most chosen patch (245 rows choose one patch in a pi0.5 structured sample)."""
    j0 = tl.program_id(0).to(tl.int64) * BLOCK_J
    b = tl.program_id(2).to(tl.int64)
    kk = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    km = kk < D
    jj = tl.arange(0, BLOCK_J)
    nv = tl.load(NSEL + b * N + j0 + jj, mask=j0 + jj < N, other=0)  # 0 past N: nothing to add
    fv = tl.load(START + b * N + j0 + jj, mask=j0 + jj < N, other=0)
    ss = tl.arange(0, BLOCK_S)
    for t in range(0, BLOCK_J):
        n = tl.sum(tl.where(jj == t, nv, 0), 0)
        first = tl.sum(tl.where(jj == t, fv, 0), 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, n, BLOCK_S):
            has = s0 + ss < n
            src = tl.load(PERM + b * N + first + s0 + ss, mask=has, other=0)
            g = tl.load(G + b * N * D + src[:, None] * D + kk[None, :], mask=has[:, None] & km[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32), 0)
        out = GP + b * N * D + (j0 + t) * D + kk
        mine = km & (n > 0)  # a patch no row chose keeps the patch kernel's value
        tl.store(out, tl.load(out, mask=mine, other=0.0).to(tl.float32) + acc, mask=mine)


@triton.jit
def _bwd_task_mm_kernel(
    A, KC, MM,
    N,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_TO: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """MM[t, t'] = sum_i A[i, t] kc[i] A[i, t'] for one [BLOCK_TO, BLOCK_TO] tile (once per sample,
    not per D tile; a whole [BLOCK_T, BLOCK_T] accumulator does not fit registers at BLOCK_T=256)."""
    pid_t = tl.program_id(0)
    pid_u = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ti = pid_t * BLOCK_TO + tl.arange(0, BLOCK_TO)
    tj = pid_u * BLOCK_TO + tl.arange(0, BLOCK_TO)
    mm = tl.zeros([BLOCK_TO, BLOCK_TO], tl.float32)
    for i0 in range(0, N, BLOCK_N):
        rows64 = (i0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = rows64 < N
        base = A + b * N * BLOCK_T + rows64[:, None] * BLOCK_T
        ai = tl.load(base + ti[None, :], mask=rmask[:, None], other=0.0)
        aj = tl.load(base + tj[None, :], mask=rmask[:, None], other=0.0)
        kc = tl.load(KC + b * N + rows64, mask=rmask, other=0.0)
        mm = _dot_f32(tl.trans(ai * kc[:, None]), aj, mm, DOT_PREC)
    tl.store(MM + b * BLOCK_T * BLOCK_T + ti[:, None] * BLOCK_T + tj[None, :], mm)


@triton.jit
def _bwd_task_kernel(
    P, TK, TOK, CNT, DS, MM, RP, RT, DTN,
    N, T, D,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_TO: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dTn[t tile, D tile] = dS^T P - MM Tn, MM = A^T diag(kc) A (``_bwd_task_mm_kernel``)."""
    pid_d = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kk = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    km = kk < D
    to = pid_t * BLOCK_TO + tl.arange(0, BLOCK_TO)
    acc = tl.zeros([BLOCK_TO, BLOCK_D], tl.float32)
    for i0 in range(0, N, BLOCK_N):
        rows64 = (i0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = rows64 < N
        dsr = tl.load(DS + b * N * BLOCK_T + rows64[:, None] * BLOCK_T + to[None, :], mask=rmask[:, None], other=0.0)
        rp = tl.load(RP + b * N + rows64, mask=rmask, other=0.0)
        x = tl.load(P + b * N * D + rows64[:, None] * D + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        pn = x.to(tl.float32) * rp[:, None]
        acc = _dot_f32(tl.trans(dsr), pn, acc, DOT_PREC)
    cnt = tl.load(CNT + b)
    for t0 in range(0, BLOCK_T, BLOCK_TO):
        tt = t0 + tl.arange(0, BLOCK_TO)
        tv = tt < cnt
        tok = tl.load(TOK + b * BLOCK_T + tt, mask=tv, other=0)
        rt = tl.load(RT + b * BLOCK_T + tt)
        q = tl.load(TK + b * T * D + tok[:, None] * D + kk[None, :], mask=tv[:, None] & km[None, :], other=0.0)
        tn = q.to(tl.float32) * rt[:, None]
        mmc = tl.load(MM + b * BLOCK_T * BLOCK_T + to[:, None] * BLOCK_T + tt[None, :])
        acc = acc - _dot_f32(mmc, tn, tl.zeros([BLOCK_TO, BLOCK_D], tl.float32), DOT_PREC)
    tl.store(DTN + b * BLOCK_T * D + to[:, None] * D + kk[None, :], acc, mask=km[None, :])


@triton.jit
def _bwd_task_rms_kernel(
    TK, TOK, CNT, RT, DTN, GT,
    T, D,
    BLOCK_TT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_task[b, tok[t]] = rt dTn - x rt^3 (x . dTn) / D for the valid tokens."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tt = pid_t * BLOCK_TT + tl.arange(0, BLOCK_TT)
    cnt = tl.load(CNT + b)
    tv = (tt < cnt) & (tt < BLOCK_T)
    tok = tl.load(TOK + b * BLOCK_T + tt, mask=tv, other=0)
    rt = tl.load(RT + b * BLOCK_T + tt, mask=tv, other=0.0)
    dot = tl.zeros([BLOCK_TT], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        msk = tv[:, None] & (kk < D)[None, :]
        x = tl.load(TK + b * T * D + tok[:, None] * D + kk[None, :], mask=msk, other=0.0).to(tl.float32)
        d = tl.load(DTN + b * BLOCK_T * D + tt[:, None] * D + kk[None, :], mask=msk, other=0.0)
        dot += tl.sum(x * d, 1)
    coef = rt * rt * rt * dot / D
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        msk = tv[:, None] & (kk < D)[None, :]
        x = tl.load(TK + b * T * D + tok[:, None] * D + kk[None, :], mask=msk, other=0.0).to(tl.float32)
        d = tl.load(DTN + b * BLOCK_T * D + tt[:, None] * D + kk[None, :], mask=msk, other=0.0)
        tl.store(GT + b * T * D + tok[:, None] * D + kk[None, :], rt[:, None] * d - x * coef[:, None], mask=msk)


# ----------------------------------------------------------------------------- launchers


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


class _Prep:
    """Host-side preparation shared by forward and backward (compacted prompt, allowed columns)."""

    def __init__(self, patches, task, task_mask, patch_mask):
        B, N, D = patches.shape
        T = task.shape[1]
        dev = patches.device
        if task_mask is None:
            tv = torch.ones(B, T, dtype=torch.bool, device=dev)
        else:
            tv = task_mask | ~task_mask.any(-1, keepdim=True)
        cnt = tv.sum(-1)
        self.tmax = int(cnt.max()) if B else 1  # the one host read: sizes BLOCK_T
        self.BT = _pow2(self.tmax)
        order = torch.sort((~tv).to(torch.int8), dim=-1, stable=True).indices
        tok = torch.zeros(B, self.BT, dtype=torch.int64, device=dev)
        w = min(T, self.BT)
        tok[:, :w] = order[:, :w]
        self.tok, self.cnt = tok.contiguous(), cnt.to(torch.int64).contiguous()
        if patch_mask is None:
            al = torch.ones(B, N, dtype=torch.int8, device=dev)
        else:
            al = patch_mask.clone()
            al[:, 0] |= ~patch_mask.any(-1)
            al = al.to(torch.int8)
        self.allowed = al.contiguous()
        self.B, self.N, self.T, self.D = B, N, T, D
        self.scale = 1.0 / math.sqrt(D)
        gpu_tiles = not INTERPRET
        # Untuned GPU defaults (no GPU was available when this was written): 64-wide tiles, half
        # the rows when the grid would not fill an H100 twice or the prompt tile is wide.
        self.BM = 64 if gpu_tiles else 16
        self.BN = 64 if gpu_tiles else 16
        self.BD = 64 if gpu_tiles else 16
        if gpu_tiles and (B * triton.cdiv(N, 64) < 264 or self.BT >= 128):
            self.BM = 32
        if gpu_tiles and self.BT >= 256:
            self.BM = 16
        # 8 warps on the GPU for every kernel with an fp32 (FMA) tl.dot: at 4 warps ptxas spills
        # 13-20 KB per thread in the patch and task kernels (sm_90 AOT test, tests/test_triton_sm90.py).
        self.warps = 8 if gpu_tiles else 4
        self.upcast = INTERPRET or patches.dtype == torch.float32


def _prep(patches, task, pr: _Prep, wrap):
    B, N, T, D, BT = pr.B, pr.N, pr.T, pr.D, pr.BT
    f32 = dict(dtype=torch.float32, device=patches.device)
    S = torch.empty(B, N, BT, **f32)
    A = torch.empty(B, N, BT, **f32)
    C = torch.empty(B, N, **f32)
    RP = torch.empty(B, N, **f32)
    RT = torch.empty(B, BT, **f32)
    wrap(_prep_kernel)[(triton.cdiv(N, pr.BM), B)](
        patches, task, pr.tok, pr.cnt, S, A, C, RP, RT, N, T, D, pr.scale,
        BLOCK_M=pr.BM, BLOCK_T=BT, BLOCK_D=pr.BD, UPCAST=pr.upcast, DOT_PREC=_dot_prec(), num_warps=pr.warps,
    )
    return S, A, C, RP, RT


def _noise_args(patches, noise_scale, seed, noise):
    """(HAS_NOISE, EXPLICIT, NS, SEED, NZ) kernel arguments; dummies where unused (noise without
    an explicit tensor comes with a seed: the ops check that before they launch)."""
    dummy = torch.zeros(2, dtype=torch.int64, device=patches.device)
    if noise_scale is None:
        return False, False, dummy, dummy, dummy
    ns = noise_scale.reshape(1).to(device=patches.device, dtype=torch.float32)
    if noise is not None:
        return True, True, ns, dummy, noise.contiguous()
    return True, False, ns, seed.reshape(2).to(device=patches.device, dtype=torch.int64), dummy


def _identity(kernel):
    return kernel


def select_soft_fwd(patches, task, task_mask=None, patch_mask=None, noise_scale=None, seed=None,
                    noise=None, wrap=_identity):
    """-> (selected [B, N, D], idx [B, N] int64, lse [B, N] fp32)."""
    patches, task = patches.contiguous(), task.contiguous()
    pr = _Prep(patches, task, task_mask, patch_mask)
    B, N, D = pr.B, pr.N, pr.D
    selected = torch.empty_like(patches)
    idx = torch.empty(B, N, dtype=torch.int64, device=patches.device)
    lse = torch.empty(B, N, dtype=torch.float32, device=patches.device)
    if B == 0:
        return selected, idx, lse
    S, A, C, RP, RT = _prep(patches, task, pr, wrap)
    has_noise, explicit, NS, SEED, NZ = _noise_args(patches, noise_scale, seed, noise)
    wrap(_fwd_kernel)[(triton.cdiv(N, pr.BM), B)](
        patches, S, A, C, pr.allowed, NS, SEED, NZ, selected, idx, lse, N, D, pr.scale,
        HAS_NOISE=has_noise, EXPLICIT=explicit,
        BLOCK_M=pr.BM, BLOCK_N=pr.BN, BLOCK_T=pr.BT, BLOCK_D=pr.BD, DOT_PREC=_dot_prec(), num_warps=pr.warps,
    )
    return selected, idx, lse


def select_soft_bwd(grad, patches, task, task_mask=None, patch_mask=None, noise_scale=None,
                    seed=None, noise=None, *, idx, lse, wrap=_identity):
    """-> (grad_patches like patches, grad_task like task)."""
    grad, patches, task = grad.contiguous(), patches.contiguous(), task.contiguous()
    pr = _Prep(patches, task, task_mask, patch_mask)
    B, N, T, D, BT = pr.B, pr.N, pr.T, pr.D, pr.BT
    grad_patches = torch.empty_like(patches)
    grad_task = torch.zeros_like(task)
    if B == 0:
        return grad_patches, grad_task
    dev = patches.device
    f32 = dict(dtype=torch.float32, device=dev)
    idx = idx.contiguous()
    lse = lse.to(torch.float32).contiguous()
    S, A, C, RP, RT = _prep(patches, task, pr, wrap)
    has_noise, explicit, NS, SEED, NZ = _noise_args(patches, noise_scale, seed, noise)
    delta = torch.empty(B, N, **f32)
    kc = torch.empty(B, N, **f32)
    dS = torch.empty(B, N, BT, **f32)
    common = dict(HAS_NOISE=has_noise, EXPLICIT=explicit, BLOCK_M=pr.BM, BLOCK_N=pr.BN, BLOCK_T=BT,
                  BLOCK_D=pr.BD, UPCAST=pr.upcast, DOT_PREC=_dot_prec(), num_warps=pr.warps)
    wrap(_bwd_row_kernel)[(triton.cdiv(N, pr.BM), B)](
        grad, patches, task, pr.tok, pr.cnt, S, A, C, RT, pr.allowed, NS, SEED, NZ, lse, delta, kc, dS,
        N, T, D, pr.scale, **common,
    )
    wrap(_bwd_col_kernel)[(triton.cdiv(N, pr.BN), B)](
        grad, patches, S, A, C, pr.allowed, NS, SEED, NZ, lse, delta, dS, N, D, pr.scale, **common,
    )
    # Rows that chose each patch, in increasing row order (stable sort: deterministic sums).
    perm = torch.sort(idx, dim=-1, stable=True).indices.contiguous()
    nsel = torch.zeros(B, N, dtype=torch.int64, device=dev).scatter_add_(1, idx, torch.ones_like(idx))
    start = (torch.cumsum(nsel, -1) - nsel).contiguous()
    wrap(_bwd_patch_kernel)[(triton.cdiv(N, pr.BM), B)](
        patches, task, pr.tok, pr.cnt, dS, RP, RT, grad_patches, N, T, D,
        # 1 stage: software pipelining of its D loops costs 255 registers and 212-344 B of spills
        # per thread on sm_90 at the training shapes (1 stage: 54 registers and no spills at B=8,
        # 128 and 12 B at B=32; tests/test_triton_sm90.py).
        BLOCK_M=pr.BM, BLOCK_T=BT, BLOCK_D=pr.BD, DOT_PREC=_dot_prec(), num_warps=pr.warps, num_stages=1,
    )
    # Interpreter: small blocks, so that the tests' small shapes cross several of each.
    BJ, BS, BDD = (4, 4, 16) if INTERPRET else (16, 32, 256)
    wrap(_bwd_direct_kernel)[(triton.cdiv(N, BJ), triton.cdiv(D, BDD), B)](
        grad, perm, start, nsel, grad_patches, N, D, BLOCK_J=BJ, BLOCK_S=BS, BLOCK_D=BDD, num_warps=4,
    )
    BTO = min(BT, 64)
    mm = torch.empty(B, BT, BT, **f32)
    wrap(_bwd_task_mm_kernel)[(BT // BTO, BT // BTO, B)](
        A, kc, mm, N, BLOCK_N=pr.BN, BLOCK_T=BT, BLOCK_TO=BTO, DOT_PREC=_dot_prec(),
    )
    dtn = torch.empty(B, BT, D, **f32)
    wrap(_bwd_task_kernel)[(triton.cdiv(D, pr.BD), BT // BTO, B)](
        patches, task, pr.tok, pr.cnt, dS, mm, RP, RT, dtn, N, T, D,
        # 1 stage, as the patch kernel: 80 registers and no spills instead of 255 and ~280 B.
        BLOCK_N=pr.BN, BLOCK_T=BT, BLOCK_TO=BTO, BLOCK_D=pr.BD, DOT_PREC=_dot_prec(), num_warps=pr.warps,
        num_stages=1,
    )
    BTT = min(BT, 16)
    wrap(_bwd_task_rms_kernel)[(triton.cdiv(BT, BTT), B)](
        task, pr.tok, pr.cnt, RT, dtn, grad_task, T, D, BLOCK_TT=BTT, BLOCK_T=BT, BLOCK_D=pr.BD,
    )
    return grad_patches, grad_task
