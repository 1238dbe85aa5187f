"""attention_jvp.py against a float64 torch.func.jvp of math attention, on fresh random inputs every run.

On CPU the Triton tile kernel runs in the interpreter at small shapes; `-m gpu` runs both kernels (the Hopper one
where it applies) at Wan shapes and odd ones.
"""
import math
import os

import numpy as np
import pytest
import torch

import attention_jvp as A

BOUND = {torch.float32: 1e-4, torch.bfloat16: 5e-3, torch.float16: 5e-3}  # relative error of o and to


@pytest.fixture(autouse=True, scope="module")
def interpreter_bf16():
    """Triton 3.9's interpreter mishandles bf16 in two ways the GPU does not: tl.dot multiplies the raw uint16 bits,
    and fp32 -> bf16 casts truncate instead of rounding to nearest even. Patch both to the GPU's semantics (a dot of
    bf16 tiles is exact products accumulated in fp32)."""
    if not os.environ.get("TRITON_INTERPRET"):
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    create_dot, cast_impl = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    InterpreterBuilder.create_dot = lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args)
    InterpreterBuilder.cast_impl = cast
    yield
    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = create_dot, cast_impl


# ------------------------------------------------------------------------------------------------------------------
# The oracle: math attention in float64, its JVP from torch.func, masks built straight from causal_rcm.md
def chunk_mask_dense(kind, chunk_tokens):
    """Boolean [L, L] (query, key) from the chunk-level definitions, independent of kv_ranges."""
    chunk = torch.repeat_interleave(torch.arange(len(chunk_tokens)), torch.tensor(chunk_tokens))
    if kind == "block_causal":
        return chunk[None, :] <= chunk[:, None]
    cq, ck = chunk[:, None], chunk[None, :]
    clean_clean, noisy_clean, noisy_noisy = ck <= cq, ck < cq, ck == cq
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], 1)  # clean queries never see noisy keys
    return torch.cat([top, torch.cat([noisy_clean, noisy_noisy], 1)], 0)


def oracle(q, k, v, tq, tk, tv, scale, allowed=None, rows=slice(None)):
    """float64 (o, to, lse) for the query rows `rows` (rows are independent in attention)."""
    def math_attention(q, k, v):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        if allowed is not None:
            s = s.masked_fill(~allowed[rows.cpu() if torch.is_tensor(rows) else rows].to(s.device), float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), s.logsumexp(-1)

    primals = tuple(x.double() for x in (q[:, rows], k, v))
    tangents = tuple(x.double() for x in (tq[:, rows], tk, tv))
    (o, lse), (to, _) = torch.func.jvp(math_attention, primals, tangents)
    return o, to, lse


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


# The small-shape kernel tests run the Triton kernel on the CPU through the interpreter, or on the GPU where there is
# one (conftest sets TRITON_INTERPRET only without CUDA).
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") or not torch.cuda.is_available() else "cuda"


