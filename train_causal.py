"""Causal-rCM: distil a bidirectional Wan2.1 teacher into a streaming generator that denoises a video chunk by chunk
in 1-4 steps, each chunk attending to the clean K/V of the chunks before it in a KV cache (causal_rcm.md).

Three stages, each starting from the EMA of the one before:

    tf       the causal teacher: the bidirectional teacher fine-tuned by teacher forcing, i.e. flow matching on the
             noisy half of the packed clip [x0 | x_s], where noisy chunk j sees the clean chunks < j and itself
    tf_scm   teacher-forcing consistency (forward divergence): sCM of the student against the causal teacher on the
    tf_dcm   same packed clip (tf_dcm: the JVP-free discrete-time variant, a warm-up or fallback)
    sf_dmd   self-forcing DMD (reverse divergence): the student rolls whole videos out chunk by chunk through its KV
             cache, and DMD against the BIDIRECTIONAL teacher and a bidirectional fake score matches the rollouts'
             distribution to the teacher's

    python train_causal.py toy                                   # tf -> tf_scm -> sf_dmd on the toy world, exact eval
    python train_causal.py toy --stages tf tf_dcm sf_dmd         # the JVP-free consistency stage instead
    python train_causal.py toy --sf.steps-per-chunk 4 2          # first chunk 4 steps, the others 2

Everything is in rectified-flow time s (x_s = (1 − s)·x0 + s·ε, v = ε − x0, network timestep 1000·s per frame);
the bidirectional DMD and critic losses are shared with rCM (losses.py, TrigFlow inside, the same x̂0). A run folder
holds one sub-folder per stage (metrics.jsonl, state.pt to resume exactly: rerun the same command, ema.safetensors
in official key names, previews/) and, for the toy world, eval.json with the exact metrics of streamed samples.
"""
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

import toy
import train_rcm
from losses import (TimeDist, critic_loss, dcm_loss, denoise, dmd_loss, euler_sample, guided_denoise, sample_time,
                    scm_objective, trig_to_rf)
from model import CacheConfig, KVCache, WanConfig, WanModel, chunk_frames, load_checkpoint, save_checkpoint
from sample import stream_latents
from train_rcm import ema_gamma, ema_update

Stage = Literal["tf", "tf_dcm", "tf_scm", "sf_dmd"]


@dataclass
class Optim:
    """AdamW with a linear LR warm-up, and the power-function EMA (EDM2) of the trained net."""
    iterations: int = 2000
    """iterations of this stage"""
    lr: float = 2e-6
    """AdamW learning rate of the trained net"""
    betas: tuple[float, float] = (0.0, 0.999)
    """AdamW betas"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    lr_warmup: int = 100
    """linear learning-rate warm-up (optimizer steps), then constant"""
    ema_sigma_rel: float = 0.1
    """relative width σ_rel of the power-function EMA, updated on every update of the trained net"""


@dataclass
class TFConfig(Optim):
    """Stage tf: the causal teacher by teacher forcing (or diffusion forcing)."""
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    p_s: TimeDist = field(default_factory=lambda: TimeDist("shift", shift=5.0))
    """distribution of the noisy half's time (as TrigFlow t; UniformShift(5) in s)"""
    forcing: Literal["teacher", "diffusion"] = "teacher"
    """teacher: packed [clean | noisy] clip, one s per clip; diffusion: block-causal mask, one s per chunk"""
    loss_scale: float = 100.0
    """weight of the flow-matching loss"""


@dataclass
class CMConfig(Optim):
    """Stages tf_scm and tf_dcm: teacher-forcing consistency distillation from the causal teacher."""
    teacher_guidance: float = 3.0
    """classifier-free guidance weight of the causal teacher"""
    p_G: TimeDist = field(default_factory=lambda: TimeDist("lognormal", p_mean=-0.8, p_std=1.6))
    """sCM: distribution of the time (EDM σ = s/(1 − s) log-normal)"""
    tangent_warmup: int = 1000
    """sCM: iterations over which the tangent warm-up ratio r grows to 1"""
    loss_scale: float = 100.0
    """weight of the consistency loss"""
    dcm_total_steps: int = 48
    """dCM: number of steps N of the discretisation grid"""
    dcm_shift: float = 3.0
    """dCM: timestep shift of the grid"""


