"""Speed benchmarks, one table per entry: `python bench.py {attn,model,sample,vae,causal,i2v,iteration,causal-iteration}`
[--help]; sample and causal also run under `torchrun --nproc_per_node=N` (context parallelism).

attn: the attention forward+JVP kernels (the Hopper kernel where it applies, and the Triton tile kernel) at Wan2.1
480p self-attention shapes against PyTorch SDPA's forward (the floor: the JVP pass does 3x its matrix work) and, when
given, NVlabs/rcm's flash_attention_jvp_triton.py timed in the same process. Effective TFLOP/s counts
12·B·H·Lq·Lk·D for fwd+JVP and 4·B·H·Lq·Lk·D for a forward.
"""
import contextlib
import dataclasses
import functools
import importlib.util
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro


@dataclass
class AttnBench:
    shapes: tuple[str, ...] = ("1,32760,12,128", "1,32760,40,128")  # B,L,H,D: Wan 1.3B and 14B at 480p
    dtype: str = "bfloat16"  # q, k, v and tangent dtype (a torch dtype name)
    chunks: int = 21  # block-causal chunks (frame-wise Causal-rCM at 480p: 21 x 1560 tokens)
    teacher_forcing: bool = True  # also time the teacher-forcing mask on [clean | noisy] halves of L
    ref_kernel: Path | None = None  # NVlabs/rcm's rcm/utils/flash_attention_jvp_triton.py (never committed here)
    configs: tuple[str, ...] = ()  # extra tile configs "BLOCK_M,BLOCK_N,warps,stages" to time (tuning the table)
    rep_ms: int = 3000  # timing window per measurement (triton do_bench); the median is reported


