"""Sampling: a prompt in, an mp4 out, with the distilled rCM student, the Wan2.1 teacher, a Causal-rCM student
streamed chunk by chunk, or a toy-world checkpoint.

    python sample.py --dit-path runs/wan1.3b/ema.safetensors --prompt "a corgi surfing a wave at sunset"
    python sample.py --dit-path rCM_Wan2.1_T2V_1.3B_480p.pt --prompt "..." --steps 2
    python sample.py --mode teacher --dit-path Wan2.1-T2V-1.3B --prompts-file prompts.txt --shard-dir my_latents/
    python sample.py --toy --dit-path runs/toy/ema.safetensors          # the run's evaluation, repeated exactly
    python sample.py --causal --dit-path runs/causal_wan1.3b/sf_dmd/ema.safetensors --prompt "..."

Defaults travel with the checkpoint: the trainers store the sampling settings a student was trained and evaluated
with (σ_max, the intermediate times --mid-t, steps, chunking, the architecture, the toy world) in the exported
safetensors' metadata; every sampling flag left unset takes the checkpoint's value, else the built-in default, and
the first line printed says which came from where.

In the order it runs: the prompts (and, for the teacher, the negative prompt) go through umT5 once and the encoder is
freed; for each video, noise drawn from seed + index becomes latents through the DiT (samplers.py: rCM's few-step
sampler, no CFG; the teacher's UniPC or Euler on Wan's shifted flow-matching grid with CFG; or the streaming loop);
the VAE decodes them to pixels, written as an mp4 at 16 fps. `generate_latents` and `decode` are the core: they take
modules and tensors, no files, so bench.py times them with random weights. With --shard-dir the latents, text
embeddings and prompts are also written as webdataset shards in the format data.py reads: a synthetic training set.

With --causal (a Causal-rCM student) the video is streamed: chunk by chunk of latent frames, each denoised in a few
steps against a KV cache of the chunks before it, and decoded by the causal VAE as soon as it is done, with a report
of the time to the first chunk's frames, the later chunks' spacing and FPS = frames / time to the last chunk's.
"""
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import imageio.v2 as imageio
import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import parallel
import toy
from checkpoint import merge_lora, read_settings, read_state_dict
from data import write_shards
from image_encoder import CLIPConfig, CLIPVision, load_clip
from model import (BOUNDARY, CONFIGS, CacheConfig, WanConfig, WanModel, chunk_frames, diffusers_config, load_checkpoint,
                   load_two_experts)
from samplers import (check_times, conditioned, draw_noise, flow_times, generate, generate_stream, guidance, kv_cache,
                      sample_euler, sample_unipc, stream_times)
from text_encoder import UMT5Config, UMT5Encoder, encode_prompts_and_free, read_negative_embedding, umt5_files
from vae import VAEConfig, i2v_size, image_condition, load_vae

FPS = 16
# Wan2.1's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                   "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                   "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
# (width, height) of each preset; 1:1 keeps the pixel count at multiples of 16.
SIZES = {("480p", "16:9"): (832, 480), ("480p", "9:16"): (480, 832), ("480p", "1:1"): (624, 624),
         ("720p", "16:9"): (1280, 720), ("720p", "9:16"): (720, 1280), ("720p", "1:1"): (960, 960)}


# Wan2.2's official teacher sampling of the two-expert models (their configs): steps, shift, guidance low/high.
WAN22_TEACHER = {"t2v-A14B": dict(steps=40, shift=12.0, guidance=3.0, guidance_high=4.0),
                 "i2v-A14B": dict(steps=40, shift=5.0, guidance=3.5, guidance_high=3.5)}
# Flags whose unset value (None) is taken from the checkpoint's settings, else from here.
DEFAULTS = dict(sigma_max=80.0, mid_t=(1.5, 1.4, 1.0), first_chunk_t=3, chunk_t=3, steps_per_chunk=(2,),
                dtype="bfloat16", num_samples=1, seed=0, model="t2v-1.3B")


@dataclass(frozen=True)
class Sampler:
    """How latents are drawn from the DiT (unset: the checkpoint's setting, else the default in brackets)."""
    mode: Literal["rcm", "teacher"] = "rcm"  # rcm: the distilled student, 1-4 steps, no CFG; teacher: an ODE solver with CFG
    steps: int | None = None                 # DiT steps [rcm 4, teacher 50]; --toy: [each step count the run evaluated]
    sigma_max: float | None = None           # rcm: starting noise level, t_0 = arctan(sigma_max) [80; A14B: 200]
    mid_t: tuple[float, ...] | None = None   # rcm: TrigFlow times of the later steps, steps ≤ len(mid_t) + 1 [1.5 1.4 1.0]
    solver: Literal["unipc", "euler"] = "unipc"  # teacher: UniPC (order 2 with the UniC corrector, Wan's default) or Euler
    shift: float | None = None               # teacher: Wan's timestep shift of the flow-matching grid [5; A14B: official]
    guidance: float | None = None            # teacher: CFG weight w, v = v_neg + w·(v_cond − v_neg); 1: off [5; A14B]
    guidance_high: float | None = None       # two-expert teacher: w of the high-noise expert [--guidance; A14B: official]