@dataclass
class SFConfig(Optim):
    """Stage sf_dmd: self-forcing DMD against the bidirectional teacher, with a bidirectional fake score."""
    lr_fake: float = 4e-7
    """fake-score AdamW learning rate"""
    teacher_guidance: float = 5.0
    """classifier-free guidance weight of the bidirectional teacher"""
    p_D: TimeDist = field(default_factory=lambda: TimeDist("shift", shift=5.0))
    """time distribution of DMD and the critic"""
    loss_scale_dmd: float = 1.0
    """weight of the DMD loss"""
    student_update_freq: int = 6
    """one student iteration per this many iterations; the others train the fake score"""
    max_simulation_steps: int = 4
    """the rollout's steps per chunk cycle through 1..this many"""
    steps_per_chunk: tuple[int, ...] = ()
    """fixed steps per chunk instead of the cycle: chunk i takes entry min(i, len − 1), e.g. 4 2"""
    noisy_context: bool = False
    """cache the K/V of each chunk's last noisy input instead of running an extra clean pass at s = 0"""


@dataclass
class CausalConfig:
    """Causal-rCM (defaults: the Wan2.1 T2V 1.3B recipe of causal_rcm.md; presets below)."""
    stages: tuple[Stage, ...] = ("tf", "tf_scm", "sf_dmd")
    """stages to run in order, each initialised from the EMA of the one before"""
    out_dir: Path = Path("runs/causal")
    """run folder: one sub-folder per stage, eval.json"""
    teacher_ckpt: Path | None = None
    """the bidirectional teacher (official key names); toy: the cached toy teacher of train_rcm.py if unset"""
    causal_teacher_ckpt: Path | None = None
    """the causal teacher, needed by tf_scm / tf_dcm when the stage tf is not run"""
    student_ckpt: Path | None = None
    """initialise the first stage's trained net from these weights (default: its teacher)"""
    dit: WanConfig = field(default_factory=WanConfig)
    """network config of every net"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    seed: int = 0
    """seed of the global RNG (times, noise, data); saved with the state, so a resumed stage repeats its losses"""
    batch: int = 1
    """clips per iteration"""
    first_chunk_t: int = 1
    """latent frames of the first chunk"""
    chunk_t: int = 1
    """latent frames of every later chunk (1: frame-wise, 3: chunk-wise)"""
    tf: TFConfig = field(default_factory=TFConfig)
    """stage tf"""
    cm: CMConfig = field(default_factory=CMConfig)
    """stages tf_scm and tf_dcm"""
    sf: SFConfig = field(default_factory=SFConfig)
    """stage sf_dmd"""
    sigma_max: float = 1600.0
    """streaming inference starts each chunk at s = σ_max/(1 + σ_max)"""
    backward_times: tuple[float, ...] = (15 / 16, 5 / 6, 5 / 8)
    """intermediate times s of the few-step rollout, in training (from s = 1) and in streaming inference"""

    # logging
    log_every: int = 10
    """iterations between lines of metrics.jsonl"""
    preview_every: int = 500
    """iterations between streamed previews of the EMA net, with exact toy metrics (0: none)"""
    ckpt_every: int = 500
    """iterations between checkpoints (state.pt and ema.safetensors)"""

    # the toy world (the only data source wired in this file)
    world: toy.ToyConfig = field(default_factory=toy.ToyConfig)
    """the toy data distribution"""
    teacher_train: toy.TeacherConfig = field(default_factory=toy.TeacherConfig)
    """flow-matching training of the toy teacher when no teacher_ckpt is cached"""
    eval_per_prompt: int = 256
    """toy evaluation: samples per prompt for each sampler"""
    eval_teacher_steps: int = 50
    """toy evaluation: Euler steps (per chunk for the causal teacher) of the teachers' samplers"""


