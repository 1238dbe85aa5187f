"""Sampling: a prompt in, an mp4 out, with the distilled rCM student, the Wan2.1 teacher, or a toy-world checkpoint.

    python sample.py --dit-path rCM_Wan2.1_T2V_1.3B_480p.pt --prompt "a corgi surfing a wave at sunset"
    python sample.py --mode teacher --dit-path Wan2.1-T2V-1.3B --prompts-file prompts.txt --shard-dir my_latents/
    python sample.py --toy --dit-path runs/toy/ema.safetensors --num-samples 8
    python sample.py --causal --dit-path causal_student.safetensors --prompt "..." --steps-per-chunk 2

In the order it runs: the prompts (and, for the teacher, the negative prompt) go through umT5 once and the encoder is
freed; for each video, noise ε drawn from seed + index becomes latents through the DiT (rCM: the few-step consistency
sampler of losses.py, no CFG; teacher: UniPC or Euler on Wan's shifted flow-matching grid, with CFG); the VAE decodes
them to pixels, written as an mp4 at 16 fps. `generate_latents` and `decode` are the core: they take modules and
tensors, no files, so bench.py times them with random weights. With --shard-dir the latents, text embeddings and
prompts are also written as webdataset shards in the format data.py reads: a synthetic training set.

With --causal (a Causal-rCM student) the video is streamed: chunk by chunk of latent frames, each denoised in a few
steps against a KV cache of the chunks before it (`stream_latents`), and decoded by the causal VAE as soon as it is
done, with a report of the first-chunk latency, the per-chunk latency and FPS = frames / (DiT time + VAE time).
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import imageio.v2 as imageio
import torch
import tyro
from tqdm import tqdm

from data import write_shards
from losses import denoise, euler_sample, rcm_sample, sampling_times, shift_time
from model import CONFIGS, CacheConfig, KVCache, WanConfig, WanModel, chunk_frames, load_checkpoint
from text_encoder import UMT5Config, encode_prompts, load_tokenizer, load_umt5
from toy import TOY_DIT, ToyConfig, make_world, metrics, save_grid
from vae import VAEConfig, load_vae

FPS = 16
# Wan2.1's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                   "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                   "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
# (width, height) of each preset; 1:1 keeps the pixel count at multiples of 16.
SIZES = {("480p", "16:9"): (832, 480), ("480p", "9:16"): (480, 832), ("480p", "1:1"): (624, 624),
         ("720p", "16:9"): (1280, 720), ("720p", "9:16"): (720, 1280), ("720p", "1:1"): (960, 960)}


@dataclass(frozen=True)
class Sampler:
    """How latents are drawn from the DiT."""
    mode: Literal["rcm", "teacher"] = "rcm"  # rcm: the distilled student, 1-4 steps, no CFG; teacher: an ODE solver with CFG
    steps: int | None = None                 # DiT steps (default: 4 for rcm, 50 for teacher)
    sigma_max: float = 80.0                  # rcm: starting noise level, t_0 = arctan(sigma_max); 1600 trades diversity for quality
    mid_t: tuple[float, ...] = (1.5, 1.4, 1.0)  # rcm: TrigFlow times of the intermediate steps (steps ≤ len(mid_t) + 1)
    solver: Literal["unipc", "euler"] = "unipc"  # teacher: UniPC (order 2 with the UniC corrector, Wan's default) or Euler
    shift: float = 5.0                       # teacher: Wan's timestep shift of the flow-matching grid
    guidance: float = 5.0                    # teacher: CFG weight w, v = v_neg + w·(v_cond − v_neg); 1 turns CFG off


@dataclass(frozen=True)
class Streaming:
    """--causal: chunk-by-chunk generation with a KV cache (causal_rcm.md, "Streaming inference")."""
    first_chunk_t: int = 3  # latent frames of the first chunk (1 with chunk_t 1: frame-wise)
    chunk_t: int = 3  # latent frames of every later chunk
    steps_per_chunk: tuple[int, ...] = (2,)  # steps of chunk i: the i-th entry, the last one repeating (e.g. 4 2)
    s0: float = 1600 / 1601  # first rectified-flow time of each chunk (σ_max = 1600)
    mid_s: tuple[float, ...] = (15 / 16, 5 / 6, 5 / 8)  # times of the later steps: an n-step chunk uses mid_s[:n − 1]
    noisy_context: bool = False  # the last step's noisy input appends its K/V, instead of a clean pass at s = 0
    window_frames: int | None = None  # KV cache: keep at most this many latent frames (sliding window); default all
    sink_chunks: int = 1  # KV cache: with a window, the first chunks are never evicted
    kv_rope: Literal["after", "before"] = "after"  # cache keys after RoPE, or before it (a window then re-indexes
    #   the kept frames contiguously, so positions stay within window + chunk frames: the trained range)
    kv_quant: Literal["none", "int8", "fp8"] = "none"  # store the KV cache as int8 or fp8 e4m3 codes with scales
    kv_scale: Literal["token", "channel"] = "token"  # quantisation scale per token, or per channel over each frame


@dataclass
class Config:
    """Sample videos from a Wan2.1 T2V DiT (the rCM student or the teacher), or from a toy-world checkpoint (--toy)."""
    dit_path: Path  # DiT weights: official .safetensors (file, folder or sharded .index.json) or an rCM .pt/.pth
    prompt: str = ""  # the text prompt (or --prompts-file)
    prompts_file: Path | None = None  # a text file with one prompt per line (blank lines skipped)
    sampler: Annotated[Sampler, tyro.conf.OmitArgPrefixes] = Sampler()
    model: str = "t2v-1.3B"  # DiT architecture: t2v-1.3B or t2v-14B (a name in model.CONFIGS)
    vae_path: Path = Path("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")  # the Wan2.1 VAE
    t5_path: Path = Path("Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth")  # umT5-XXL; tokenizer.json in google/umt5-xxl/ beside it
    negative_prompt: str = NEGATIVE_PROMPT  # teacher: the CFG negative prompt (default: Wan's)
    neg_embed_path: Path | None = None  # teacher: a precomputed negative-prompt T5 embedding [L, 4096] (.pt), used instead
    resolution: str = "480p"  # 480p, 720p, or WIDTHxHEIGHT (multiples of 16)
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"  # orientation of 480p/720p at their pixel count
    num_frames: int = 81  # video frames, 4k+1 (1 + (frames − 1)/4 latent frames)
    num_samples: int = 1  # videos per prompt
    seed: int = 0  # video k (over prompts × samples) uses noise seed + k: the same seed gives the same videos
    save_path: Path = Path("samples")  # folder for the mp4s
    videos: bool = True  # decode and write mp4s (--no-videos when only building --shard-dir)
    shard_dir: Path | None = None  # also write latent.pt / embed.pt / prompt.txt webdataset shards here
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # DiT weights (the T5 runs in bf16 and the VAE in fp32, as Wan's)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the DiT, T5 and VAE run
    compile: bool = False  # torch.compile each DiT block (fuses the fp32 norm/modulation glue; the first video compiles)
    causal: bool = False  # stream a Causal-rCM student chunk by chunk with a KV cache (see --first-chunk-t ...)
    streaming: Annotated[Streaming, tyro.conf.OmitArgPrefixes] = Streaming()
    toy: bool = False  # sample the toy world of `train_rcm.py toy` instead: its prompts, no T5/VAE, a grid mp4
    world: ToyConfig = field(default_factory=ToyConfig)  # --toy: the world the checkpoint was trained on
    toy_dit: WanConfig = TOY_DIT  # --toy: the DiT architecture of the checkpoint (train_rcm.py's --dit)
    vae_cfg: tyro.conf.Suppress[VAEConfig] = VAEConfig()  # architectures: the releases' (tests use tiny ones)
    t5_cfg: tyro.conf.Suppress[UMT5Config] = UMT5Config()


# ------------------------------------------------------------------------------------------------ teacher solvers
def guided_velocity(net, context, neg_context, w: float):
    """The teacher's velocity with classifier-free guidance, v = v_neg + w·(v_cond − v_neg), as velocity(x, timestep)."""
    def velocity(x, timestep):
        v_cond = net(x, timestep, context).float()
        if w == 1:
            return v_cond
        v_neg = net(x, timestep, neg_context).float()
        return v_neg + w * (v_cond - v_neg)
    return velocity


