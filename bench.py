"""Speed benchmarks, one table per entry: `python bench.py attn [--ref-kernel PATH]`.

attn: the attention forward+JVP kernel at Wan2.1 480p self-attention shapes against PyTorch SDPA's forward (the
floor: the JVP pass does 3x its matrix work) and, when given, NVlabs/rcm's flash_attention_jvp_triton.py timed in the
same process. Effective TFLOP/s counts 12·B·H·Lq·Lk·D for fwd+JVP and 4·B·H·Lq·Lk·D for a forward.
"""
import importlib.util
import math
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro


@dataclass
class AttnBench:
    shapes: tuple[str, ...] = ("1,32760,12,128", "1,32760,40,128")  # B,L,H,D: Wan 1.3B and 14B at 480p
    dtype: str = "bfloat16"
    chunks: int = 21  # block-causal chunks (frame-wise Causal-rCM at 480p: 21 x 1560 tokens)
    teacher_forcing: bool = True  # also time the teacher-forcing mask on [clean | noisy] halves of L
    ref_kernel: Path | None = None  # NVlabs/rcm's rcm/utils/flash_attention_jvp_triton.py (never committed here)
    configs: tuple[str, ...] = ()  # extra tile configs "BLOCK_M,BLOCK_N,warps,stages" to time (tuning the table)
    rep_ms: int = 3000  # timing window per measurement (triton do_bench); the median is reported


