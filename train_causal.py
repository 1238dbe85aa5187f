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
    torchrun --nproc_per_node=8 train_causal.py wan1.3b --teacher-ckpt Wan2.1-T2V-1.3B --data shards/ \
        --neg-embed umT5_wan_negative_emb.pt                     # chunk-wise (3 latent frames), 480p

Everything is in rectified-flow time s (x_s = (1 − s)·x0 + s·ε, v = ε − x0, network timestep 1000·s per frame);
the bidirectional DMD and critic losses are shared with rCM (losses.py, TrigFlow inside, the same x̂0). Data,
FSDP2 sharding, context parallelism and checkpoints are train_rcm.py's. A run folder holds one sub-folder per stage
(metrics.jsonl, state/ to resume: rerun the same command, ema.safetensors in official key names, previews/) and,
for the toy world, eval.json with the exact metrics of samples streamed chunk by chunk, and their gifs.
"""
import functools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

import parallel
import toy
import train_rcm
from losses import (TimeDist, critic_loss, dcm_loss, denoise, dmd_loss, euler_sample, guided_denoise, sample_time,
                    scm_objective, trig_to_rf)
from model import CONFIGS, CacheConfig, KVCache, WanModel, chunk_frames, load_checkpoint
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
class CausalConfig(train_rcm.RunConfig):
    """Causal-rCM (stage defaults: the Wan2.1 T2V 1.3B recipe of causal_rcm.md; presets below). The data, scale-out,
    checkpoint and toy fields are train_rcm.py's RunConfig: its builders (FSDP nets, data stream, checkpoints) serve
    both. A run folder holds one sub-folder per stage; stage k draws its randomness from seed + k."""
    stages: tuple[Stage, ...] = ("tf", "tf_scm", "sf_dmd")
    """stages to run in order, each initialised from the EMA of the one before"""
    causal_teacher_ckpt: Path | None = None
    """the causal teacher, needed by tf_scm / tf_dcm when the stage tf is not run"""

    # chunks and stages
    first_chunk_t: int = 3
    """latent frames of the first chunk"""
    chunk_t: int = 3
    """latent frames of every later chunk (3: chunk-wise, 1: frame-wise)"""
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
    preview_every: int = 0
    """toy: iterations between streamed previews of the EMA net, with exact metrics (0: none)"""
    eval_teacher_steps: int = 50
    """toy evaluation: Euler steps (per chunk for the causal teacher) of the teachers' samplers"""


