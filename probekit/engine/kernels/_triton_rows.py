"""The Triton kernel of :mod:`probekit.engine.kernels.triton` (imported only when triton is there).

A separate module because Triton's interpreter patches ``triton.language`` in the globals of
the module that defines the kernel; see :mod:`probekit.engine.kernels.triton` for what it computes.
"""

import triton
import triton.language as tl


@triton.jit
def rows_kernel(Q, K, V, BIAS, OUT, LSE, MASS, PLOG, DPX, DGR, PRE, HIST, EDGES2,
                sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                sbb, sbh, sbt, sbs, sob, soh, sot, sod,
                H, T, S, D, DV, GROUP, scale, n0, gw, py, px, hy, hx, NBINS,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                HAS_BIAS: tl.constexpr, WANT_OUT: tl.constexpr, WANT_PLOG: tl.constexpr,
                WANT_DIST: tl.constexpr, WANT_PRE: tl.constexpr, NP: tl.constexpr, WANT_HIST: tl.constexpr,
                NB: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    rmask = rows < T
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dq[None, :] * sqd,
                mask=rmask[:, None] & (dq[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], tl.float32)
    mass = tl.zeros([BLOCK_M], tl.float32)
    plog = tl.zeros([BLOCK_M], tl.float32)
    dpx = tl.zeros([BLOCK_M], tl.float32)
    dgr = tl.zeros([BLOCK_M], tl.float32)
    pre = tl.zeros([BLOCK_M, NP], tl.float32)
    hist = tl.zeros([BLOCK_M, NB], tl.float32)
    qi = rows - n0
    qy = (qi // gw).to(tl.float32)
    qx = (qi % gw).to(tl.float32)
    qpatch = qi >= 0
    pcols = tl.arange(0, NP)
    bins = tl.arange(0, NB)
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < S
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * sks + dq[None, :] * skd,
                    mask=cmask[:, None] & (dq[None, :] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_BIAS:
            s += tl.load(BIAS + b * sbb + h * sbh + rows[:, None] * sbt + cols[None, :] * sbs,
                         mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if WANT_OUT:
            v = tl.load(V + b * svb + hk * svh + cols[:, None] * svs + dv[None, :] * svd,
                        mask=cmask[:, None] & (dv[None, :] < DV), other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        kpatch = cmask & (cols >= n0)
        pp = tl.where(kpatch[None, :], p, 0.0)
        mass = mass * alpha + tl.sum(pp, 1)
        if WANT_PLOG:
            plog = plog * alpha + tl.sum(pp * tl.where(pp > 0, s, 0.0), 1)
        if WANT_PRE:
            pre = pre * alpha[:, None]
            for j in tl.static_range(NP):
                pj = tl.sum(tl.where((cols == j)[None, :] & (cols < n0)[None, :], p, 0.0), 1)
                pre += tl.where((pcols == j)[None, :], pj[:, None], 0.0)
        if WANT_DIST or WANT_HIST:
            kj = cols - n0
            dy = qy[:, None] - (kj // gw).to(tl.float32)[None, :]
            dx = qx[:, None] - (kj % gw).to(tl.float32)[None, :]
            keep = qpatch[:, None] & kpatch[None, :]
            if WANT_DIST:
                dpx = dpx * alpha + tl.sum(tl.where(keep, pp * tl.sqrt(dy * dy * py * py + dx * dx * px * px), 0.0), 1)
                dgr = dgr * alpha + tl.sum(tl.where(keep, pp * tl.sqrt(dy * dy + dx * dx), 0.0), 1)
            if WANT_HIST:
                d2 = (dy * dy * hy * hy + dx * dx * hx * hx) * 1.000001
                idx = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
                for e in tl.static_range(1, NB):
                    idx += (d2 >= tl.load(EDGES2 + e)).to(tl.int32)
                hist = hist * alpha[:, None]
                for e in tl.static_range(NB):
                    he = tl.sum(tl.where(keep & (idx == e), pp, 0.0), 1)
                    hist += tl.where((bins == e)[None, :], he[:, None], 0.0)
    inv = 1.0 / l_i
    bhrow = bh * T + rows
    if WANT_OUT:
        o = acc * inv[:, None]
        tl.store(OUT + b * sob + h * soh + rows[:, None] * sot + dv[None, :] * sod,
                 o.to(OUT.dtype.element_ty), mask=rmask[:, None] & (dv[None, :] < DV))
    tl.store(LSE + bhrow, m_i + tl.log(l_i), mask=rmask)
    tl.store(MASS + bhrow, mass * inv, mask=rmask)
    if WANT_PLOG:
        tl.store(PLOG + bhrow, plog * inv, mask=rmask)
    if WANT_DIST:
        tl.store(DPX + bhrow, dpx * inv, mask=rmask)
        tl.store(DGR + bhrow, dgr * inv, mask=rmask)
    if WANT_PRE:
        tl.store(PRE + bhrow[:, None] * n0 + pcols[None, :], pre * inv[:, None],
                 mask=rmask[:, None] & (pcols[None, :] < n0))
    if WANT_HIST:
        tl.store(HIST + bhrow[:, None] * NBINS + bins[None, :], hist * inv[:, None],
                 mask=rmask[:, None] & (bins[None, :] < NBINS))
