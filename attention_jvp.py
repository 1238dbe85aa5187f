"""Attention and its JVP (forward-mode derivative) in one streaming pass.

The continuous-time consistency loss needs dF/dt of the whole network. For attention

    O  = softmax(S) V,            S  = Q Kᵀ · s
    tO = P tV + (P∘tS) V − rowsum(P∘tS) ∘ O,    tS = (tQ Kᵀ + Q tKᵀ) · s,

where P = softmax(S) and t· is the tangent of ·. A FlashAttention-2 style kernel streams over key tiles keeping,
per query row, the running max m, the running sum l = Σ exp(S − m), and three running sums rescaled together:
acc_o = Σ p·v, acc_t = Σ p·tv + Σ (p∘ts)·v and mu = Σ p∘ts. At the end O = acc_o/l and tO = acc_t/l − (mu/l)·O.
The L×L matrix is never stored, which matters at 480p (32,760 tokens per head).

One entry point, `attention(q, k, v, tq, tk, tv, *, scale, mask)`, on [B, L, H, D] tensors:
- no tangent: the primal O, differentiable. CUDA: PyTorch SDPA (cuDNN/Flash), or FlexAttention with a block mask.
  CPU: SDPA, or the reference with a block mask.
- tangents (any of tq, tk, tv; missing ones are zero): (O, tO), never differentiable (JVP passes run under
  no_grad). CUDA: two kernels below, the Hopper kernel (Gluon, sm_90, fp16/bf16, head dims 64/128) where it
  applies, else the Triton tile kernel (other GPUs, fp32, other head dims; on CPU it runs in Triton's interpreter in
  the tests). CPU: the reference.
`backend="sm90"`, `"triton"` or `"reference"` forces one path. The reference is plain differentiable torch (it also
works under torch.func.jvp), chunked over queries so memory stays bounded; it is the test oracle's twin.

Block masks (causal_rcm.md) are described by chunk token counts. Each query row i then sees the keys
[0, a_i) ∪ [b_i, e_i): block-causal rows see every chunk up to their own; teacher-forcing rows of the noisy copy
see the clean past and their own noisy chunk. The kernel reads (a, b, e) per row, skips key tiles no row of the
query tile sees, and masks elements only in the few tiles a chunk boundary cuts (both kernels).

On one H200 (bf16, [1, 32760, H, 128], counting 3x the forward FLOPs) the Hopper kernel runs fwd+JVP at 1.18x
SDPA's forward TFLOP/s, 1.47x faster than NVlabs/rcm's autotuned kernel; the tile kernel at 0.95x and 1.18x
(`python bench.py attn`; a first call compiles in about 2 s).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Block masks
@dataclass(frozen=True)
class ChunkMask:
    """A block mask at chunk granularity. chunk_tokens: tokens per video chunk, e.g. (1560,) * 21 at 480p."""
    kind: str  # "block_causal" or "teacher_forcing"
    chunk_tokens: tuple[int, ...]

    def seq_len(self) -> int:
        """Sequence length the mask applies to (queries and keys alike)."""
        n = sum(self.chunk_tokens)
        return 2 * n if self.kind == "teacher_forcing" else n


def block_causal(chunk_tokens) -> ChunkMask:
    """Queries of chunk c see the keys of chunks ≤ c (full attention inside a chunk)."""
    return _chunk_mask("block_causal", chunk_tokens)


def teacher_forcing(chunk_tokens) -> ChunkMask:
    """On the packed sequence [clean copy | noisy copy]: clean chunk c sees clean chunks ≤ c; noisy chunk c sees
    clean chunks < c and itself; clean queries never see noisy keys."""
    return _chunk_mask("teacher_forcing", chunk_tokens)


def _chunk_mask(kind, chunk_tokens):
    chunk_tokens = tuple(int(n) for n in chunk_tokens)
    if not chunk_tokens or min(chunk_tokens) <= 0:
        raise ValueError(f"chunk_tokens must be positive token counts per chunk, got {chunk_tokens}")
    return ChunkMask(kind, chunk_tokens)


@functools.lru_cache(maxsize=32)
def kv_ranges(mask: ChunkMask, device) -> torch.Tensor:
    """Row i of the attention sees keys [0, a_i) ∪ [b_i, e_i). Returns int32 [3, L] = (a, b, e); an empty second
    range is (b, e) = (L, 0) so that it never widens a tile's key range."""
    ends = torch.tensor(mask.chunk_tokens).cumsum(0)
    starts = ends - torch.tensor(mask.chunk_tokens)
    chunk = torch.repeat_interleave(torch.arange(len(ends)), torch.tensor(mask.chunk_tokens))  # chunk of each token
    n, L = int(ends[-1]), mask.seq_len()
    a, b, e = ends[chunk], torch.full_like(chunk, L), torch.zeros_like(chunk)
    if mask.kind == "teacher_forcing":  # clean rows as above; noisy rows: clean past, then their own noisy chunk
        a = torch.cat([a, starts[chunk]])
        b = torch.cat([b, n + starts[chunk]])
        e = torch.cat([e, n + ends[chunk]])
    return torch.stack([a, b, e]).to(device=device, dtype=torch.int32)