def unipc_update(x, s, s_next, lam, lam_next, m, m_prev=None, lam_prev=None, m_next=None):
    """One UniPC update (bh2 variant, data prediction) of x at rectified-flow time s to s_next, in float32.

    In half log-SNR λ = log((1 − s)/s) the ODE is solved exactly for a constant x0 prediction m (the DDIM step); the
    change of m along the path is taken from divided differences: D = (m_prev − m)/r with r = (λ_prev − λ)/h (order 2),
    and for the corrector UniC also from m_next, the prediction at the predicted point. B(h) = e^{−h} − 1.
    Predictor (m_next None): weight 1/2 on D. Corrector: weights ρ solve R·ρ = b (order 2) or ρ = 1/2 (order 1).
    """
    h = lam_next - lam
    B = math.expm1(-h)
    x_next = (s_next / s) * x - (1 - s_next) * B * m
    D, rho = [], []
    if m_prev is not None:
        r = (lam_prev - lam) / h
        D.append((m_prev - m) / r)
    if m_next is None:
        rho = [0.5] * len(D)
    else:
        D.append(m_next - m)
        if len(D) == 1:
            rho = [0.5]
        else:  # b_k = k!·φ_{k+1}(−h)/B(h) from the exponential integrator; R = [[1, 1], [r, 1]]
            phi2 = B / -h - 1
            b1, b2 = phi2 / B, 2 * (phi2 / -h - 0.5) / B
            rho0 = (b1 - b2) / (1 - r)
            rho = [rho0, b1 - rho0]
    for rho_k, D_k in zip(rho, D):
        x_next = x_next - (1 - s_next) * B * rho_k * D_k
    return x_next


