"""Wan2.1/2.2 DiT (T2V, I2V, TI2V), exact to the official checkpoints, with a tangent (JVP) path through every layer.

    v = model(x, t, context)                              x [B,C,F,H,W]; t [B] or per-frame [B,F] (= 1000·σ)
    v, tv = model(x, t, context, tangent=(tx, tt))        tv = directional derivative of v along (tx, tt)
    v = model(x, t, context, chunks=(3, 3, 3))            block-causal: chunk c sees the frames of chunks ≤ c
    v = model(torch.cat([x0, xs], 2), t, context, chunks=c, teacher_forcing=True)   [clean | noisy] packed
    v = model(x_chunk, t, context, kv_cache=cache)        streaming: one chunk against the cached past chunks

The velocity is v = ε − x0 for x_σ = (1−σ)·x0 + σ·ε. The tangent path is forward-mode differentiation written
layer by layer: every helper below maps a primal and its tangent, (h, th), to (out, tout), with th = None when no
tangent is asked for. Tangents are computed without gradient (the sCM loss only needs them as a fixed target), so
call the tangent forward under `torch.no_grad()`. Attention and its JVP go through `attention_jvp.attention`.

Precision follows the official mixed-precision recipe whatever the weights' dtype: the time embedding, the
modulation, the gates, the residual stream, the norms and the head run in fp32; the block matmuls and attention run
in the dtype of the block weights (fp32 reproduces the official outputs; bf16 is the training/sampling mode).

The causal mode (Causal-rCM, causal_rcm.md) changes only which keys a query sees and which frame index RoPE gives
a token: a clip is cut into chunks of latent frames, attention is masked at chunk granularity (attention_jvp's
ChunkMask, in the forward, the tangent and the with-grad passes), and at inference a KVCache holds the keys and
values of the chunks already generated, so each new chunk costs a forward over its own tokens only.
"""
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
import triton
import triton.language as tl

import checkpoint
from attention_jvp import attention, block_causal
from attention_jvp import teacher_forcing as teacher_forcing_mask
from parallel import gather_tokens, shard_tokens, token_layout, ulysses_attention


@dataclass(frozen=True)
class WanConfig:
    """The official WanModel constructor arguments (defaults: T2V-1.3B)."""
    model_type: str = "t2v"          # "t2v", "i2v" (the y conditioning channels) or "ti2v" (Wan2.2 5B: t2v-shaped)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, columns) of a token's latent patch
    text_len: int = 512              # text context is zero-padded to this many rows
    in_dim: int = 16                 # latent channels (+20 conditioning channels for I2V)
    dim: int = 1536                  # transformer width
    ffn_dim: int = 8960              # feed-forward width
    freq_dim: int = 256              # sinusoidal time-embedding width
    text_dim: int = 4096             # umT5-XXL width
    out_dim: int = 16                # predicted velocity channels
    num_heads: int = 12              # attention heads (head dim = dim / num_heads)
    num_layers: int = 30             # transformer blocks
    qk_norm: bool = True             # RMSNorm on queries and keys
    cross_attn_norm: bool = True     # LayerNorm before the cross-attention
    eps: float = 1e-6                # norms' epsilon
    clip: bool = True                # i2v: CLIP image tokens in the cross-attention (Wan2.1); Wan2.2's i2v has none


_TINY = dict(text_len=32, dim=128, ffn_dim=256, freq_dim=64, text_dim=48, num_heads=2, num_layers=2)
CONFIGS = {
    "t2v-1.3B": WanConfig(),
    "t2v-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-14B": WanConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Wan2.2: each A14B expert is a Wan2.1-14B-shaped net (the i2v ones without CLIP); TI2V-5B takes 48 channels
    "t2v-A14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-A14B": WanConfig(model_type="i2v", clip=False, in_dim=36, dim=5120, ffn_dim=13824, num_heads=40,
                          num_layers=40),
    "ti2v-5B": WanConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24,
                         num_layers=30),
    # the toy world's DiT (toy.py), and a larger one to distil it from (a teacher of another size)
    "toy": WanConfig(text_len=8, dim=128, ffn_dim=256, freq_dim=64, text_dim=32, num_heads=4, num_layers=5),
    "toy-large": WanConfig(text_len=8, dim=192, ffn_dim=512, freq_dim=64, text_dim=32, num_heads=4, num_layers=6),
    # the image-conditioned toy world's DiT: Wan's I2V input (16 latent + 20 conditioning channels), no CLIP
    "toy-i2v": WanConfig(model_type="i2v", in_dim=36, clip=False, text_len=8, dim=128, ffn_dim=256, freq_dim=64,
                         text_dim=32, num_heads=4, num_layers=5),
    # the tiny shapes of the golden fixtures (tests/golden)
    "t2v-tiny": WanConfig(**_TINY),
    "i2v-tiny": WanConfig(model_type="i2v", in_dim=36, **_TINY),
}
CLIP_DIM = 1280  # CLIP ViT-H/14 penultimate features, 257 tokens per image


# ----------------------------------------------------------------------------------------------------------------
# Layers with their tangents. Each takes (h, th) and returns (out, tout); tout is None iff th is None.
# ----------------------------------------------------------------------------------------------------------------

def linear(h, th, layer, dtype=None):
    """y = W·h + b in the weight's dtype (or `dtype`); the tangent is W·th (the bias is constant)."""
    w, b = layer.weight, layer.bias
    if dtype is not None:
        w, b = w.to(dtype), None if b is None else b.to(dtype)
    y = F.linear(h.to(w.dtype), w, b)
    return y, None if th is None else F.linear(th.to(w.dtype), w)


def layer_norm(h, th, eps, weight=None, bias=None):
    """LayerNorm over the last dim in fp32. Tangent: (th − mean(th) − y·mean(y·th)) / σ, times the weight.

    That Jacobian is symmetric, so the tangent is LayerNorm's backward applied to th: one fused kernel instead of
    a dozen elementwise passes over the [B, L, dim] stream when the model runs eagerly."""
    h = h.float()
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    if th is None:
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps), None
    y, mean, rstd = torch.native_layer_norm(h, h.shape[-1:], None, None, eps)
    ty = torch.ops.aten.native_layer_norm_backward(th.float(), h, h.shape[-1:], mean, rstd, None, None,
                                                   [True, False, False])[0]
    if weight is not None:
        y, ty = y * weight + bias, ty * weight
    return y, ty