def _dense_mask(ranges, rows, Lk):
    """Boolean [len(rows), Lk]: which keys the given query rows see."""
    j = torch.arange(Lk, device=ranges.device)
    a, b, e = (r[rows, None] for r in ranges)
    return (j < a) | ((j >= b) & (j < e))


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernel: FlashAttention-2 forward + JVP
@triton.jit
def _rescale(alpha, l_i, mu_i, acc_o, acc_t):
    """Move the running sums to a new reference max: every one of them is multiplied by alpha = 2^(m_old − m_new)."""
    return l_i * alpha, mu_i * alpha, acc_o * alpha[:, None], acc_t * alpha[:, None]


@triton.jit
def _tile(q, tq, desc_k, desc_tk, desc_v, desc_tv, off_b, off_hd, start_n, Lk, a, b, e, offs_n, m_i, l_i, mu_i,
          acc_o, acc_t, scale_log2, scale, BLOCK_N: tl.constexpr, D: tl.constexpr, EDGE: tl.constexpr,
          MASKED: tl.constexpr, PRECISION: tl.constexpr, LAZY: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) folded into the running statistics of a query tile. Loads are bulk
    tensor copies (TMA on Hopper) that zero-fill past the sequence end."""
    k = desc_k.load([off_b, start_n, off_hd]).reshape(BLOCK_N, D)
    tk = desc_tk.load([off_b, start_n, off_hd]).reshape(BLOCK_N, D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    ts = tl.dot(tq, tl.trans(k), input_precision=PRECISION)
    ts = tl.dot(q, tl.trans(tk), ts, input_precision=PRECISION)  # tQ·Kᵀ + Q·tKᵀ in one accumulator
    if EDGE:  # a tile cut by the sequence end or a chunk boundary
        n = start_n + offs_n
        if MASKED:
            seen = (n[None, :] < a[:, None]) | ((n[None, :] >= b[:, None]) & (n[None, :] < e[:, None]))
        else:
            seen = (n < Lk)[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see nothing yet: keep exp2 finite
        p = tl.math.exp2(s * scale_log2 - m_use[:, None])  # log2(e) folded into the scale: one FMA and exp2
        l_i, mu_i, acc_o, acc_t = _rescale(tl.math.exp2(m_i - m_use), l_i, mu_i, acc_o, acc_t)
        m_i = m_new
    else:
        # Lazy rescaling: the reference max m_i moves only when some row's max grew by more than 2^LAZY (then
        # exp2 stays below 2^LAZY, harmless in fp32 sums and bf16 P), which after the first tiles is rare.
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        if tl.max(m_new - m_i, 0) > LAZY:
            l_i, mu_i, acc_o, acc_t = _rescale(tl.math.exp2(m_i - m_new), l_i, mu_i, acc_o, acc_t)
            m_i = m_new
        p = tl.math.exp2(s * scale_log2 - m_i[:, None])
    h = p * (ts * scale)  # P∘tS (unnormalised)
    l_i = l_i + tl.sum(p, 1)
    mu_i = mu_i + tl.sum(h, 1)
    v = desc_v.load([off_b, start_n, off_hd]).reshape(BLOCK_N, D)
    tv = desc_tv.load([off_b, start_n, off_hd]).reshape(BLOCK_N, D)
    p = p.to(v.dtype)
    acc_o = tl.dot(p, v, acc_o, input_precision=PRECISION)
    acc_t = tl.dot(p, tv, acc_t, input_precision=PRECISION)
    acc_t = tl.dot(h.to(v.dtype), v, acc_t, input_precision=PRECISION)  # P·tV + (P∘tS)·V in one accumulator
    return m_i, l_i, mu_i, acc_o, acc_t


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attention_jvp_kernel(desc_q, desc_tq, desc_k, desc_tk, desc_v, desc_tv, desc_o, desc_to, LSE, RANGES,
                          scale_log2, scale, Lq, Lk, H, D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, LAZY: tl.constexpr):
    """Tensor descriptors over [B, L, H·D] views of the [B, L, H, D] inputs and outputs (tiles [1, BLOCK, D]);
    LSE: [B, H, Lq] fp32 (natural log); RANGES: int32 [3, Lq] per-row key ranges (a, b, e) when MASKED.
    Grid: (query tiles, B·H)."""
    # The last query tiles see the most keys under causal masks: start them first so the tail of the grid is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b, off_hd = pid_bh // H, pid_bh % H * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    in_q = offs_m < Lq
    q = desc_q.load([off_b, pid_m * BLOCK_M, off_hd]).reshape(BLOCK_M, D)
    tq = desc_tq.load([off_b, pid_m * BLOCK_M, off_hd]).reshape(BLOCK_M, D)

    # Key tiles of this query tile: [0, full) seen by every row; then edge tiles [full, a_hi) and [b_lo, e_hi).
    if MASKED:
        a = tl.load(RANGES + offs_m, mask=in_q, other=Lk)
        b = tl.load(RANGES + Lq + offs_m, mask=in_q, other=Lk)
        e = tl.load(RANGES + 2 * Lq + offs_m, mask=in_q, other=0)
        full = tl.min(a, 0) // BLOCK_N * BLOCK_N
        a_hi = tl.cdiv(tl.max(tl.where(in_q, a, 0), 0), BLOCK_N) * BLOCK_N
        b_lo = tl.maximum(tl.min(b, 0) // BLOCK_N * BLOCK_N, a_hi)  # a tile shared by both ranges is done once
        e_hi = tl.cdiv(tl.max(e, 0), BLOCK_N) * BLOCK_N
    else:
        a, b, e = Lk, Lk, 0
        full = Lk // BLOCK_N * BLOCK_N
        a_hi = tl.cdiv(Lk, BLOCK_N) * BLOCK_N
        b_lo, e_hi = a_hi, a_hi
    n_first = (a_hi - full) // BLOCK_N
    n_edge = n_first + tl.maximum(e_hi - b_lo, 0) // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mu_i = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, full, BLOCK_N):
        m_i, l_i, mu_i, acc_o, acc_t = _tile(q, tq, desc_k, desc_tk, desc_v, desc_tv, off_b, off_hd, start_n, Lk,
                                             a, b, e, offs_n, m_i, l_i, mu_i, acc_o, acc_t, scale_log2, scale,
                                             BLOCK_N, D, False, MASKED, PRECISION, LAZY)
    for i in range(0, n_edge):
        start_n = tl.where(i < n_first, full + i * BLOCK_N, b_lo + (i - n_first) * BLOCK_N)
        m_i, l_i, mu_i, acc_o, acc_t = _tile(q, tq, desc_k, desc_tk, desc_v, desc_tv, off_b, off_hd, start_n, Lk,
                                             a, b, e, offs_n, m_i, l_i, mu_i, acc_o, acc_t, scale_log2, scale,
                                             BLOCK_N, D, True, MASKED, PRECISION, LAZY)

    o = acc_o / l_i[:, None]
    to = acc_t / l_i[:, None] - (mu_i / l_i)[:, None] * o
    desc_o.store([off_b, pid_m * BLOCK_M, off_hd], o.to(desc_o.dtype).reshape(1, BLOCK_M, D))  # rows past Lq clipped
    desc_to.store([off_b, pid_m * BLOCK_M, off_hd], to.to(desc_to.dtype).reshape(1, BLOCK_M, D))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=in_q)


# Tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages) keyed on (GPU arch, head dim, bytes per element), measured
# with `python bench.py attn --configs ...`. A small fixed table instead of autotuning: a first call compiles one kernel.
# H200, bf16, D=128: (128, 64, 8, 2) 36.8 ms at [1, 32760, 12, 128]; (128, 32, 8, 3) 41.4 ms;
# deeper pipelines or BLOCK_N=128 exceed shared memory.
CONFIGS = {
    ("sm90", 64, 2): (128, 64, 8, 2),
    ("sm90", 128, 2): (128, 64, 8, 2),
}
LAZY_RESCALE = 8.0  # log2 headroom of the lazy rescaling (0: rescale whenever a row max grows)
FALLBACK_CONFIG = (64, 32, 4, 2)  # other GPUs, head dims and fp32: small enough to fit in shared memory everywhere
INTERPRETER_CONFIG = (32, 32, 4, 1)  # CPU tests: small tiles exercise the edge-tile logic at small shapes


def _config(q):
    if not q.is_cuda:
        return INTERPRETER_CONFIG
    arch = "sm" + "".join(map(str, torch.cuda.get_device_capability(q.device)))
    return CONFIGS.get((arch, q.shape[-1], q.element_size()), FALLBACK_CONFIG)


def _no_grad_check(*tensors):
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise RuntimeError("the attention JVP kernels have no backward: call attention(q, k, v, tq, tk, tv) under "
                           "torch.no_grad() (tangents never need gradients), or pass backend='reference'")


@torch.compiler.disable  # torch.compile of a block (--compile) leaves the kernel launch to eager mode
def _attention_triton(q, k, v, tq, tk, tv, scale, mask, tiles=None):
    """(o, to, lse) from the Triton kernel; inputs [B, L, H, D], lse [B, H, Lq] fp32. tiles: (BLOCK_M, BLOCK_N,
    num_warps, num_stages) instead of the table's (bench.py tries others)."""
    _no_grad_check(q, k, v, tq, tk, tv)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o, to = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(2))
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    block_m, block_n, num_warps, num_stages = tiles or _config(q)

    def desc(x, rows):  # [B, L, H, D] -> a descriptor over [B, L, H·D] with [1, rows, D] tiles
        return TensorDescriptor.from_tensor(x.contiguous().flatten(2), [1, rows, D])

    _attention_jvp_kernel[(triton.cdiv(Lq, block_m), B * H)](
        desc(q, block_m), desc(tq, block_m), desc(k, block_n), desc(tk, block_n), desc(v, block_n), desc(tv, block_n),
        desc(o, block_m), desc(to, block_m), lse, None if mask is None else kv_ranges(mask, q.device),
        scale * LOG2E, scale, Lq, Lk, H, D=D, BLOCK_M=block_m, BLOCK_N=block_n, MASKED=mask is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", LAZY=LAZY_RESCALE, num_warps=num_warps,
        num_stages=num_stages)
    return o, to, lse