def unipc_sample(velocity, eps: torch.Tensor, steps: int = 50, shift: float = 5.0) -> torch.Tensor:
    """Wan's default teacher solver: UniPC order 2 with the UniC corrector on the flow-matching ODE, from x = ε.

    Grid as Wan's scheduler: s_i = shift(0.999·(1 − i/steps)), ending at 0 (λ would be −∞ at s = 1). velocity(x,
    timestep [B]) -> v with timestep = 1000·s (Wan's scheduler rounds it down to an integer; here it is not rounded).
    Each network call gives the x0 prediction m_i = x_i − s_i·v_i; UniC first corrects x_i with it (no extra call),
    then UniP steps on; the order is 1 on the first and the last step. Returns x at s = 0 (fp32).
    """
    s = shift_time(0.999 * torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).tolist()
    lam = [math.log((1 - s_i) / s_i) for s_i in s[:-1]] + [math.inf]
    x, m, x_prev, order = eps.float(), [], None, 1
    for i in range(steps):
        v = velocity(x, torch.full((x.shape[0],), 1000 * s[i], device=x.device))
        m.append(x - s[i] * v.float())
        if i > 0:  # UniC: redo the last step with the prediction at its end point
            two = order == 2
            x = unipc_update(x_prev, s[i - 1], s[i], lam[i - 1], lam[i], m[-2], m[-3] if two else None,
                             lam[i - 2] if two else None, m_next=m[-1])
        order = min(2, i + 1, steps - i)
        x_prev = x
        x = unipc_update(x, s[i], s[i + 1], lam[i], lam[i + 1], m[-1], m[-2] if order == 2 else None,
                         lam[i - 1] if order == 2 else None)
        m = m[-2:]
    return x


# -------------------------------------------------------------------------------------------------- the core
def num_steps(sampler: Sampler) -> int:
    return sampler.steps if sampler.steps is not None else (4 if sampler.mode == "rcm" else 50)


@torch.no_grad()
def generate_latents(net, context, neg_context, shape: tuple[int, int, int, int], sampler: Sampler,
                     generator: torch.Generator) -> torch.Tensor:
    """Latents [B, C, T, H, W] (fp32) for B text contexts, from noise drawn with `generator` (on the sampling device).

    net(x, timestep, context) -> v is a Wan DiT; context: B embeddings [L_i, D] or [B, L, D]; neg_context: the
    negative prompt's, the same way (teacher with CFG only); shape = (C, T, H, W) of one latent clip.
    """
    B = len(context)
    eps = torch.randn((B, *shape), generator=generator, device=generator.device)
    steps = num_steps(sampler)
    if sampler.mode == "rcm":
        t_steps = sampling_times(steps, B, sampler.sigma_max, sampler.mid_t)
        return rcm_sample(lambda x, t: denoise(net, x, t, context)[0], eps, t_steps, generator=generator)
    velocity = guided_velocity(net, context, neg_context, sampler.guidance)
    solve = unipc_sample if sampler.solver == "unipc" else euler_sample
    return solve(velocity, eps, steps, sampler.shift)