_RCM_TOY = train_rcm.PRESETS["toy"][1]
PRESETS = {
    "toy": ("Causal-rCM on the toy video world (CPU, minutes): tf -> tf_scm -> sf_dmd, frame-wise chunks", CausalConfig(
        out_dir=Path("runs/causal_toy"), dit=_RCM_TOY.dit, world=_RCM_TOY.world, teacher_train=_RCM_TOY.teacher_train,
        batch=16, log_every=10, preview_every=0, ckpt_every=100, eval_per_prompt=128,
        tf=TFConfig(iterations=300, lr=1e-4, lr_warmup=20),
        cm=CMConfig(iterations=300, lr=1e-4, lr_warmup=20, tangent_warmup=100),
        sf=SFConfig(iterations=300, lr=1e-4, lr_fake=1e-4, lr_warmup=20, student_update_freq=3, teacher_guidance=3.0))),
}


# ------------------------------------------------------------------------------------------- teacher forcing
def per_frame(timestep: torch.Tensor, frames: int) -> torch.Tensor:
    """A timestep per clip [B] or per frame [B, T] -> per frame [B, T]."""
    return timestep[:, None].expand(-1, frames) if timestep.ndim == 1 else timestep


def teacher_forced(net: WanModel, x0: torch.Tensor, chunks: tuple[int, ...]):
    """The causal net under teacher forcing, as a Wan-signature net of the noisy half alone:
    f(x_s, timestep, context, tangent=None) -> v (or (v, tv)) [B, C, T, H, W], computed on the packed clip
    [x0 | x_s] with per-frame times [0…0 | timestep]. The clean half is a constant context, so its tangent and its
    time's tangent are ZERO."""
    T = x0.shape[2]

    def f(x_s, timestep, context, tangent=None):
        zeros_t = torch.zeros(x_s.shape[0], T, device=x_s.device)
        x, t = torch.cat([x0.to(x_s.dtype), x_s], dim=2), torch.cat([zeros_t, per_frame(timestep, T)], dim=1)
        if tangent is None:
            return net(x, t, context, chunks=chunks, teacher_forcing=True)[:, :, T:]
        tx, tt = torch.cat([torch.zeros_like(x0), tangent[0]], dim=2), torch.cat([zeros_t, per_frame(tangent[1], T)], 1)
        v, tv = net(x, t, context, tangent=(tx, tt), chunks=chunks, teacher_forcing=True)
        return v[:, :, T:], tv[:, :, T:]
    return f


def guided_velocity(net, x, timestep, cond, uncond, w: float):
    """Classifier-free guidance in velocity space, v = v_uncond + w·(v_cond − v_uncond) (w = 1: one call)."""
    v_c = net(x, timestep, cond)
    return v_c if w == 1 else v_c + (w - 1) * (v_c - net(x, timestep, uncond))


def sample_s(dist: TimeDist, shape, device) -> torch.Tensor:
    """Rectified-flow times s ~ dist (a TimeDist over TrigFlow t), float64 of the given shape."""
    return trig_to_rf(sample_time(dist, math.prod(shape), device)).view(shape)