# ----------------------------------------------------------------------------------------------------------------
# The Hopper kernel (sm_90): the same pass in Gluon, Triton's lower-level dialect, where warps and barriers are
# explicit. The tile language waits on every wgmma and synchronises all warps after it, so the softmax never overlaps
# matrix work and the tile kernel above tops out at cuDNN's forward rate. Here the warps are specialised as in
# FlashAttention-3: a loader warp streams K/tK and V/tV through two-slot rings (TMA, ready/empty mbarriers), and two
# consumer warpgroups each own 64 query rows of a 128-row tile; while one runs its softmax, the other's wgmmas keep
# the tensor cores busy. The running sums are rescaled every tile (a lazy rescale would need a CTA-wide vote).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # Triton >= 3.7 / 3.6 names


@gluon.jit
def _sm90_tile_start(j, n_first, b_lo, BLOCK_N: gl.constexpr):
    """First key of the program's j-th key tile: n_first tiles from 0, then tiles from b_lo (block masks)."""
    return gl.where(j < n_first, j * BLOCK_N, b_lo + (j - n_first) * BLOCK_N)


@gluon.jit
def _sm90_loader(c: gl.constexpr, descs, smem, bars, rows, dims, out, scales, D: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """One warp: Q/tQ of both consumers, then K/tK and V/tV of the program's j-th key tile into ring slot j % 2 once
    both consumers have released the slot (c is unused: worker partitions share one signature)."""
    desc_q, desc_tq, desc_k, desc_tk, desc_v, desc_tv = descs
    q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem = smem
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    q_row, k_row, col, n_tiles, full, n_first, b_lo = rows
    mbarrier.expect(q_bar, 4 * desc_q.block_type.nbytes)
    for i in gl.static_range(2):
        _tma_load(desc_q, [q_row + i * BLOCK_M, col], q_bar, q_smem.index(i))
        _tma_load(desc_tq, [q_row + i * BLOCK_M, col], q_bar, tq_smem.index(i))
    for j in range(n_tiles):
        slot, phase = j % 2, j // 2 & 1
        row = k_row + _sm90_tile_start(j, n_first, b_lo, BLOCK_N)
        mbarrier.wait(k_empty.index(slot), phase ^ 1)  # a fresh mbarrier counts as released
        mbarrier.expect(k_ready.index(slot), 2 * desc_k.block_type.nbytes)
        _tma_load(desc_k, [row, col], k_ready.index(slot), k_smem.index(slot))
        _tma_load(desc_tk, [row, col], k_ready.index(slot), tk_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), 2 * desc_v.block_type.nbytes)
        _tma_load(desc_v, [row, col], v_ready.index(slot), v_smem.index(slot))
        _tma_load(desc_tv, [row, col], v_ready.index(slot), tv_smem.index(slot))