@dataclass(frozen=True)
class Streaming:
    """--causal: chunk-by-chunk generation with a KV cache (docs/causal_rcm.md, "Streaming inference")."""
    first_chunk_t: int | None = None  # latent frames of the first chunk [3]
    chunk_t: int | None = None  # latent frames of every later chunk [3]; 1 with first_chunk_t 1: frame-wise
    steps_per_chunk: tuple[int, ...] | None = None  # steps of chunk i: the i-th entry, the last one repeating [2]
    noisy_context: bool = False  # the last step's input appends its K/V, not a clean pass (on if trained so)
    window_frames: int | None = None  # KV cache: keep at most this many latent frames (sliding window); default all
    sink_chunks: int = 1  # KV cache: with a window, the first chunks are never evicted
    kv_rope: Literal["after", "before"] = "after"  # cache keys after RoPE, or before (a window re-indexes kept frames)
    kv_quant: Literal["none", "int8", "fp8"] = "none"  # store the KV cache as int8 or fp8 e4m3 codes with scales
    kv_scale: Literal["token", "channel"] = "token"  # quantisation scale per token, or per channel over each frame
    overlap_decode: bool = False  # on a GPU, decode chunk i on a second CUDA stream while the DiT makes chunk i + 1


@dataclass
class Config:
    """Sample videos from a Wan2.1 T2V DiT (the rCM student or the teacher), or from a toy-world checkpoint (--toy)."""
    dit_path: Path  # DiT weights: official (file, folder, .index.json), rCM .pt/.pth, or a diffusers pipeline folder
    image: Path | None = None  # image-to-video: the first frame (with an I2V --model: i2v-14B, i2v-A14B)
    lora: Path | None = None  # a LoRA to merge into the DiT (export.py lora, or a Wan LoRA in the ComfyUI layout)
    lora_strength: float = 1.0  # the LoRA's multiplier (1: the exported student exactly, at full rank)
    dit_path_low: Path | None = None  # Wan2.2 A14B: the low-noise expert when --dit-path is the high-noise one's file
    offload: bool = False  # Wan2.2 A14B: the expert not in use waits on the CPU (one 14B expert on the GPU)
    clip_path: Path = Path("Wan2.1-I2V-14B-480P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")  # Wan2.1 I2V
    prompt: str = ""  # the text prompt (or --prompts-file)
    prompts_file: Path | None = None  # a text file with one prompt per line (blank lines skipped)
    sampler: Annotated[Sampler, tyro.conf.OmitArgPrefixes] = Sampler()
    model: str | None = None  # DiT architecture, a name in model.CONFIGS [the checkpoint's, else t2v-1.3B]
    vae_path: Path = Path("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")  # the Wan2.1 VAE (or a diffusers vae/ folder)
    t5_path: Path = Path("Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth")  # umT5-XXL (or diffusers text_encoder/)
    negative_prompt: str = NEGATIVE_PROMPT  # teacher: the CFG negative prompt (default: Wan's)
    neg_embed: Path | None = None  # teacher: a precomputed negative-prompt umT5 embedding [L, 4096] (.safetensors or .pt), used instead
    resolution: str = "480p"  # 480p, 720p, or WIDTHxHEIGHT (multiples of 16)
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"  # orientation of 480p/720p at their pixel count
    num_frames: int = 81  # video frames, 4k+1 (1 + (frames − 1)/4 latent frames)
    num_samples: int | None = None  # videos per prompt [1; --toy: the run's evaluation count]
    seed: int | None = None  # video k (over prompts × samples) uses noise seed + k [0; --toy: the run's evaluation seed]
    save_path: Path = Path("samples")  # folder for the mp4s
    videos: bool = True  # decode and write mp4s (--no-videos when only building --shard-dir)
    shard_dir: Path | None = None  # also write latent.pt / embed.pt / prompt.txt webdataset shards here
    dtype: Literal["bfloat16", "float32"] | None = None  # DiT weights [the run's precision, else bfloat16]; T5 bf16
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the DiT, T5 and VAE run
    compile: bool = False  # torch.compile each DiT and VAE block (fuses the elementwise glue; the first video compiles)
    vae_dtype: Literal["float32", "bfloat16"] = "float32"  # the VAE's precision (fp32 as Wan; bf16 decodes 1.9x faster)
    vae_frames_per_call: int = 1  # latent frames per VAE decoder call (Wan's 1; 4: bf16 decode 1.07x faster, more memory)
    causal: bool = False  # stream a Causal-rCM student chunk by chunk with a KV cache (train_causal's exports always are)
    streaming: Annotated[Streaming, tyro.conf.OmitArgPrefixes] = Streaming()
    toy: bool = False  # sample the toy world the checkpoint was trained on: its prompts, no T5/VAE, exact metrics, grid mp4s
    vae_cfg: tyro.conf.Suppress[VAEConfig] = VAEConfig()  # architectures: the releases' (tests use tiny ones)
    t5_cfg: tyro.conf.Suppress[UMT5Config] = UMT5Config()
    clip_cfg: tyro.conf.Suppress[CLIPConfig] = CLIPConfig()