_RCM_TOY = train_rcm.PRESETS["toy"][1]
PRESETS = {
    "toy": ("Causal-rCM on the toy video world (CPU, minutes): tf -> tf_scm -> sf_dmd, frame-wise chunks", CausalConfig(
        out_dir=Path("runs/causal_toy"), task="toy", dit=_RCM_TOY.dit, world=_RCM_TOY.world,
        teacher_train=_RCM_TOY.teacher_train, precision="fp32", checkpointing="none", batch=16, first_chunk_t=1,
        chunk_t=1, ckpt_every=100, eval_per_prompt=128,
        # rCM's toy few-step times (TrigFlow) in rectified-flow time: where the toy's modes are decided
        backward_times=tuple(trig_to_rf(torch.tensor(_RCM_TOY.backward_timesteps, dtype=torch.float64)).tolist()),
        tf=TFConfig(iterations=600, lr=3e-4, lr_warmup=20),
        cm=CMConfig(iterations=300, lr=3e-5, lr_warmup=20, tangent_warmup=100),
        sf=SFConfig(iterations=600, lr=1e-4, lr_fake=1e-4, lr_warmup=20, student_update_freq=3,
                     teacher_guidance=_RCM_TOY.teacher_guidance))),
    "wan1.3b": ("Causal-rCM of Wan2.1 T2V 1.3B at 480p, chunk-wise (3 latent frames); torchrun, needs --teacher-ckpt, "
                "--data, --neg-embed",
                CausalConfig(out_dir=Path("runs/causal_wan1.3b"), dit=CONFIGS["t2v-1.3B"], task="wan", precision="bf16",
                             checkpointing="block")),
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
def kv_cache(net: WanModel, batch: int, shape, chunks: tuple[int, ...], device, dtype=None) -> KVCache:
    """A KV cache that holds whole clips of `shape` [C, T, H, W] cut into `chunks` (nothing is evicted), in `dtype`
    (default: the dtype of the net's weights; bf16 for FSDP nets with fp32 masters that compute in bf16)."""
    _, T, H, W = shape
    ph, pw = net.cfg.patch_size[1:]
    return KVCache(net, batch, (H // ph) * (W // pw), CacheConfig(max_frames=T), max(chunks), device, dtype)


def rollout(net: WanModel, context, eps: torch.Tensor, chunks: tuple[int, ...], times: list[list[float]],
            cache: KVCache, grad_last: bool = False, noisy_context: bool = False) -> torch.Tensor:
    """Self forcing: the student generates whole videos chunk by chunk through its KV cache, as streaming inference
    does (sample.stream_latents), keeping the graph of each chunk's LAST step only.

    eps [B, C, T, H, W]: each chunk's starting noise; times[i]: chunk i's rectified-flow times [s_0, ..., s_{n−1}];
    cache: a KVCache of the net for B whole clips (emptied first).
    Per chunk: x = s_0·ε; each step v = net(x, s_k | cache), x̂0 = x − s_k·v, then, but after the last step,
    x = (1 − s_{k+1})·x̂0 + s_{k+1}·ε' with fresh noise ε'. The cache holds constants, so no gradient crosses chunks.
    Then the chunk's K/V join the cache: a clean pass of x̂0 at s = 0 (no grad; none after the last chunk), or, with
    noisy_context, the last step's own pass on its noisy input. Returns the video of x̂0s [B, C, T, H, W].
    """
    B = eps.shape[0]
    cache.reset()
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
    """Streamed samples of a stage's net at 1, 2 and 4 steps per chunk, and for the causal teacher (stage tf) also at
    eval_teacher_steps Euler steps with CFG (its few-step rows are the baseline that distillation has to beat)."""
    context, shape = world.text[prompt], world.cfg.shape
    chunks = chunk_frames(shape[1], cfg.first_chunk_t, cfg.chunk_t)
    out = {f"{stage}-{n}": student_stream(net, context, n, shape, chunks, cfg, seed) for n in (1, 2, 4)}
    if stage == "tf":
        uncond = world.negative.expand(len(prompt), -1, -1)
        out[f"causal-teacher-{cfg.eval_teacher_steps}"] = teacher_stream(
            net, context, uncond, shape, chunks, cfg.cm.teacher_guidance, cfg.eval_teacher_steps, seed, cfg.device)
    return out


def preview(cfg: CausalConfig, world: toy.World, stage: Stage, net: WanModel, folder: Path, i: int,
            save_grids: bool) -> dict:
    """Streamed previews of the EMA net (every rank runs it: the net may be sharded): exact toy metrics and, with
    save_grids, gif grids (rows = prompts, 8 clips each)."""
    prompt, _ = toy.eval_prompts(world, 64)
    out = {}
    for name, x in stream_samples(cfg, world, stage, net, prompt, seed=1).items():
        out.update({f"preview/{name}/{k}": v for k, v in toy.metrics(world, x, prompt).items()})
        if save_grids:
            grid = x.view(world.cfg.prompts, 64, *x.shape[1:])[:, :8].flatten(0, 1)
            toy.save_grid(world, grid, world.cfg.prompts, folder / "previews" / f"{i:06d}_{name}.gif")
    return out


# ---------------------------------------------------------------------------------------------------- training
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


def cache_dtype(cfg: CausalConfig):
    return torch.bfloat16 if cfg.precision == "bf16" else None


def student_step(cfg: CausalConfig, stage: Stage, nets: train_rcm.Nets, batches, i: int) -> dict:
    """One update of the trained net: the stage's loss on each micro-batch (x0, cond, uncond) of `batches`, gradients
    accumulated into one AdamW step, then the EMA. Returns the metrics (micro-batch means)."""
    scfg = {"tf": cfg.tf, "tf_scm": cfg.cm, "tf_dcm": cfg.cm, "sf_dmd": cfg.sf}[stage]
    n_eff = i // cfg.sf.student_update_freq if stage == "sf_dmd" else i   # student updates before this one
    nets.opt_student.zero_grad(set_to_none=True)
    metrics = {}
    for x0, cond, uncond in batches:
        chunks = chunk_frames(x0.shape[2], cfg.first_chunk_t, cfg.chunk_t)
        if stage == "tf":
            loss = tf_loss(nets.student, x0, cond, chunks, cfg.tf).mean()
            record = {"loss/tf": loss.item()}
        elif stage == "tf_scm":
            r = 1.0 if cfg.cm.tangent_warmup == 0 else min(1.0, i / cfg.cm.tangent_warmup)
            v_T = lambda x, timestep: guided_velocity(teacher_forced(nets.teacher, x0, chunks), x, timestep, cond,
                                                      uncond, cfg.cm.teacher_guidance)
            l_cm, n_nan = tf_scm_loss(nets.student, v_T, x0, cond, chunks, cfg.cm, r)
            loss = l_cm.mean()
            record = {"loss/scm": loss.item(), "scm/nan_samples": n_nan, "scm/r": r}
        elif stage == "tf_dcm":
            # the bidirectional dCM of losses.py on the teacher-forced nets (the same x̂0 = x_s − s·v): one Euler step
            # of the CFG causal teacher, the target from the same online student
            F_T = lambda x, t: guided_denoise(teacher_forced(nets.teacher, x0, chunks), x, t, cond, uncond,
                                              cfg.cm.teacher_guidance)[1]
            loss = dcm_loss(teacher_forced(nets.student, x0, chunks), cond, F_T, x0, cfg.cm.dcm_total_steps, 1,
                            cfg.cm.dcm_shift, cfg.cm.loss_scale).mean()
            record = {"loss/dcm": loss.item()}
        else:
            steps = rollout_steps(cfg.sf, len(chunks), n_eff)
            cache = kv_cache(nets.student, len(x0), x0.shape[1:], chunks, x0.device, cache_dtype(cfg))
            G = rollout(nets.student, cond, torch.randn_like(x0), chunks, chunk_times(steps, 1.0, cfg.backward_times),
                        cache, grad_last=True, noisy_context=cfg.sf.noisy_context)
            loss = dmd_loss(G, lambda x, t: denoise(nets.fake, x, t, cond)[0],
                            lambda x, t: guided_denoise(nets.teacher, x, t, cond, uncond, cfg.sf.teacher_guidance)[0],
                            cfg.sf.p_D, cfg.sf.loss_scale_dmd).mean()
            record = {"loss/dmd": loss.item(), "dmd/steps": steps[-1]}
        (loss / cfg.grad_accum).backward()
        train_rcm.accumulate_metrics(metrics, record, cfg.grad_accum)
    nets.opt_student.step()
    nets.sched_student.step()
    ema_update(nets.ema, nets.student, n_eff, ema_gamma(scfg.ema_sigma_rel))
    return {**metrics, "lr": nets.sched_student.get_last_lr()[0]}


def critic_step(cfg: CausalConfig, nets: train_rcm.Nets, batches, i: int) -> dict:
    """One fake-score update of sf_dmd: on each micro-batch, a no-grad self-forcing rollout of the student, then the
    fake score's denoising loss on it (as rCM's critic); one AdamW step. Returns the metrics (micro-batch means)."""
    critic_before = i - i // cfg.sf.student_update_freq - 1   # the cycle of rollout steps runs over critic updates
    nets.opt_fake.zero_grad(set_to_none=True)
    metrics = {}
    for x0, cond, _ in batches:
        chunks = chunk_frames(x0.shape[2], cfg.first_chunk_t, cfg.chunk_t)
        steps = rollout_steps(cfg.sf, len(chunks), critic_before)
        cache = kv_cache(nets.student, len(x0), x0.shape[1:], chunks, x0.device, cache_dtype(cfg))
        with torch.no_grad():
            G = rollout(nets.student, cond, torch.randn_like(x0), chunks, chunk_times(steps, 1.0, cfg.backward_times),
                        cache, noisy_context=cfg.sf.noisy_context)
        l_fake = critic_loss(G, lambda x, t: denoise(nets.fake, x, t, cond)[0], cfg.sf.p_D).mean()
        (l_fake / cfg.grad_accum).backward()
        train_rcm.accumulate_metrics(metrics, {"loss/critic": l_fake.item(), "critic/steps": steps[-1]}, cfg.grad_accum)
    nets.opt_fake.step()
    nets.sched_fake.step()
    return {**metrics, "lr_fake": nets.sched_fake.get_last_lr()[0]}


def train_stage(cfg: CausalConfig, d: parallel.Dist, stage: Stage, world: toy.World | None,
                bidirectional: Path) -> Path:
    """Run one stage to its last iteration, resuming from its newest checkpoint if there is one (a finished stage is
    skipped); returns its EMA weights. The nets are FSDP-sharded over all ranks and built from rank 0's files, the
    checkpoints and the data stream are train_rcm's."""
    folder, k = cfg.out_dir / stage, cfg.stages.index(stage)
    scfg = {"tf": cfg.tf, "tf_scm": cfg.cm, "tf_dcm": cfg.cm, "sf_dmd": cfg.sf}[stage]
    latest = folder / "state" / "latest.json"
    if latest.exists() and json.loads(latest.read_text())["iteration"] >= scfg.iterations:
        return folder / "ema.safetensors"
    settings = replace(cfg, out_dir=folder, seed=cfg.seed + k)  # for train_rcm's builders
    init, teacher_path = stage_checkpoints(cfg, stage, bidirectional)
    build = lambda path, role: train_rcm.build_net(settings, d, train_rcm.read_weights(d, path, cfg.dit), role)
    student, ema = build(init, "trained"), build(init, "ema")
    teacher = build(teacher_path, "teacher") if stage != "tf" else None
    fake = build(bidirectional, "trained") if stage == "sf_dmd" else None
    opt_s, sched_s = train_rcm.adamw(scfg, student, scfg.lr)
    opt_f, sched_f = train_rcm.adamw(cfg.sf, fake, cfg.sf.lr_fake) if fake is not None else (None, None)
    nets = train_rcm.Nets(teacher, student, fake, ema, opt_s, sched_s, opt_f, sched_f)

    # Resume: weights, optimisers, schedules, counters; draws are seeded per (iteration, micro-batch) and the data
    # stream skips what was consumed, so the continued stage repeats the losses it would have had.
    start, start_batches = train_rcm.load_state(settings, nets)
    log_path = folder / "metrics.jsonl"
    if d.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if start:
            tqdm.write(f"{stage}: resumed from {folder / 'state'} at iteration {start}")
        if log_path.exists():  # drop log lines written after the checkpoint by the interrupted run
            lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["iteration"] < start]
            log_path.write_text("".join(ln + "\n" for ln in lines))
    draw, skipped = train_rcm.data_stream(settings, d, world, start_batches)

    bar = tqdm(range(start, scfg.iterations), initial=start, total=scfg.iterations, desc=stage, disable=not d.is_main)
    t0 = time.time()
    for i in bar:
        batches = train_rcm.micro_batches(settings, d, i, draw)
        # sf_dmd gives one iteration in student_update_freq to the student, the others to the fake score
        if stage == "sf_dmd" and i % cfg.sf.student_update_freq:
            record = critic_step(cfg, nets, batches, i)
        else:
            record = student_step(cfg, stage, nets, batches, i)
        record = {"iteration": i, **record, **skipped}
        skipped.update({key: 0 for key in skipped})

        previewing = cfg.task == "toy" and cfg.preview_every > 0 and (i + 1) % cfg.preview_every == 0
        if i % cfg.log_every == 0 or previewing:
            record = train_rcm.reduce_metrics(record, d)
            if previewing:
                record.update(preview(cfg, world, stage, nets.ema, folder, i + 1, save_grids=d.is_main))
            record["time_s"] = round(time.time() - t0, 2)
            if d.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({key.split("/")[-1]: f"{v:.3g}" for key, v in record.items()
                                 if key.startswith("loss/")})
        if (i + 1) % cfg.ckpt_every == 0 or i + 1 == scfg.iterations:
            train_rcm.save_state(settings, d, nets, i + 1, start_batches + (i + 1 - start) * cfg.grad_accum)
    return folder / "ema.safetensors"


def load_net(cfg: CausalConfig, path: Path) -> WanModel:
    """A frozen fp32 net on this process's device (toy evaluation)."""
    return load_checkpoint(WanModel(cfg.dit), path).to(cfg.device).requires_grad_(False).eval()


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
            load_net(cfg, bidirectional), world, prompt, cfg.sf.teacher_guidance, cfg.eval_teacher_steps, 5.0, seed=2,
            device=cfg.device)}
    for stage, path in results.items():
        samples.update(stream_samples(cfg, world, stage, load_net(cfg, path), prompt, seed=2))
    out = {name: toy.metrics(world, x, prompt) for name, x in samples.items()}
    (cfg.out_dir / "eval.json").write_text(json.dumps(out, indent=2))
    for name, x in samples.items():
        grid = x.view(world.cfg.prompts, cfg.eval_per_prompt, *x.shape[1:])[:, :8].flatten(0, 1)
        toy.save_grid(world, grid, world.cfg.prompts, cfg.out_dir / "previews" / f"eval_{name}.gif")
    width = max(map(len, out)) + 2
    print(f"{'sampler':<{width}}{'precision':>10}{'wrong':>8}{'mode TV':>9}{'mean ρ':>8}")
    for name, m in out.items():
        print(f"{name:<{width}}{m['precision']:>10.3f}{m['wrong_prompt']:>8.3f}{m['mode_tv']:>9.3f}"
              f"{m['mean_rho']:>8.3f}")
    return out