@gluon.jit
def _sm90_consumer(c: gl.constexpr, descs, smem, bars, rows, dims, out, scales, D: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """One warpgroup: query rows [c·BLOCK_M, (c + 1)·BLOCK_M) of the program's tile, in FlashAttention-2 order."""
    q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem = smem
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    q_row, k_row, col, n_tiles, full, n_first, b_lo = rows
    Lq, Lk, H, pid_bh, pid_m = dims
    O, TO, LSE, RANGES = out
    scale_log2, scale = scales
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P, h as wgmma A
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    mu_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    acc_o = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    acc_t = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    q, tq = q_smem.index(c), tq_smem.index(c)
    if MASKED:  # this warpgroup's rows see keys [0, a) ∪ [b, e)
        m = pid_m * 2 * BLOCK_M + c * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_s)
        a = gl.load(RANGES + m, mask=m < Lq, other=Lk)
        b = gl.load(RANGES + Lq + m, mask=m < Lq, other=Lk)
        e = gl.load(RANGES + 2 * Lq + m, mask=m < Lq, other=0)
    mbarrier.wait(q_bar, 0)
    for j in range(n_tiles):
        slot, phase = j % 2, j // 2 & 1
        start_n = _sm90_tile_start(j, n_first, b_lo, BLOCK_N)
        mbarrier.wait(k_ready.index(slot), phase)
        kT = k_smem.index(slot).permute((1, 0))
        s = warpgroup_mma(q, kT, zero_s, use_acc=False, is_async=True)
        ts = warpgroup_mma(tq, kT, zero_s, use_acc=False, is_async=True)
        ts = warpgroup_mma(q, tk_smem.index(slot).permute((1, 0)), ts, is_async=True)  # tQ·Kᵀ + Q·tKᵀ
        s, ts = warpgroup_mma_wait(0, deps=(s, ts))
        mbarrier.arrive(k_empty.index(slot), count=1)
        if start_n + BLOCK_N > full:  # a tile cut by the sequence end or a chunk boundary
            n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))[None, :]
            if MASKED:
                seen = (n < a[:, None]) | ((n >= b[:, None]) & (n < e[:, None]))
            else:
                seen = n < Lk
            s = gl.where(seen, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * scale_log2)
        if MASKED:  # a row may see nothing yet: keep exp2 finite
            m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * scale_log2 - m_new[:, None])
        h = p * (ts * scale)  # P∘tS (unnormalised)
        l_i = l_i * alpha + gl.sum(p, 1)
        mu_i = mu_i * alpha + gl.sum(h, 1)
        m_i = m_new
        alpha = gl.convert_layout(alpha, rows_o)[:, None]
        acc_o, acc_t = acc_o * alpha, acc_t * alpha
        p = gl.convert_layout(p.to(dtype), p_layout)
        h = gl.convert_layout(h.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(slot), phase)
        acc_o = warpgroup_mma(p, v_smem.index(slot), acc_o, is_async=True)
        acc_t = warpgroup_mma(p, tv_smem.index(slot), acc_t, is_async=True)
        acc_t = warpgroup_mma(h, v_smem.index(slot), acc_t, is_async=True)  # P·tV + (P∘tS)·V in one accumulator
        acc_o, acc_t = warpgroup_mma_wait(0, deps=(acc_o, acc_t))
        mbarrier.arrive(v_empty.index(slot), count=1)

    l_o = gl.convert_layout(l_i, rows_o)[:, None]
    o = acc_o / l_o
    to = acc_t / l_o - gl.convert_layout(mu_i, rows_o)[:, None] / l_o * o
    r = c * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_o)  # row in the program's tile
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    at = (q_row + r).to(gl.int64)[:, None] * (H * D) + col + d[None, :]
    in_q = (pid_m * 2 * BLOCK_M + r < Lq)[:, None]
    gl.store(O + at, o.to(dtype), mask=in_q)
    gl.store(TO + at, to.to(dtype), mask=in_q)
    m = pid_m * 2 * BLOCK_M + c * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_s)
    gl.store(LSE + pid_bh.to(gl.int64) * Lq + m, (m_i + gl.log2(l_i)) * 0.6931471805599453, mask=m < Lq)