# ------------------------------------------------------------------------------------ settings from the checkpoint
def with_settings(cfg: Config) -> tuple[Config, dict]:
    """cfg with every unset sampling flag filled from the checkpoint's stored settings, else DEFAULTS; and the
    settings. Prints what was taken from the checkpoint."""
    settings = read_settings(cfg.dit_path) if cfg.dit_path.exists() else {}
    source, lora = cfg.dit_path, read_settings(cfg.lora) if cfg.lora is not None and cfg.lora.exists() else {}
    if lora:  # a student exported as a LoRA carries the student's settings
        settings, source = {**settings, **lora}, cfg.lora
    toy_settings = settings.get("toy", {})
    taken = []

    def pick(name, value, stored=settings):
        if value is not None:
            return value
        if name in stored:
            taken.append(name)
            return stored[name]
        return DEFAULTS[name]
    sampler = dataclasses.replace(cfg.sampler, sigma_max=pick("sigma_max", cfg.sampler.sigma_max),
                                  mid_t=pick("mid_t", cfg.sampler.mid_t))
    if cfg.model in BOUNDARY and cfg.sampler.sigma_max is None and "sigma_max" not in settings:
        sampler = dataclasses.replace(sampler, sigma_max=200.0)  # NVlabs's setting for its Wan2.2 rCM experts
    if cfg.sampler.mode == "rcm" and cfg.sampler.steps is None and "steps" in settings and not cfg.toy:
        sampler = dataclasses.replace(sampler, steps=pick("steps", None))  # (--toy: every evaluated step count)
    if cfg.sampler.mode == "teacher":  # Wan2.2's official settings for its experts (else Wan2.1's, see teacher_sampler)
        official = WAN22_TEACHER.get(cfg.model, {})
        sampler = dataclasses.replace(sampler, **{k: v for k, v in official.items() if getattr(sampler, k) is None})
    st = cfg.streaming
    streaming = dataclasses.replace(st, noisy_context=st.noisy_context or settings.get("noisy_context", False),
                                    **{k: pick(k, getattr(st, k)) for k in ("first_chunk_t", "chunk_t", "steps_per_chunk")})
    stored = dict(num_samples=pick("num_samples", cfg.num_samples, toy_settings if cfg.toy else {}),
                  seed=pick("seed", cfg.seed, toy_settings if cfg.toy else {}), dtype=pick("dtype", cfg.dtype))
    causal = cfg.causal or settings.get("method") == "causal"
    if cfg.model is None and "dit" in settings:
        taken.append("architecture")
    root = cfg.dit_path if (cfg.dit_path / "model_index.json").exists() else None
    if root is not None:  # a diffusers pipeline folder: its vae/, text_encoder/ and tokenizer/ unless given
        defaults = Config(dit_path=root)
        parts = {k: root for k in ("vae_path", "t5_path") if getattr(cfg, k) == getattr(defaults, k)}
        stored.update(parts)
        print(f"{root} (a diffusers pipeline): its transformer/" + "".join(
            f", {k[:-5].replace('t5', 'text_encoder/, tokenizer')}/" for k in parts))
        if cfg.model is None and "dit" not in settings:
            stored["model"] = diffusers_model(root / "transformer" / "config.json")
    if settings:
        print(f"{source} ({settings.get('method', '?')} run): from its stored settings: "
              + (", ".join(taken) or "nothing (every flag given)"))
    return dataclasses.replace(cfg, sampler=sampler, streaming=streaming, causal=causal, **stored), settings


def diffusers_model(config_json: Path) -> str:
    """The name in model.CONFIGS of a diffusers transformer's config.json."""
    config = json.loads(config_json.read_text())
    for name, arch in CONFIGS.items():
        if all(config.get(k) == v for k, v in diffusers_config(arch).items() if not k.startswith("_")):
            return name
    raise ValueError(f"{config_json} describes no architecture of model.CONFIGS: pass --model")


def architecture(cfg: Config, settings: dict) -> WanConfig:
    """--model, else the architecture stored with the checkpoint, else t2v-1.3B (the toy DiT for --toy)."""
    if cfg.model is not None:
        return CONFIGS[cfg.model]
    if "dit" in settings:
        return WanConfig(**settings["dit"])
    return toy.TOY_DIT if cfg.toy else CONFIGS[DEFAULTS["model"]]


# -------------------------------------------------------------------------------------------------- the core
def num_steps(sampler: Sampler) -> int:
    return sampler.steps if sampler.steps is not None else (4 if sampler.mode == "rcm" else 50)


def teacher_sampler(sampler: Sampler) -> Sampler:
    """The teacher's unset shift and guidance at Wan2.1's values (5 and 5)."""
    return dataclasses.replace(sampler, shift=5.0 if sampler.shift is None else sampler.shift,
                               guidance=5.0 if sampler.guidance is None else sampler.guidance)


@torch.no_grad()
def generate_latents(net, context, neg_context, shape: tuple[int, int, int, int], sampler: Sampler,
                     generator: torch.Generator, boundary: float = 1.0) -> torch.Tensor:
    """Latents [B, C, T, H, W] (fp32) for B text contexts, from noise drawn with `generator` (on the sampling device).

    net(x, timestep, context) -> v is a Wan DiT; context: B embeddings [L_i, D] or [B, L, D]; neg_context: the
    negative prompt's, the same way (teacher with CFG only); shape = (C, T, H, W) of one latent clip; sampler: with
    sigma_max and mid_t set (rcm).
    """
    steps = num_steps(sampler)
    if sampler.mode == "rcm":
        return generate(net, context, shape, steps, sampler.sigma_max, sampler.mid_t, generator)
    noise = draw_noise(len(context), shape, generator)
    solve, s_max = (sample_unipc, 0.999) if sampler.solver == "unipc" else (sample_euler, 1.0)  # λ(s = 1) = −∞
    sampler = teacher_sampler(sampler)
    teacher = guidance(net, neg_context, sampler.guidance, sampler.guidance_high, boundary)
    return solve(teacher, noise, context, flow_times(steps, sampler.shift, s_max))