def rms_norm(h, th, weight, eps):
    """h·rsqrt(mean(h²)+eps)·w over the full width, in fp32. Tangent: (th − ĥ·mean(ĥ·th))·rsqrt(·)·w, ĥ = h·rsqrt."""
    h, weight = h.float(), weight.float()
    if th is None:
        return F.rms_norm(h, h.shape[-1:], weight, eps), None
    rstd = torch.rsqrt(torch.linalg.vector_norm(h, dim=-1, keepdim=True).square() / h.shape[-1] + eps)
    h_hat = h * rstd
    ty = torch.addcmul(th.float(), h_hat, (h_hat * th).mean(-1, keepdim=True), value=-1)
    return h_hat * weight, ty.mul_(rstd).mul_(weight)


def gelu_tanh(h, th):
    """GELU with the tanh approximation. Its tangent th·GELU'(h) is exactly what GELU's backward computes from the
    output gradient th (elementwise functions have diagonal Jacobians): one fused kernel."""
    y = F.gelu(h, approximate="tanh")
    return y, None if th is None else torch.ops.aten.gelu_backward(th, h, approximate="tanh")


def silu(h, th):
    """h·sigmoid(h); its tangent th·sigmoid(h)·(1 + h·(1 − sigmoid(h))) from SiLU's backward, as for GELU."""
    return F.silu(h), None if th is None else torch.ops.aten.silu_backward(th, h)