@gluon.jit
def _attention_jvp_sm90(desc_q, desc_tq, desc_k, desc_tk, desc_v, desc_tv, O, TO, LSE, RANGES, scale_log2, scale, Lq,
                        Lk, H, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr):
    """Descriptors over [B·L, H·D] views of the [B, L, H, D] inputs (a tile running into the next batch element is
    masked, the last one zero-filled); O, TO [B, Lq, H, D]; LSE [B, H, Lq] fp32; RANGES: int32 [3, Lq] per-row key
    ranges (a, b, e) when MASKED. Each program does 2·BLOCK_M query rows. Grid: (cdiv(Lq, 2·BLOCK_M), B·H)."""
    dtype: gl.constexpr = desc_q.dtype
    pid_m, pid_bh = gl.program_id(0), gl.program_id(1)
    off_b, col = pid_bh // H, pid_bh % H * D
    # The program's key tiles, as in the tile kernel: [0, full) seen by every row, edge tiles up to a_hi, [b_lo, e_hi).
    if MASKED:
        m = pid_m * 2 * BLOCK_M + gl.arange(0, 2 * BLOCK_M, layout=gl.BlockedLayout([1], [32], [4], [0]))
        a = gl.load(RANGES + m, mask=m < Lq, other=Lk)
        full = gl.min(a, 0) // BLOCK_N * BLOCK_N
        a_hi = gl.cdiv(gl.max(gl.where(m < Lq, a, 0), 0), BLOCK_N) * BLOCK_N
        b_lo = gl.maximum(gl.min(gl.load(RANGES + Lq + m, mask=m < Lq, other=Lk), 0) // BLOCK_N * BLOCK_N, a_hi)
        e_hi = gl.cdiv(gl.max(gl.load(RANGES + 2 * Lq + m, mask=m < Lq, other=0), 0), BLOCK_N) * BLOCK_N
        n_first = a_hi // BLOCK_N
        n_tiles = n_first + gl.maximum(e_hi - b_lo, 0) // BLOCK_N
    else:
        full = Lk // BLOCK_N * BLOCK_N
        n_tiles = gl.cdiv(Lk, BLOCK_N)
        n_first = n_tiles
        b_lo = 0
    rows = (off_b * Lq + pid_m * 2 * BLOCK_M, off_b * Lk, col, n_tiles, full, n_first, b_lo)
    smem = (gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], desc_q.layout),   # Q of both consumers
            gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], desc_q.layout),   # tQ
            gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], desc_k.layout),   # K ring
            gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], desc_k.layout),   # tK ring
            gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], desc_k.layout),   # V ring
            gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], desc_k.layout))   # tV ring
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready, k_empty, v_ready, v_empty = (gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout()),
                                          gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout()),
                                          gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout()),
                                          gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout()))
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # released when both consumers are done with the slot
        mbarrier.init(v_empty.index(i), count=2)
    descs = (desc_q, desc_tq, desc_k, desc_tk, desc_v, desc_tv)
    bars = (q_bar, k_ready, k_empty, v_ready, v_empty)
    dims = (Lq, Lk, H, pid_bh, pid_m)
    out = (O, TO, LSE, RANGES)
    scales = (scale_log2, scale)
    gl.warp_specialize([
        (_sm90_consumer, (0, descs, smem, bars, rows, dims, out, scales, D, BLOCK_M, BLOCK_N, MASKED)),  # default
        (_sm90_consumer, (1, descs, smem, bars, rows, dims, out, scales, D, BLOCK_M, BLOCK_N, MASKED)),
        (_sm90_loader, (1, descs, smem, bars, rows, dims, out, scales, D, BLOCK_M, BLOCK_N, MASKED)),
    ], [4, 1], [CONSUMER_REGS, 24])