@torch.no_grad()
def decode(vae, z: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """Latents [B, 16, T, h, w] -> video frames uint8 [B, 1 + 4(T − 1), 8h, 8w, 3], on the VAE's device. Streaming:
    pass one `cache` dict to the calls on consecutive latent chunks of a clip (the clip's first latent frame gives 1
    frame, later ones 4)."""
    video = vae.decode(z.to(vae.conv2.weight.device), cache).clamp(-1, 1)
    return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


# ----------------------------------------------------------------------------------------- causal streaming
def stream_cache(net, batch: int, shape: tuple[int, int, int, int], st: Streaming, prefix_frames: int = 0):
    """The KV cache for streaming clips of latent shape (C, T, H, W), after prefix_frames prefilled ones: the whole
    clip's past, or --window-frames."""
    chunks = (prefix_frames,) * bool(prefix_frames) + chunk_frames(shape[1] - prefix_frames, st.first_chunk_t, st.chunk_t)
    max_frames = shape[1] - chunks[-1] if st.window_frames is None else st.window_frames
    cache = CacheConfig(max(1, max_frames), st.sink_chunks if st.window_frames else 0, st.kv_rope, st.kv_quant,
                        st.kv_scale)
    return kv_cache(net, batch, shape, chunks, cache)


def stream_video(net, vae, context, shape: tuple[int, int, int, int], st: Streaming, sampler: Sampler,
                 generator: torch.Generator, cache=None, prefix=None, image: dict | None = None):
    """Stream B videos (B = len(context)): each chunk's latents are decoded as soon as they exist.
    Returns latents [B, C, T, H, W], frames uint8 [B, F, 8H, 8W, 3] (None without a vae) and, per chunk, the seconds
    from the start until its frames (without a vae: its latents) were ready. With st.overlap_decode on a GPU, a chunk
    is decoded on a second CUDA stream while the DiT goes on with the next one. Image-to-video: a T2V net's prefix
    (the image's latent frame, prefilled into the cache as the first chunk), or an I2V net's `image` conditioning of
    the whole clip (each chunk gets its frames of it)."""
    chunks = chunk_frames(shape[1] - (0 if prefix is None else prefix.shape[2]), st.first_chunk_t, st.chunk_t)
    cache = stream_cache(net, len(context), shape, st, 0 if prefix is None else prefix.shape[2]) if cache is None \
        else cache
    stream = generate_stream(net, context, shape, chunks, st.steps_per_chunk, sampler.sigma_max, sampler.mid_t,
                             generator, cache, st.noisy_context, prefix, image)
    device = generator.device
    # The decoder's stream has the higher priority: its kernels go first and the DiT's fill the rest of the GPU.
    side = torch.cuda.Stream(device, priority=-1) \
        if device.type == "cuda" and st.overlap_decode and vae and vae.conv2.weight.is_cuda else None
    zs, videos, marks, vae_cache = [], [], [], {}
    start = clock_mark(device)
    for z in stream:
        zs.append(z)
        if vae is None:
            marks.append(clock_mark(device))
        elif side is None:
            videos.append(decode(vae, z, vae_cache))
            marks.append(clock_mark(device))
        else:
            side.wait_stream(torch.cuda.current_stream(device))  # z is written
            with torch.cuda.stream(side):
                videos.append(decode(vae, z, vae_cache))
                marks.append(clock_mark(device, side))
            z.record_stream(side)
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
        for video in videos:  # made on the side stream, read by the main one's concatenation below
            video.record_stream(torch.cuda.current_stream(device))
    ready = [seconds_between(start, mark) for mark in marks]
    return torch.cat(zs, 2), torch.cat(videos, 1) if videos else None, ready


def clock_mark(device: torch.device, stream=None):
    """A point in time that does not stop the GPU: a CUDA event recorded on `stream`, else the host's clock."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def seconds_between(start, end) -> float:
    """Seconds from one clock_mark to a later one (waits for a CUDA event to be reached)."""
    if isinstance(start, torch.cuda.Event):
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return end - start


def stream_report(ready: list[float], frames: int) -> str:
    """First-chunk latency, mean latency of the later chunks, and FPS = frames / seconds until the last chunk."""
    later = [b - a for a, b in zip(ready, ready[1:])]
    per_chunk = f", later chunks {sum(later) / len(later):.3f} s apart" if later else ""
    return f"first chunk {ready[0]:.3f} s{per_chunk}; {frames} frames in {ready[-1]:.2f} s = {frames / ready[-1]:.1f} FPS"


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
        try:  # utf-8-sig: a byte-order mark is not part of the first prompt
            text = cfg.prompts_file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            line = cfg.prompts_file.read_bytes()[:e.start].count(b"\n") + 1
            raise ValueError(f"--prompts-file {cfg.prompts_file}: line {line} is not UTF-8 text; save the file as "
                             f"UTF-8") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {cfg.prompts_file} holds no prompts (one per line)")
        return prompts
    if not cfg.prompt.strip():
        raise ValueError("give a --prompt \"...\" or a --prompts-file with one prompt per line")
    return [cfg.prompt]


def check(cfg: Config, settings: dict):
    """Every user error found before anything is loaded, each with what to change (cfg: with its settings)."""
    s = cfg.sampler
    steps = max(toy_steps(cfg, settings)) if cfg.toy else num_steps(s)
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if s.mode == "rcm" and not cfg.causal and steps > len(s.mid_t) + 1:
        raise ValueError(f"the rCM sampler takes at most {len(s.mid_t) + 1} steps with --mid-t {' '.join(map(str, s.mid_t))}"
                         f", got --steps {steps}: lower --steps, or give one more --mid-t time per extra step")
    if cfg.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {cfg.num_samples}")
    if cfg.vae_frames_per_call < 1:
        raise ValueError(f"--vae-frames-per-call must be at least 1, got {cfg.vae_frames_per_call}")
    if s.mode == "rcm":
        check_times(s.sigma_max, s.mid_t)
    elif not teacher_sampler(s).shift > 0:
        raise ValueError(f"--shift must be positive, got {s.shift}")
    if cfg.causal:
        st = cfg.streaming
        if s.mode != "rcm":
            raise ValueError("--causal streams a distilled Causal-rCM student: drop --mode teacher")
        if not st.steps_per_chunk or not all(1 <= n <= len(s.mid_t) + 1 for n in st.steps_per_chunk):
            raise ValueError(f"--steps-per-chunk {' '.join(map(str, st.steps_per_chunk))}: each must be 1..."
                             f"{len(s.mid_t) + 1} (one --mid-t time per step after the first)")
        if min(st.first_chunk_t, st.chunk_t) < 1 or (st.window_frames is not None and st.window_frames < 1):
            raise ValueError("--first-chunk-t, --chunk-t and --window-frames must be positive latent frame counts")
    if cfg.toy:
        unused = [flag for flag, value, default in (("--num-frames", cfg.num_frames, 81), ("--resolution",
                  cfg.resolution, "480p"), ("--image", cfg.image, None)) if value != default]
        if unused:
            raise ValueError(f"--toy samples the clips of the checkpoint's toy world (their shape is the world's): "
                             f"drop {', '.join(unused)}")
    files = [("--dit-path", cfg.dit_path, "the DiT weights")]
    if cfg.lora is not None:
        files.append(("--lora", cfg.lora, "a LoRA .safetensors"))
    if cfg.prompts_file is not None:
        files.append(("--prompts-file", cfg.prompts_file, "one prompt per line"))
    if not cfg.toy:
        arch = architecture(cfg, settings)
        if cfg.model is not None and cfg.model not in CONFIGS:
            raise ValueError(f"--model {cfg.model!r}: use one of {', '.join(CONFIGS)}")
        if arch.model_type == "ti2v":
            raise ValueError("--model ti2v-5B needs the Wan2.2 VAE, which sample.py does not have yet")
        # (causal image-to-video: an I2V student conditioned chunk by chunk, or a T2V one with the image prefilled)
        if (arch.model_type == "i2v") != (cfg.image is not None) and not (cfg.causal and cfg.image is not None):
            raise ValueError(f"--model {cfg.model or 'of the checkpoint'} is an image-to-video model: give --image PATH "
                             "(or pick a text-to-video --model)"
                             if cfg.image is None else "--image needs an image-to-video model (--model i2v-14B or "
                             "i2v-A14B); the text-to-video ones take no image")
        if cfg.lora is not None and boundary_of(cfg, settings) is not None:
            raise ValueError("--lora merges into one DiT; the two experts of an A14B model would each need their own")
        if cfg.dit_path_low is not None and boundary_of(cfg, settings) is None:
            raise ValueError(f"--dit-path-low is the low-noise expert of a two-expert model ({', '.join(BOUNDARY)})")
        if arch.model_type == "i2v" and arch.clip:
            files.append(("--clip-path", cfg.clip_path, "the CLIP checkpoint of the Wan2.1 I2V release"))
        if cfg.image is not None:
            files.append(("--image", cfg.image, "the first frame"))
        if cfg.dit_path_low is not None:
            files.append(("--dit-path-low", cfg.dit_path_low, "the low-noise expert's weights"))
        if (cfg.num_frames - 1) % 4 or cfg.num_frames < 1:
            raise ValueError(f"--num-frames {cfg.num_frames} is not 4k+1 (the VAE packs 4 frames per latent frame "
                             f"after the first): use {max(1, round((cfg.num_frames - 1) / 4) * 4 + 1)}")
        video_size(cfg)
        weights, tokenizer = umt5_files(cfg.t5_path)
        files += [("--t5-path", weights, "models_t5_umt5-xxl-enc-bf16.pth of the Wan2.1 release"),
                  ("--t5-path", tokenizer, "the google/umt5-xxl tokenizer, in google/umt5-xxl/ beside the T5 weights "
                                           "(diffusers: tokenizer/ beside text_encoder/)")]
        if cfg.videos:
            files.append(("--vae-path", cfg.vae_path, "Wan2.1_VAE.pth of the Wan2.1 release"))
        if s.mode == "teacher" and cfg.neg_embed is not None:
            files.append(("--neg-embed", cfg.neg_embed, "a negative-prompt umT5 embedding [L, 4096]"))
    for flag, path, what in files:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found ({what}); set {flag} to where it is")
    if cfg.image is not None and not cfg.toy:
        read_image(cfg, 16, 16)  # an unreadable image is named before anything is loaded
    if not cfg.toy:
        read_prompts(cfg)


def now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def load_dit(arch: WanConfig, cfg: Config) -> WanModel:
    """The DiT built on the meta device, then filled from --dit-path (never materialised twice)."""
    with torch.device("meta"):
        net = WanModel(arch)
    hint = "a checkpoint of `train_rcm.py toy`" if cfg.toy else f"a {cfg.model} checkpoint (else set --model)"
    load_checkpoint(net, cfg.dit_path, dtype=getattr(torch, cfg.dtype),
                    header=f"{cfg.dit_path} does not match the model: is --dit-path {hint}?")
    if cfg.lora is not None:
        net.load_state_dict(merge_lora(net.state_dict(), read_state_dict(cfg.lora), cfg.lora_strength), assign=True)
        print(f"merged {cfg.lora} at strength {cfg.lora_strength}")
    net = net.to(cfg.device).eval().requires_grad_(False)
    if cfg.compile:
        for block in net.blocks:
            block.compile()
    return net


def gpu_or_cpu(device: str, need: int, message: str, free_bytes: int | None = None) -> str:
    """`device`, or "cpu" when that GPU has less free memory than `need` bytes (free_bytes; default: CUDA's free
    memory plus what torch holds unused), then saying so: `message` with {free} and {need} filled in (GiB). The CPU
    is far slower, but a GPU that is too small would stop the run."""
    if torch.device(device).type != "cuda":
        return device
    if free_bytes is None:
        gpu = torch.device(device)
        free_bytes = (torch.cuda.mem_get_info(gpu)[0] + torch.cuda.memory_reserved(gpu)
                      - torch.cuda.memory_allocated(gpu))
    if free_bytes >= need:
        return device
    print(message.format(free=f"{free_bytes / 2**30:.1f}", need=f"{need / 2**30:.1f}"))
    return "cpu"


def encoder_device(device: str, t5_cfg: UMT5Config, free_bytes: int | None = None) -> str:
    """Where umT5 runs: gpu_or_cpu with the encoder's bf16 weights plus 1 GiB for its activations."""
    with torch.device("meta"):
        need = 2 * sum(p.numel() for p in UMT5Encoder(t5_cfg).parameters()) + 2**30
    return gpu_or_cpu(device, need, f"umT5 runs on the CPU: {device} has {{free}} GiB free, the encoder needs "
                      "{need} GiB", free_bytes)


# Peak memory of a decode above the VAE's weights, per output pixel and latent frame per decoder call: bench.py vae
# measured 6.7 GiB (fp32) and 4.1 GiB (bf16, its convolutions below 128 channels run per temporal tap) at 832x480,
# channels-last, one latent frame per call; rounded up.
DECODE_BYTES_PER_PIXEL = {torch.float32: 18_500, torch.bfloat16: 11_500}


def decoder_device(device: str, vae, width: int, height: int, free_bytes: int | None = None) -> str:
    """Where the VAE decodes, once the DiT is loaded: gpu_or_cpu with a decode's measured need at this size (its
    dtype, its latent frames per call) plus 1 GiB."""
    need = DECODE_BYTES_PER_PIXEL[vae.conv2.weight.dtype] * width * height * vae.frames_per_call + 2**30
    return gpu_or_cpu(device, need, f"the VAE decodes on the CPU: {device} has {{free}} GiB free beside the DiT, a "
                      f"{width}x{height} decode needs {{need}} GiB", free_bytes)


def embed_texts(cfg: Config, prompts: list[str]):
    """umT5 embeddings [L_i, 4096] of the prompts and, for the teacher with CFG, the negative (--neg-embed, else the
    encoded --negative-prompt); the encoder runs on --device (the CPU if the GPU is short of memory) and is freed
    before the DiT loads. Also returns the encoding seconds."""
    t0 = now(cfg.device)
    cfg_negative = cfg.sampler.mode == "teacher" and teacher_sampler(cfg.sampler).guidance != 1
    encode_negative = cfg_negative and cfg.neg_embed is None
    embeds = encode_prompts_and_free(cfg.t5_path, prompts + [cfg.negative_prompt] * encode_negative,
                                     device=encoder_device(cfg.device, cfg.t5_cfg), out_device=cfg.device,
                                     cfg=cfg.t5_cfg)
    neg = embeds.pop() if encode_negative else None
    if cfg_negative and cfg.neg_embed is not None:
        neg = read_negative_embedding(cfg.neg_embed, cfg.t5_cfg.dim).to(cfg.device)
    seconds = now(cfg.device) - t0
    print(f"text encoder: {len(prompts)} prompt(s) in {seconds:.1f} s (loading included)")
    return embeds, neg, seconds


def slug(text: str, n: int = 40) -> str:
    return "".join(c if c.isalnum() else "_" for c in text[:n]).strip("_") or "video"


def read_image(cfg: Config, width: int, height: int):
    """--image as [3, H, W] in [-1, 1] on the device, and its size for the video: at --resolution 480p/720p Wan's
    adaptive size (the image's aspect ratio at that pixel count), at WIDTHxHEIGHT that size."""
    try:
        pixels = torch.from_numpy(imageio.imread(cfg.image)).float()
    except Exception as e:
        raise ValueError(f"--image {cfg.image} cannot be read as an image ({type(e).__name__}: {e})") from None
    pixels = pixels[..., None].expand(-1, -1, 3) if pixels.ndim == 2 else pixels[..., :3]  # grey, RGBA -> RGB
    image = (pixels.permute(2, 0, 1) / 127.5 - 1).to(cfg.device)
    if cfg.resolution in ("480p", "720p"):
        height, width = i2v_size(image.shape[1], image.shape[2], width * height)
    return image, width, height


@torch.no_grad()
def i2v_inputs(cfg: Config, arch: WanConfig, vae, width: int, height: int):
    """(y [1, 20, T, h, w], CLIP features [1, 257, 1280] or None, width, height) for --image: the conditioning
    latents of Wan's pipelines and, for Wan2.1 I2V, the CLIP image tokens (the encoder is freed after use)."""
    image, width, height = read_image(cfg, width, height)
    resized = F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False)[0]
    y = image_condition(vae, resized.clamp(-1, 1), cfg.num_frames)
    clip_fea = None
    if arch.model_type == "i2v" and arch.clip:
        encoder = load_clip(CLIPVision(cfg.clip_cfg).to(cfg.device), cfg.clip_path)
        clip_fea = encoder([image]).to(torch.float32)
        del encoder
    return y, clip_fea, width, height