def _median_ms(fn, rep_ms):
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(100, rep_ms // 10), rep=rep_ms, return_mode="median")


def _timed(fn):
    """(fn(), its wall seconds) of one call, synchronised (first calls: compilation included)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


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
            jvp = lambda mask=None, backend="auto", tiles=None: A.attention(q, k, v, tq, tk, tv, mask=mask,
                                                                            backend=backend, tiles=tiles)

            def add_jvp(name, backend, tiles=None):  # unmasked fwd+JVP: first call, accuracy, then the timing
                first = _timed(lambda: jvp(backend=backend, tiles=tiles))[1]
                o, to = jvp(backend=backend, tiles=tiles)
                add(name, lambda: jvp(backend=backend, tiles=tiles), 12, first,
                    _rel_err_rows(o, to, q, k, v, tq, tk, tv, scale))

            add_jvp("ours fwd+JVP", "auto")
            if A._sm90_supported(q):  # "ours" was the Hopper kernel: time the tile kernel too
                add_jvp("ours fwd+JVP, Triton tile kernel", "triton")
            for c in cfg.configs:  # tile kernel configs, passed to the kernel (the table stays as it is)
                tiles = tuple(map(int, c.split(",")))
                try:
                    add_jvp(f"ours fwd+JVP, tiles [{c}]", "triton", tiles)
                    mask = A.block_causal(_even_chunks(L, cfg.chunks))
                    first = _timed(lambda: jvp(mask, "triton", tiles))[1]
                    add(f"ours block-causal, tiles [{c}]", lambda: jvp(mask, "triton", tiles), 6 * (1 + 1 / cfg.chunks),
                        first)
                except Exception as e:  # e.g. out of shared memory
                    print(f"config {c}: {type(e).__name__}: {str(e)[:200]}")

            # useful work of a block-causal pass: (1 + 1/chunks)/2 of the full one
            mask = A.block_causal(_even_chunks(L, cfg.chunks))
            first = _timed(lambda: jvp(mask))[1]
            add(f"ours block-causal, {cfg.chunks} chunks", lambda: jvp(mask), 6 * (1 + 1 / cfg.chunks), first)
            if A._sm90_supported(q):
                add("block-causal, Triton tile kernel", lambda: jvp(mask, "triton"), 6 * (1 + 1 / cfg.chunks))
            if cfg.teacher_forcing and L % 2 == 0:  # each half does a block-causal pass's work over L/2
                tf_mask = A.teacher_forcing(_even_chunks(L // 2, cfg.chunks))
                first = _timed(lambda: jvp(tf_mask))[1]
                add(f"ours teacher-forcing, {cfg.chunks} chunks", lambda: jvp(tf_mask), 3 * (1 + 1 / cfg.chunks), first)

            if rcm_attention is not None:
                args = [x.transpose(1, 2).contiguous() for x in (q, k, v, tq, tk, tv)]
                ref = lambda: rcm_attention(*args, scale)
                first = _timed(ref)[1]
                o, to = ref()
                add("rCM fwd+JVP (autotuned)", ref, 12, first,
                    _rel_err_rows(o.transpose(1, 2), to.transpose(1, 2), q, k, v, tq, tk, tv, scale))
        del q, k, v, tq, tk, tv, qt, kt, vt
        torch.cuda.empty_cache()

    print("\n| shape B,L,H,D | kernel | median ms | TFLOP/s | x SDPA fwd rate | first call s | rel err |")
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
            rcm = by_name["rCM fwd+JVP (autotuned)"]
            line += f"; rCM / ours = {rcm / ours:.2f}x"
            if "ours fwd+JVP, Triton tile kernel" in by_name:
                line += f" (tile kernel: {rcm / by_name['ours fwd+JVP, Triton tile kernel']:.2f}x)"
        print(line)


# ---------------------------------------------------------------------------------------------------- the DiT
LATENT = {"480p": (60, 104), "720p": (90, 160)}  # latent (H, W) of 832x480 and 1280x720


def _cuda_median_s(fn, warmup=2, iters=10):
    """Median seconds of fn() over `iters` runs after `warmup`, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def dit_flops(cfg, L, text_rows=512, tangent=False):
    """Matmul FLOPs of one DiT forward on L tokens; the tangent forward doubles the token matmuls (primal and tangent
    through the same weights) and triples attention (fwd+JVP)."""
    d, f = cfg.dim, cfg.ffn_dim
    tokens = 2 * L * (6 * d * d + 2 * d * f)  # self q,k,v,o; cross q,o; FFN
    context = 2 * text_rows * 2 * d * d  # cross k,v of the text rows
    attn = 4 * L * L * d + 4 * L * text_rows * d
    return cfg.num_layers * ((2 * tokens + context + 3 * attn) if tangent else (tokens + context + attn))


def random_dit(cfg, dtype=torch.bfloat16, device="cuda"):
    """A DiT with random weights (timing only; the official init zeroes the output layer)."""
    from model import WanModel
    with torch.device(device):
        net = WanModel(cfg).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def random_weights(arch, d) -> dict:
    """A random bf16 state dict of a DiT config on rank 0's GPU ({} on the other ranks, which build_nets fills)."""
    from model import WanModel
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(arch).state_dict().items()}
    return {k: torch.empty(s, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
            for k, s in shapes.items()} if d.is_main else {}


def _load_official_dit(folder):
    """The official WanModel class from a folder holding Wan2.1's wan/modules/{model,attention}.py. diffusers' mixins
    are stubbed (they only add config bookkeeping) and attention is PyTorch SDPA, as Wan runs without flash-attn."""
    stubs = {"diffusers": types.ModuleType("diffusers"), "diffusers.models": types.ModuleType("diffusers.models"),
             "diffusers.configuration_utils": types.ModuleType("diffusers.configuration_utils"),
             "diffusers.models.modeling_utils": types.ModuleType("diffusers.models.modeling_utils")}
    stubs["diffusers.configuration_utils"].ConfigMixin = object
    stubs["diffusers.configuration_utils"].register_to_config = lambda f: f
    stubs["diffusers.models.modeling_utils"].ModelMixin = torch.nn.Module
    sys.modules.update(stubs)
    package = types.ModuleType("wan_official")
    package.__path__ = [str(folder)]
    sys.modules["wan_official"] = package
    modules = {}
    for name in ("attention", "model"):
        spec = importlib.util.spec_from_file_location(f"wan_official.{name}", Path(folder) / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"wan_official.{name}"] = modules[name]
        spec.loader.exec_module(modules[name])
    modules["model"].flash_attention = lambda q, k, v, **kw: modules["attention"].attention(q, k, v)
    return modules["model"].WanModel


@dataclass
class ModelBench:
    """The DiT's forward and tangent forward (no grad, bf16 weights, batch 1) beside the official Wan2.1 forward."""
    preset: str = "t2v-1.3B"  # a name in model.CONFIGS
    resolution: Literal["480p", "720p"] = "480p"  # video size (832x480 or 1280x720)
    frames: int = 81  # video frames (1 + (frames − 1)/4 latent frames)
    official: Path | None = None  # a folder with the official wan/modules/{model,attention}.py (never committed here)
    compile: bool = True  # also time ours with torch.compile of each block (first call includes compilation)
    iters: int = 10  # timed runs per entry (median reported)


def bench_model(cfg: ModelBench):
    from model import CONFIGS
    dit = CONFIGS[cfg.preset]
    T, (H, W) = 1 + (cfg.frames - 1) // 4, LATENT[cfg.resolution]
    L = T * (H // 2) * (W // 2)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {cfg.preset}, {cfg.resolution}, "
          f"{cfg.frames} frames ({L} tokens), batch 1, {time.strftime('%Y-%m-%d')}", flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, T, H, W, device="cuda", generator=g)
    tx = torch.randn(x.shape, device="cuda", generator=g)
    t, tt = torch.tensor([500.0], device="cuda"), torch.tensor([30.0], device="cuda")
    context = torch.randn(1, 512, dit.text_dim, device="cuda", generator=g)
    rows = []

    def add(name, fn, flops):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        first = _timed(fn)[1]
        sec = _cuda_median_s(fn, iters=cfg.iters)
        rows.append((name, sec, torch.cuda.max_memory_allocated() / 2**30, flops / sec / 1e12, first))
        print(f"{name:<48} {sec * 1e3:8.1f} ms", flush=True)

    net = random_dit(dit)
    with torch.no_grad():
        add("ours forward (bf16 weights)", lambda: net(x, t, context), dit_flops(dit, L))
        add("ours tangent forward (bf16 weights)", lambda: net(x, t, context, tangent=(tx, tt)),
            dit_flops(dit, L, tangent=True))
        if cfg.compile:
            for block in net.blocks:
                block.compile()
            add("ours forward, compiled blocks", lambda: net(x, t, context), dit_flops(dit, L))
            add("ours tangent forward, compiled blocks", lambda: net(x, t, context, tangent=(tx, tt)),
                dit_flops(dit, L, tangent=True))
    del net
    if cfg.official is not None:
        official = _load_official_dit(cfg.official)
        with torch.device("cuda"):
            ref = official(model_type=dit.model_type, dim=dit.dim, ffn_dim=dit.ffn_dim, num_heads=dit.num_heads,
                           num_layers=dit.num_layers, in_dim=dit.in_dim).eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # Wan's recipe: fp32 weights, autocast
            add("official forward (fp32 weights, bf16 autocast, SDPA)", lambda: ref([x[0]], t, [context[0]], L),
                dit_flops(dit, L))
        del ref
    print("\n| entry | median ms | peak GiB | TFLOP/s | first call s |\n|---|---:|---:|---:|---:|")
    for name, sec, mem, tflops, first in rows:
        print(f"| {name} | {sec * 1e3:.1f} | {mem:.1f} | {tflops:.0f} | {first:.1f} |")
    times = {r[0].split(" (")[0]: r[1] for r in rows}
    print(f"tangent forward / forward = {times['ours tangent forward'] / times['ours forward']:.2f}")
    if cfg.compile:
        print(f"compiled: tangent forward / forward = "
              f"{times['ours tangent forward, compiled blocks'] / times['ours forward, compiled blocks']:.2f}")
    if "official forward" in times:
        for ours in [n for n in times if n.startswith("ours forward")]:
            print(f"official forward / {ours} = {times['official forward'] / times[ours]:.2f}x")


# ---------------------------------------------------------------------------------------------------- sampling
@dataclass
class SampleBench:
    """Text-to-video sampling with random weights, end to end and in parts: the umT5 forward of one prompt, the DiT
    time of the rCM student and of the CFG teacher, and the VAE decode (the plain fp32 decode of before the fused
    kernel, then the fused one in fp32 and bf16, compiled too). Loading checkpoints is not timed."""
    preset: str = "t2v-1.3B"  # a name in model.CONFIGS
    resolution: Literal["480p", "720p"] = "480p"  # video size (832x480 or 1280x720)
    frames: int = 81  # video frames (1 + (frames − 1)/4 latent frames)
    rcm_steps: int = 4  # rCM student: DiT steps
    teacher_steps: int = 50  # teacher: UniPC with CFG (both halves in one batched forward a step)
    compile: bool = True  # also time rCM with torch.compile of each block (sample.py --compile); the teacher and VAE then too
    text_encoder: bool = True  # time the umT5-XXL forward (11 GB of random bf16 weights on the GPU)


def sampling_group():
    """Under torchrun (`torchrun --nproc_per_node=N bench.py sample|causal`): join the process group, one GPU each,
    and return it for sample.split_tokens, which splits each clip's tokens over the processes as `torchrun sample.py`
    does; None for one process. Every rank seeds alike, so all hold the same random weights and inputs."""
    torch.manual_seed(0)
    if "RANK" not in os.environ:
        return None
    import parallel
    from sample import cp_group
    parallel.init_distributed(1, "cuda")
    return cp_group()


def processes() -> str:
    return f" x{torch.distributed.get_world_size()} (context parallel)" if torch.distributed.is_initialized() else ""


def bench_sample(cfg: SampleBench):
    from model import CONFIGS
    from sample import DEFAULTS, Sampler, decode, generate_latents, split_tokens
    from text_encoder import UMT5Config, UMT5Encoder
    from vae import VAEConfig, WanVAE
    group = sampling_group()
    dit = CONFIGS[cfg.preset]
    T, (H, W) = 1 + (cfg.frames - 1) // 4, LATENT[cfg.resolution]
    print(f"# {torch.cuda.get_device_name()}{processes()}, torch {torch.__version__}, {cfg.preset}, {cfg.resolution}, "
          f"{cfg.frames} frames, batch 1, bf16 DiT, {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []

    def add(name, sec, mem=None):
        rows.append((name, sec, mem))
        print(f"{name}: {sec:.3f} s" + ("" if mem is None else f", peak {mem:.1f} GiB"), flush=True)

    t5_s = 0.0
    if cfg.text_encoder:
        with torch.device("cuda"):
            t5 = UMT5Encoder(UMT5Config()).to(torch.bfloat16).eval()
        ids = torch.randint(0, UMT5Config().vocab, (1, 512), device="cuda")
        mask = (torch.arange(512, device="cuda") < 30)[None].long()  # a prompt of 30 tokens, padded as sample.py does
        with torch.no_grad():
            t5_s = _cuda_median_s(lambda: t5(ids, mask), warmup=1, iters=5)
        add("umT5-XXL forward, one prompt (bf16)", t5_s)
        del t5
        torch.cuda.empty_cache()

    net = split_tokens(random_dit(dit), group)
    g = torch.Generator("cuda").manual_seed(0)
    context = [torch.randn(30, dit.text_dim, device="cuda", generator=g)]
    neg = [torch.randn(60, dit.text_dim, device="cuda", generator=g)]
    rcm = Sampler(mode="rcm", steps=cfg.rcm_steps, sigma_max=DEFAULTS["sigma_max"], mid_t=DEFAULTS["mid_t"])
    teacher = Sampler(mode="teacher", steps=cfg.teacher_steps)
    rcm_latents = lambda: generate_latents(net, context, neg, (16, T, H, W), rcm, g)
    generate_latents(net, context, neg, (16, T, H, W), dataclasses.replace(rcm, steps=1), g)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    runs = [_timed(rcm_latents) for _ in range(3)]
    z, rcm_eager = runs[-1][0], sorted(r[1] for r in runs)[1]
    add(f"rCM {cfg.rcm_steps}-step DiT (median of 3)", rcm_eager, torch.cuda.max_memory_allocated() / 2**30)
    rcm_s = rcm_eager
    if cfg.compile:
        for block in net.blocks:
            block.compile()
        first = _timed(rcm_latents)[1]
        rcm_s = sorted(_timed(rcm_latents)[1] for _ in range(3))[1]
        add(f"rCM {cfg.rcm_steps}-step DiT, compiled blocks (median of 3; first call {first:.0f} s)", rcm_s)
    teacher_s = _timed(lambda: generate_latents(net, context, neg, (16, T, H, W), teacher, g))[1]
    add(f"teacher {cfg.teacher_steps}-step UniPC + CFG DiT" + (", compiled blocks" if cfg.compile else ""), teacher_s)
    del net
    torch.cuda.empty_cache()

    with torch.device("cuda"):
        vae = WanVAE(VAEConfig()).eval()
    decodes = {}
    settings = [("fp32, plain norms, channels-first (the decode before the fused kernel)", torch.float32, False, False),
                ("fp32", torch.float32, True, False), ("bf16", torch.bfloat16, True, False)]
    settings += [("bf16, compiled blocks", torch.bfloat16, True, True)] if cfg.compile else []
    for name, dtype, fused, compiled in settings:  # (fused: the fused norms and channels-last, as load_vae on CUDA)
        _norms(fused)
        vae.to(dtype).channels_last(fused)
        if compiled:
            vae.compile_blocks()
        decode(vae, z)  # warm-up (and compilation)
        torch.cuda.reset_peak_memory_stats()
        decodes[name] = _cuda_median_s(lambda: decode(vae, z), warmup=0, iters=3)
        add(f"VAE decode {name} (median of 3)", decodes[name], torch.cuda.max_memory_allocated() / 2**30)
    _norms(fused=True)
    before = decodes[settings[0][0]]
    best = min(decodes, key=decodes.get)
    print("\n| step | time s | peak GiB |\n|---|---:|---:|")
    for name, sec, mem in rows:
        print(f"| {name} | {sec:.3f} | {'' if mem is None else f'{mem:.1f}'} |")
    print(f"\nend to end, rCM {cfg.rcm_steps} steps: umT5 {t5_s:.2f} + DiT {rcm_eager:.2f} (eager) + decode {before:.2f} "
          f"({settings[0][0]}) = {t5_s + rcm_eager + before:.2f} s; umT5 {t5_s:.2f} + DiT {rcm_s:.2f} + decode "
          f"{decodes[best]:.2f} ({best}) = {t5_s + rcm_s + decodes[best]:.2f} s (DiT + decode {rcm_s + decodes[best]:.2f} s)")
    print(f"speed-up of rCM {cfg.rcm_steps}-step over teacher {cfg.teacher_steps}-step + CFG (DiT): "
          f"{teacher_s / rcm_s:.1f}x; end to end: {(t5_s + teacher_s + decodes[best]) / (t5_s + rcm_s + decodes[best]):.1f}x")


# ---------------------------------------------------------------------------------------------------------- the VAE
@dataclass
class VAEBench:
    """The VAE's decode (and encode) of one clip with random full-size weights: seconds (CUDA events, median), peak
    memory above weights and inputs, and the relative error against a strict fp32 decode (plain ops, TF32 off). Rows:
    the plain-torch norms (the code before the fused kernel, still the CPU path) and the fused Triton norm + SiLU, in
    fp32 and bf16, for each --frames-per-call, and with compiled blocks."""
    resolution: Literal["480p", "720p"] = "480p"  # video size (832x480 or 1280x720)
    frames: int = 81  # video frames (1 + (frames − 1)/4 latent frames)
    frames_per_call: tuple[int, ...] = (1, 4)  # latent frames per decoder call (vae.decode's frames_per_call)
    compile: bool = True  # also time the fused VAE with compiled blocks (the first call compiles, about a minute)
    encode: bool = True  # also time encode (plain and fused, fp32 and bf16)
    repeats: int = 5  # timed calls per row after one warm-up (median reported)


def _norms(fused: bool):
    """Route vae.norm_silu through the fused kernel or the plain torch ops (the code before the kernel)."""
    import vae as vae_module
    original = getattr(vae_module.norm_silu, "func", vae_module.norm_silu)
    vae_module.norm_silu = original if fused else functools.partial(original, backend="torch")


def bench_vae(cfg: VAEBench):
    from vae import VAEConfig, WanVAE
    T, (H, W) = 1 + (cfg.frames - 1) // 4, LATENT[cfg.resolution]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, Wan2.1 VAE, {cfg.resolution}, "
          f"{cfg.frames} frames, batch 1, random weights, {time.strftime('%Y-%m-%d')}", flush=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        vaes = {"fp32": WanVAE(VAEConfig()).eval()}
    vaes["bf16"] = WanVAE(VAEConfig()).to("cuda", torch.bfloat16).eval()
    vaes["bf16"].load_state_dict(vaes["fp32"].state_dict())
    z = torch.randn(1, 16, T, H, W, device="cuda")
    _norms(fused=False)
    torch.backends.cudnn.allow_tf32 = False
    ref = vaes["fp32"].decode(z)
    torch.backends.cudnn.allow_tf32 = True  # torch's default, which the rows run with
    video = ref.clamp(-1, 1)
    rows = []

    def add(name, fn, ref):
        out = fn()  # warm-up
        err = ((out - ref).norm() / ref.norm()).item()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        sec = _cuda_median_s(fn, warmup=0, iters=cfg.repeats)
        rows.append((name, sec, (torch.cuda.max_memory_allocated() - base) / 2**30, err))
        print(f"{name}: {sec:.3f} s, rel. error {err:.1e}", flush=True)

    # (dtype, fused norms, channels-last, latent frames per call); the first is the decode before this work
    settings = [("fp32", False, False, 1), ("fp32", True, False, 1), ("fp32", True, True, 1),
                ("bf16", False, False, 1), ("bf16", True, False, 1)]
    settings += [("bf16", True, True, k) for k in cfg.frames_per_call]
    for dtype, fused, last, k in settings:
        _norms(fused)
        vaes[dtype].channels_last(last)
        add(f"decode {dtype}, {'fused' if fused else 'plain'} norms, channels-{'last' if last else 'first'}, {k} "
            f"latent frame(s) per call", lambda: vaes[dtype].decode(z, frames_per_call=k), ref)
    if cfg.compile:  # (compiled fp32 stayed at 1.26x in an earlier trial: bf16 only)
        vaes["bf16"].channels_last().compile_blocks()
        for k in cfg.frames_per_call:
            add(f"decode bf16, compiled blocks, channels-last, {k} latent frame(s) per call",
                lambda: vaes["bf16"].decode(z, frames_per_call=k), ref)
    if cfg.encode:
        _norms(fused=False)
        vaes["fp32"].channels_last(False)
        torch.backends.cudnn.allow_tf32 = False
        mu = vaes["fp32"].encode(video)
        torch.backends.cudnn.allow_tf32 = True
        for dtype, fused, last in (("fp32", False, False), ("fp32", True, True), ("bf16", True, True)):
            _norms(fused)
            vaes[dtype].channels_last(last)
            add(f"encode {dtype}, {'fused' if fused else 'plain'} norms, channels-{'last' if last else 'first'}"
                + (", compiled blocks" * (cfg.compile and dtype == "bf16")), lambda: vaes[dtype].encode(video), mu)
    _norms(fused=True)
    base = rows[0][1]
    print("\n| run | seconds | vs plain fp32 decode | peak GiB above inputs | rel. error vs strict fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name, sec, mem, err in rows:
        print(f"| {name} | {sec:.3f} | {base / sec:.2f}x | {mem:.1f} | {err:.1e} |")


# ---------------------------------------------------------------------------------------------- image-to-video
@dataclass
class I2VBench:
    """Image-to-video rCM sampling with random weights (sample.py's generate_latents with the conditioning y and, for
    Wan2.1, the CLIP tokens): DiT seconds and peak GPU memory of Wan2.1 I2V-14B and of Wan2.2 I2V-A14B's two experts,
    both resident and with the idle expert waiting on the CPU (one video; the experts switch once per video)."""
    resolution: Literal["480p", "720p"] = "480p"  # video size (832x480 or 1280x720)
    frames: int = 81  # video frames (1 + (frames − 1)/4 latent frames)
    steps: int = 4  # rCM student: DiT steps
    sigma_max: float = 200.0  # NVlabs's setting for its Wan2.2 I2V rCM experts


def bench_i2v(cfg: I2VBench):
    from model import BOUNDARY, CONFIGS, TwoExperts
    from sample import Sampler, generate_latents
    T, (H, W) = 1 + (cfg.frames - 1) // 4, LATENT[cfg.resolution]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {cfg.resolution}, {cfg.frames} frames, "
          f"rCM {cfg.steps} steps, σ_max {cfg.sigma_max}, bf16, {time.strftime('%Y-%m-%d')}", flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    context = [torch.randn(30, 4096, device="cuda", generator=g)]
    y = torch.randn(1, 20, T, H, W, device="cuda", generator=g)
    sampler = Sampler(mode="rcm", steps=cfg.steps, sigma_max=cfg.sigma_max, mid_t=(1.5, 1.4, 1.0))
    rows = []

    def run(name, net, clip: bool):
        clip_fea = torch.randn(1, 257, 1280, device="cuda", generator=g) if clip else None
        dit = lambda x, t, c, **kw: net(x, t, c, y=y.expand(len(x), -1, -1, -1, -1), clip_fea=clip_fea, **kw)
        generate_latents(dit, context, None, (16, T, H, W), dataclasses.replace(sampler, steps=1), g)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        sec = _timed(lambda: generate_latents(dit, context, None, (16, T, H, W), sampler, g))[1]
        rows.append((name, sec, torch.cuda.max_memory_allocated() / 2**30))
        print(f"{name}: {sec:.2f} s, peak {rows[-1][2]:.1f} GiB", flush=True)

    run("Wan2.1 I2V-14B", random_dit(CONFIGS["i2v-14B"]), clip=True)
    torch.cuda.empty_cache()
    high, low = random_dit(CONFIGS["i2v-A14B"]), random_dit(CONFIGS["i2v-A14B"])
    run("Wan2.2 I2V-A14B, both experts on the GPU", TwoExperts(high, low, BOUNDARY["i2v-A14B"]), clip=False)
    low.to("cpu")
    torch.cuda.empty_cache()
    run("Wan2.2 I2V-A14B, idle expert on the CPU", TwoExperts(high, low, BOUNDARY["i2v-A14B"], device="cuda"),
        clip=False)
    print("\n| model | DiT s | peak GiB |\n|---|---:|---:|")
    for name, sec, mem in rows:
        print(f"| {name} | {sec:.2f} | {mem:.1f} |")


# ---------------------------------------------------------------------------------------------- causal streaming
@dataclass
class CausalBench:
    """Causal-rCM streaming with random weights (sample.py's stream_video): FPS = frames / seconds until the last
    chunk's frames are decoded, the first chunk's latency, the later chunks' spacing, the seconds of the DiT alone (no
    decode), of the decode after the DiT on one CUDA stream and overlapped on a second, peak memory, the KV cache quantised
    (memory, speed, and the latents' relative deviation from the unquantised cache, same seed)."""
    preset: str = "t2v-1.3B"  # a name in model.CONFIGS
    resolution: Literal["480p", "720p"] = "480p"  # video size (832x480 or 1280x720)
    frames: int = 81  # video frames (1 + (frames − 1)/4 latent frames)
    runs: tuple[str, ...] = ("3,3,2", "3,3,2,noisy", "1,1,1", "1,1,1,noisy")  # first_chunk_t,chunk_t,steps[,noisy]
    quant: tuple[str, ...] = ("int8", "fp8")  # quantised caches timed on the first run's layout (per-token scales)
    vae_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # dtype of the streaming VAE decode
    compile: bool = False  # torch.compile the DiT's and the VAE's blocks (sample.py --compile)
    overlap_decode: bool = False  # the FPS and latency columns with the decode overlapped (sample.py --overlap-decode)
    repeats: int = 3  # timed videos per row after one warm-up (median reported)
    vae_frames_per_call: int = 1  # latent frames per VAE decoder call (sample.py --vae-frames-per-call)
    profile: bool = False  # also print where the GPU time of one more video of the first run goes, by kind of kernel


def bench_causal(cfg: CausalBench):
    from model import CONFIGS
    from sample import Sampler, Streaming, split_tokens, stream_cache, stream_report, stream_video
    from samplers import CAUSAL_MID_T
    from vae import VAEConfig, WanVAE
    group = sampling_group()
    dit = CONFIGS[cfg.preset]
    shape = (16, 1 + (cfg.frames - 1) // 4, *LATENT[cfg.resolution])
    print(f"# {torch.cuda.get_device_name()}{processes()}, torch {torch.__version__}, {cfg.preset}, {cfg.resolution}, "
          f"{cfg.frames} frames, batch 1, bf16 DiT, {cfg.vae_dtype} VAE ({cfg.vae_frames_per_call} latent frames per call), "
          f"compile {cfg.compile}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    net = random_dit(dit)
    with torch.device("cuda"):
        vae = WanVAE(VAEConfig()).to(getattr(torch, cfg.vae_dtype)).eval().channels_last()  # as load_vae on CUDA
    vae.frames_per_call = cfg.vae_frames_per_call
    if cfg.compile:
        for block in net.blocks:
            block.compile()
        vae.compile_blocks()
    net = split_tokens(net, group)
    context = [torch.randn(30, dit.text_dim, device="cuda", generator=torch.Generator("cuda").manual_seed(0))]
    rows, reference = [], {}
    sampler = Sampler(sigma_max=1600.0, mid_t=CAUSAL_MID_T)  # the Causal-rCM recipe's streaming times

    def median_video(st, vae, cache):
        video = lambda: stream_video(net, vae, context, shape, st, sampler, torch.Generator("cuda").manual_seed(1),
                                     cache)
        video()  # warm-up (and compilation)
        results = sorted((video() for _ in range(cfg.repeats)), key=lambda r: r[2][-1])
        return results[len(results) // 2]

    def run(name, st):
        cache = stream_cache(net, 1, shape, st)
        torch.cuda.reset_peak_memory_stats()
        z, frames, ready = median_video(st, vae, cache)
        peak = torch.cuda.max_memory_allocated() / 2**30
        dit_s = median_video(st, None, cache)[2][-1]
        other_s = median_video(dataclasses.replace(st, overlap_decode=not st.overlap_decode), vae, cache)[2][-1]
        dev = "" if st.kv_quant == "none" else f"{((z - reference[name]).norm() / reference[name].norm()).item():.1e}"
        reference.setdefault(name, z)
        later = [b - a for a, b in zip(ready, ready[1:])]
        serial_s, overlapped_s = (other_s, ready[-1]) if st.overlap_decode else (ready[-1], other_s)
        rows.append((f"{name} kv {st.kv_quant}", frames.shape[1] / ready[-1], ready[0], sum(later) / len(later),
                     dit_s, serial_s, overlapped_s, cache.nbytes() / 2**30, peak, dev))
        print(f"{rows[-1][0]}: {stream_report(ready, frames.shape[1])}; DiT alone {dit_s:.2f} s, decode after the "
              f"DiT on one stream {serial_s:.2f} s, overlapped on a second stream {overlapped_s:.2f} s", flush=True)

    for spec in cfg.runs:
        first, chunk, steps, *noisy = spec.split(",")
        st = Streaming(int(first), int(chunk), (int(steps),), noisy_context=bool(noisy),
                       overlap_decode=cfg.overlap_decode)
        name = f"c{first}-{chunk} {steps}-step" + (" noisy ctx" if noisy else "")
        run(name, st)
        if spec == cfg.runs[0] and cfg.profile:
            kernel_time_breakdown(lambda: stream_video(net, vae, context, shape, st, sampler,
                                                       torch.Generator("cuda").manual_seed(1)),
                                  f"one {name} video (DiT and decode)", group is None or group.rank() == 0)
        if spec == cfg.runs[0]:
            for q in cfg.quant:
                run(name, dataclasses.replace(st, kv_quant=q))
    print("\n| run | FPS | first chunk s | later chunks s apart | DiT alone s | DiT then decode, one stream s | "
          "overlapped s | KV cache GiB | peak GiB | latents rel. dev. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, fps, first, later, dit_s, serial_s, total, cache_gib, peak, dev in rows:
        print(f"| {name} | {fps:.1f} | {first:.3f} | {later:.3f} | {dit_s:.2f} | {serial_s:.2f} | {total:.2f} | "
              f"{cache_gib:.2f} | {peak:.1f} | {dev} |")


# ---------------------------------------------------------------------------------------------------- rCM iteration
@dataclass
class IterationBench:
    """train_rcm's own student_step (sCM + DMD) and critic_step on random weights: seconds, peak memory and MFU of an
    rCM iteration. Under torchrun the nets are FSDP-sharded over all ranks and --cp-size splits each clip's tokens."""
    preset: str = "wan1.3b"  # a train_rcm preset (its precision, guidance, warm-up and update schedule)
    teacher_model: str | None = None  # a teacher of another size, a name in model.CONFIGS (e.g. t2v-14B)
    resolution: Literal["480p", "720p"] = "480p"  # video size (832x480 or 1280x720)
    frames: int = 81  # video frames (1 + (frames − 1)/4 latent frames)
    batch: int = 1  # clips per data-parallel rank
    cp_size: int = 1  # context-parallel ranks per clip
    cp_head_groups: int = 1  # Ulysses all-to-alls pipelined over this many groups of heads (train_rcm's flag)
    checkpointing: Literal["none", "block", "attention", "matmul"] | None = None  # activation checkpointing [preset's]
    compile: bool | None = None  # torch.compile every block [preset's]
    iters: int = 4  # timed iterations of each kind after one warm-up: one cycle of 1..4 simulation steps
    peak_tflops: float = 989.0  # dense bf16 peak of one GPU (H200 SXM)
    profile: bool = False  # also print where the GPU time of one more student iteration goes, by kind of kernel


# kinds of kernel by name, first match wins: torch.compile's kernels are named after the ops they fuse (attention
# and copies included), and cuDNN's attention and convolution kernels say wgmma or xmma like the matmuls
KERNEL_KINDS = (("elementwise fused by torch.compile", ("triton_poi", "triton_red", "triton_per")),
                ("attention", ("sdpa", "flash", "attn", "attention", "fmha", "flex")),
                ("convolution (VAE)", ("fprop", "dgrad", "wgrad", "implicit_gemm", "convolve")),
                ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "cublas")),
                ("copy / dtype cast", ("copy", "cast", "convert", "catarray")),
                ("optimizer and EMA", ("adam", "foreach", "multi_tensor", "lerp")),
                ("communication", ("nccl",)))


def kernel_time_breakdown(fn, what: str, show: bool = True, top: int = 12):
    """Run fn() under torch.profiler and print the GPU time by kind of kernel (by name: KERNEL_KINDS; the rest is
    elementwise work and reductions: norms, RoPE, activations, loss arithmetic) and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    kernels = [(e.key, e.self_device_time_total / 1e6) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    kind_of = lambda name: next((k for k, keys in KERNEL_KINDS if any(key in name.lower() for key in keys)),
                                "elementwise and reductions")
    kinds = {}
    for name, sec in kernels:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + sec
    if not show:
        return
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, span = busy_seconds(spans), (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e6
    total = sum(kinds.values())
    print(f"\nGPU time of {what} by kind of kernel ({total:.2f} s in kernels). Some kernel ran during {busy:.2f} s "
          f"of the {span:.2f} s from the first kernel to the last: the GPU idled {1 - busy / span:.1%} of it "
          "(waiting on the host: launches, Python, guards)")
    print("| kind | seconds | share |\n|---|---:|---:|")
    for kind, sec in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {sec:.2f} | {sec / total:.1%} |")
    print(f"| kernel (the top {top}, then the top 3 of each other kind) | seconds | share |\n|---|---:|---:|")
    ranked = sorted(kernels, key=lambda kv: -kv[1])
    shown = ranked[:top] + [kv for kind in kinds for kv in [kv for kv in ranked[top:] if kind_of(kv[0]) == kind][:3]]
    for name, sec in shown:
        print(f"| {name[:90]} | {sec:.3f} | {sec / total:.1%} |")


def busy_seconds(spans) -> float:
    """The length of the union of [start, end) intervals in µs, in seconds: the time some kernel ran (kernels on
    two CUDA streams overlap)."""
    busy, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
        busy += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    return busy / 1e6


def rcm_iteration_flops(student, teacher, L, n_sim: int) -> tuple[int, int]:
    """Model FLOPs (no recomputation) of one clip's student iteration (sCM + DMD, CFG teacher) and critic iteration,
    n_sim backward-simulation steps, over all nets (the teacher at its own size); a backward costs two forwards.
    student: teacher CFG 2 + student JVP (tangent) + with-grad student 3 (sCM); n_sim − 1 no-grad student + with-grad
    student 3 + fake 1 + teacher CFG 2 (DMD). critic: n_sim no-grad student + fake with grad 3."""
    f, f_jvp, f_teacher = dit_flops(student, L), dit_flops(student, L, tangent=True), dit_flops(teacher, L)
    return f_jvp + (n_sim + 6) * f + 4 * f_teacher, (n_sim + 3) * f


def bench_iteration(cfg: IterationBench):
    import torch.distributed as dist
    import parallel
    import train_rcm
    import training
    preset = train_rcm.PRESETS[cfg.preset][1]
    rcm = dataclasses.replace(preset, device="cuda", batch=cfg.batch, cp_size=cfg.cp_size,
                              cp_head_groups=cfg.cp_head_groups, checkpointing=cfg.checkpointing or preset.checkpointing,
                              compile=preset.compile if cfg.compile is None else cfg.compile,
                              teacher_model=cfg.teacher_model)
    d = parallel.init_distributed(rcm.cp_size, "cuda")
    dit, teacher_dit, processes = rcm.dit, training.teacher_arch(rcm), dist.get_world_size()
    T, (H, W) = 1 + (cfg.frames - 1) // 4, LATENT[cfg.resolution]
    L = T * (H // 2) * (W // 2)
    if d.is_main:
        print(f"# {torch.cuda.get_device_name()} x{processes} (dp {d.dp_size} x cp {d.cp_size}), torch {torch.__version__}, "
              f"{cfg.preset}, teacher {cfg.teacher_model or 'of --dit'}, {cfg.resolution}, {cfg.frames} frames "
              f"({L} tokens), batch {cfg.batch} per dp rank, "
              f"SAC {rcm.checkpointing}, compile {rcm.compile}, {time.strftime('%Y-%m-%d')}", flush=True)
    weights = random_weights(dit, d)
    teacher = weights if teacher_dit == dit else random_weights(teacher_dit, d)
    nets = training.build_nets(rcm, d, rcm, teacher=teacher, trained=weights, fake=weights, lr_fake=rcm.lr_fake)
    del weights, teacher
    g = torch.Generator("cuda").manual_seed(d.dp_rank)  # the ranks of a CP group hold the same clip
    x0 = torch.randn(cfg.batch, 16, T, H, W, device="cuda", generator=g)
    cond, uncond = (torch.randn(cfg.batch, 512, dit.text_dim, device="cuda", generator=g) for _ in range(2))

    def timed(step, i):
        parallel.seed_everything(0, d, i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        record = step(rcm, nets, [(x0, cond, uncond, {})], i)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, record

    rows = []
    # iterations after the tangent warm-up (DMD and critic on). The first of each kind warms up (and compiles), both
    # before either is measured: a net's AdamW state appears at its first step, and a run's steps have both nets'.
    after = range(rcm.tangent_warmup, rcm.tangent_warmup + (cfg.iters + 1) * rcm.student_update_freq * 2)
    its_of = lambda student: [i for i in after if train_rcm.is_student_iteration(rcm, i) == student][:cfg.iters + 1]
    student_its, critic_its = its_of(True), its_of(False)
    kinds = [("student (sCM + DMD)", train_rcm.student_step, 0, student_its),
             ("critic", train_rcm.critic_step, 1, critic_its)]
    for _, step, _, its in kinds:
        timed(step, its[0])
    for name, step, offset, its in kinds:
        torch.cuda.reset_peak_memory_stats()
        runs = [timed(step, i) for i in its[1:]]
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        for sec, record in runs:
            n_sim = int(record.get("dmd/steps", record.get("critic/steps")))
            flops = rcm_iteration_flops(dit, teacher_dit, L, n_sim)[offset] * cfg.batch * d.dp_size  # every clip
            rows.append((name, n_sim, sec, peak.item(), flops / sec / processes / 1e12))
    if cfg.profile:
        kernel_time_breakdown(lambda: timed(train_rcm.student_step, student_its[-1]), "one student iteration", d.is_main)
    if d.is_main:
        print("\n| iteration | sim steps | seconds | peak GiB (max over ranks) | TFLOP/s per GPU | MFU |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, n_sim, sec, peak, tflops in rows:
            print(f"| {name} | {n_sim} | {sec:.2f} | {peak:.1f} | {tflops:.0f} | {tflops / cfg.peak_tflops:.1%} |")
        for name in ("student (sCM + DMD)", "critic"):
            secs = sorted(r[2] for r in rows if r[0] == name)
            mean_tflops = sum(r[4] * r[2] for r in rows if r[0] == name) / sum(secs)
            print(f"{name}: median {secs[len(secs) // 2]:.2f} s, mean over the cycle {sum(secs) / len(secs):.2f} s, "
                  f"MFU {mean_tflops / cfg.peak_tflops:.1%}; clips/s over all ranks: "
                  f"{cfg.batch * d.dp_size * len(secs) / sum(secs):.2f}")
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------- Causal-rCM stage iterations
@dataclass
class CausalIterationBench:
    """train_causal's own student_step (stages tf_scm and sf_dmd) and critic_step (sf_dmd) on random weights: seconds
    and peak memory of one iteration, and the matmul throughput (attention not counted: a lower bound on MFU). Under
    torchrun the nets are FSDP-sharded over all ranks and --cp-size splits each clip's tokens."""
    preset: str = "wan14b-to-1.3b"  # a train_causal preset (sizes, precision, chunks, guidance, update schedule)
    stages: tuple[str, ...] = ("tf_scm", "sf_dmd")  # the stages to time
    resolution: Literal["480p", "720p"] = "480p"  # video size (832x480 or 1280x720)
    frames: int = 81  # video frames (1 + (frames − 1)/4 latent frames)
    cp_size: int | None = None  # context-parallel ranks per clip (default: the preset's, capped at the processes)
    checkpointing: Literal["none", "block", "attention", "matmul"] | None = None  # activation checkpointing [preset's]
    iters: int = 4  # timed iterations of each kind after one warm-up
    peak_tflops: float = 989.0  # dense bf16 peak of one GPU (H200 SXM)


def matmul_flops(cfg, L, text_rows=512) -> int:
    """Token and text matmul FLOPs of one DiT forward on L tokens (no attention)."""
    return cfg.num_layers * (2 * L * (6 * cfg.dim**2 + 2 * cfg.dim * cfg.ffn_dim) + 2 * text_rows * 2 * cfg.dim**2)


def bench_causal_iteration(cfg: CausalIterationBench):
    import torch.distributed as dist
    import parallel
    import train_causal
    import training
    from model import chunk_frames
    base = train_causal.PRESETS[cfg.preset][1]
    processes = int(os.environ.get("WORLD_SIZE", 1))
    cp = min(base.cp_size, processes) if cfg.cp_size is None else cfg.cp_size
    causal = dataclasses.replace(base, device="cuda", batch=1, cp_size=cp,
                                 checkpointing=cfg.checkpointing or base.checkpointing)
    d = parallel.init_distributed(causal.cp_size, "cuda")
    T, (H, W) = 1 + (cfg.frames - 1) // 4, LATENT[cfg.resolution]
    L = T * (H // 2) * (W // 2)
    student, teacher_dit = causal.dit, training.teacher_arch(causal)
    if d.is_main:
        print(f"# {torch.cuda.get_device_name()} x{processes} (dp {d.dp_size} x cp {d.cp_size}), torch {torch.__version__}, "
              f"{cfg.preset}: student {student.dim}/{student.num_layers}, teachers {teacher_dit.dim}/"
              f"{teacher_dit.num_layers}, {cfg.resolution}, {cfg.frames} frames ({L} tokens), chunks of "
              f"{causal.chunk_t} latent frames, SAC {causal.checkpointing}, {time.strftime('%Y-%m-%d')}", flush=True)
    g = torch.Generator("cuda").manual_seed(d.dp_rank)
    x0 = torch.randn(1, 16, T, H, W, device="cuda", generator=g)
    cond, uncond = (torch.randn(1, student.text_len, student.text_dim, device="cuda", generator=g) for _ in range(2))
    n_chunks = len(chunk_frames(T, causal.first_chunk_t, causal.chunk_t))
    rows = []
    for stage in cfg.stages:
        run = dataclasses.replace(causal, dit=train_causal.stage_arch(causal, stage))
        weights = random_weights(run.dit, d)
        nets = training.build_nets(run, d, train_causal.stage_config(causal, stage), teacher=random_weights(teacher_dit, d),
                                   trained=weights, fake=weights if stage == "sf_dmd" else None,
                                   lr_fake=causal.sf.lr_fake)
        del weights
        freq = causal.sf.student_update_freq
        kinds = [(kind, [i for i in range(10**4) if stage != "sf_dmd" or (i % freq == 0) == (kind == "student")]
                  [:cfg.iters + 1]) for kind in ["student"] + (["critic"] if stage == "sf_dmd" else [])]

        def timed(kind, i):
            parallel.seed_everything(0, d, i)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            batch = [(x0, cond, uncond, {})]
            record = train_causal.student_step(causal, stage, nets, batch, i) if kind == "student" else \
                train_causal.critic_step(causal, nets, batch, i)
            torch.cuda.synchronize()
            return time.perf_counter() - t0, record
        for kind, its in kinds:  # every kind warms up before any is measured (each net's AdamW state then exists)
            timed(kind, its[0])
        for kind, its in kinds:
            torch.cuda.reset_peak_memory_stats()
            times = [timed(kind, i) for i in its[1:]]
            peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            for sec, record in times:
                # matmul FLOPs of the clip (backward = 2 forwards): tf_scm packs [clean | noisy] (2L tokens): CFG
                # teacher 2, student JVP 2 (primal + tangent), student with grad 3. sf_dmd: the rollout's student
                # passes (n steps per chunk, a clean pass per chunk but the last, the last step with grad: +2),
                # then DMD: fake 1 + CFG teacher 2 on L tokens; critic: the rollout, then the fake with grad 3.
                f_s, f_t = (lambda n: matmul_flops(student, n)), (lambda n: matmul_flops(teacher_dit, n))
                if stage == "tf_scm":
                    flops = 2 * f_t(2 * L) + 5 * f_s(2 * L)
                else:
                    steps = int(record.get("dmd/steps", record.get("critic/steps", 1)))
                    rollout = (steps + 1) * f_s(L) - f_s(L // n_chunks)
                    flops = rollout + (2 * f_s(L) + f_s(L) + 2 * f_t(L) if kind == "student" else 3 * f_s(L))
                rows.append((f"{stage} {kind}", sec, peak.item(), flops * d.dp_size / sec / processes / 1e12))
        del nets
        torch.cuda.empty_cache()
    if d.is_main:
        print("\n| iteration | seconds (median) | peak GiB (max over ranks) | matmul TFLOP/s per GPU | matmul MFU |")
        print("|---|---:|---:|---:|---:|")
        for name in dict.fromkeys(r[0] for r in rows):
            rs = sorted((r for r in rows if r[0] == name), key=lambda r: r[1])
            sec, peak, tflops = rs[len(rs) // 2][1:]
            print(f"| {name} | {sec:.2f} | {peak:.1f} | {tflops:.0f} | {tflops / cfg.peak_tflops:.1%} |")
    dist.destroy_process_group()


BENCHES = {AttnBench: bench_attn, ModelBench: bench_model, SampleBench: bench_sample, CausalBench: bench_causal,
           VAEBench: bench_vae,
           IterationBench: bench_iteration, I2VBench: bench_i2v, CausalIterationBench: bench_causal_iteration}

if __name__ == "__main__":
    cfg = tyro.extras.subcommand_cli_from_dict({"attn": AttnBench, "model": ModelBench, "sample": SampleBench,
                                                "causal": CausalBench, "iteration": IterationBench,
                                                "i2v": I2VBench, "causal-iteration": CausalIterationBench, "vae": VAEBench})
    quiet = int(os.environ.get("RANK", 0)) > 0  # (under torchrun rank 0 prints)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
        BENCHES[type(cfg)](cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