# (rows per consumer, key tile, registers of the second consumer warpgroup, launch register cap): the loader warp's
# warpgroup gives back all but 24 registers, so each consumer gets 240 of the 3 × 128 × 168 launched; 192 KiB of
# shared memory at D = 128. Measured on an H200: 240 registers beat 232.
SM90_CONFIG = (64, 64, 240, 168)


def _sm90_supported(q):
    """The Hopper kernel covers fp16/bf16 attention with head dims 64 and 128 on sm_90."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128))


@torch.compiler.disable
def _attention_sm90(q, k, v, tq, tk, tv, scale, mask):
    """(o, to, lse) from the Hopper kernel; inputs [B, L, H, D], lse [B, H, Lq] fp32."""
    _no_grad_check(q, k, v, tq, tk, tv)
    B, Lq, H, D = q.shape
    block_m, block_n, consumer_regs, maxnreg = SM90_CONFIG
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(x, rows):  # [B, L, H, D] -> a descriptor over [B·L, H·D] with [rows, D] tiles
        layout = gl.NVMMASharedLayout.get_default_for([rows, D], dtype)
        return GluonDescriptor.from_tensor(x.contiguous().view(-1, H * D), [rows, D], layout)

    o, to = torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    _attention_jvp_sm90[(triton.cdiv(Lq, 2 * block_m), B * H)](
        desc(q, block_m), desc(tq, block_m), desc(k, block_n), desc(tk, block_n), desc(v, block_n), desc(tv, block_n),
        o, to, lse, None if mask is None else kv_ranges(mask, q.device), scale * LOG2E, scale, Lq, k.shape[1], H, D=D,
        BLOCK_M=block_m, BLOCK_N=block_n, MASKED=mask is not None, CONSUMER_REGS=consumer_regs, num_warps=4,
        maxnreg=maxnreg)
    return o, to, lse


# ----------------------------------------------------------------------------------------------------------------
# The reference: the same math in plain torch (differentiable, forward-AD compatible), chunked over queries
def _attention_reference(q, k, v, tq, tk, tv, scale, mask, chunk_elements=2**25):
    """(o, to or None, lse), accumulating in fp32 (fp64 for fp64 inputs); at most chunk_elements scores at once."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    tangent = tq is not None
    if tangent:
        tq, tk, tv = tq.to(acc), tk.to(acc), tv.to(acc)
    ranges = None if mask is None else kv_ranges(mask, q.device)
    rows_per_chunk = max(1, chunk_elements // (B * H * Lk))
    os, tos, lses = [], [], []
    for i in range(0, Lq, rows_per_chunk):
        rows = slice(i, min(i + rows_per_chunk, Lq))
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, rows], k) * scale
        if ranges is not None:
            s = s.masked_fill(~_dense_mask(ranges, rows, Lk), float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None])
        o = torch.einsum("bhqk,bkhd->bqhd", p, v)
        if tangent:
            ts = (torch.einsum("bqhd,bkhd->bhqk", tq[:, rows], k) + torch.einsum("bqhd,bkhd->bhqk", q[:, rows], tk))
            h = p * ts * scale
            mu = h.sum(-1).transpose(1, 2)[..., None]
            tos.append(torch.einsum("bhqk,bkhd->bqhd", p, tv) + torch.einsum("bhqk,bkhd->bqhd", h, v) - mu * o)
        os.append(o)
        lses.append(lse)
    return torch.cat(os, 1), torch.cat(tos, 1) if tangent else None, torch.cat(lses, -1)