def modulate(h, th, shift, tshift, scale, tscale):
    """h·(1+scale)+shift with per-frame modulation: h [B,L,D] seen as [B,Fe,L/Fe,D]; shift/scale [B,Fe,D]."""
    B, L, D = h.shape
    Fe = shift.shape[1]
    h4 = h.view(B, Fe, L // Fe, D)
    y = torch.addcmul(shift[:, :, None], h4, 1 + scale[:, :, None]).view(B, L, D)
    if th is None:
        return y, None
    ty = torch.addcmul(tshift[:, :, None], h4, tscale[:, :, None])
    return y, ty.addcmul_(th.view(B, Fe, L // Fe, D), 1 + scale[:, :, None]).view(B, L, D)


def gate(x, tx, y, ty, g, tg):
    """Gated residual x + y·g (fp32), g per frame [B,Fe,D]."""
    B, L, D = x.shape
    Fe = g.shape[1]
    y4 = y.view(B, Fe, L // Fe, D)
    out = torch.addcmul(x.view(B, Fe, L // Fe, D), y4, g[:, :, None]).view(B, L, D)
    if tx is None:
        return out, None
    ty = torch.addcmul(tx.view(B, Fe, L // Fe, D), ty.view(B, Fe, L // Fe, D), g[:, :, None])
    return out, torch.addcmul(ty, y4, tg[:, :, None]).view(B, L, D)


def sinusoid(t, tt, freq_dim):
    """[cos(t·ω), sin(t·ω)] with ω_k = 10000^(−k/half), in float64 as the official code, then fp32. t [...]"""
    half = freq_dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = t.double()[..., None] * omega
    cos, sin = torch.cos(arg), torch.sin(arg)
    emb = torch.cat([cos, sin], dim=-1).float()
    if tt is None:
        return emb, None
    darg = tt.double()[..., None] * omega
    return emb, torch.cat([-sin * darg, cos * darg], dim=-1).float()


def rope_tables(grid, head_dim, device, frame_offset=0, theta=10000.0):
    """Rotations [L, 1, head_dim/2, 2] (cos, sin) of Wan's 3D RoPE for a (F, H, W) token grid, frames starting at
    `frame_offset`.

    The head's channels form head_dim/2 complex pairs of adjacent channels; with c = head_dim/2 the first
    c − 2·(c//3) pairs rotate with the frame index, the next c//3 with the row, the last c//3 with the column,
    at frequencies theta^(−2k/d_axis), d_axis = 2·(pairs of that axis). Angles, cos and sin in float64 (as the
    official code's complex128 polar), stored as float32 (its complex64).
    """
    c = head_dim // 2
    pairs = (c - 2 * (c // 3), c // 3, c // 3)
    angles = []
    for axis, (n, size) in enumerate(zip(pairs, grid)):
        pos = torch.arange(size, dtype=torch.float64, device=device) + (frame_offset if axis == 0 else 0)
        omega = theta ** (-torch.arange(n, dtype=torch.float64, device=device) * 2 / (2 * n))
        shape = [1, 1, 1, n]
        shape[axis] = size
        angles.append(torch.outer(pos, omega).view(shape).expand(*grid, n))
    angles = torch.cat(angles, dim=-1).reshape(-1, 1, c)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def rope(h, freqs, dtype=torch.float32, backend: str = "auto"):
    """Rotate adjacent channel pairs (a, b) = (h_2i, h_2i+1) of h [B,L,H,D] by freqs [L,1,D/2,2] (cos, sin):
    (a·cos − b·sin, a·sin + b·cos), the complex product of the official code, in fp32; returned in `dtype`.
    Linear in h, so the tangent is rotated the same way.

    backend "triton" (default on CUDA outside torch.compile, head size a power of two): one kernel that reads h once
    and writes the result in `dtype` once (the torch ops take an fp32 copy, the product and a cast back: RoPE was a
    visible share of the elementwise time); its gradient is the inverse rotation by the same kernel. "torch": the
    same arithmetic in torch ops, which torch.compile can fuse (it cannot fuse complex products)."""
    if h is None:
        return None
    if backend == "auto":
        pow2 = h.shape[-1] & (h.shape[-1] - 1) == 0  # the kernel's tiles span a whole head
        backend = "triton" if h.is_cuda and pow2 and not torch.compiler.is_compiling() else "torch"
    if backend == "torch":
        a, b = h.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = freqs.unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(dtype)
    return _Rotate.apply(h, freqs, dtype)


@triton.jit
def _rotate_kernel(h_ptr, cs_ptr, out_ptr, rows, L, H, SIGN: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """h [rows = B·L, H, D] contiguous, cs [L, D/2, 2]: out = the pairs rotated by SIGN·angle. A program takes
    BLOCK_R tokens, loads their cos/sin once and rotates each head with whole-row (coalesced) loads and stores."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, D)
    mask = (r < rows)[:, None]
    cos, sin = tl.split(tl.reshape(tl.load(cs_ptr + (r % L).to(tl.int64)[:, None] * D + c[None, :], mask=mask,
                                           other=0.0), (BLOCK_R, D // 2, 2)))
    sin = SIGN * sin
    row = r.to(tl.int64)[:, None] * (H * D) + c[None, :]
    for head in range(H):
        a, b = tl.split(tl.reshape(tl.load(h_ptr + row + head * D, mask=mask, other=0.0).to(tl.float32),
                                   (BLOCK_R, D // 2, 2)))
        out = tl.reshape(tl.join(a * cos - b * sin, a * sin + b * cos), (BLOCK_R, D))
        tl.store(out_ptr + row + head * D, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(h, freqs, dtype, sign: float):
    h, freqs = h.contiguous(), freqs.contiguous()
    B, L, H, D = h.shape
    if freqs.shape != (L, 1, D // 2, 2) or D & (D - 1):
        raise ValueError(f"rope kernel: tables {tuple(freqs.shape)} and h {tuple(h.shape)}: the tables must be "
                         "[L, 1, D/2, 2] and the head size D a power of two (else use backend='torch')")
    out = torch.empty(h.shape, dtype=dtype, device=h.device)
    _rotate_kernel[(triton.cdiv(B * L, 32),)](h, freqs, out, B * L, L, H, SIGN=sign, D=D, BLOCK_R=32)
    return out


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, freqs, dtype):
        ctx.save_for_backward(freqs)
        ctx.h_dtype = h.dtype
        return _rotate(h, freqs, dtype, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return _rotate(grad, freqs, ctx.h_dtype, -1.0), None, None


# ----------------------------------------------------------------------------------------------------------------
# The causal mode: chunks of latent frames and a KV cache of the past chunks.
# ----------------------------------------------------------------------------------------------------------------

def chunk_frames(num_frames: int, first_chunk_t: int, chunk_t: int) -> tuple[int, ...]:
    """Latent frames per chunk, (first_chunk_t, chunk_t, ..., remainder), summing to num_frames.
    E.g. 21 frames: (3, 3) -> seven chunks of 3 (chunk-wise), (1, 1) -> 21 of 1 (frame-wise), (1, 4) -> 1 + 5·4."""
    if min(num_frames, first_chunk_t, chunk_t) < 1:
        raise ValueError(f"frames and chunk sizes must be positive, got {num_frames} frames, chunks "
                         f"first_chunk_t={first_chunk_t}, chunk_t={chunk_t}")
    first = min(first_chunk_t, num_frames)
    rest = num_frames - first
    return (first,) + (chunk_t,) * (rest // chunk_t) + ((rest % chunk_t,) if rest % chunk_t else ())


def quantize(x, kind: str, scale_by: str, frame_tokens: int):
    """x [B,L,H,D] -> (codes, scale) with x ≈ codes·scale. kind "int8" (round(x/s), s = amax/127) or "fp8" (e4m3,
    s = amax/448). scale_by "token": one scale per token and head (amax over D) -> scale [B,L,H,1]; "channel": one
    per channel over each frame's tokens (outlier channels of keys get their own range) -> scale [B,L/frame_tokens,H,D]."""
    x = x.float()
    if scale_by == "token":
        amax = x.abs().amax(-1, keepdim=True)
    else:
        amax = x.unflatten(1, (-1, frame_tokens)).abs().amax(2)
    top = 127.0 if kind == "int8" else 448.0
    scale = amax.clamp(min=1e-12) / top
    y = x / (scale if scale_by == "token" else scale.repeat_interleave(frame_tokens, 1))
    codes = y.round().clamp(-127, 127).to(torch.int8) if kind == "int8" else y.to(torch.float8_e4m3fn)
    return codes, scale


def dequantize(codes, scale, frame_tokens: int, dtype):
    """The inverse of `quantize`, in `dtype`."""
    if scale.shape[-1] == 1:  # per token
        return (codes.float() * scale).to(dtype)
    return (codes.float().unflatten(1, (-1, frame_tokens)) * scale[:, :, None]).flatten(1, 2).to(dtype)


@dataclass(frozen=True)
class CacheConfig:
    """What a KVCache keeps and how. Frames are latent frames; chunks are evicted whole, oldest first."""
    max_frames: int  # frames kept: beyond this the oldest non-sink chunks are evicted (a sliding window)
    sink_chunks: int = 0  # the first chunks are never evicted (attention sinks)
    rope: Literal["after", "before"] = "after"  # cache keys after RoPE (absolute positions) or before it (positions
    #   re-indexed contiguously at every read, so they stay below max_frames + one chunk: within the trained range)
    quant: Literal["none", "int8", "fp8"] = "none"  # store keys and values as int8 or fp8 e4m3 codes with scales
    scale: Literal["token", "channel"] = "token"  # quantisation scale per token, or per channel over each frame


class KVCache:
    """Keys and values of the past chunks for every block, preallocated: [B, capacity tokens, H, D] per block,
    capacity = max_frames + max_chunk_t frames (the chunk being appended lands behind the kept frames, then the
    window slides). Under Ulysses context parallelism each rank holds its head shard (H/P heads, all tokens).

    State: `chunks` (frames of each cached chunk, oldest first), `frames` (their sum), `position` (the RoPE frame
    index the next chunk gets: frames appended so far with keys after RoPE, `frames` with keys before RoPE). Sizes:
    `batch`, `frame_tokens`, `max_chunk_t`.
    """

    def __init__(self, cfg: CacheConfig, *, layers: int, batch: int, frame_tokens: int, heads: int, head_dim: int,
                 max_chunk_t: int, device=None, dtype=torch.float32):
        """Buffers for `layers` blocks of `heads` heads (this rank's, under context parallelism) of head_dim; dtype:
        the unquantised storage (samplers.kv_cache builds one for a net)."""
        if cfg.max_frames < 1 or max_chunk_t < 1 or cfg.sink_chunks < 0:
            raise ValueError(f"a KV cache needs max_frames ≥ 1, max_chunk_t ≥ 1 and sink_chunks ≥ 0, got {cfg}, "
                             f"max_chunk_t={max_chunk_t}")
        self.cfg, self.batch, self.frame_tokens, self.max_chunk_t = cfg, batch, frame_tokens, max_chunk_t
        capacity = cfg.max_frames + max_chunk_t
        shape = (batch, capacity * frame_tokens, heads, head_dim)
        store = {"none": dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[cfg.quant]
        self.k, self.v = ([torch.empty(shape, dtype=store, device=device) for _ in range(layers)] for _ in range(2))
        self.k_scale = self.v_scale = None
        if cfg.quant != "none":
            scale_shape = (batch, capacity * frame_tokens, heads, 1) if cfg.scale == "token" else \
                (batch, capacity, heads, head_dim)
            self.k_scale, self.v_scale = ([torch.empty(scale_shape, device=device) for _ in range(layers)]
                                          for _ in range(2))
        self.reset()

    def reset(self):
        """Forget every chunk (the buffers are reused)."""
        self.chunks, self.appended, self.evictions = [], 0, 0

    @property
    def frames(self) -> int:
        return sum(self.chunks)

    @property
    def position(self) -> int:
        return self.appended if self.cfg.rope == "after" else self.frames

    def nbytes(self) -> int:
        bufs = self.k + self.v + (self.k_scale + self.v_scale if self.k_scale is not None else [])
        return sum(b.numel() * b.element_size() for b in bufs)

    def _read(self, store, scale, n, dtype):
        if scale is None:
            return store[:, :n].to(dtype)
        return dequantize(store[:, :n], scale[:, :n if self.cfg.scale == "token" else n // self.frame_tokens],
                          self.frame_tokens, dtype)

    def _write(self, store, scale, n, x):
        if scale is None:
            store[:, n:n + x.shape[1]] = x
            return
        codes, s = quantize(x, self.cfg.quant, self.cfg.scale, self.frame_tokens)
        store[:, n:n + x.shape[1]] = codes
        f = self.frame_tokens if self.cfg.scale == "channel" else 1
        scale[:, n // f:(n + x.shape[1]) // f] = s

    def snapshot(self, chunk_t: int, rope) -> dict:
        """The cache state a forward of a chunk_t-frame chunk reads: the frames kept, the RoPE tables of the keys of
        [kept frames | chunk] (rope(frames, first frame index) -> tables: the chunk's own with keys cached after RoPE,
        all of them re-indexed from 0 with keys cached before it), the evictions so far. Blocks get it frozen, so that
        activation checkpointing, which re-runs a with-grad chunk's blocks in the backward after later chunks were
        appended, reads the same cached keys and values again."""
        freqs = rope(chunk_t, self.position) if self.cfg.rope == "after" else rope(self.frames + chunk_t, 0)
        return dict(frames=self.frames, freqs=freqs, evictions=self.evictions)

    def extend(self, block: int, k, v, append: bool, frames: int, freqs, evictions: int):
        """Keys/values of a chunk, k (before RoPE) and v [B,Lc,H,D], -> those of [cached frames | chunk] with RoPE
        applied, in v's (the attention's) dtype. append: also store the chunk's (detached) in this block's buffers.
        frames, freqs, evictions: the snapshot(...) taken when the forward began."""
        if evictions != self.evictions:
            raise RuntimeError("the KV cache slid its window between a with-grad forward and its recomputation in the "
                               "backward (activation checkpointing): give the cache max_frames covering the whole "
                               "rollout, or train with --checkpointing none")
        n, Lc, dtype = frames * self.frame_tokens, k.shape[1], v.dtype
        # freqs: [n + Lc, 1, D/2, 2] with keys before RoPE, [Lc, 1, D/2, 2] after
        k_new = rope(k, freqs[-Lc:], dtype)
        if (self.k_scale is None and self.cfg.rope == "after" and self.k[block].dtype == dtype
                and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad))):
            # Write the chunk behind the kept frames (room the buffers always have; it stays only if appended) and
            # attend to the buffers themselves: concatenating [past | chunk] would copy the whole past per block.
            self.k[block][:, n:n + Lc], self.v[block][:, n:n + Lc] = k_new, v
            return self.k[block][:, :n + Lc], self.v[block][:, :n + Lc]
        k_past = self._read(self.k[block], None if self.k_scale is None else self.k_scale[block], n, dtype)
        if self.cfg.rope == "before":
            k_past = rope(k_past, freqs[:n], dtype)
        v_past = self._read(self.v[block], None if self.v_scale is None else self.v_scale[block], n, dtype)
        if append:
            self._write(self.k[block], None if self.k_scale is None else self.k_scale[block], n,
                        (k if self.cfg.rope == "before" else k_new).detach())
            self._write(self.v[block], None if self.v_scale is None else self.v_scale[block], n, v.detach())
        return torch.cat([k_past, k_new], 1), torch.cat([v_past, v], 1)

    def commit(self, chunk_t: int):
        """After an appending forward: the chunk written by every block joins the cache; then the window slides,
        evicting the oldest chunks after the sinks until at most max_frames frames remain."""
        self.chunks.append(chunk_t)
        self.appended += chunk_t
        first = self.cfg.sink_chunks
        drop = 0
        while self.frames - sum(self.chunks[first:first + drop]) > self.cfg.max_frames:
            drop += 1
            if first + drop >= len(self.chunks):
                raise ValueError(f"the KV cache cannot keep {self.cfg.sink_chunks} sink chunk(s) and the newest chunk "
                                 f"within max_frames={self.cfg.max_frames} (chunks {self.chunks}): raise max_frames")
        if drop == 0:
            return
        ft = self.frame_tokens
        start, end = sum(self.chunks[:first]), sum(self.chunks[:first + drop])
        kept = self.frames - end
        for bufs, per_frame in ((self.k, False), (self.v, False), (self.k_scale, self.cfg.scale == "channel"),
                                (self.v_scale, self.cfg.scale == "channel")):
            f = 1 if per_frame else ft
            for b in bufs or []:  # move the newer frames down over the evicted ones (clone: the ranges overlap)
                b[:, start * f:(start + kept) * f] = b[:, end * f:(end + kept) * f].clone()
        del self.chunks[first:first + drop]
        self.evictions += 1


# ----------------------------------------------------------------------------------------------------------------
# Modules. They hold the parameters under the official names; the math is in the helpers above.
# ----------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim) if cfg.qk_norm else None
        self.norm_k = RMSNorm(cfg.dim) if cfg.qk_norm else None

    def qk_norm(self, h, th, norm):
        return (h, th) if norm is None else rms_norm(h, th, norm.weight, self.eps)

    def heads(self, h):
        return None if h is None else h.unflatten(-1, (self.num_heads, -1))

    def forward(self, h, th, freqs, cp=None, mask=None, kv=None):
        """h [B,L,dim] (fp32) -> [B,L,dim]. RoPE on q and k, softmax attention with scale 1/√head_dim.
        With context parallelism (cp, a parallel.TokenLayout) h holds this rank's tokens and attention is Ulysses'.
        mask: an attention_jvp.ChunkMask over the whole sequence (causal mode). kv: with a KV cache, a function
        (chunk keys before RoPE, values) -> keys and values of [cached frames | chunk] (KVCache.extend of this
        block); the keys are rotated there, since with keys cached before RoPE the past is rotated at every read."""
        attend = attention if cp is None else functools.partial(ulysses_attention, cp=cp)
        dtype = self.q.weight.dtype
        h, th = h.to(dtype), None if th is None else th.to(dtype)  # cast once for q, k and v
        q, tq = self.qk_norm(*linear(h, th, self.q), self.norm_q)
        k, tk = self.qk_norm(*linear(h, th, self.k), self.norm_k)
        v, tv = linear(h, th, self.v)
        q, tq, v = rope(self.heads(q), freqs, dtype), rope(self.heads(tq), freqs, dtype), self.heads(v)
        if kv is not None:  # queries of this chunk against [cache | chunk]: a dense rectangle, no mask
            with_past = lambda q, k, v, *no_tangents: attention(q, *kv(k, v))
            o = with_past(q, self.heads(k), v) if cp is None else \
                ulysses_attention(q, self.heads(k), v, cp=cp, attend=with_past)
            return linear(o.flatten(2), None, self.o)
        k, tk = rope(self.heads(k), freqs, dtype), rope(self.heads(tk), freqs, dtype)
        if th is None:
            return linear(attend(q, k, v, mask=mask).flatten(2), None, self.o)
        o, to = attend(q, k, v, tq, tk, self.heads(tv), mask=mask)
        return linear(o.flatten(2), to.flatten(2), self.o)


class CrossAttention(SelfAttention):
    """Attention from the video tokens to the 512 text rows (no key mask), plus the 257 CLIP rows for I2V."""

    def __init__(self, cfg: WanConfig):
        super().__init__(cfg)
        if cfg.model_type == "i2v" and cfg.clip:
            self.k_img, self.v_img = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
            self.norm_k_img = RMSNorm(cfg.dim) if cfg.qk_norm else None

    def attend(self, q, tq, k, v):
        """Context keys/values carry no tangent (attention takes missing tangents as zero)."""
        k, v = self.heads(k).to(q.dtype), self.heads(v)
        return (attention(q, k, v), None) if tq is None else attention(q, k, v, tq)

    def forward(self, h, th, context, context_img):
        dtype = self.q.weight.dtype
        q, tq = self.qk_norm(*linear(h, th, self.q), self.norm_q)
        q, tq = self.heads(q).to(dtype), None if tq is None else self.heads(tq).to(dtype)
        k, _ = self.qk_norm(*linear(context, None, self.k), self.norm_k)
        o, to = self.attend(q, tq, k, linear(context, None, self.v)[0])
        if context_img is not None:
            k_img, _ = self.qk_norm(*linear(context_img, None, self.k_img), self.norm_k_img)
            o_img, to_img = self.attend(q, tq, k_img, linear(context_img, None, self.v_img)[0])
            o, to = o + o_img, None if to is None else to + to_img
        return linear(o.flatten(2), None if to is None else to.flatten(2), self.o)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, tx, e0, te0, freqs, context, context_img, cp=None, mask=None, kv=None):
        """x [B,L,dim] fp32 residual stream; e0 [B,Fe,6,dim] fp32 time projection (per frame when Fe = F);
        cp, mask, kv: see SelfAttention.forward."""
        m = self.modulation.float() + e0
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = m.unbind(2)
        tm = (None,) * 6 if te0 is None else te0.unbind(2)

        h, th = modulate(*layer_norm(x, tx, self.eps), shift_sa, tm[0], scale_sa, tm[1])
        y, ty = self.self_attn(h, th, freqs, cp, mask, kv)
        x, tx = gate(x, tx, y, ty, gate_sa, tm[2])

        h, th = (x, tx) if self.norm3 is None else layer_norm(x, tx, self.eps, self.norm3.weight, self.norm3.bias)
        y, ty = self.cross_attn(h, th, context, context_img)
        x, tx = x + y, None if tx is None else tx + ty  # (fp32 + bf16 promotes in one pass, no cast copy)

        h, th = modulate(*layer_norm(x, tx, self.eps), shift_ffn, tm[3], scale_ffn, tm[4])
        h, th = linear(*gelu_tanh(*linear(h, th, self.ffn[0])), self.ffn[2])
        return gate(x, tx, h, th, gate_ffn, tm[5])


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, tx, e, te):
        """All fp32. Modulated by e (not e0), without SiLU: (shift, scale) = modulation + e."""
        shift, scale = (self.modulation.float() + e[:, :, None]).unbind(2)
        tshift, tscale = (None, None) if te is None else (te, te)
        h, th = modulate(*layer_norm(x, tx, self.eps), shift, tshift, scale, tscale)
        return linear(h, th, self.head, dtype=torch.float32)


class WanModel(nn.Module):
    """The Wan2.1 diffusion transformer. `state_dict()` uses the official key names."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        assert cfg.model_type in ("t2v", "i2v", "ti2v"), f"model_type must be t2v, i2v or ti2v, got {cfg.model_type!r}"
        assert cfg.dim % cfg.num_heads == 0 and (cfg.dim // cfg.num_heads) % 2 == 0
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.model_type == "i2v" and cfg.clip:
            self.img_emb = nn.Module()
            self.img_emb.proj = nn.Sequential(nn.LayerNorm(CLIP_DIM, eps=1e-5), nn.Linear(CLIP_DIM, CLIP_DIM), nn.GELU(),
                                              nn.Linear(CLIP_DIM, cfg.dim), nn.LayerNorm(cfg.dim, eps=1e-5))
        self._rope_cache = {}
        self.cp_group = None  # a context-parallel process group, set by parallel.context_parallel
        self.cp_head_groups = 1  # its all-to-alls pipelined over this many groups of heads (ulysses_attention)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The official initialisation (Xavier linears, zero biases, N(0, 0.02) embeddings, zero output layer)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # --- inputs -------------------------------------------------------------------------------------------------

    def patchify(self, x):
        """[B,C,F,H,W] -> tokens [B, F'·H'·W', C·pt·ph·pw], frame-major then row then column (Conv3d's order)."""
        pt, ph, pw = self.cfg.patch_size
        return rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def unpatchify(self, h, grid):
        """[B,L,pt·ph·pw·C] -> [B,C,F,H,W]: out[c, f, 2i+p, 2j+q] = h[(f·H'+i)·W'+j, (2p+q)·C + c]."""
        pt, ph, pw = self.cfg.patch_size
        return rearrange(h, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                         f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)

    def embed_context(self, context):
        """Text: list of [L_i,text_dim] or [B,L,text_dim], zero-padded to text_len rows -> [B,text_len,dim]."""
        text_len = self.cfg.text_len
        if isinstance(context, (list, tuple)):
            too_long = [len(c) for c in context if len(c) > text_len]
            if too_long:
                raise ValueError(f"text context has {max(too_long)} rows; the model takes at most text_len={text_len}")
            context = torch.stack([F.pad(c, (0, 0, 0, text_len - len(c))) for c in context])
        elif context.shape[1] != text_len:
            if context.shape[1] > text_len:
                raise ValueError(f"text context has {context.shape[1]} rows; the model takes at most {text_len}")
            context = F.pad(context, (0, 0, 0, text_len - context.shape[1]))
        dtype = self.text_embedding[0].weight.dtype
        h, _ = linear(*gelu_tanh(*linear(context.to(dtype), None, self.text_embedding[0])), self.text_embedding[2])
        return h

    def embed_clip(self, clip_fea):
        """I2V: CLIP features [B,257,1280] -> [B,257,dim] (LayerNorm, Linear, GELU(erf), Linear, LayerNorm)."""
        p = self.img_emb.proj
        h = layer_norm(clip_fea, None, p[0].eps, p[0].weight, p[0].bias)[0]
        h = F.gelu(linear(h, None, p[1])[0])
        return layer_norm(linear(h, None, p[3])[0], None, p[4].eps, p[4].weight, p[4].bias)[0]

    def embed_time(self, t, tt):
        """t [B] or [B,F] -> e [B,Fe,dim] and e0 [B,Fe,6,dim] (Fe = 1 or F), with tangents; all fp32."""
        if t.ndim == 1:
            t, tt = t[:, None], None if tt is None else tt[:, None]
        f32 = torch.float32
        e, te = sinusoid(t, tt, self.cfg.freq_dim)
        e, te = linear(*silu(*linear(e, te, self.time_embedding[0], f32)), self.time_embedding[2], f32)
        e0, te0 = linear(*silu(e, te), self.time_projection[1], f32)
        unflat = lambda a: None if a is None else a.unflatten(-1, (6, self.cfg.dim))
        return e, te, unflat(e0), unflat(te0)

    def rope(self, frames, hw, device, frame_offset=0):
        """RoPE tables [frames·H'·W', 1, head_dim/2] of frames from index `frame_offset`, memoised (a few at a time:
        streaming with keys cached after RoPE moves the offset with every chunk)."""
        key = (frames, tuple(hw), str(device), frame_offset)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 64:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_tables((frames, *hw), self.cfg.dim // self.cfg.num_heads, device, frame_offset)
        return self._rope_cache[key]

    # --- forward ------------------------------------------------------------------------------------------------

    def forward(self, x, t, context, *, y=None, clip_fea=None, tangent=None, chunks=None, teacher_forcing=False,
                kv_cache=None, kv_append=False, frame_offset=0):
        """Velocity v [B,out_dim,F,H,W] (fp32), or (v, tv) when tangent=(tx, tt) is given.

        x [B,in_dim(−20 for I2V),F,H,W]; t [B] or [B,F] timesteps 1000·σ; context: see `embed_context`;
        y [B,20,F,H,W] for I2V, and clip_fea [B,257,1280] for Wan2.1 I2V. tx has x's shape, tt has t's shape.
        The causal mode (causal_rcm.md; with no causal argument attention is bidirectional):
        - chunks: latent frames per chunk (e.g. chunk_frames(F, 3, 3)): block-causal attention over the clip.
        - teacher_forcing (with chunks): x = torch.cat([clean, noisy], 2) packs two copies of a sum(chunks)-frame
          clip; noisy chunk c sees the clean chunks < c and itself, clean chunk c sees the clean chunks ≤ c; both
          copies of a frame get its RoPE frame index. For the sCM tangent pass zero tx, tt on the clean half.
        - kv_cache (a KVCache): x is the next chunk; it attends [cached frames | itself] from RoPE frame
          kv_cache.position. kv_append: the chunk's keys and values then join the cache (it may slide). No tangent.
        - frame_offset: the RoPE frame index of x's first frame (without kv_cache).
        """
        cfg = self.cfg
        tx, tt = (None, None) if tangent is None else tangent
        if cfg.model_type == "i2v" and (y is None or (cfg.clip and clip_fea is None)):
            raise ValueError("an i2v model needs y [B,20,F,H,W]" + (" and clip_fea [B,257,1280]" if cfg.clip else ""))
        if clip_fea is not None and not (cfg.model_type == "i2v" and cfg.clip):
            raise ValueError("clip_fea is for Wan2.1's i2v models (WanConfig(model_type='i2v', clip=True)) only")
        B, _, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent size (F,H,W)=({T},{H},{W}) must be divisible by the patch size {cfg.patch_size}")
        grid = (T // pt, H // ph, W // pw)
        if t.ndim == 2 and t.shape[1] != grid[0]:
            raise ValueError(f"per-frame t has {t.shape[1]} entries but the clip has {grid[0]} latent frames")
        mask, segments = causal_layout(grid, chunks, teacher_forcing, frame_offset, kv_cache, batch=B,
                                       kv_append=kv_append, tangent=tangent is not None)
        tables = [self.rope(n, grid[1:], x.device, first) for n, first in segments]
        freqs = tables[0] if len(tables) == 1 else torch.cat(tables)

        if y is not None:
            x = torch.cat([x, y], dim=1)
            tx = None if tx is None else torch.cat([tx, torch.zeros_like(y)], dim=1)
        # the patch Conv3d (kernel = stride) is a Linear over flattened (c, kt, kh, kw) patches
        w, b = self.patch_embedding.weight.flatten(1), self.patch_embedding.bias
        x = F.linear(self.patchify(x).to(w.dtype), w, b).float()
        tx = None if tx is None else F.linear(self.patchify(tx).to(w.dtype), w).float()

        e, te, e0, te0 = self.embed_time(t, tt)
        context = self.embed_context(context)
        context_img = None
        if clip_fea is not None:
            # The official code splits [clip | text] at (rows − 512), a constant; with text_len = 512 (every released
            # model) those are the 257 CLIP rows. Reproduced so that small test configs match it too.
            both = torch.cat([self.embed_clip(clip_fea), context], dim=1)
            n_img = both.shape[1] - 512  # Python slicing, as the official code, also when this is negative
            context_img, context = both[:, :n_img], both[:, n_img:]
        cp = None if self.cp_group is None else token_layout(self.cp_group, grid[0], grid[1] * grid[2], x.device,
                                                             self.cp_head_groups)
        if cp is not None:  # this rank keeps its slice of every frame's tokens (see parallel.py)
            x, tx, freqs = shard_tokens(x, cp), shard_tokens(tx, cp), shard_tokens(freqs, cp, dim=0)
        state = None if kv_cache is None else \
            kv_cache.snapshot(grid[0], lambda n, first: self.rope(n, grid[1:], x.device, first))
        for i, block in enumerate(self.blocks):
            kv = None if kv_cache is None else functools.partial(kv_cache.extend, i, append=kv_append, **state)
            x, tx = block(x, tx, e0, te0, freqs, context, context_img, cp, mask, kv)
        if kv_append:
            kv_cache.commit(grid[0])

        h, th = self.head(x, tx, e, te)
        if cp is not None:
            h, th = gather_tokens(h, cp), gather_tokens(th, cp)
        v = self.unpatchify(h, grid)
        return v if tangent is None else (v, self.unpatchify(th, grid))


def causal_layout(grid, chunks, teacher_forcing: bool, frame_offset: int, kv_cache: KVCache | None, *, batch: int,
                  kv_append: bool, tangent: bool):
    """What WanModel.forward's causal arguments mean for `batch` clips of grid (F', H', W') tokens, checked: the
    attention mask (None or a ChunkMask) and the RoPE frames of the queries as [(frames, first frame index), ...]
    segments, in token order. Reads the cache's sizes and position, never writes it (nor anything else)."""
    frames, frame_tokens = grid[0], grid[1] * grid[2]
    if kv_cache is None:
        if kv_append:
            raise ValueError("kv_append=True needs a kv_cache to append to")
        if chunks is None:
            if teacher_forcing:
                raise ValueError("teacher_forcing=True needs chunks=(frames per chunk, ...) of the clip")
            return None, [(frames, frame_offset)]
        clip = frames // 2 if teacher_forcing else frames
        if sum(chunks) != clip or (teacher_forcing and frames % 2):
            raise ValueError(f"chunks {tuple(chunks)} cover {sum(chunks)} latent frames, but x holds {frames}"
                             + (" = [clean | noisy] copies of the clip" if teacher_forcing else "")
                             + f": the chunks must add up to {'half of ' if teacher_forcing else ''}the frames")
        tokens = [c * frame_tokens for c in chunks]
        if not teacher_forcing:
            return block_causal(tokens), [(frames, frame_offset)]
        # a frame's clean and noisy copies share its RoPE index
        return teacher_forcing_mask(tokens), [(clip, frame_offset), (clip, frame_offset)]
    if chunks is not None or teacher_forcing or tangent or frame_offset:
        raise ValueError("with a kv_cache x is one chunk: pass no chunks, teacher_forcing, tangent or "
                         "frame_offset (the cache decides the RoPE position)")
    if (kv_cache.frame_tokens, kv_cache.batch) != (frame_tokens, batch) or frames > kv_cache.max_chunk_t:
        raise ValueError(f"the KV cache was built for batch {kv_cache.batch}, {kv_cache.frame_tokens} "
                         f"tokens per frame and chunks of ≤ {kv_cache.max_chunk_t} frames; this chunk has batch "
                         f"{batch}, {frame_tokens} tokens per frame, {frames} frames: build a KVCache to match")
    return None, [(frames, kv_cache.position)]


# ----------------------------------------------------------------------------------------------------------------
# Wan2.2 A14B: two experts behind one call.
# ----------------------------------------------------------------------------------------------------------------

BOUNDARY = {"t2v-A14B": 0.875, "i2v-A14B": 0.900}  # the experts' boundary in rectified-flow time (official configs)


def _take(v, idx):
    """The samples idx of a per-sample argument (a tensor, a list of rows, or a tuple of those); others as they are."""
    if torch.is_tensor(v):
        return v[idx]
    if isinstance(v, list):
        return [v[i] for i in idx.tolist()]
    return tuple(_take(u, idx) for u in v) if isinstance(v, tuple) else v


class TwoExperts(nn.Module):
    """Wan2.2's A14B model: a high-noise and a low-noise expert (each a WanModel) behind WanModel's call. A sample goes
    to the high-noise expert when its timestep is at least 1000·boundary (the noisiest frame decides), else to the
    low-noise one; a batch that straddles the boundary is split. With `device` set, the expert not in use waits on
    the CPU and the one called moves there, so one 14B expert at a time sits on the GPU. `sharded` (FSDP experts, one
    process per rank): every rank runs each expert that any rank needs, so the ranks' collectives stay matched."""

    def __init__(self, high: WanModel, low: WanModel, boundary: float, device=None, sharded: bool = False):
        super().__init__()
        self.high, self.low, self.boundary, self.device, self.sharded = high, low, boundary, device, sharded
        self.cfg = high.cfg

    def expert(self, high: bool) -> WanModel:
        net, idle = (self.high, self.low) if high else (self.low, self.high)
        if self.device is not None and next(net.parameters()).device != torch.device(self.device):
            idle.to("cpu")
            net.to(self.device)
        return net

    def forward(self, x, t, context, **kw):
        if kw.get("kv_cache") is not None:
            raise ValueError("streaming through a KV cache is not supported by the two-expert model")
        noisy = t.reshape(len(t), -1).amax(1) >= 1000 * self.boundary
        needed = torch.stack([noisy.any(), (~noisy).any()]).float()
        if self.sharded:  # FSDP experts: every rank runs each expert that any rank needs, so their collectives match
            torch.distributed.all_reduce(needed)
        if needed.count_nonzero() == 1:
            return self.expert(bool(needed[0]))(x, t, context, **kw)
        out = None
        for high in (True, False):  # each expert on its samples, scattered back ((v,) or (v, tv) with a tangent)
            idx = torch.nonzero(noisy == high).flatten()
            idle = len(idx) == 0  # (only when sharded) one sample runs through it, its output weighted by 0
            idx = idx if not idle else torch.zeros(1, dtype=torch.long, device=noisy.device)
            o = self.expert(high)(x[idx], t[idx], _take(context, idx), **{k: _take(v, idx) for k, v in kw.items()})
            o = (o,) if torch.is_tensor(o) else o
            out = out or [u.new_zeros((len(x), *u.shape[1:])) for u in o]
            for j, u in enumerate(o):
                if idle:  # a zero that depends on the expert: its backward (and gradient collectives) run as well
                    out[j] = out[j] + 0 * u.sum()
                else:
                    out[j][idx] = u
        return out[0] if len(out) == 1 else tuple(out)


def load_two_experts(name: str | None, high, low=None, *, dtype=None, device="cpu", offload: bool = False,
                     arch: WanConfig | None = None, boundary: float | None = None) -> TwoExperts:
    """The two experts of a Wan2.2 A14B model `name` (a key of BOUNDARY; or any `arch` and `boundary`, e.g. a toy
    two-expert run's): from a folder holding both (`expert_folders`; high = that folder, low = None), or from two
    checkpoints (e.g. NVlabs's merged rCM .pth experts). offload: the idle expert waits on the CPU."""
    if low is None:
        high, low = expert_folders(high)
    experts = []
    for path in (high, low):
        with torch.device("meta"):
            net = WanModel(arch or CONFIGS[name])
        load_checkpoint(net, path, dtype=dtype)
        experts.append(net.to("cpu" if offload else device).eval().requires_grad_(False))
    return TwoExperts(*experts, boundary or BOUNDARY[name], device if offload else None)


EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")  # the official Wan2.2 A14B layout (and train_rcm's export)


def expert_folders(folder) -> tuple[Path, Path]:
    """The high- and low-noise experts' folders in a Wan2.2 A14B folder (official: high_noise_model/ and
    low_noise_model/; a diffusers pipeline: transformer/ and transformer_2/)."""
    parts = ("transformer", "transformer_2") if (Path(folder) / "model_index.json").exists() else EXPERT_FOLDERS
    high, low = Path(folder) / parts[0], Path(folder) / parts[1]
    for f in (high, low):
        if not f.is_dir():
            raise FileNotFoundError(f"{f} not found: a two-expert (Wan2.2 A14B) folder holds high_noise_model/ and "
                                    f"low_noise_model/ (diffusers: transformer/ and transformer_2/)")
    return high, low


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: official key names in and out.
# ----------------------------------------------------------------------------------------------------------------

# The diffusers names of the official keys (WanTransformer3DModel), one row per module: checkpoint.rename reads a
# diffusers checkpoint with them and export.py writes one.
DIFFUSERS_NAMES = [
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("blocks.#.modulation", "blocks.#.scale_shift_table"),
    *((f"blocks.#.{ours}.{a}", f"blocks.#.{theirs}.{b}")
      for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                   ("norm_k", "norm_k"), ("k_img", "add_k_proj"), ("v_img", "add_v_proj"),
                   ("norm_k_img", "norm_added_k"))),
    ("blocks.#.norm3", "blocks.#.norm2"),  # the cross-attention norm (the official norm1, norm2 have no weights)
    ("blocks.#.ffn.0", "blocks.#.ffn.net.0.proj"),
    ("blocks.#.ffn.2", "blocks.#.ffn.net.2"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
]


def diffusers_config(cfg: WanConfig) -> dict:
    """The config.json of a diffusers WanTransformer3DModel with this architecture."""
    clip = cfg.model_type == "i2v" and cfg.clip
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.dim // cfg.num_heads,
            "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
            "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "eps": cfg.eps,
            "image_dim": CLIP_DIM if clip else None, "added_kv_proj_dim": cfg.dim if clip else None,
            "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


def save_diffusers(state_dict: dict, cfg: WanConfig, folder, settings: dict | None = None):
    """Write official-named DiT weights as a diffusers transformer folder: config.json and
    diffusion_pytorch_model.safetensors (diffusers names; `settings` in its header, which diffusers ignores)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    checkpoint.save_checkpoint(checkpoint.rename(state_dict, DIFFUSERS_NAMES),
                               folder / "diffusion_pytorch_model.safetensors", settings)


def read_state_dict(path, prefix=None, device="cpu", patch_size=(1, 2, 2)):
    """Read DiT weights from an official, rCM-style or diffusers checkpoint into a {official name: tensor} dict.

    path: `diffusion_pytorch_model.safetensors`, a sharded `*.safetensors.index.json`, a folder holding either
    (the official release's, or a diffusers `transformer/`), a diffusers pipeline folder (its `transformer/` is
    read), or a `.pt`/`.pth` file (read with `weights_only=True`). rCM-style files prefix the names with `net.` or
    `net_ema.` (by default the EMA weights are taken when present; `prefix` picks one, "" for none) and store the
    patch Conv3d as a Linear [dim, in_dim·pt·ph·pw]; it is given back its Conv3d shape (flattening order
    (c, kt, kh, kw) makes the two identical). Diffusers names are renamed by DIFFUSERS_NAMES.
    """
    path = Path(path)
    if (path / "model_index.json").exists():  # a diffusers pipeline: the DiT is its transformer/
        path = path / "transformer"
    sd = checkpoint.read_state_dict(path, device)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    if prefix is None:
        prefix = next((p for p in ("net_ema.", "net.") if any(k.startswith(p) for k in sd)), "")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith("condition_embedder.") for k in sd):
        sd = checkpoint.rename(sd, DIFFUSERS_NAMES, reverse=True)
    pe = sd.get("patch_embedding.weight")
    if pe is not None and pe.ndim == 2:
        sd["patch_embedding.weight"] = pe.reshape(pe.shape[0], -1, *patch_size)
    return sd


def read_checked(path, cfg: WanConfig, header: str) -> dict:
    """read_state_dict(path), checked key by key against a model of config cfg (built on the meta device, so nothing
    is allocated); a mismatch raises one error opening with `header`."""
    sd = read_state_dict(path, patch_size=cfg.patch_size)
    with torch.device("meta"):
        checkpoint.check_state_dict(WanModel(cfg), sd, header)
    return sd


def load_checkpoint(model: WanModel, path, *, prefix=None, dtype=None, header: str | None = None):
    """Load weights strictly into `model` (which may live on the meta device: its tensors are then replaced,
    so a big model is never materialised twice). Tensors are converted to `dtype`, or to the model's dtypes.
    Raises one error, opening with `header`, listing every missing, unexpected and mis-shaped key."""
    sd = read_state_dict(path, prefix, patch_size=model.cfg.patch_size)
    if dtype is not None:
        model.to(dtype)
    checkpoint.check_state_dict(model, sd, header or f"checkpoint {path} does not match the model config:")
    expected = model.state_dict()
    sd = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model