def _median_ms(fn, rep_ms):
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(100, rep_ms // 10), rep=rep_ms, return_mode="median")


def _first_call_s(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _load_rcm_kernel(path):
    """Import rCM's kernel file by path. It imports flash-attn's backward at top level; only its forward+JVP is timed
    here, so a stand-in module satisfies the import when flash-attn is absent."""
    if importlib.util.find_spec("flash_attn") is None:
        def no_backward(*args, **kwargs):
            raise RuntimeError("flash-attn is not installed: rCM's backward is unavailable (not benchmarked)")
        stub = types.ModuleType("flash_attn.flash_attn_interface")
        stub._flash_attn_backward = stub._flash_attn_varlen_backward = no_backward
        sys.modules["flash_attn"] = types.ModuleType("flash_attn")
        sys.modules["flash_attn.flash_attn_interface"] = stub
    spec = importlib.util.spec_from_file_location("rcm_attention_jvp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attention  # (q, k, v, tq, tk, tv, sm_scale) on [B, H, L, D] -> (o, to)


def _rel_err_rows(o, to, q, k, v, tq, tk, tv, scale, n_rows=256):
    """Relative error of (o, to) on random query rows against a float64 JVP of math attention (unmasked)."""
    rows = torch.randperm(q.shape[1], device=q.device)[:n_rows]

    def math_attention(q, k, v):
        p = (torch.einsum("bqhd,bkhd->bhqk", q, k) * scale).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", p, v)

    ro, rto = torch.func.jvp(math_attention, tuple(x.double() for x in (q[:, rows], k, v)),
                             tuple(x.double() for x in (tq[:, rows], tk, tv)))
    return max(((x[:, rows].double() - r).norm() / r.norm()).item() for x, r in ((o, ro), (to, rto)))


def _even_chunks(n, chunks):
    """Token counts of `chunks` chunks covering n tokens (the last takes the remainder)."""
    return [n // chunks] * (chunks - 1) + [n - n // chunks * (chunks - 1)]


def bench_attn(cfg: AttnBench):
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # cold cache: the first call includes compilation
    import attention_jvp as A
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, cfg.dtype)
    arch = "sm" + "".join(map(str, torch.cuda.get_device_capability()))
    rcm_attention = None if cfg.ref_kernel is None else _load_rcm_kernel(cfg.ref_kernel)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
          f"{cfg.dtype}, {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []  # (shape, name, ms, flop multiple, first call s, rel err)
    for shape in cfg.shapes:
        B, L, H, D = map(int, shape.split(","))
        q, k, v, tq, tk, tv = (torch.randn(B, L, H, D, device="cuda", dtype=dtype) for _ in range(6))
        scale = D**-0.5
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views, as the model would pass them

        def add(name, fn, flop_multiple, first_call=None, err=None):
            ms = _median_ms(fn, cfg.rep_ms)
            rows.append((shape, name, ms, flop_multiple * B * H * L * L * D / ms / 1e9, first_call, err))
            print(f"{shape:>16} {name:<34} {ms:9.2f} ms", flush=True)

        add("SDPA forward (default)", lambda: F.scaled_dot_product_attention(qt, kt, vt), 4)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    add(f"SDPA forward ({backend.name.lower()})", lambda: F.scaled_dot_product_attention(qt, kt, vt), 4)
            except RuntimeError as e:
                print(f"{backend.name} unavailable: {str(e)[:100]}")

        with torch.no_grad():
            jvp = lambda mask=None: A.attention(q, k, v, tq, tk, tv, mask=mask)
            first = _first_call_s(jvp)
            o, to = jvp()
            add("ours fwd+JVP", jvp, 12, first, _rel_err_rows(o, to, q, k, v, tq, tk, tv, scale))
            for c in cfg.configs:
                key = (arch, D, q.element_size())
                saved = A.CONFIGS.get(key, A.FALLBACK_CONFIG)
                A.CONFIGS[key] = tuple(map(int, c.split(",")))
                try:
                    first = _first_call_s(jvp)
                    o, to = jvp()
                    add(f"ours fwd+JVP [{c}]", jvp, 12, first, _rel_err_rows(o, to, q, k, v, tq, tk, tv, scale))
                    mask = A.block_causal(_even_chunks(L, cfg.chunks))
                    first = _first_call_s(lambda: jvp(mask))
                    add(f"ours block-causal [{c}]", lambda: jvp(mask), 6 * (1 + 1 / cfg.chunks), first)
                except Exception as e:  # e.g. out of shared memory
                    print(f"config {c}: {type(e).__name__}: {str(e)[:200]}")
                finally:
                    A.CONFIGS[key] = saved

            # useful work of a block-causal pass: (1 + 1/chunks)/2 of the full one
            mask = A.block_causal(_even_chunks(L, cfg.chunks))
            first = _first_call_s(lambda: jvp(mask))
            add(f"ours block-causal, {cfg.chunks} chunks", lambda: jvp(mask), 6 * (1 + 1 / cfg.chunks), first)
            if cfg.teacher_forcing and L % 2 == 0:  # each half does a block-causal pass's work over L/2
                tf = A.teacher_forcing(_even_chunks(L // 2, cfg.chunks))
                first = _first_call_s(lambda: jvp(tf))
                add(f"ours teacher-forcing, {cfg.chunks} chunks", lambda: jvp(tf), 3 * (1 + 1 / cfg.chunks), first)

            if rcm_attention is not None:
                args = [x.transpose(1, 2).contiguous() for x in (q, k, v, tq, tk, tv)]
                ref = lambda: rcm_attention(*args, scale)
                first = _first_call_s(ref)
                o, to = ref()
                add("rCM fwd+JVP (autotuned)", ref, 12, first,
                    _rel_err_rows(o.transpose(1, 2), to.transpose(1, 2), q, k, v, tq, tk, tv, scale))
        del q, k, v, tq, tk, tv, qt, kt, vt
        torch.cuda.empty_cache()

    print(f"\n| shape B,L,H,D | kernel | median ms | TFLOP/s | x SDPA fwd rate | first call s | rel err |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, name, ms, tflops, first, err in rows:
        sdpa = next(r[3] for r in rows if r[0] == shape and r[1] == "SDPA forward (default)")
        first_s = "" if first is None else f"{first:.1f}"
        err_s = "" if err is None else f"{err:.1e}"
        print(f"| {shape} | {name} | {ms:.2f} | {tflops:.0f} | {tflops / sdpa:.2f} | {first_s} | {err_s} |")
    for shape in cfg.shapes:
        by_name = {r[1]: r[2] for r in rows if r[0] == shape}
        ours = by_name["ours fwd+JVP"]
        masked = by_name[f"ours block-causal, {cfg.chunks} chunks"]
        line = f"{shape}: block-causal / full = {masked / ours:.2f}"
        if "rCM fwd+JVP (autotuned)" in by_name:
            line += f"; rCM / ours = {by_name['rCM fwd+JVP (autotuned)'] / ours:.2f}x"
        print(line)


BENCHES = {AttnBench: bench_attn}

if __name__ == "__main__":
    cfg = tyro.extras.subcommand_cli_from_dict({"attn": AttnBench})
    BENCHES[type(cfg)](cfg)