def boundary_of(cfg: Config, settings: dict) -> float | None:
    """The experts' boundary of a two-expert model: an A14B --model's, else a two-expert run's stored one; else None."""
    return BOUNDARY.get(cfg.model, settings.get("boundary") if cfg.model is None else None)


def split_tokens(net, group):
    """Under torchrun: every WanModel of `net` (both experts of a two-expert model) splits each clip's tokens over the
    processes of `group` (parallel.py's Ulysses context parallelism; the head count must divide by their number)."""
    if group is not None:
        for m in net.modules():
            if isinstance(m, WanModel):
                parallel.context_parallel(m, group)
    return net


def cp_group():
    """The processes of a torchrun sampling as one context-parallel group (None for one process)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.group.WORLD


def main_rank() -> bool:
    """Whether this process writes files and prints: always, except for the ranks > 0 of a torchrun sampling."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def load_net(cfg: Config, settings: dict):
    """The DiT, or the two experts of an A14B --model or a two-expert run (a folder with both, or --dit-path and
    --dit-path-low)."""
    boundary = boundary_of(cfg, settings)
    if boundary is not None:
        net = load_two_experts(cfg.model, cfg.dit_path, cfg.dit_path_low, dtype=getattr(torch, cfg.dtype),
                               device=cfg.device, offload=cfg.offload, arch=architecture(cfg, settings),
                               boundary=boundary)
        if cfg.compile:
            for block in (*net.high.blocks, *net.low.blocks):
                block.compile()
        return split_tokens(net, cp_group())
    return split_tokens(load_dit(architecture(cfg, settings), cfg), cp_group())