@torch.no_grad()
def decode(vae, z: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """Latents [B, 16, T, h, w] -> video frames uint8 [B, 1 + 4(T − 1), 8h, 8w, 3]. Streaming: pass one `cache` dict
    to the calls on consecutive latent chunks of a clip (the clip's first latent frame gives 1 frame, later ones 4)."""
    video = vae.decode(z, cache).clamp(-1, 1)
    return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


# ----------------------------------------------------------------------------------------- causal streaming
def chunk_times(st: Streaming, num_chunks: int) -> list[list[float]]:
    """The rectified-flow times [s_0, s_1, ..., s_{n−1}] of each chunk's steps (the last step goes to s = 0)."""
    steps = [st.steps_per_chunk[min(i, len(st.steps_per_chunk) - 1)] for i in range(num_chunks)]
    return [[st.s0, *st.mid_s[:n - 1]] for n in steps]


def stream_cache(net, batch: int, shape: tuple[int, int, int, int], st: Streaming) -> KVCache:
    """A KV cache for streaming clips of latent shape (C, T, H, W): the whole clip's past, or --window-frames."""
    chunks = chunk_frames(shape[1], st.first_chunk_t, st.chunk_t)
    max_frames = shape[1] - chunks[-1] if st.window_frames is None else st.window_frames
    ph, pw = net.cfg.patch_size[1:]
    cfg = CacheConfig(max(1, max_frames), st.sink_chunks if st.window_frames else 0, st.kv_rope, st.kv_quant,
                      st.kv_scale)
    return KVCache(net, batch, (shape[2] // ph) * (shape[3] // pw), cfg, max(chunks))


@torch.no_grad()
def stream_latents(net, context, shape: tuple[int, int, int, int], chunks, times, cache: KVCache,
                   generator: torch.Generator, noisy_context: bool = False):
    """Causal-rCM streaming: yields each chunk's latents [B, C, Tc, H, W] (fp32) as soon as it is denoised.

    For chunk i with times s = times[i]: x = s_0·ε; each step v = net(x, 1000·s_k) reading the cache, x̂0 = x − s_k·v,
    x = (1 − s_{k+1})·x̂0 + s_{k+1}·ε_k with fresh noise (s_n = 0 ends the chunk at x̂0). Then the chunk's K/V join the
    cache: a clean pass on x̂0 at s = 0, run when the next chunk is asked for (so decoding this one need not wait), or,
    with noisy_context, the last step's own pass on its noisy input (one forward less per chunk).
    """
    C, _, H, W = shape
    B, device = len(context), generator.device
    cache.reset()
    for i, (Tc, s) in enumerate(zip(chunks, times)):
        x = s[0] * torch.randn((B, C, Tc, H, W), generator=generator, device=device)
        for k, s_k in enumerate(s):
            last = k == len(s) - 1
            v = net(x, torch.full((B,), 1000 * s_k, device=device), context, kv_cache=cache,
                    kv_append=noisy_context and last)
            x0 = x - s_k * v.float()
            if not last:
                x = (1 - s[k + 1]) * x0 + s[k + 1] * torch.randn(x0.shape, generator=generator, device=device)
        yield x0
        if not noisy_context and i < len(chunks) - 1:
            net(x0, torch.zeros(B, device=device), context, kv_cache=cache, kv_append=True)


def stream_video(net, vae, context, shape: tuple[int, int, int, int], st: Streaming, generator: torch.Generator,
                 cache: KVCache | None = None):
    """Stream B videos (B = len(context)): each chunk's latents are decoded as soon as they exist.
    Returns latents [B, C, T, H, W], frames uint8 [B, F, 8H, 8W, 3] (None without a vae) and, per chunk, the seconds
    (DiT, VAE) it waited for (the clean pass of chunk i counts in chunk i + 1's DiT time)."""
    chunks = chunk_frames(shape[1], st.first_chunk_t, st.chunk_t)
    cache = stream_cache(net, len(context), shape, st) if cache is None else cache
    stream = stream_latents(net, context, shape, chunks, chunk_times(st, len(chunks)), cache, generator,
                            st.noisy_context)
    device = generator.device
    zs, videos, seconds, vae_cache = [], [], [], {}
    t0 = now(device)
    for z in stream:
        t1 = now(device)
        if vae is not None:
            videos.append(decode(vae, z, vae_cache))
        t2 = now(device)
        zs.append(z)
        seconds.append((t1 - t0, t2 - t1))
        t0 = t2
    return torch.cat(zs, 2), torch.cat(videos, 1) if videos else None, seconds


def stream_report(seconds: list[tuple[float, float]], frames: int) -> str:
    """First-chunk latency, mean latency of the later chunks, and FPS = frames / (DiT + VAE seconds)."""
    dit, vae = sum(s[0] for s in seconds), sum(s[1] for s in seconds)
    later = [sum(s) for s in seconds[1:]]
    per_chunk = f", later chunks {sum(later) / len(later):.3f} s each" if later else ""
    return (f"first chunk {sum(seconds[0]):.3f} s (DiT {seconds[0][0]:.3f} + VAE {seconds[0][1]:.3f}){per_chunk}; "
            f"DiT {dit:.2f} s + VAE {vae:.2f} s for {frames} frames = {frames / (dit + vae):.1f} FPS")


def write_mp4(frames: torch.Tensor, path: Path):
    """frames uint8 [F, H, W, 3] -> an H.264 mp4 at 16 fps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, list(frames.cpu().numpy()), fps=FPS, codec="libx264", quality=8)


# -------------------------------------------------------------------------------------- the command line
def video_size(cfg: Config) -> tuple[int, int]:
    """(width, height) from --resolution and --aspect-ratio."""
    if (cfg.resolution, cfg.aspect_ratio) in SIZES:
        return SIZES[cfg.resolution, cfg.aspect_ratio]
    try:
        width, height = (int(n) for n in cfg.resolution.lower().split("x"))
    except ValueError:
        raise ValueError(f"--resolution {cfg.resolution!r}: use 480p, 720p or WIDTHxHEIGHT such as 832x480") from None
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise ValueError(f"--resolution {width}x{height}: width and height must be positive multiples of 16 "
                         "(the VAE downsamples 8x and the DiT patches 2x2); try "
                         f"{max(16, round(width / 16) * 16)}x{max(16, round(height / 16) * 16)}")
    return width, height


def read_prompts(cfg: Config) -> list[str]:
    if cfg.prompts_file is not None:
        prompts = [line.strip() for line in cfg.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {cfg.prompts_file} holds no prompts (one per line)")
        return prompts
    if not cfg.prompt.strip():
        raise ValueError("give a --prompt \"...\" or a --prompts-file with one prompt per line")
    return [cfg.prompt]


def check(cfg: Config):
    """Every user error found before anything is loaded, each with what to change."""
    steps, s = num_steps(cfg.sampler), cfg.sampler
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if s.mode == "rcm" and steps > len(s.mid_t) + 1:
        raise ValueError(f"the rCM sampler takes at most {len(s.mid_t) + 1} steps with --mid-t {' '.join(map(str, s.mid_t))}"
                         f", got --steps {steps}: lower --steps, or give one more --mid-t time per extra step")
    if cfg.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {cfg.num_samples}")
    if cfg.causal:
        st = cfg.streaming
        if s.mode != "rcm":
            raise ValueError("--causal streams a distilled Causal-rCM student: drop --mode teacher")
        if not st.steps_per_chunk or not all(1 <= n <= len(st.mid_s) + 1 for n in st.steps_per_chunk):
            raise ValueError(f"--steps-per-chunk {' '.join(map(str, st.steps_per_chunk))}: each must be 1..."
                             f"{len(st.mid_s) + 1} (one --mid-s time per step after the first)")
        if min(st.first_chunk_t, st.chunk_t) < 1 or (st.window_frames is not None and st.window_frames < 1):
            raise ValueError("--first-chunk-t, --chunk-t and --window-frames must be positive latent frame counts")
    files = [("--dit-path", cfg.dit_path, "the DiT weights")]
    if cfg.prompts_file is not None:
        files.append(("--prompts-file", cfg.prompts_file, "one prompt per line"))
    if not cfg.toy:
        if cfg.model not in CONFIGS or CONFIGS[cfg.model].model_type != "t2v":
            raise ValueError(f"--model {cfg.model!r}: sample.py runs text-to-video DiTs, one of "
                             + ", ".join(k for k, c in CONFIGS.items() if c.model_type == "t2v"))
        if (cfg.num_frames - 1) % 4 or cfg.num_frames < 1:
            raise ValueError(f"--num-frames {cfg.num_frames} is not 4k+1 (the VAE packs 4 frames per latent frame "
                             f"after the first): use {max(1, round((cfg.num_frames - 1) / 4) * 4 + 1)}")
        video_size(cfg)
        tokenizer = cfg.t5_path.parent / "google" / "umt5-xxl" / "tokenizer.json"
        files += [("--t5-path", cfg.t5_path, "models_t5_umt5-xxl-enc-bf16.pth of the Wan2.1 release"),
                  ("--t5-path", tokenizer, "the google/umt5-xxl tokenizer, in google/umt5-xxl/ beside the T5 weights")]
        if cfg.videos:
            files.append(("--vae-path", cfg.vae_path, "Wan2.1_VAE.pth of the Wan2.1 release"))
        if s.mode == "teacher" and cfg.neg_embed_path is not None:
            files.append(("--neg-embed-path", cfg.neg_embed_path, "a negative-prompt T5 embedding [L, 4096]"))
    for flag, path, what in files:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found ({what}); set {flag} to where it is")
    if not cfg.toy:
        read_prompts(cfg)


def now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def load_dit(arch, cfg: Config) -> WanModel:
    """The DiT built on the meta device, then filled from --dit-path (never materialised twice)."""
    with torch.device("meta"):
        net = WanModel(arch)
    try:
        load_checkpoint(net, cfg.dit_path, dtype=getattr(torch, cfg.dtype))
    except ValueError as e:
        hint = "a checkpoint of `train_rcm.py toy`" if cfg.toy else f"a {cfg.model} checkpoint (else set --model)"
        raise ValueError(f"{e}\nIs --dit-path {hint}?") from None
    net = net.to(cfg.device).eval().requires_grad_(False)
    if cfg.compile:
        for block in net.blocks:
            block.compile()
    return net


def embed_texts(cfg: Config, prompts: list[str]):
    """umT5 embeddings [L_i, 4096] of the prompts (and the negative), with the encoding seconds of each prompt."""
    t0 = now(cfg.device)
    tokenizer = load_tokenizer(cfg.t5_path.parent / "google" / "umt5-xxl" / "tokenizer.json")
    encoder = load_umt5(cfg.t5_path, dtype=torch.bfloat16, device=cfg.device, cfg=cfg.t5_cfg)
    print(f"text encoder loaded in {now(cfg.device) - t0:.1f} s")
    embeds, seconds = [], []
    for prompt in prompts:
        t0 = now(cfg.device)
        embeds.append(encode_prompts(encoder, tokenizer, [prompt])[0])
        seconds.append(now(cfg.device) - t0)
    neg = None
    if cfg.sampler.mode == "teacher" and cfg.sampler.guidance != 1:
        if cfg.neg_embed_path is None:
            neg = encode_prompts(encoder, tokenizer, [cfg.negative_prompt])[0]
        else:
            neg = torch.load(cfg.neg_embed_path, map_location=cfg.device, weights_only=True)
            neg = neg[0] if neg.ndim == 3 and len(neg) == 1 else neg
            if neg.ndim != 2 or neg.shape[1] != cfg.t5_cfg.dim:
                raise ValueError(f"--neg-embed-path {cfg.neg_embed_path} holds a {tuple(neg.shape)} tensor; expected "
                                 f"one T5 embedding [L, {cfg.t5_cfg.dim}]")
    del encoder
    if torch.device(cfg.device).type == "cuda":
        torch.cuda.empty_cache()
    return embeds, neg, seconds


def slug(text: str, n: int = 40) -> str:
    return "".join(c if c.isalnum() else "_" for c in text[:n]).strip("_") or "video"


def sample_wan(cfg: Config):
    """Prompts -> T5 -> DiT -> VAE -> mp4s (and shards), one video at a time; one timing line per video."""
    prompts = read_prompts(cfg)
    width, height = video_size(cfg)
    shape = (cfg.vae_cfg.z_dim, 1 + (cfg.num_frames - 1) // 4, height // 8, width // 8)
    embeds, neg, t5_seconds = embed_texts(cfg, prompts)
    if torch.device(cfg.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the encoder is gone: the peak below is the DiT's and the VAE's
    net = load_dit(CONFIGS[cfg.model], cfg)
    vae = load_vae(cfg.vae_path, device=cfg.device, cfg=cfg.vae_cfg) if cfg.videos else None
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(cfg.num_samples)]
    s = cfg.sampler
    calls_per_video = num_steps(s) * (2 if s.mode == "teacher" and s.guidance != 1 else 1)
    if cfg.causal:
        chunks = chunk_frames(shape[1], cfg.streaming.first_chunk_t, cfg.streaming.chunk_t)
        calls_per_video = (sum(map(len, chunk_times(cfg.streaming, len(chunks))))
                           + (0 if cfg.streaming.noisy_context else len(chunks) - 1))
    bar = tqdm(total=len(jobs) * calls_per_video, unit="DiT call")
    cache = stream_cache(net, 1, shape, cfg.streaming) if cfg.causal else None  # preallocated once, reset per video

    def dit(x, timestep, context, **causal):
        v = net(x, timestep, context, **causal)
        bar.update()
        return v

    def videos():
        for k, (i, prompt) in enumerate(jobs):
            t0 = now(cfg.device)
            generator = torch.Generator(cfg.device).manual_seed(cfg.seed + k)
            line = f"video {k}: text encoder {t5_seconds[i]:.2f} s, "
            if cfg.causal:
                z, frames, seconds = stream_video(dit, vae, [embeds[i]], shape, cfg.streaming, generator, cache)
                line += stream_report(seconds, cfg.num_frames)
            else:
                z = generate_latents(dit, [embeds[i]], None if neg is None else [neg], shape, s, generator)
                t1 = now(cfg.device)
                line += f"DiT {t1 - t0:.2f} s"
                if vae is not None:
                    frames = decode(vae, z)
                    line += f", VAE {now(cfg.device) - t1:.2f} s"
            if vae is not None:
                frames = frames[0]
                path = cfg.save_path / f"{k:04d}_{slug(prompt)}_seed{cfg.seed + k}.mp4"
                write_mp4(frames, path)
                line += f" -> {path}"
            bar.write(line)
            yield z[0].cpu(), embeds[i].cpu(), prompt

    if cfg.shard_dir is not None:
        paths = write_shards(videos(), cfg.shard_dir)
        print(f"{len(jobs)} samples written to {len(paths)} shard(s) in {cfg.shard_dir}")
    else:
        for _ in videos():
            pass
    bar.close()
    if torch.device(cfg.device).type == "cuda":
        print(f"peak GPU memory of DiT + VAE: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def sample_toy(cfg: Config):
    """A toy checkpoint: num_samples clips of every prompt of the world, its exact metrics, and a grid mp4."""
    world = make_world(cfg.world)
    net = load_dit(cfg.toy_dit, cfg)
    prompt = torch.arange(cfg.world.prompts).repeat_interleave(cfg.num_samples)
    context = world.text[prompt].to(cfg.device)
    neg_context = world.negative.expand(len(prompt), -1, -1).to(cfg.device)
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    t0 = now(cfg.device)
    if cfg.causal:
        x = stream_video(net, None, context, world.cfg.shape, cfg.streaming, generator)[0].cpu()
        name = "causal" + "-".join(map(str, cfg.streaming.steps_per_chunk))
    else:
        x = generate_latents(net, context, neg_context, world.cfg.shape, cfg.sampler, generator).cpu()
        name = f"{cfg.sampler.mode}{num_steps(cfg.sampler)}"
    print(f"DiT {now(cfg.device) - t0:.2f} s; " + ", ".join(f"{k} {v:.3f}" for k, v in metrics(world, x, prompt).items()))
    path = cfg.save_path / f"toy_{name}_seed{cfg.seed}.mp4"
    save_grid(world, x, rows=cfg.world.prompts, path=path)
    print(f"grid (rows = prompts) -> {path}")


def main(cfg: Config):
    check(cfg)
    if cfg.toy:
        sample_toy(cfg)
    else:
        sample_wan(cfg)


if __name__ == "__main__":
    main(tyro.cli(Config))