def random_qkv(B, Lq, Lk, H, D, dtype, device="cpu"):
    q, k, v = (torch.randn(B, L, H, D, device=device).to(dtype) for L in (Lq, Lk, Lk))
    return q, k, v, torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Outputs the kernel allocates start as NaN, so any element it fails to write shows up."""
    def poison(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    empty_like, empty = torch.empty_like, torch.empty
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))


def random_chunks(n_chunks, mean):
    """Chunk token counts around `mean`, some smaller than a tile so tiles span several chunk boundaries."""
    return [int(n) for n in torch.randint(max(1, mean // 4), 2 * mean, (n_chunks,))]


# ------------------------------------------------------------------------------------------------------------------
# CPU: the kernel under the Triton interpreter and the reference
CASES = [  # (dtype, Lq, Lk, D, mask kind)
    (torch.bfloat16, 999, 515, 64, None),
    (torch.float32, 515, 999, 128, None),
    (torch.float16, 77, 512, 64, None),
    (torch.bfloat16, None, None, 64, "block_causal"),
    (torch.float32, None, None, 128, "block_causal"),
    (torch.bfloat16, None, None, 128, "teacher_forcing"),
    (torch.float32, None, None, 64, "teacher_forcing"),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype,Lq,Lk,D,kind", CASES)
def test_matches_float64_jvp(backend, dtype, Lq, Lk, D, kind, poisoned_outputs):
    mask, allowed = None, None
    if kind is not None:
        chunks = random_chunks(5, 60)
        mask = A.block_causal(chunks) if kind == "block_causal" else A.teacher_forcing(chunks)
        allowed = chunk_mask_dense(kind, chunks)
        Lq = Lk = mask.seq_len()
    q, k, v, tq, tk, tv = random_qkv(1, Lq, Lk, 2, D, dtype, KERNEL_DEVICE if backend == "triton" else "cpu")
    scale = 1.3 / math.sqrt(D)
    o, to, lse = A.attention_with_lse(q, k, v, tq, tk, tv, scale=scale, mask=mask, backend=backend)
    ro, rto, rlse = oracle(q, k, v, tq, tk, tv, scale, allowed)
    assert o.dtype == to.dtype == dtype and o.shape == to.shape == q.shape
    assert rel_err(o, ro) < BOUND[dtype], rel_err(o, ro)
    assert rel_err(to, rto) < BOUND[dtype], rel_err(to, rto)
    assert rel_err(lse, rlse) < 1e-5


def test_kv_ranges_match_causal_rcm():
    for kind, build in (("block_causal", A.block_causal), ("teacher_forcing", A.teacher_forcing)):
        chunks = random_chunks(6, 20)
        mask = build(chunks)
        dense = A._dense_mask(A.kv_ranges(mask, "cpu"), slice(None), mask.seq_len())
        assert torch.equal(dense, chunk_mask_dense(kind, chunks)), kind


def test_reference_chunking_and_forward_ad():
    """The reference streams queries in chunks and is plain torch: torch.func.jvp through it gives its own tangent."""
    mask = A.block_causal(random_chunks(4, 30))
    q, k, v, tq, tk, tv = random_qkv(2, mask.seq_len(), mask.seq_len(), 3, 32, torch.float64)
    o, to, _ = A._attention_reference(q, k, v, tq, tk, tv, 0.2, mask, chunk_elements=20000)
    ro, rto, _ = oracle(q, k, v, tq, tk, tv, 0.2, chunk_mask_dense("block_causal", mask.chunk_tokens))
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12
    fo, fto = torch.func.jvp(lambda q, k, v: A.attention(q, k, v, scale=0.2, mask=mask, backend="reference"),
                             (q, k, v), (tq, tk, tv))
    assert rel_err(fo, ro) < 1e-12 and rel_err(fto, rto) < 1e-12


@pytest.mark.parametrize("kind", [None, "teacher_forcing"])
def test_primal_gradients(kind):
    """The default plain forward is differentiable (SDPA unmasked, the reference masked on CPU)."""
    mask, allowed, L = None, None, 70
    if kind:
        chunks = random_chunks(3, 15)
        mask, allowed, L = A.teacher_forcing(chunks), chunk_mask_dense(kind, chunks), 2 * sum(chunks)
    q, k, v, do, _, _ = random_qkv(1, L, L, 2, 16, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad((A.attention(q, k, v, mask=mask) * do).sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, _, _ = oracle(qd, kd, vd, qd, kd, vd, 16**-0.5, allowed)
    ref_grads = torch.autograd.grad((ro * do.double()).sum(), (qd, kd, vd))
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-5


def test_missing_tangents_are_zero():
    q, k, v, tq, _, _ = random_qkv(1, 40, 24, 2, 16, torch.float32, KERNEL_DEVICE)
    o, to = A.attention(q, k, v, tq, backend="triton")
    ro, rto, _ = oracle(q, k, v, tq, torch.zeros_like(k), torch.zeros_like(v), 0.25)
    assert rel_err(o, ro) < 1e-4 and rel_err(to, rto) < 1e-4


def test_tile_override_reaches_the_kernel():
    """bench.py tries tile configs through `tiles` (no module global changes): other tiles, the same result."""
    q, k, v, tq, tk, tv = random_qkv(1, 40, 24, 2, 16, torch.float32, KERNEL_DEVICE)
    o, to = A.attention(q, k, v, tq, tk, tv, backend="triton")
    o2, to2 = A.attention(q, k, v, tq, tk, tv, backend="triton", tiles=(16, 16, 4, 1))
    assert rel_err(o2, o) < 1e-5 and rel_err(to2, to) < 1e-5
    with pytest.raises(ValueError, match="backend='triton'"):
        A.attention(q, k, v, tq, tk, tv, backend="reference", tiles=(16, 16, 4, 1))


def test_user_errors():
    q, k, v, tq, tk, tv = random_qkv(1, 32, 32, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="chunk token counts"):
        A.attention(q, k, v, mask=A.block_causal([10, 10]))
    with pytest.raises(ValueError, match=r"k and v must be"):
        A.attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="tk must match"):
        A.attention(q, k, v, tq, tk[:, :5], tv)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        A.attention(q[..., :12], k[..., :12], v[..., :12], backend="triton")
    with pytest.raises(RuntimeError, match="no backward"):
        A.attention(q.requires_grad_(), k, v, tq, tk, tv, backend="triton")
    with pytest.raises(ValueError, match="token counts"):
        A.block_causal([4, 0])
    with pytest.raises(ValueError, match="Hopper kernel"):
        A.attention(q, k, v, tq, tk, tv, backend="sm90")  # CPU tensors


# ------------------------------------------------------------------------------------------------------------------
# GPU: Wan shapes, the oracle on a random subset of query rows
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sm90", "triton"])
@pytest.mark.parametrize("dtype,B,L,Lk,H,D,kind", [
    (torch.bfloat16, 1, 32760, 32760, 12, 128, None),
    (torch.bfloat16, 1, 32760, 32760, 12, 128, "block_causal"),
    (torch.bfloat16, 1, 2 * 9360, 2 * 9360, 12, 128, "teacher_forcing"),
    (torch.bfloat16, 1, 32760, 512, 40, 128, None),
    (torch.float16, 2, 999, 515, 12, 128, None),
    (torch.float32, 1, 4680, 4680, 12, 128, "block_causal"),
    (torch.bfloat16, 2, 1000, 257, 12, 128, None),
    (torch.bfloat16, 3, 515, 999, 4, 64, None),
    (torch.float16, 1, 50, 37, 2, 64, None),
])
def test_gpu_wan_shapes(backend, dtype, B, L, Lk, H, D, kind, poisoned_outputs):
    mask = allowed = None
    if kind:
        n = L if kind == "block_causal" else L // 2
        chunks = [n // 21] * 21 if n % 21 == 0 else [n // 6] * 6  # frame-wise at 480p: 1560 tokens a chunk
        mask = A.block_causal(chunks) if kind == "block_causal" else A.teacher_forcing(chunks)
        allowed = chunk_mask_dense(kind, chunks)
    q, k, v, tq, tk, tv = random_qkv(B, L, Lk, H, D, dtype, device="cuda")
    if backend == "sm90" and not A._sm90_supported(q):
        with pytest.raises(ValueError, match="Hopper kernel"):
            A.attention(q, k, v, tq, tk, tv, mask=mask, backend=backend)
        return
    with torch.no_grad():
        o, to, lse = A.attention_with_lse(q, k, v, tq, tk, tv, mask=mask, backend=backend)
    rows = torch.randperm(L, device="cuda")[:512].sort().values
    ro, rto, rlse = oracle(q, k, v, tq, tk, tv, D**-0.5, allowed, rows)
    assert torch.isfinite(o).all() and torch.isfinite(to).all() and torch.isfinite(lse).all()
    assert rel_err(o[:, rows], ro) < BOUND[dtype] and rel_err(to[:, rows], rto) < BOUND[dtype]
    assert rel_err(lse[:, :, rows], rlse) < 1e-5


@pytest.mark.gpu
def test_gpu_auto_picks_the_hopper_kernel():
    q, k, v, tq, tk, tv = random_qkv(1, 300, 300, 2, 128, torch.bfloat16, device="cuda")
    with torch.no_grad():
        auto = A.attention(q, k, v, tq, tk, tv)
        forced = A.attention(q, k, v, tq, tk, tv, backend="sm90" if A._sm90_supported(q) else "triton")
    assert all(torch.equal(a, b) for a, b in zip(auto, forced))