def train(cfg: CausalConfig) -> dict:
    """Run (or resume) the stages in order; returns the toy evaluation ({} for Wan runs). Joins torchrun's process
    group, or makes a one-process one for the run (an existing group, e.g. a test's, is used and left as it is)."""
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ValueError(f"each stage runs once, got --stages {' '.join(cfg.stages)}")
    train_rcm.check_config(cfg)
    if cfg.causal_teacher_ckpt is not None and not Path(cfg.causal_teacher_ckpt).exists():
        raise FileNotFoundError(f"--causal-teacher-ckpt {cfg.causal_teacher_ckpt} does not exist")
    own_group = not dist.is_initialized()
    try:
        return run(cfg, parallel.init_distributed(cfg.cp_size, cfg.device))
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: CausalConfig, d: parallel.Dist) -> dict:
    world = toy.make_world(cfg.world) if cfg.task == "toy" else None
    bidirectional = train_rcm.prepare_teacher(cfg, d, world)  # toy: rCM's cached toy teacher
    results = {stage: train_stage(cfg, d, stage, world, bidirectional) for stage in cfg.stages}
    if cfg.task == "wan" or cfg.eval_per_prompt == 0 or not d.is_main:
        return {}
    return evaluate(cfg, world, bidirectional, results)


if __name__ == "__main__":
    train(tyro.extras.overridable_config_cli(PRESETS))