def noised(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 − s)·x0 + s·ε with s per clip [B] or per frame [B, T]."""
    s = per_frame(s, x0.shape[2])[:, None, :, None, None].float()
    return (1 - s) * x0 + s * eps


# ---------------------------------------------------------------------------------------- stage tf: the causal teacher
def tf_weight(s: torch.Tensor) -> torch.Tensor:
    """w(s) = exp(−2(s − 0.5)²) − e^(−1/2): zero at s = 0 and 1, largest at s = 1/2."""
    return torch.exp(-2 * (s - 0.5) ** 2) - math.exp(-0.5)


def tf_loss(net: WanModel, x0: torch.Tensor, context, chunks: tuple[int, ...], cfg: TFConfig) -> torch.Tensor:
    """Flow matching of the causal net: loss_scale·Σ_frames w(s)·mean_{C,H,W}(v̂ − (ε − x0))² over the noisy frames.
    Teacher forcing: one s per clip, v̂ from the packed [x0 | x_s] forward (the clean half is never a target).
    Diffusion forcing: one s per chunk, v̂ from the block-causal forward of x_s. Returns loss [B] (fp32)."""
    B, T = x0.shape[0], x0.shape[2]
    eps = torch.randn_like(x0)
    if cfg.forcing == "teacher":
        s = per_frame(sample_s(cfg.p_s, (B,), x0.device), T)
        v = teacher_forced(net, x0, chunks)(noised(x0, eps, s), (1000 * s).float(), context)
    else:
        s = sample_s(cfg.p_s, (B, len(chunks)), x0.device).repeat_interleave(torch.tensor(chunks, device=x0.device), 1)
        v = net(noised(x0, eps, s), (1000 * s).float(), context, chunks=chunks)
    per_frame_mse = (v.float() - (eps - x0)).pow(2).mean(dim=(1, 3, 4))                 # [B, T]
    return cfg.loss_scale * (tf_weight(s).float() * per_frame_mse).sum(1)


# ------------------------------------------------------------------------ stages tf_scm / tf_dcm: teacher-forcing CM
def tf_scm_loss(student: WanModel, v_teacher, x0: torch.Tensor, context, chunks, cfg: CMConfig, r: float):
    """Teacher-forcing sCM, written for the consistency function f = x_s − s·v_θ of the noisy half:
    1. s ~ p_G, x_s = (1 − s)·x0 + s·ε;  v_T = v_teacher(x_s, s) (the CFG causal teacher, no grad).
    2. JVP of the student velocity along the PF-ODE, tangent v_T on the noisy half and 1 on its time, ZERO on the
       clean half: (v⁻, dv_θ/ds) (no grad).
    3. g = (v_T − v⁻) − r·s·dv_θ/ds = df/ds along the ODE at r = 1 (r: the tangent warm-up ratio);
    4. NaN → 0, g ← g/(‖g‖₂ + 0.1), L = loss_scale·‖v_θ − sg(v_θ) − g‖² (losses.scm_objective), so v_θ moves along g.
    Returns (loss [B] float64, number of NaN-guarded samples)."""
    s = sample_s(cfg.p_G, (x0.shape[0],), x0.device)
    x_s = noised(x0, torch.randn_like(x0), s)
    timestep = (1000 * s).float()
    f = teacher_forced(student, x0, chunks)
    with torch.no_grad():
        v_T = v_teacher(x_s, timestep)
        v_minus, dv_ds = f(x_s, timestep, context, tangent=(v_T, torch.full_like(timestep, 1000.0)))  # d(1000 s)/ds
    v = f(x_s, timestep, context)
    g = (v_T - v_minus) - r * s.float()[:, None, None, None, None] * dv_ds
    return scm_objective(v.float(), g, cfg.loss_scale)


# ----------------------------------------------------------------------------------- stage sf_dmd: self forcing
def kv_cache(net: WanModel, batch: int, shape, chunks: tuple[int, ...], device) -> KVCache:
    """A KV cache that holds whole clips of `shape` [C, T, H, W] cut into `chunks` (nothing is evicted)."""
    _, T, H, W = shape
    ph, pw = net.cfg.patch_size[1:]
    return KVCache(net, batch, (H // ph) * (W // pw), CacheConfig(max_frames=T), max(chunks), device=device)


def rollout(net: WanModel, context, eps: torch.Tensor, chunks: tuple[int, ...], times: list[list[float]],
            grad_last: bool = False, noisy_context: bool = False) -> torch.Tensor:
    """Self forcing: the student generates whole videos chunk by chunk through its KV cache, as streaming inference
    does (sample.stream_latents), keeping the graph of each chunk's LAST step only.

    eps [B, C, T, H, W]: each chunk's starting noise; times[i]: chunk i's rectified-flow times [s_0, ..., s_{n−1}].
    Per chunk: x = s_0·ε; each step v = net(x, s_k | cache), x̂0 = x − s_k·v, then, but after the last step,
    x = (1 − s_{k+1})·x̂0 + s_{k+1}·ε' with fresh noise ε'. The cache holds constants, so no gradient crosses chunks.
    Then the chunk's K/V join the cache: a clean pass of x̂0 at s = 0 (no grad; none after the last chunk), or, with
    noisy_context, the last step's own pass on its noisy input. Returns the video of x̂0s [B, C, T, H, W].
    """
    B = eps.shape[0]
    cache = kv_cache(net, B, eps.shape[1:], chunks, eps.device)
    video, f0 = [], 0
    for i, (Tc, s) in enumerate(zip(chunks, times)):
        x = s[0] * eps[:, :, f0:f0 + Tc]
        for k, s_k in enumerate(s):
            last = k == len(s) - 1
            with torch.set_grad_enabled(grad_last and last):
                v = net(x, torch.full((B,), 1000 * s_k, device=x.device), context, kv_cache=cache,
                        kv_append=noisy_context and last)
                x0_hat = x - s_k * v
            if not last:
                x = (1 - s[k + 1]) * x0_hat + s[k + 1] * torch.randn_like(x)
        if not noisy_context and i < len(chunks) - 1:
            with torch.no_grad():
                net(x0_hat.detach(), torch.zeros(B, device=x.device), context, kv_cache=cache, kv_append=True)
        video.append(x0_hat)
        f0 += Tc
    return torch.cat(video, dim=2)


def chunk_times(n_steps: tuple[int, ...], s0: float, backward_times: tuple[float, ...]) -> list[list[float]]:
    """Per chunk, the few-step times [s0, *backward_times[:n − 1]] for its number of steps n."""
    if max(n_steps) > len(backward_times) + 1 or min(n_steps) < 1:
        raise ValueError(f"steps per chunk must lie in 1..{len(backward_times) + 1} with backward_times="
                         f"{backward_times}, got {n_steps}")
    return [[s0, *backward_times[: n - 1]] for n in n_steps]


def rollout_steps(cfg: SFConfig, n_chunks: int, cycle: int) -> tuple[int, ...]:
    """Steps of each chunk: the fixed steps_per_chunk, or the same n = cycle mod max + 1 for every chunk."""
    if cfg.steps_per_chunk:
        return tuple(cfg.steps_per_chunk[min(i, len(cfg.steps_per_chunk) - 1)] for i in range(n_chunks))
    return (cycle % cfg.max_simulation_steps + 1,) * n_chunks


# ------------------------------------------------------------------------------------------ streamed evaluation
def student_stream(net: WanModel, context, n_steps: int, shape, chunks, cfg: CausalConfig, seed: int):
    """Samples of a few-step student from sample.py's streaming sampler: n_steps per chunk starting at
    s_0 = σ_max/(1 + σ_max), then the backward times; seeded."""
    gen = torch.Generator(cfg.device).manual_seed(seed)
    times = chunk_times((n_steps,) * len(chunks), cfg.sigma_max / (1 + cfg.sigma_max), cfg.backward_times)
    cache = kv_cache(net, len(context), shape, chunks, cfg.device)
    return torch.cat(list(stream_latents(net, context.to(cfg.device), shape, chunks, times, cache, gen)), 2).cpu()


def teacher_stream(net: WanModel, context, uncond, shape, chunks, w: float, steps: int, seed: int, device):
    """Streaming samples of the causal teacher: per chunk, `steps` Euler steps with CFG w (cond and uncond halves of
    one batch, so one KV cache serves both), then a clean pass at s = 0 appends the chunk's K/V. Seeded."""
    B = len(context)
    eps = torch.randn((B, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    both = torch.cat([context, uncond]).to(device)
    cache = kv_cache(net, 2 * B, shape, chunks, device)
    video, f0 = [], 0
    for Tc in chunks:
        def velocity(x, timestep):
            v_c, v_u = net(torch.cat([x, x]), torch.cat([timestep, timestep]), both, kv_cache=cache).chunk(2)
            return v_u + w * (v_c - v_u)
        x0 = euler_sample(velocity, eps[:, :, f0:f0 + Tc], steps, shift=5.0)
        net(torch.cat([x0, x0]), torch.zeros(2 * B, device=device), both, kv_cache=cache, kv_append=True)
        video.append(x0)
        f0 += Tc
    return torch.cat(video, dim=2).cpu()


@torch.no_grad()
def stream_samples(cfg: CausalConfig, world: toy.World, stage: Stage, net: WanModel, prompt, seed: int) -> dict:
    """Streamed samples of a stage's net: the causal teacher (stage tf) or the student at 1, 2 and 4 steps."""
    context, shape = world.text[prompt], world.cfg.shape
    chunks = chunk_frames(shape[1], cfg.first_chunk_t, cfg.chunk_t)
    if stage == "tf":
        uncond = world.negative.expand(len(prompt), -1, -1)
        return {f"causal-teacher-{cfg.eval_teacher_steps}": teacher_stream(
            net, context, uncond, shape, chunks, cfg.cm.teacher_guidance, cfg.eval_teacher_steps, seed, cfg.device)}
    return {f"{stage}-{n}": student_stream(net, context, n, shape, chunks, cfg, seed) for n in (1, 2, 4)}


def preview(cfg: CausalConfig, world: toy.World, stage: Stage, net: WanModel, folder: Path, i: int) -> dict:
    """Streamed previews of the EMA net: gif grids (rows = prompts, 8 clips each) and exact toy metrics."""
    prompt, _ = toy.eval_prompts(world, 64)
    out = {}
    for name, x in stream_samples(cfg, world, stage, net, prompt, seed=1).items():
        out.update({f"preview/{name}/{k}": v for k, v in toy.metrics(world, x, prompt).items()})
        grid = x.view(world.cfg.prompts, 64, *x.shape[1:])[:, :8].flatten(0, 1)
        toy.save_grid(world, grid, world.cfg.prompts, folder / "previews" / f"{i:06d}_{name}.gif")
    return out


# ---------------------------------------------------------------------------------------------------- training
def adamw(cfg: Optim, net: WanModel, lr: float, device: str):
    """AdamW (fused on CUDA) with a linear warm-up to lr, then constant."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=True if device == "cuda" else None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg.lr_warmup))


def load_net(cfg: CausalConfig, path: Path, trainable: bool) -> WanModel:
    net = load_checkpoint(WanModel(cfg.dit), path).to(cfg.device)
    return net.requires_grad_(trainable).train(trainable)


def stage_checkpoints(cfg: CausalConfig, stage: Stage, bidirectional: Path) -> tuple[Path, Path]:
    """(init of the trained net, its teacher) for a stage: each stage starts from the EMA of the stage before it in
    cfg.stages (the first one from student_ckpt, else from its teacher). tf learns from data (its 'teacher' is the
    bidirectional net it starts from); tf_scm/tf_dcm distil the causal teacher; sf_dmd the bidirectional teacher."""
    k = cfg.stages.index(stage)
    previous = cfg.out_dir / cfg.stages[k - 1] / "ema.safetensors" if k > 0 else cfg.student_ckpt
    if stage in ("tf_scm", "tf_dcm"):
        causal = cfg.out_dir / "tf" / "ema.safetensors" if "tf" in cfg.stages[:k] else cfg.causal_teacher_ckpt
        if causal is None:
            raise ValueError(f"stage {stage} distils a causal teacher: pass --causal-teacher-ckpt or run the stage tf "
                             f"before it (--stages tf {stage} ...)")
        return previous or causal, causal
    return previous or bidirectional, bidirectional


def train_stage(cfg: CausalConfig, stage: Stage, world: toy.World, bidirectional: Path) -> Path:
    """Run one stage to its last iteration (resuming from its state.pt if there is one); returns its EMA weights."""
    folder = cfg.out_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    scfg = {"tf": cfg.tf, "tf_scm": cfg.cm, "tf_dcm": cfg.cm, "sf_dmd": cfg.sf}[stage]
    init, teacher_path = stage_checkpoints(cfg, stage, bidirectional)
    student, ema = load_net(cfg, init, True), load_net(cfg, init, False)
    teacher = load_net(cfg, teacher_path, False) if stage != "tf" else None
    fake = load_net(cfg, bidirectional, True) if stage == "sf_dmd" else None
    opt_s, sched_s = adamw(scfg, student, scfg.lr, cfg.device)
    opt_f, sched_f = adamw(scfg, fake, cfg.sf.lr_fake, cfg.device) if fake is not None else (None, None)
    gamma = ema_gamma(scfg.ema_sigma_rel)
    chunks = chunk_frames(world.cfg.shape[1], cfg.first_chunk_t, cfg.chunk_t)
    torch.manual_seed(cfg.seed)

    # Resume: every piece of state, the RNG included, so the continued stage repeats the losses it would have had.
    state_path, log_path, start = folder / "state.pt", folder / "metrics.jsonl", 0
    if state_path.exists():
        state = torch.load(state_path, map_location=cfg.device, weights_only=True)
        for obj, key in ((student, "student"), (fake, "fake"), (ema, "ema"), (opt_s, "opt_student"),
                         (opt_f, "opt_fake"), (sched_s, "sched_student"), (sched_f, "sched_fake")):
            if obj is not None:
                obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"].cpu())
        if "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
        start = state["iteration"]
        if log_path.exists():  # drop log lines written after the checkpoint by the interrupted run
            lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["iteration"] < start]
            log_path.write_text("".join(ln + "\n" for ln in lines))
        if start < scfg.iterations:
            tqdm.write(f"{stage}: resumed from {state_path} at iteration {start}")

    uncond = world.negative.expand(cfg.batch, -1, -1).to(cfg.device)
    bar = tqdm(range(start, scfg.iterations), initial=start, total=scfg.iterations, desc=stage)
    t0 = time.time()
    for i in bar:
        x0, cond, _ = toy.sample_data(world, cfg.batch)
        x0, cond = x0.to(cfg.device), cond.to(cfg.device)
        record = {"iteration": i}
        # sf_dmd alternates one student iteration with student_update_freq − 1 critic iterations; the others only
        # train the student. n_eff counts student iterations (EMA, cycle of rollout steps).
        freq = cfg.sf.student_update_freq if stage == "sf_dmd" else 1
        n_eff = i // freq

        if i % freq == 0:
            if stage == "tf":
                loss = tf_loss(student, x0, cond, chunks, cfg.tf).mean()
                record["loss/tf"] = loss.item()
            elif stage == "tf_scm":
                r = 1.0 if cfg.cm.tangent_warmup == 0 else min(1.0, i / cfg.cm.tangent_warmup)
                v_T = lambda x, timestep: guided_velocity(teacher_forced(teacher, x0, chunks), x, timestep, cond,
                                                          uncond, cfg.cm.teacher_guidance)
                l_cm, n_nan = tf_scm_loss(student, v_T, x0, cond, chunks, cfg.cm, r)
                loss = l_cm.mean()
                record.update({"loss/scm": loss.item(), "scm/nan_samples": n_nan, "scm/r": r})
            elif stage == "tf_dcm":
                # the bidirectional dCM of losses.py on the teacher-forced nets (the same x̂0 = x_s − s·v): one Euler
                # step of the CFG causal teacher, the target from the same online student
                F_T = lambda x, t: guided_denoise(teacher_forced(teacher, x0, chunks), x, t, cond, uncond,
                                                  cfg.cm.teacher_guidance)[1]
                loss = dcm_loss(teacher_forced(student, x0, chunks), cond, F_T, x0, cfg.cm.dcm_total_steps, 1,
                                cfg.cm.dcm_shift, cfg.cm.loss_scale).mean()
                record["loss/dcm"] = loss.item()
            else:
                steps = rollout_steps(cfg.sf, len(chunks), n_eff)
                G = rollout(student, cond, torch.randn_like(x0), chunks, chunk_times(steps, 1.0, cfg.backward_times),
                            grad_last=True, noisy_context=cfg.sf.noisy_context)
                loss = dmd_loss(G, lambda x, t: denoise(fake, x, t, cond)[0],
                                lambda x, t: guided_denoise(teacher, x, t, cond, uncond, cfg.sf.teacher_guidance)[0],
                                cfg.sf.p_D, cfg.sf.loss_scale_dmd).mean()
                record.update({"loss/dmd": loss.item(), "dmd/steps": steps[-1]})
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            sched_s.step()
            ema_update(ema, student, n_eff, gamma)
            record["lr"] = sched_s.get_last_lr()[0]
        else:
            steps = rollout_steps(cfg.sf, len(chunks), i - n_eff - 1)   # cycles over the critic's own iterations
            with torch.no_grad():
                G = rollout(student, cond, torch.randn_like(x0), chunks, chunk_times(steps, 1.0, cfg.backward_times),
                            noisy_context=cfg.sf.noisy_context)
            l_fake = critic_loss(G, lambda x, t: denoise(fake, x, t, cond)[0], cfg.sf.p_D).mean()
            opt_f.zero_grad(set_to_none=True)
            l_fake.backward()
            opt_f.step()
            sched_f.step()
            record.update({"loss/critic": l_fake.item(), "critic/steps": steps[-1],
                           "lr_fake": sched_f.get_last_lr()[0]})

        previewing = cfg.preview_every > 0 and (i + 1) % cfg.preview_every == 0
        if previewing:
            record.update(preview(cfg, world, stage, ema, folder, i + 1))
        if i % cfg.log_every == 0 or previewing:
            record["time_s"] = round(time.time() - t0, 2)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")})
        if (i + 1) % cfg.ckpt_every == 0 or i + 1 == scfg.iterations:
            save_state(folder, i + 1, student, fake, ema, opt_s, opt_f, sched_s, sched_f)
    return folder / "ema.safetensors"


def save_state(folder: Path, iteration, student, fake, ema, opt_s, opt_f, sched_s, sched_f):
    """state.pt (loads with weights_only=True) and the EMA net in official key names, written atomically."""
    state = {"iteration": iteration, "student": student.state_dict(), "ema": ema.state_dict(),
             "opt_student": opt_s.state_dict(), "sched_student": sched_s.state_dict(), "rng": torch.get_rng_state()}
    if fake is not None:
        state.update(fake=fake.state_dict(), opt_fake=opt_f.state_dict(), sched_fake=sched_f.state_dict())
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / "state.pt.tmp")
    (folder / "state.pt.tmp").replace(folder / "state.pt")
    save_checkpoint(ema, folder / "ema.tmp.safetensors")
    (folder / "ema.tmp.safetensors").replace(folder / "ema.safetensors")


@torch.no_grad()
def evaluate(cfg: CausalConfig, world: toy.World, bidirectional: Path, results: dict[Stage, Path]) -> dict:
    """Exact metrics of the exact-velocity sampler (200 Euler steps), the bidirectional teacher (Euler with CFG), and
    every stage's EMA net streamed chunk by chunk: the causal teacher (Euler with CFG per chunk) and the students at
    1, 2 and 4 steps per chunk; eval_per_prompt samples per prompt. Writes eval.json and one preview gif per sampler."""
    prompt, _ = toy.eval_prompts(world, cfg.eval_per_prompt)
    samples = {
        "exact": toy.teacher_sample(functools.partial(toy.exact_velocity, world), world, prompt, 1.0, 200, 1.0, seed=2,
                                    device=cfg.device),
        f"teacher-{cfg.eval_teacher_steps}": toy.teacher_sample(
            load_net(cfg, bidirectional, False), world, prompt, cfg.sf.teacher_guidance, cfg.eval_teacher_steps, 5.0,
            seed=2, device=cfg.device)}
    for stage, path in results.items():
        samples.update(stream_samples(cfg, world, stage, load_net(cfg, path, False), prompt, seed=2))
    out = {name: toy.metrics(world, x, prompt) for name, x in samples.items()}
    (cfg.out_dir / "eval.json").write_text(json.dumps(out, indent=2))
    for name, x in samples.items():
        grid = x.view(world.cfg.prompts, cfg.eval_per_prompt, *x.shape[1:])[:, :8].flatten(0, 1)
        toy.save_grid(world, grid, world.cfg.prompts, cfg.out_dir / "previews" / f"eval_{name}.gif")
    return out


def train(cfg: CausalConfig) -> dict:
    """Run the stages in order (a finished stage is skipped on a rerun), then the exact toy evaluation."""
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ValueError(f"each stage runs once, got --stages {' '.join(cfg.stages)}")
    world = toy.make_world(cfg.world)
    bidirectional = cfg.teacher_ckpt or train_rcm.toy_teacher_path(cfg)   # the toy teacher rCM's toy preset caches
    if not bidirectional.exists():
        tqdm.write(f"no cached toy teacher: training one ({cfg.teacher_train.steps} steps) -> {bidirectional}")
        toy.train_teacher(world, cfg.teacher_train, cfg.dit, bidirectional, cfg.device, log=tqdm.write)
    results = {stage: train_stage(cfg, stage, world, bidirectional) for stage in cfg.stages}
    out = evaluate(cfg, world, bidirectional, results)
    width = max(map(len, out)) + 2
    print(f"{'sampler':<{width}}{'precision':>10}{'wrong':>8}{'mode TV':>9}{'mean ρ':>8}")
    for name, m in out.items():
        print(f"{name:<{width}}{m['precision']:>10.3f}{m['wrong_prompt']:>8.3f}{m['mode_tv']:>9.3f}{m['mean_rho']:>8.3f}")
    return out


if __name__ == "__main__":
    train(tyro.extras.overridable_config_cli(PRESETS))