def sample_wan(cfg: Config, settings: dict):
    """Prompts -> T5 -> DiT -> VAE -> mp4s (and shards), one video at a time; one timing line per video. With an
    image, the VAE and CLIP encode it first; its latent frame is the video's first."""
    prompts = read_prompts(cfg)
    width, height = video_size(cfg)
    embeds, neg, t5_seconds = embed_texts(cfg, prompts)
    if torch.device(cfg.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the encoder is gone: the peak below is the DiT's and the VAE's
    vae = load_vae(cfg.vae_path, device=cfg.device, dtype=getattr(torch, cfg.vae_dtype), cfg=cfg.vae_cfg) \
        if cfg.videos or cfg.image else None
    if vae is not None:
        vae.frames_per_call = cfg.vae_frames_per_call
    if vae is not None and cfg.compile:
        vae.compile_blocks()
    y = clip_fea = None
    if cfg.image is not None:
        y, clip_fea, width, height = i2v_inputs(cfg, architecture(cfg, settings), vae, width, height)
        print(f"image-to-video at {width}x{height}")
    shape = (cfg.vae_cfg.z_dim, 1 + (cfg.num_frames - 1) // 4, height // 8, width // 8)
    net = load_net(cfg, settings)
    if vae is not None and cfg.videos and main_rank() and decoder_device(cfg.device, vae, width, height) == "cpu":
        vae.channels_last(False).to("cpu")
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(cfg.num_samples)]
    s, st = cfg.sampler, cfg.streaming
    calls_per_video = num_steps(s)
    if cfg.causal:
        chunks = chunk_frames(shape[1], st.first_chunk_t, st.chunk_t)
        calls_per_video = (sum(len(t) - 1 for t in stream_times(chunks, st.steps_per_chunk, s.sigma_max, s.mid_t))
                           + (0 if st.noisy_context else len(chunks) - 1))
    bar = tqdm(total=len(jobs) * calls_per_video, unit="DiT call", disable=not main_rank())
    writes = cfg.videos and main_rank()  # (under torchrun every rank runs the DiT, rank 0 decodes and writes)
    i2v_net = architecture(cfg, settings).model_type == "i2v"
    prefix = y[:, 4:, :1] if y is not None and cfg.causal and not i2v_net else None  # a T2V student: the image prefilled
    cache = stream_cache(net, 1, shape, st, 0 if prefix is None else 1) if cfg.causal else None  # reset per video

    def dit(x, timestep, context, **kw):  # the net, counted (CFG's two halves are one batched call)
        v = net(x, timestep, context, **kw)
        bar.update()
        return v
    if not cfg.causal:  # I2V: every call (both halves under CFG) gets the image's conditioning
        dit = conditioned(dit, y=y, clip_fea=clip_fea)

    def videos():
        for k, (i, prompt) in enumerate(jobs):
            t0 = now(cfg.device)
            generator = torch.Generator(cfg.device).manual_seed(cfg.seed + k)
            line = f"video {k}: "
            if cfg.causal:
                z, frames, ready = stream_video(dit, vae if writes else None, [embeds[i]], shape, st, s, generator,
                                                cache, prefix, image={"y": y, "clip_fea": clip_fea} if i2v_net else None)
                line += stream_report(ready, cfg.num_frames)
            else:
                z = generate_latents(dit, [embeds[i]], None if neg is None else [neg], shape, s, generator,
                                     boundary_of(cfg, settings) or 1.0)
                if y is not None:  # the conditioning image is the first frame
                    z[:, :, :1] = y[:, 4:, :1]
                t1 = now(cfg.device)
                line += f"DiT {t1 - t0:.2f} s"
                if writes:
                    frames = decode(vae, z)
                    line += f", VAE {now(cfg.device) - t1:.2f} s"
            if writes:
                frames = frames[0]
                path = cfg.save_path / f"{k:04d}_{slug(prompt)}_seed{cfg.seed + k}.mp4"
                write_mp4(frames, path)
                line += f" -> {path}"
            bar.write(line)
            conditioning = {} if y is None or cfg.causal else \
                {"y": y[0].cpu(), **({} if clip_fea is None else {"clip": clip_fea[0].cpu()})}
            yield z[0].cpu(), embeds[i].cpu(), prompt, conditioning

    if cfg.shard_dir is not None and main_rank():
        paths = write_shards(videos(), cfg.shard_dir)
        print(f"{len(jobs)} samples written to {len(paths)} shard(s) in {cfg.shard_dir}")
    else:
        for _ in videos():
            pass
    bar.close()
    if torch.device(cfg.device).type == "cuda":
        print(f"peak GPU memory of DiT + VAE: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def toy_steps(cfg: Config, settings: dict) -> list[int]:
    """--steps, else every step count the run evaluated."""
    s = cfg.sampler
    return [num_steps(s)] if s.steps is not None or s.mode == "teacher" else settings.get("eval_steps", [num_steps(s)])


def sample_toy(cfg: Config, settings: dict) -> dict:
    """A toy checkpoint on the world it was trained on: num_samples clips of every prompt at each step count (the
    run's evaluated ones unless --steps), their exact metrics as the run printed them, and a grid mp4 per row."""
    world = toy.make_world(toy.ToyConfig(**settings.get("toy", {}).get("world", {})))
    net = load_net(cfg, settings)
    prompt, context = toy.eval_prompts(world, cfg.num_samples)
    context = context.to(cfg.device)
    image = toy.eval_conditioning(world, net.cfg, prompt, cfg.seed)  # (I2V: the run's evaluation images)
    bound = {k: v.to(cfg.device) for k, v in image.items()}
    neg_context = world.negative.expand(len(prompt), -1, -1).to(cfg.device)
    s = cfg.sampler
    steps = toy_steps(cfg, settings)
    name = {"rcm": "student", "teacher": "teacher"}[s.mode] if not cfg.causal else settings.get("stage", "causal")
    results = {}
    for n in steps:
        generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
        sampler = dataclasses.replace(s, steps=n)
        if cfg.causal:
            st = dataclasses.replace(cfg.streaming, steps_per_chunk=(n,))  # n steps in every chunk, as evaluated
            x = stream_video(net, None, context, world.cfg.shape, st, sampler, generator, image=bound)[0].cpu()
        else:
            x = generate_latents(conditioned(net, **bound), context, neg_context, world.cfg.shape, sampler,
                                 generator).cpu()
        results[f"{name}-{n}"] = toy.metrics(world, x, prompt, image.get("y"))
        if main_rank():
            toy.save_grid(world, x, rows=world.cfg.prompts, path=cfg.save_path / f"toy_{name}-{n}_seed{cfg.seed}.mp4")
    toy.print_table(results)
    print(f"grids (rows = prompts) -> {cfg.save_path}/toy_*_seed{cfg.seed}.mp4")
    return results


def main(cfg: Config) -> dict:
    """Sample as configured; returns the toy metrics ({} for Wan videos). Under torchrun (or in a process group) the
    processes sample each video together, its tokens split over them (context parallelism, one GPU each): the same
    videos as one process up to rounding; rank 0 prints and writes."""
    joined = "RANK" in os.environ and not torch.distributed.is_initialized()
    if joined or torch.distributed.is_initialized():
        d = parallel.init_distributed(1, cfg.device)
        cfg = dataclasses.replace(cfg, device=str(d.device))
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if main_rank() else devnull):
            cfg, settings = with_settings(cfg)
            check(cfg, settings)
            if cfg.toy:
                return sample_toy(cfg, settings)
            sample_wan(cfg, settings)
            return {}
    finally:
        if joined:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parallel.cli(main, tyro.cli(Config))