# ----------------------------------------------------------------------------------------------------------------
# The with-grad primal: the fastest well-kept kernels
@functools.lru_cache(maxsize=32)
def _flex_block_mask(mask: ChunkMask, device):
    from torch.nn.attention.flex_attention import create_block_mask
    a, b, e = kv_ranges(mask, device)
    L = mask.seq_len()
    return create_block_mask(lambda _b, _h, i, j: (j < a[i]) | ((j >= b[i]) & (j < e[i])), None, None, L, L,
                             device=device)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _attention_primal(q, k, v, scale, mask):
    """O = softmax(QKᵀ·s)V with autograd: SDPA unmasked; FlexAttention (CUDA) or the reference (CPU) masked."""
    if mask is None:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=scale).transpose(1, 2)
    if not q.is_cuda:
        return _attention_reference(q, k, v, None, None, None, scale, mask)[0].to(q.dtype)
    o = _flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          block_mask=_flex_block_mask(mask, q.device), scale=scale)
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# The entry point
def attention(q, k, v, tq=None, tk=None, tv=None, *, scale=None, mask=None, backend="auto", tiles=None):
    """Softmax attention on q [B, Lq, H, D], k, v [B, Lk, H, D]; scale defaults to 1/√D.

    Returns o [B, Lq, H, D], or (o, to) when any tangent is given (missing tangents are zero).
    mask: None (full attention) or a ChunkMask from block_causal(...) / teacher_forcing(...), with Lq = Lk =
    mask.seq_len(). backend: "auto" (CUDA: SDPA/FlexAttention for o; for (o, to) the Hopper kernel where it applies,
    else the Triton tile kernel; CPU: SDPA or the reference for o, the reference for (o, to)), "sm90" or "triton"
    (force one JVP kernel; no gradient) or "reference" (plain torch, differentiable in reverse and forward mode: use
    it under torch.func.jvp). tiles: the Triton tile kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages), with
    backend="triton" only (default: CONFIGS).
    """
    o, to, _ = _dispatch(q, k, v, tq, tk, tv, scale, mask, backend, need_lse=False, tiles=tiles)
    return o if to is None else (o, to)


