"""NSA's one-token decode step in Triton: one kernel launch per layer, two at long contexts (the maths
of ops/nsa.py::nsa_decode).

At batch 1 a decode step is launch-bound: the PyTorch `nsa_decode` issues 23 compute ops per layer
(counted eagerly; projections aside: matmuls for the compressed branch, a softmax, the importance sum,
the forced-block scatter, top-k, index arithmetic, a gather, the selected/window softmax and matmuls).
Here one program per (sequence, KV head) does all of it for the G query heads of the group:

1. compressed branch: softmax over the complete blocks' means, its matmul with the value means, and the
   importance of each block (its probability summed over the group), stored to a scratch row;
2. selection: `block_counts` rounds of argmax over the importance row, the forced blocks (first,
   previous, own) ranked on top as in nsa_decode, then the chosen blocks' keys attended;
3. the sliding window over the last `window_size` positions;
4. the gated sum of the three branches.

Step 1 walks the block means in tiles of 64. With one tile it runs inside the program (two passes: row
max and sum, then the rest). With several, which is from 2,048 tokens of context at block size 32, a
first kernel scores one tile per program in parallel, flash-decoding style. It keeps each tile's
scores, row max, row sum and unnormalised output. The main program combines those partials and reads
the kept scores for the importance, eight tiles' partials and 512 scores per load: at batch 1 it is the
only program of its layer, so each load waits for the one before, and few wide loads beat many narrow
ones. For the same reason the selection reads the importance row once and runs its argmax rounds in
registers (to 64k tokens; beyond, each round scans the row in memory), then gathers the chosen blocks'
keys in one load (up to 128 keys) and attends them with one softmax, instead of a dependent round trip
per block.

Each of these choices removes a dependent round trip to memory, which is what a batch-1 step's time is
made of; the split's tiles stay in a second launch because finishing them inside the main kernel (the
last program carrying on after an atomic counter) is slower at 16k tokens of context. The per-token
figures of each variant (whole model, step compiled and replayed from a CUDA graph, and the kernel alone
from scripts/nsa_decode_kernel_bench.py) are in the GPU report listed in results/README.md.

Float32 values throughout (the cache may be bf16). Products run on tensor cores in tf32 with float32
accumulation; the compressed scores, which decide the selection, run in 3xtf32 (float32 accuracy;
'ieee' beside tf32 in one kernel trips Triton 3.6's compiler). Compiled for sm_90 by the bundled ptxas
at the bake-off's NSA shape (attnbench/configs/nsa.toml):

| kernel | warps | registers | spills |
| --- | --- | --- | --- |
| one program | 8 | 255 | 76 B |
| main program after the split (8 tiles' partials, 512 scores per load) | 8 | 255 | none |
| split's tile scoring | 4 | 152 | none |

Shapes are static and the position is read on the device, so the step is CUDA-graph safe. `nsa_decode`
calls it for CUDA tensors (backend 'auto') after checking, once per shape, that it matches the PyTorch
step. Tests run it under Triton's interpreter on the CPU, compile it for sm_90 there, and compare it on
a GPU (tests/gpu).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

NEG = float(torch.finfo(torch.float32).min)  # nsa_decode's masked-logit fill (finite: no NaN rows)
RANK = 2.0 ** 20  # forced blocks' scores: above any importance (<= G), exact in float32


def available() -> bool:
    return triton is not None


if triton is not None:
    _NEG = tl.constexpr(NEG)  # Triton kernels read only constexpr globals
    _RANK = tl.constexpr(RANK)
    # tf32 tensor-core products (fp32 accumulation), except the compressed scores that decide the
    # selection: those at float32 accuracy (3xtf32), as the PyTorch step computes them, so the same
    # blocks win
    FAST = tl.constexpr("tf32")
    EXACT = tl.constexpr("tf32x3")

    @triton.jit
    def _scores(q, kt, USE_DOT: tl.constexpr, PREC: tl.constexpr):
        """q [BG, BD] @ kt^T with kt [BN, BD] -> [BG, BN], float32."""
        if USE_DOT:
            return tl.dot(q, tl.trans(kt), input_precision=PREC)
        return tl.sum(q[:, None, :] * kt[None, :, :], 2)

    @triton.jit
    def _mix(p, v, USE_DOT: tl.constexpr, PREC: tl.constexpr):
        """p [BG, BN] @ v [BN, BD] -> [BG, BD], float32."""
        if USE_DOT:
            return tl.dot(p, v, input_precision=PREC)
        return tl.sum(p[:, :, None] * v[None, :, :], 1)

    @triton.jit
    def _compressed_scores(q, kmc, oc, mc, od, md, n_complete, scale, D: tl.constexpr, DOT_NB: tl.constexpr):
        """q's scores against the block means `oc` (kmc: this head's [NB, D] rows) -> [BG, tile], in float32
        accuracy (they decide the selection): blocks not yet complete at the NEG fill, those past NB at -inf."""
        km = tl.load(kmc + oc[:, None] * D + od[None, :], mask=mc[:, None] & md[None, :], other=0.0)
        s = _scores(q, km.to(tl.float32), DOT_NB, EXACT) * scale
        s = tl.where((oc < n_complete)[None, :], s, _NEG)
        return tl.where(mc[None, :], s, float("-inf"))

    @triton.jit
    def _store_importance(imp_ptr, bh, NB, p, oc, mc, n_complete, ic):
        """The selection's importance of blocks `oc` (p [BG, tile]: the compressed probabilities, summed
        over the group), incomplete blocks at NEG, the forced blocks (first, previous, own) ranked on top."""
        imp = tl.sum(p, 0) + tl.where(oc < n_complete, 0.0, _NEG)
        imp = tl.where(oc == 0, tl.maximum(imp, _RANK), imp)
        imp = tl.where(oc == tl.maximum(ic - 1, 0), tl.maximum(imp, _RANK + 1), imp)
        imp = tl.where(oc == ic, tl.maximum(imp, _RANK + 2), imp)
        tl.store(imp_ptr + bh * NB + oc, imp, mask=mc)

    @triton.jit
    def _compressed_split_kernel(q_ptr, km_ptr, vm_ptr, s_ptr, pm_ptr, pl_ptr, pacc_ptr, pos_ptr, NB, NSPLIT, scale,
                                 G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BS: tl.constexpr, BLOCK_NB: tl.constexpr, DOT_NB: tl.constexpr):
        """One tile of BLOCK_NB block means per program (flash-decoding's split): the compressed scores
        (kept for the importance), and the tile's softmax partials: row max, sum, unnormalised output."""
        bh, sp = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr)
        og, od = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        mg, md = og < G, od < D
        q = tl.load(q_ptr + (bh * G + og[:, None]) * D + od[None, :], mask=mg[:, None] & md[None, :],
                    other=0.0).to(tl.float32)
        oc = sp * BLOCK_NB + tl.arange(0, BLOCK_NB)
        mc = oc < NB
        kmc, vmc = km_ptr + bh * NB * D, vm_ptr + bh * NB * D
        vm = tl.load(vmc + oc[:, None] * D + od[None, :], mask=mc[:, None] & md[None, :], other=0.0)
        s = _compressed_scores(q, kmc, oc, mc, od, md, (pos + 1) // BS, scale, D, DOT_NB)
        tl.store(s_ptr + (bh * G + og[:, None]) * NB + oc[None, :], s, mask=mg[:, None] & mc[None, :])
        m = tl.max(s, 1)  # finite: every tile holds at least one block (sp * BLOCK_NB < NB)
        p = tl.exp(s - m[:, None])
        part = (bh * NSPLIT + sp) * G + og
        tl.store(pm_ptr + part, m, mask=mg)
        tl.store(pl_ptr + part, tl.sum(p, 1), mask=mg)
        tl.store(pacc_ptr + part[:, None] * D + od[None, :], _mix(p, vm.to(tl.float32), DOT_NB, FAST),
                 mask=mg[:, None] & md[None, :])

    @triton.jit
    def _nsa_decode_kernel(q_ptr, gate_ptr, k_ptr, v_ptr, km_ptr, vm_ptr, imp_ptr, o_ptr, pos_ptr,
                           s_ptr, pm_ptr, pl_ptr, pacc_ptr, L, NB, NSPLIT, scale,
                           G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                           BS: tl.constexpr, S: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
                           BLOCK_NB: tl.constexpr, BLOCK_SEL: tl.constexpr, DOT: tl.constexpr,
                           SPLIT: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
                           BLOCK_IMP: tl.constexpr, ONE_SEL: tl.constexpr, BLOCK_S: tl.constexpr,
                           CH: tl.constexpr, BLOCK_SB: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr)
        og, od = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        mg, md = og < G, od < D
        q = tl.load(q_ptr + (bh * G + og[:, None]) * D + od[None, :], mask=mg[:, None] & md[None, :],
                    other=0.0).to(tl.float32)
        gp = gate_ptr + (bh * G + og) * 3
        g_cmp = tl.load(gp, mask=mg, other=0.0).to(tl.float32)
        g_slc = tl.load(gp + 1, mask=mg, other=0.0).to(tl.float32)
        g_swa = tl.load(gp + 2, mask=mg, other=0.0).to(tl.float32)
        kc, vc = k_ptr + bh * L * D, v_ptr + bh * L * D
        kmc, vmc = km_ptr + bh * NB * D, vm_ptr + bh * NB * D
        n_complete = (pos + 1) // BS  # blocks 0..n_complete-1 are complete (visible)
        ic = pos // BS

        # 1. compressed branch: softmax over all NB block means, incomplete ones at the NEG fill
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        lsum = tl.zeros([BLOCK_G], tl.float32)
        acc_c = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if SPLIT:
            # the tiles' partials, BLOCK_SPLIT tiles per load, combined with an online softmax; then the
            # importance from the scores the tiles kept, BLOCK_IMP blocks per load. One program walks these
            # loops (batch 1: one program per layer), and each round trip to memory waits for the one before:
            # wide loads make few of them.
            osp = tl.arange(0, BLOCK_SPLIT)
            for s0 in range(0, NSPLIT, BLOCK_SPLIT):
                ms2 = ((s0 + osp) < NSPLIT)[:, None] & mg[None, :]
                part = (bh * NSPLIT + s0 + osp[:, None]) * G + og[None, :]  # [BLOCK_SPLIT, BLOCK_G]
                m_t = tl.load(pm_ptr + part, mask=ms2, other=float("-inf"))
                m_new = tl.where(mg, tl.maximum(m, tl.max(m_t, 0)), 0.0)  # padded rows: 0, not -inf - -inf
                w = tl.where(ms2, tl.exp(m_t - m_new[None, :]), 0.0)
                a = tl.where(mg, tl.exp(m - m_new), 0.0)  # the first round: exp(-inf) = 0
                lsum = lsum * a + tl.sum(tl.load(pl_ptr + part, mask=ms2, other=0.0) * w, 0)
                pacc = tl.load(pacc_ptr + part[:, :, None] * D + od[None, None, :],
                               mask=ms2[:, :, None] & md[None, None, :], other=0.0)
                acc_c = acc_c * a[:, None] + tl.sum(pacc * w[:, :, None], 0)
                m = m_new
            acc_c = tl.where(mg[:, None], acc_c / lsum[:, None], 0.0)
            for c0 in range(0, NB, BLOCK_IMP):
                oc = c0 + tl.arange(0, BLOCK_IMP)
                mc = oc < NB
                s = tl.load(s_ptr + (bh * G + og[:, None]) * NB + oc[None, :], mask=mg[:, None] & mc[None, :],
                            other=float("-inf"))
                p = tl.where(mg[:, None], tl.exp(s - m[:, None]) / lsum[:, None], 0.0)
                _store_importance(imp_ptr, bh, NB, p, oc, mc, n_complete, ic)
        else:  # one program: two passes over the block means (row max and sum, then the rest)
            for c0 in range(0, NB, BLOCK_NB):
                oc = c0 + tl.arange(0, BLOCK_NB)
                mc = oc < NB
                s = _compressed_scores(q, kmc, oc, mc, od, md, n_complete, scale, D, DOT)
                m_new = tl.maximum(m, tl.max(s, 1))
                lsum = lsum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
                m = m_new
            for c0 in range(0, NB, BLOCK_NB):
                oc = c0 + tl.arange(0, BLOCK_NB)
                mc = oc < NB
                s = _compressed_scores(q, kmc, oc, mc, od, md, n_complete, scale, D, DOT)
                p = tl.where(mg[:, None], tl.exp(s - m[:, None]) / lsum[:, None], 0.0)
                vm = tl.load(vmc + oc[:, None] * D + od[None, :], mask=mc[:, None] & md[None, :], other=0.0)
                acc_c += _mix(p, vm.to(tl.float32), DOT, FAST)
                _store_importance(imp_ptr, bh, NB, p, oc, mc, n_complete, ic)
        tl.debug_barrier()

        # 2. selection: block_counts rounds of argmax over the importance row. Where the row fits one scan tile
        # (to 64k tokens at the defaults) it is read once and the rounds run in registers; otherwise each
        # round scans the row in memory and marks its choice there. Then the chosen blocks' keys are gathered,
        # CH blocks per load (all of them at the bake-off shape), and attended with an online softmax.
        osl = tl.arange(0, BLOCK_S)
        sel = tl.full([BLOCK_S], -1, tl.int64)  # the chosen blocks; -1: nothing left to choose
        if ONE_SEL:
            osel = tl.arange(0, BLOCK_SEL)
            row = tl.load(imp_ptr + bh * NB + osel, mask=osel < NB, other=float("-inf"))
        for r in tl.static_range(S):
            if ONE_SEL:
                best_v, best_i = tl.max(row, 0, return_indices=True)
                row = tl.where(osel == best_i, float("-inf"), row)
            else:
                best_v, best_i = _select_in_memory(imp_ptr, bh, NB, BLOCK_SEL)
            sel = tl.where(osl == r, tl.where(best_v > float("-inf"), best_i.to(tl.int64), -1), sel)
        oj = tl.arange(0, BLOCK_SB)
        slot, within = oj // BS, oj % BS
        m_s = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_G], tl.float32)
        acc_s = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for c0 in tl.static_range(0, S, CH):
            blk = tl.sum(tl.where(osl[None, :] == (c0 + slot)[:, None], sel[None, :], 0), 1)  # [BLOCK_SB]
            ids = blk * BS + within
            keep = (slot < CH) & (c0 + slot < S) & (blk >= 0) & (ids <= pos)
            kb = tl.load(kc + ids[:, None] * D + od[None, :], mask=keep[:, None] & md[None, :], other=0.0)
            vb = tl.load(vc + ids[:, None] * D + od[None, :], mask=keep[:, None] & md[None, :], other=0.0)
            s = tl.where(keep[None, :], _scores(q, kb.to(tl.float32), DOT, FAST) * scale, _NEG)
            m_new = tl.maximum(m_s, tl.max(s, 1))
            alpha = tl.exp(m_s - m_new)
            p = tl.exp(s - m_new[:, None])
            l_s = l_s * alpha + tl.sum(p, 1)
            acc_s = acc_s * alpha[:, None] + _mix(p, vb.to(tl.float32), DOT, FAST)
            m_s = m_new
        out = g_slc[:, None] * acc_s / l_s[:, None]
        out += (g_cmp * (n_complete > 0).to(tl.float32))[:, None] * acc_c

        # 3. sliding window: positions pos-W+1 .. pos
        if W > 0:
            ow = tl.arange(0, BLOCK_W)
            ids = pos - (W - 1) + ow
            keep = (ids >= 0) & (ow < W)
            kw = tl.load(kc + ids[:, None] * D + od[None, :], mask=keep[:, None] & md[None, :], other=0.0)
            vw = tl.load(vc + ids[:, None] * D + od[None, :], mask=keep[:, None] & md[None, :], other=0.0)
            s = tl.where(keep[None, :], _scores(q, kw.to(tl.float32), DOT, FAST) * scale, _NEG)
            mw = tl.max(s, 1)
            p = tl.exp(s - mw[:, None])
            out += g_swa[:, None] * _mix(p, vw.to(tl.float32), DOT, FAST) / tl.sum(p, 1)[:, None]
        tl.store(o_ptr + (bh * G + og[:, None]) * D + od[None, :], out, mask=mg[:, None] & md[None, :])

    @triton.jit
    def _select_in_memory(imp_ptr, bh, NB, BLOCK_SEL: tl.constexpr):
        """One selection round over an importance row wider than a tile: its argmax (value, index), the
        chosen entry set to -inf in memory for the next round."""
        best_v = tl.full([1], float("-inf"), tl.float32)
        best_i = tl.zeros([1], tl.int64)
        for c0 in range(0, NB, BLOCK_SEL):
            oc = c0 + tl.arange(0, BLOCK_SEL)
            imp = tl.load(imp_ptr + bh * NB + oc, mask=oc < NB, other=float("-inf"))
            tile_v = tl.max(imp, 0)
            tile_i = c0 + tl.argmax(imp, 0)
            better = tile_v > best_v
            best_i = tl.where(better, tile_i, best_i)
            best_v = tl.where(better, tile_v, best_v)
        tl.debug_barrier()
        v, i = tl.max(best_v, 0), tl.sum(best_i, 0)
        tl.store(imp_ptr + bh * NB + i, float("-inf"), mask=v > float("-inf"))
        tl.debug_barrier()
        return v, i


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def nsa_decode_triton(q: torch.Tensor, kv: torch.Tensor, kv_means: torch.Tensor, pos: torch.Tensor,
                      gates: torch.Tensor, block_size: int, block_counts: int, window_size: int,
                      scale: float, block_sel: int | None = None, block_nb: int | None = None,
                      block_split: int | None = None, block_imp: int | None = None,
                      sel_gather: int | None = None) -> torch.Tensor:
    """nsa_decode's result (its layouts; no block_indices override): one kernel launch per call, two
    where the block means span several tiles. `block_sel` (a power of two >= 16) and `block_nb` (a power of
    two; >= 16 where G and D are) override the selection scan's and the compressed pass's tiles;
    `block_split` and `block_imp` (powers of two) how many tiles' partials and how many block scores the
    main program reads per load after the split; `sel_gather` how many chosen blocks' keys are gathered
    per load (tests: several tiles, loads and gathers at small sizes)."""
    B, _, HQ, D = q.shape
    _, _, H, L, _ = kv.shape
    G, NB = HQ // H, kv_means.shape[3]
    if not (kv.is_contiguous() and kv_means.is_contiguous()):
        raise ValueError("nsa_decode_triton needs contiguous kv and kv_means (the cache buffers)")
    qh = q.reshape(B * H, G, D).contiguous()
    g = gates.reshape(B * H, G, 3).contiguous()
    o = torch.empty(B * H, G, D, dtype=q.dtype, device=q.device)
    imp = torch.empty(B * H, NB, dtype=torch.float32, device=q.device)
    BG, BD = _pow2(G), _pow2(D)
    BNB = block_nb or min(_pow2(NB, 16), 64)  # 64 x 64 fp32 tiles: on sm_90 (8 warps) ~100 B of spills; 128 spilled 1.6 KB
    BSEL = block_sel or min(_pow2(NB, 16), 2048)  # the selection scans the 1-D importance row: one tile to 64k tokens
    BW = _pow2(window_size, 16) if window_size > 0 else 16
    CH = sel_gather or max(1, min(block_counts, 128 // block_size))  # gathers of <= 128 keys, like the window's 64
    dot = BG >= 16 and BD >= 16  # tl.dot wants every dimension >= 16
    nsplit = triton.cdiv(NB, BNB)
    split = nsplit > 1  # several tiles of block means: score them in parallel programs first
    # after the split: [8, 16, 64] fp32 partials and [16, 512] fp32 scores per load, 32 registers a thread each;
    # fixed where there is no split (unused there: no extra specializations of the one-program kernel)
    BSP = (block_split or min(_pow2(nsplit), 8)) if split else 1
    BIMP = (block_imp or min(_pow2(NB, 16), 512)) if split else 16
    if split:
        scores = torch.empty(B * H, G, NB, dtype=torch.float32, device=q.device)
        pm = torch.empty(B * H, nsplit, G, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * H, nsplit, G, D, dtype=torch.float32, device=q.device)
        _compressed_split_kernel[(B * H, nsplit)](
            qh, kv_means[0], kv_means[1], scores, pm, pl, pacc, pos, NB, nsplit, float(scale),
            G=G, D=D, BLOCK_G=BG, BLOCK_D=BD, BS=block_size, BLOCK_NB=BNB, DOT_NB=dot, num_warps=4)
    else:
        scores = pm = pl = pacc = imp  # not read
    _nsa_decode_kernel[(B * H,)](
        qh, g, kv[0], kv[1], kv_means[0], kv_means[1], imp, o, pos, scores, pm, pl, pacc, L, NB, nsplit,
        float(scale), G=G, D=D, BLOCK_G=BG, BLOCK_D=BD, BS=block_size, S=block_counts, W=window_size,
        BLOCK_W=BW, BLOCK_NB=BNB, BLOCK_SEL=BSEL, DOT=dot, SPLIT=split, BLOCK_SPLIT=BSP, BLOCK_IMP=BIMP,
        ONE_SEL=NB <= BSEL, BLOCK_S=_pow2(block_counts), CH=CH, BLOCK_SB=_pow2(CH * block_size, 16), num_warps=8)
    return o.view(B, 1, HQ, D)