def attention_with_lse(q, k, v, tq=None, tk=None, tv=None, *, scale=None, mask=None, backend="auto"):
    """Like attention(), but always returns (o, to or None, lse [B, H, Lq] fp32, natural log). The LSE comes from
    a JVP kernel (CUDA; without tangents it runs on zero tangents) or the reference (CPU)."""
    return _dispatch(q, k, v, tq, tk, tv, scale, mask, backend, need_lse=True)


def _dispatch(q, k, v, tq, tk, tv, scale, mask, backend, need_lse, tiles=None):
    tangent = any(t is not None for t in (tq, tk, tv))
    if tiles is not None and (backend != "triton" or len(tiles) != 4):
        raise ValueError(f"tiles={tiles}: give (BLOCK_M, BLOCK_N, num_warps, num_stages) with backend='triton' "
                         f"(got backend={backend!r})")
    if backend == "auto" and not (tangent or need_lse):
        backend = "primal"
    elif backend == "auto":
        backend = "reference" if not q.is_cuda else "sm90" if _sm90_supported(q) else "triton"
    _check(q, k, v, tq, tk, tv, mask, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "primal":
        return _attention_primal(q, k, v, scale, mask), None, None
    if tangent or backend != "reference":  # the kernels always stream tangents; zeros stand in for missing ones
        tq, tk, tv = (torch.zeros_like(x) if t is None else t for x, t in ((q, tq), (k, tk), (v, tv)))
    if backend == "sm90":
        o, to, lse = _attention_sm90(q, k, v, tq, tk, tv, scale, mask)
    elif backend == "triton":
        o, to, lse = _attention_triton(q, k, v, tq, tk, tv, scale, mask, tiles)
    else:
        o, to, lse = _attention_reference(q, k, v, tq, tk, tv, scale, mask)
        o, to = o.to(q.dtype), None if to is None else to.to(q.dtype)
    return o, to if tangent else None, lse


def _check(q, k, v, tq, tk, tv, mask, backend):
    if backend not in ("primal", "sm90", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'sm90', 'triton' or 'reference', got {backend!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be [B={B}, Lk, H={H}, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in floats:
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x, t in (("tq", q, tq), ("tk", k, tk), ("tv", v, tv)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype):
            raise ValueError(f"{name} must match its primal {tuple(x.shape)} {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    if backend == "triton" and (D < 16 or D > 256 or D & (D - 1) or q.dtype == torch.float64):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim in [16, 256] and fp16/bf16/fp32 inputs, "
                         f"got D={D} and {q.dtype}; pass backend='reference' for anything else")
    if backend == "sm90" and not _sm90_supported(q):
        raise ValueError(f"the Hopper kernel needs an sm_90 GPU, fp16/bf16 and head dim 64 or 128, got {q.device}, "
                         f"{q.dtype}, D={D}; pass backend='triton'")
    if mask is not None and not (Lq == k.shape[1] == mask.seq_len()):
        raise ValueError(f"{mask.kind} mask over {len(mask.chunk_tokens)} chunks covers {mask.seq_len()} tokens, "
                         f"but Lq={Lq}, Lk={k.shape[1]}: the chunk token counts must add up to the sequence")
