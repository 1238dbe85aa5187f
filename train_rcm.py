"""rCM: distil a Wan2.1 flow-matching teacher into a 1-4 step student by score-regularised continuous-time
consistency (sCM, JVP-based, forward divergence) plus distribution matching (DMD, reverse divergence, against a
fake-score critic), in one training loop that follows rcm.md.

    python train_rcm.py toy                                     # rCM on the toy video world, evaluated exactly
                                                                # (dCM warm-up, then sCM + DMD)
    python train_rcm.py toy --no-fake-score --dcm-iterations 0  # pure sCM
    python train_rcm.py toy --loss-scale 0 --dmd-fix-timesteps  # pure DMD
    torchrun --nproc_per_node=8 train_rcm.py wan1.3b --teacher-ckpt Wan2.1-T2V-1.3B --data shards/ \
        --neg-embed umT5_wan_negative_emb.pt                    # the real thing (14B: wan14b, --cp-size 8)

Four networks: the frozen teacher (with CFG), the student (trained), the fake score (trained on the student's
samples) and the EMA of the student (the one that is saved and evaluated). Iterations alternate between the
student and the critic; the "effective iteration" counts student iterations only.

Scale-out (parallel.py): the processes form a (data-parallel × context-parallel) mesh; all four nets are built on
the meta device, sharded by FSDP2 over every rank and filled from rank 0's copy of the checkpoint; with --cp-size P
each clip's tokens are split over P ranks (Ulysses), which see the same clip, noise and times. Every random draw of
micro-batch m of iteration i comes from a stream seeded by (seed, i, global micro-batch index), so N ranks equal one
process with N-fold gradient accumulation, and a resumed run redraws exactly what the interrupted one drew.

A run folder holds metrics.jsonl, state/ (a torch.distributed.checkpoint folder per checkpoint with everything a
resume needs, and latest.json naming the newest: rerun the same command, on as many processes), ema.safetensors
(the EMA student, official key names), previews/ and, for the toy world, eval.json.
"""
import functools
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import tyro
from safetensors.torch import load_file
from tqdm import tqdm

import parallel
import toy
from data import DataConfig, make_loader, write_shards
from losses import (TimeDist, critic_loss, dcm_loss, denoise, dmd_loss, guided_denoise, rcm_sample, sampling_times,
                    scm_loss, simulation_times)
from model import CONFIGS, WanConfig, WanModel, check_state_dict, read_state_dict, save_checkpoint


@dataclass
class RunConfig:
    """What a training run needs besides its losses: checkpoints, data, scale-out, logging, the toy world. The builders
    below (nets, data stream, checkpoints) take it; RCMConfig and train_causal.py's CausalConfig extend it."""
    out_dir: Path = Path("runs/rcm")
    """run folder: metrics.jsonl, state/ (resume), ema.safetensors, previews/, eval.json (train_causal: per stage)"""
    teacher_ckpt: Path | None = None
    """teacher weights, official key names (Wan2.1 folder, .safetensors, .index.json, .pt); toy: cached if unset"""
    student_ckpt: Path | None = None
    """initialise the (first) trained net from these weights instead of the teacher (e.g. a dCM warm-up's EMA)"""
    dit: WanConfig = field(default_factory=WanConfig)
    """network config of every net"""
    device: Literal["cuda", "cpu"] = "cuda" if torch.cuda.is_available() else "cpu"
    """cuda: one GPU per process (NCCL); cpu: gloo"""
    seed: int = 0
    """seed of every random draw (data of the toy world, noise, times, data order)"""

    # data
    task: Literal["toy", "wan"] = "toy"
    """toy: the toy world (exact data, toy teacher, exact eval); wan: --data, --teacher-ckpt, --neg-embed needed"""
    data: Path | None = None
    """folder of shard*.tar (latent.pt [16,T,H,W], embed.pt [L,4096], prompt.txt); toy: unset = fresh exact draws"""
    toy_data_clips: int = 0
    """toy: write this many clips of the world as shards to --data (if it holds none), then train on them"""
    neg_embed: Path | None = None
    """negative-prompt umT5 embedding [L,4096] (.safetensors or .pt): the teacher's unconditional input (wan)"""
    num_workers: int = 2
    """data reader processes per rank"""
    shuffle_buffer: int = 64
    """samples held for shuffling inside a data reader"""

    # scale-out
    precision: Literal["bf16", "fp32"] = "fp32"
    """bf16: fp32 masters, bf16 compute, fp32 grad reduction, bf16 teacher (Wan); fp32: all fp32 (toy)"""
    cp_size: int = 1
    """context-parallel (Ulysses) ranks per clip; must divide the number of processes and the head count"""
    checkpointing: Literal["none", "block", "matmul"] = "none"
    """activation checkpointing of the trained nets: block (keep block inputs), matmul (keep matmul outputs)"""
    compile: bool = False
    """torch.compile every transformer block (the attention kernel launch stays eager)"""
    batch: int = 1
    """clips per iteration on each data-parallel rank"""
    grad_accum: int = 1
    """split each rank's batch into this many micro-batches, their gradients accumulated (less activation memory)"""

    # logging
    log_every: int = 10
    """iterations between lines of metrics.jsonl (losses averaged over the ranks)"""
    ckpt_every: int = 500
    """iterations between checkpoints (state/ and ema.safetensors)"""

    # the toy world
    world: toy.ToyConfig = field(default_factory=toy.ToyConfig)
    """the toy data distribution"""
    teacher_train: toy.TeacherConfig = field(default_factory=toy.TeacherConfig)
    """flow-matching training of the toy teacher when no teacher_ckpt is cached"""
    eval_per_prompt: int = 256
    """toy evaluation: samples per prompt for each sampler (0: no evaluation)"""


@dataclass
class RCMConfig(RunConfig):
    """rCM distillation (defaults: the Wan2.1 T2V 1.3B recipe of rcm.md; presets below)."""
    # optimisation
    iterations: int = 10000
    """total iterations (student and critic)"""
    lr: float = 2e-6
    """student AdamW learning rate"""
    lr_fake: float = 4e-7
    """fake-score AdamW learning rate"""
    betas: tuple[float, float] = (0.0, 0.999)
    """AdamW betas of both optimisers"""
    weight_decay: float = 0.01
    """AdamW weight decay of both optimisers"""
    lr_warmup: int = 100
    """linear learning-rate warm-up (optimizer steps of each optimiser), then constant"""
    ema_sigma_rel: float = 0.1
    """relative width σ_rel of the power-function EMA of the student (EDM2), updated on student iterations"""

    # consistency loss (sCM / dCM)
    loss_scale: float = 100.0
    """weight of the consistency loss; 0 disables it (pure DMD)"""
    p_G: TimeDist = field(default_factory=lambda: TimeDist("lognormal", p_mean=0.7, p_std=1.6))
    """time distribution of the consistency loss"""
    tangent_warmup: int = 1000
    """iterations over which the sCM tangent warm-up ratio r grows to 1; DMD and the critic start after it"""
    dcm_iterations: int = 0
    """use the JVP-free discrete-time CM loss (dCM) instead of sCM for the first N iterations (a warm-up)"""
    dcm_total_steps: int = 48
    """dCM: number of steps N of the discretisation grid"""
    dcm_skip: int = 1
    """dCM: teacher Euler steps k between the two student evaluations"""
    dcm_shift: float = 5.0
    """dCM: timestep shift of the grid"""
    teacher_guidance: float = 5.0
    """classifier-free guidance weight of the teacher (distilled into the student)"""

    # distribution matching (DMD) and its critic
    fake_score: bool = True
    """train a fake score and add the DMD loss (off: pure sCM)"""
    loss_scale_dmd: float = 1.0
    """weight of the DMD loss"""
    p_D: TimeDist = field(default_factory=lambda: TimeDist("shift", shift=5.0))
    """time distribution of DMD, the critic and the random backward-simulation times"""
    student_update_freq: int = 5
    """after the tangent warm-up, one student iteration per this many iterations; the others train the critic"""
    max_simulation_steps: int = 4
    """backward simulation cycles through 1..this many student steps"""
    dmd_fix_timesteps: bool = False
    """backward simulation at the fixed backward_timesteps instead of random draws from p_D (pure DMD prefers it)"""
    backward_timesteps: tuple[float, ...] = (1.5, 1.4, 1.0)
    """intermediate TrigFlow times of the fixed backward simulation and of the few-step sampler"""
    sigma_max: float = 80.0
    """the sampler starts at t = arctan(sigma_max)"""
    preview_every: int = 500
    """toy: iterations between sample previews of the EMA student at 1, 2 and 4 steps, with exact metrics"""


PRESETS = {
    "toy": ("rCM on the toy video world (CPU, minutes): teacher, distillation, exact evaluation", RCMConfig(
        out_dir=Path("runs/toy"), dit=toy.TOY_DIT, iterations=600, batch=16, lr=1e-4, lr_fake=1e-4,
        lr_warmup=20, tangent_warmup=300, student_update_freq=5, teacher_guidance=3.0,
        # The toy's modes are decided at s ≈ 0.85-0.98 (t ≈ 1.4-1.55), and the flow above that drifts every sample
        # towards the heavy modes. Learnt step by step (sCM, or dCM with skip 1) the student misses the drift and
        # flattens the mode weights (README, "Where the flattening comes from"); so, staged as rcm.md recommends, a
        # dCM warm-up whose targets lie 4 teacher steps away carries it, then sCM + DMD.
        dcm_iterations=300, dcm_skip=4,
        # later mid times than rcm.md's (1.5, 1.4, 1.0) leave the last steps to denoise
        backward_timesteps=(1.2, 1.0, 0.6),
        log_every=10, preview_every=200, ckpt_every=200, eval_per_prompt=128,
        # off-mode clips: without them a fifth of the teacher's samples move between two modes (toy.train_teacher)
        teacher_train=toy.TeacherConfig(steps=3000, batch=32, lr=2e-3, hard_fraction=0.5, hard_from=0.85,
                                        off_mode_fraction=0.25))),
    # rcm.md's defaults, the 14B values from NVlabs/rcm's wan2pt1_t2v experiment config
    "wan1.3b": ("rCM of Wan2.1 T2V 1.3B at 480p (torchrun, 1+ GPUs; needs --teacher-ckpt, --data, --neg-embed)",
                RCMConfig(out_dir=Path("runs/wan1.3b"), dit=CONFIGS["t2v-1.3B"], task="wan", precision="bf16",
                          checkpointing="block")),
    "wan14b": ("rCM of Wan2.1 T2V 14B at 480p (torchrun, 8+ GPUs; needs --teacher-ckpt, --data, --neg-embed)",
               RCMConfig(out_dir=Path("runs/wan14b"), dit=CONFIGS["t2v-14B"], task="wan", precision="bf16",
                         checkpointing="matmul", cp_size=8, lr=1e-6, lr_fake=1e-7, tangent_warmup=0,
                         student_update_freq=10, sigma_max=200.0, p_G=TimeDist("lognormal", p_mean=1.5, p_std=1.6),
                         ckpt_every=250)),
}


# ------------------------------------------------------------------------------------------------ bookkeeping
def is_student_iteration(cfg: RCMConfig, i: int) -> bool:
    """Iteration i trains the student iff there is no critic, the tangent warm-up runs, or its turn has come."""
    return not cfg.fake_score or i < cfg.tangent_warmup or (i - cfg.tangent_warmup) % cfg.student_update_freq == 0


def effective_iteration(cfg: RCMConfig, i: int) -> int:
    """At a student iteration: the number of student iterations before it (drives the EMA and the cycle of
    simulation steps). At a critic iteration i, i − effective_iteration − 1 critic iterations came before it."""
    if not cfg.fake_score or i < cfg.tangent_warmup:
        return i
    return cfg.tangent_warmup + (i - cfg.tangent_warmup) // cfg.student_update_freq


def ema_gamma(sigma_rel: float) -> float:
    """EDM2 power-function EMA: the exponent γ with σ_rel² = (γ + 1)/((γ + 2)²(γ + 3)), found by bisection."""
    if not 0 < sigma_rel < 12**-0.5:
        raise ValueError(f"ema_sigma_rel must lie in (0, {12**-0.5:.3f}), got {sigma_rel}")
    lo, hi = 0.0, 1e9
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel**2 else (lo, mid)
    return lo


@torch.no_grad()
def ema_update(ema: WanModel, net: WanModel, n: int, gamma: float):
    """θ_ema ← β·θ_ema + (1 − β)·θ with β = (1 − 1/(n + 1))^(γ + 1) at effective iteration n (n = 0 copies).
    Works shard by shard on FSDP nets (the EMA is sharded as the student)."""
    beta = (1 - 1 / (n + 1)) ** (gamma + 1)
    local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # FSDP: this rank's shards, alike on both nets
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        local(p_ema).lerp_(local(p).to(p_ema.dtype), 1 - beta)


# ---------------------------------------------------------------------------------------------------- setup
def check_config(cfg: RunConfig):
    """Every user mistake that can be seen before loading anything, as one clear message."""
    if cfg.batch % cfg.grad_accum:
        raise ValueError(f"--batch {cfg.batch} is not divisible by --grad-accum {cfg.grad_accum}: each rank splits "
                         f"its batch into grad_accum equal micro-batches")
    if cfg.dit.num_heads % cfg.cp_size:
        raise ValueError(f"the model has {cfg.dit.num_heads} attention heads, not divisible by --cp-size "
                         f"{cfg.cp_size}: pick a divisor of {cfg.dit.num_heads}")
    if cfg.task == "wan":
        for flag, path in (("--teacher-ckpt", cfg.teacher_ckpt), ("--data", cfg.data), ("--neg-embed", cfg.neg_embed)):
            if path is None:
                raise ValueError(f"a Wan run needs {flag} (see --help)")
    if cfg.toy_data_clips and cfg.task != "toy":
        raise ValueError("--toy-data-clips writes clips of the toy world: it needs --task toy")
    if cfg.toy_data_clips and cfg.data is None:
        raise ValueError("--toy-data-clips writes shards to --data: pass --data DIR")
    for flag, path in (("--teacher-ckpt", cfg.teacher_ckpt), ("--student-ckpt", cfg.student_ckpt),
                       ("--neg-embed", cfg.neg_embed), ("--data", None if cfg.toy_data_clips else cfg.data)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")


def toy_teacher_path(cfg: RunConfig) -> Path:
    """The cached toy teacher for this world, DiT and training config."""
    key = hashlib.sha1(repr((cfg.world, cfg.dit, cfg.teacher_train)).encode()).hexdigest()[:10]
    return Path("checkpoints") / f"toy_teacher_{key}.safetensors"


def prepare_teacher(cfg: RunConfig, d: parallel.Dist, world: toy.World | None) -> Path:
    """The teacher's checkpoint: --teacher-ckpt, or in the toy world the cached toy teacher (trained first if missing);
    toy runs with --toy-data-clips also get their shards written. Rank 0 does the work, the others wait."""
    path = cfg.teacher_ckpt
    if world is not None and path is None:
        path = toy_teacher_path(cfg)
        if d.is_main and not path.exists():
            tqdm.write(f"no cached toy teacher: training one ({cfg.teacher_train.steps} steps) -> {path}")
            toy.train_teacher(world, cfg.teacher_train, cfg.dit, path, d.device, log=tqdm.write)
    if d.is_main and cfg.toy_data_clips and not any(Path(cfg.data).glob("shard*.tar")):
        write_toy_shards(cfg, world)
    dist.barrier()
    return path


def read_weights(d: parallel.Dist, path, dit: WanConfig) -> dict:
    """Rank 0 reads a checkpoint (official key names) and checks it against the config; the other ranks get {}.
    A bad file raises on every rank (rank 0 with the message), never leaving the others waiting."""
    state_dict, error = {}, None
    if d.is_main:
        try:
            state_dict = read_state_dict(path, patch_size=dit.patch_size)
            with torch.device("meta"):
                check_state_dict(WanModel(dit), state_dict, f"checkpoint {path} does not match --dit:")
        except (OSError, ValueError) as e:
            error = e
    failed = torch.tensor(float(error is not None), device=d.device)
    dist.all_reduce(failed)
    if failed.item():
        raise error or RuntimeError(f"rank 0 could not load {path} (its message says why)")
    return state_dict


def build_net(cfg: RunConfig, d: parallel.Dist, state_dict: dict, role: Literal["teacher", "trained", "ema"]):
    """One net, built on the meta device (nothing allocated), wrapped, sharded by FSDP2 over all ranks, then filled
    from rank 0's full state dict. trained (student, fake score): fp32 masters, checkpointed activations; teacher:
    frozen, stored in bf16 under bf16 precision; ema: fp32, never differentiated."""
    bf16 = cfg.precision == "bf16"
    with torch.device("meta"):
        net = WanModel(cfg.dit)
    if role == "teacher" and bf16:
        net.to(torch.bfloat16)
    net.requires_grad_(role == "trained").train(role == "trained")
    if role == "trained":
        parallel.checkpoint_activations(net, cfg.checkpointing)
    if cfg.cp_size > 1:
        parallel.context_parallel(net, d.cp_group)
    if cfg.compile and role != "ema":  # the EMA only samples previews, at other batch sizes
        for block in net.blocks:
            block.compile()
    # a bf16-stored teacher computes in its own dtype; fp32 masters are gathered in bf16 under bf16 precision
    parallel.shard_model(net, d.fsdp_mesh, compute_dtype=torch.bfloat16 if bf16 and role != "teacher" else None)
    net.to_empty(device=d.device)
    parallel.load_full_state_dict(net, state_dict)
    return net


@dataclass
class Nets:
    """The four networks of rCM and the optimisers and LR schedules of the two that train (fake: None when off)."""
    teacher: WanModel
    student: WanModel
    fake: WanModel | None
    ema: WanModel
    opt_student: torch.optim.Optimizer
    sched_student: torch.optim.lr_scheduler.LRScheduler
    opt_fake: torch.optim.Optimizer | None
    sched_fake: torch.optim.lr_scheduler.LRScheduler | None


def adamw(cfg: RCMConfig, net: WanModel, lr: float):
    """Fused AdamW with a linear warm-up to lr, then constant (cfg: betas, weight_decay, lr_warmup; train_causal.py
    passes its stage configs)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg.lr_warmup))


def build_nets(cfg: RCMConfig, d: parallel.Dist, teacher_sd: dict, student_sd: dict) -> Nets:
    """Teacher, student, fake score (from the teacher's weights) and EMA (from the student's); state dicts on rank 0."""
    teacher = build_net(cfg, d, teacher_sd, "teacher")
    student = build_net(cfg, d, student_sd, "trained")
    fake = build_net(cfg, d, teacher_sd, "trained") if cfg.fake_score else None
    ema = build_net(cfg, d, student_sd, "ema")
    opt_s, sched_s = adamw(cfg, student, cfg.lr)
    opt_f, sched_f = adamw(cfg, fake, cfg.lr_fake) if fake is not None else (None, None)
    return Nets(teacher, student, fake, ema, opt_s, sched_s, opt_f, sched_f)


def read_negative_embedding(path: Path, text_dim: int) -> torch.Tensor:
    """The negative-prompt embedding [L, text_dim] from a .safetensors file holding one tensor, or a .pt/.pth file
    holding a tensor (or a dict with one), read with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors":
        content = load_file(path)
    elif path.suffix in (".pt", ".pth"):
        content = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"--neg-embed {path}: use a .safetensors or .pt file")
    if isinstance(content, dict):
        if len(content) != 1:
            raise ValueError(f"--neg-embed {path} holds {len(content)} tensors ({', '.join(content)}); expected one")
        content = next(iter(content.values()))
    emb = content.float()
    while emb.ndim > 2 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.ndim != 2 or emb.shape[1] != text_dim:
        raise ValueError(f"--neg-embed {path} has shape {tuple(content.shape)}; expected [L, {text_dim}]")
    return emb


def data_stream(cfg: RunConfig, d: parallel.Dist, world: toy.World | None, start_batch: int):
    """(draw, skipped): draw() -> one micro-batch (x0 [b,C,T,H,W], cond [b,L,D], uncond [b,L',D]) on the device,
    b = batch/grad_accum; skipped counts the corrupt samples and shards the loader passed over (the caller clears
    it). Shards are split by data-parallel rank and resume after `start_batch` micro-batches; the toy world without
    --data draws fresh clips from the global RNG (seeded per micro-batch)."""
    micro, skipped = cfg.batch // cfg.grad_accum, {"data/bad_samples": 0, "data/bad_shards": 0}
    if world is not None:
        negative = world.negative
    else:
        negative = read_negative_embedding(cfg.neg_embed, cfg.dit.text_dim)
    uncond = negative.to(d.device).expand(micro, -1, -1)
    if cfg.data is None:
        def draw():
            x0, cond, _ = toy.sample_data(world, micro)
            return x0.to(d.device), cond.to(d.device), uncond
        return draw, skipped

    loader = make_loader(DataConfig(path=str(cfg.data), batch_size=micro, num_workers=cfg.num_workers,
                                    shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed),
                         rank=d.dp_rank, world=d.dp_size, start_batch=start_batch)

    def draw():
        b = next(loader)
        skipped["data/bad_samples"] += b["bad_samples"]
        skipped["data/bad_shards"] += b["bad_shards"]
        x0, cond = b["latent"], b["embed"]
        if x0.shape[1] != cfg.dit.in_dim or cond.shape[-1] != cfg.dit.text_dim:
            raise ValueError(f"--data latents have {x0.shape[1]} channels and embeddings width {cond.shape[-1]}; "
                             f"the model takes {cfg.dit.in_dim} and {cfg.dit.text_dim}")
        return x0.to(d.device), cond.to(d.device), uncond
    return draw, skipped


def write_toy_shards(cfg: RunConfig, world: toy.World):
    """--toy-data-clips clips of the toy world (drawn from a generator seeded by --seed) as shards in --data."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x0, cond, prompt = toy.sample_data(world, cfg.toy_data_clips, generator=gen)
    samples = ((x0[k], cond[k], f"toy prompt {prompt[k].item()}") for k in range(cfg.toy_data_clips))
    write_shards(samples, cfg.data, samples_per_shard=-(-cfg.toy_data_clips // 16))


# ------------------------------------------------------------------------------------------------- one iteration
def micro_batches(cfg: RunConfig, d: parallel.Dist, i: int, draw):
    """The grad_accum micro-batches of iteration i. The RNG is seeded right before each is drawn (a generator runs
    on demand), so its data, noise and times depend only on (seed, i, global micro-batch index)."""
    for m in range(cfg.grad_accum):
        parallel.seed_everything(cfg.seed, d, i, m, cfg.grad_accum)
        yield draw()


COUNTS = ("scm/nan_samples", "data/bad_samples", "data/bad_shards")  # metrics that add up (the others are means)


def accumulate_metrics(metrics: dict, record: dict, n: int):
    """Add one of n micro-batches' metrics into `metrics`."""
    for k, v in record.items():
        metrics[k] = metrics.get(k, 0.0) + (v if k in COUNTS else v / n)


def student_step(cfg: RCMConfig, nets: Nets, batches, i: int) -> dict:
    """One student iteration: on each micro-batch (x0, cond, uncond) of `batches`, the sCM (or dCM) loss and, after
    the tangent warm-up, the DMD loss through a backward simulation of 1..max_simulation_steps student steps; their
    gradients accumulate into one AdamW step, then the EMA follows. Returns the metrics (micro-batch means)."""
    n_eff = effective_iteration(cfg, i)
    nets.opt_student.zero_grad(set_to_none=True)
    metrics = {}
    for x0, cond, uncond in batches:
        f_student = lambda x, t: denoise(nets.student, x, t, cond)[0]
        record = {}
        loss = torch.zeros((), device=x0.device, dtype=torch.float64)
        if cfg.loss_scale > 0:
            F_teacher = lambda x, t: guided_denoise(nets.teacher, x, t, cond, uncond, cfg.teacher_guidance)[1]
            if i < cfg.dcm_iterations:
                l_cm = dcm_loss(nets.student, cond, F_teacher, x0, cfg.dcm_total_steps, cfg.dcm_skip, cfg.dcm_shift,
                                cfg.loss_scale)
                record["loss/dcm"] = l_cm.mean().item()
            else:
                r = 1.0 if cfg.tangent_warmup == 0 else min(1.0, i / cfg.tangent_warmup)
                l_cm, n_nan = scm_loss(nets.student, cond, F_teacher, x0, cfg.p_G, r, cfg.loss_scale)
                record.update({"loss/scm": l_cm.mean().item(), "scm/nan_samples": n_nan, "scm/r": r})
            loss = loss + l_cm.mean()
        if cfg.fake_score and i >= cfg.tangent_warmup:
            n_sim = n_eff % cfg.max_simulation_steps + 1
            fixed = cfg.backward_timesteps if cfg.dmd_fix_timesteps else None
            G = rcm_sample(f_student, torch.randn_like(x0), simulation_times(n_sim, len(x0), cfg.p_D, fixed),
                           grad_last=True)
            l_dmd = dmd_loss(G, lambda x, t: denoise(nets.fake, x, t, cond)[0],
                             lambda x, t: guided_denoise(nets.teacher, x, t, cond, uncond, cfg.teacher_guidance)[0],
                             cfg.p_D, cfg.loss_scale_dmd)
            record.update({"loss/dmd": l_dmd.mean().item(), "dmd/steps": n_sim})
            loss = loss + l_dmd.mean()
        if loss.requires_grad:  # (pure DMD has no student loss during the tangent warm-up)
            (loss / cfg.grad_accum).backward()
        accumulate_metrics(metrics, record, cfg.grad_accum)
    nets.opt_student.step()
    nets.sched_student.step()
    ema_update(nets.ema, nets.student, n_eff, ema_gamma(cfg.ema_sigma_rel))
    return {**metrics, "lr": nets.sched_student.get_last_lr()[0]}


def critic_step(cfg: RCMConfig, nets: Nets, batches, i: int) -> dict:
    """One critic iteration: on each micro-batch, a no-grad backward simulation of the student, then the fake
    score's denoising loss on its samples; one AdamW step. Returns the metrics (micro-batch means)."""
    n_sim = (i - effective_iteration(cfg, i) - 1) % cfg.max_simulation_steps + 1  # cycles over the critic's iterations
    fixed = cfg.backward_timesteps if cfg.dmd_fix_timesteps else None
    nets.opt_fake.zero_grad(set_to_none=True)
    metrics = {}
    for x0, cond, _ in batches:
        f_student = lambda x, t: denoise(nets.student, x, t, cond)[0]
        G = rcm_sample(f_student, torch.randn_like(x0), simulation_times(n_sim, len(x0), cfg.p_D, fixed))
        l_fake = critic_loss(G, lambda x, t: denoise(nets.fake, x, t, cond)[0], cfg.p_D).mean()
        (l_fake / cfg.grad_accum).backward()
        accumulate_metrics(metrics, {"loss/critic": l_fake.item(), "critic/steps": n_sim}, cfg.grad_accum)
    nets.opt_fake.step()
    nets.sched_fake.step()
    return {**metrics, "lr_fake": nets.sched_fake.get_last_lr()[0]}


def reduce_metrics(record: dict, d: parallel.Dist) -> dict:
    """Average the training metrics over the data-parallel ranks (counts add up; a CP group counts its clip once)."""
    keys = [k for k in record if k != "iteration"]
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(values)
    world = d.dp_size * d.cp_size
    return {"iteration": record["iteration"], **{k: v / (d.cp_size if k in COUNTS else world)
                                                 for k, v in zip(keys, values.tolist())}}


# ------------------------------------------------------------------------------------------------- sampling
def student_sample(net: WanModel, context, n_steps: int, shape, sigma_max: float, mid_t, seed: int, device):
    """The rCM few-step sampler with the student's consistency function f = x̂0, seeded."""
    gen = torch.Generator(device).manual_seed(seed)
    eps = torch.randn((len(context), *shape), generator=gen, device=device)
    f = lambda x, t: denoise(net, x, t, context)[0]
    return rcm_sample(f, eps, sampling_times(n_steps, len(context), sigma_max, mid_t), generator=gen)


@torch.no_grad()
def preview(cfg: RCMConfig, world: toy.World, ema: WanModel, i: int, device, save_grids: bool) -> dict:
    """Previews of the EMA student at 1, 2 and 4 steps: gif grids (rows = prompts) and exact toy metrics."""
    prompt, context = toy.eval_prompts(world, 64)
    out = {}
    for n in (1, 2, 4):
        x = student_sample(ema, context.to(device), n, world.cfg.shape, cfg.sigma_max, cfg.backward_timesteps,
                           seed=1, device=device).cpu()
        m = toy.metrics(world, x, prompt)
        out.update({f"preview/{n}step/{k}": v for k, v in m.items()})
        if save_grids:
            grid = x.view(world.cfg.prompts, 64, *x.shape[1:])[:, :8].flatten(0, 1)
            toy.save_grid(world, grid, world.cfg.prompts, cfg.out_dir / "previews" / f"{i:06d}_{n}step.gif")
    return out


@torch.no_grad()
def evaluate(cfg: RCMConfig, world: toy.World, teacher: WanModel, ema: WanModel, device) -> dict:
    """Exact metrics of the exact-velocity sampler (ground truth, 200 Euler steps, no CFG), the 50-step CFG
    teacher and the EMA student at 1, 2 and 4 steps, on eval_per_prompt samples per prompt."""
    prompt, context = toy.eval_prompts(world, cfg.eval_per_prompt)
    exact = functools.partial(toy.exact_velocity, world)
    samples = {
        "exact": toy.teacher_sample(exact, world, prompt, 1.0, 200, 1.0, seed=2, device=device),
        "teacher-50": toy.teacher_sample(teacher, world, prompt, cfg.teacher_guidance, 50, 5.0, seed=2,
                                         device=device),
    }
    for n in (1, 2, 4):
        samples[f"student-{n}"] = student_sample(ema, context.to(device), n, world.cfg.shape, cfg.sigma_max,
                                                 cfg.backward_timesteps, seed=2, device=device).cpu()
    return {name: toy.metrics(world, x, prompt) for name, x in samples.items()}


def print_table(results: dict):
    print(f"{'sampler':<12}{'precision':>10}{'wrong':>8}{'mode TV':>9}{'mean ρ':>8}")
    for name, m in results.items():
        print(f"{name:<12}{m['precision']:>10.3f}{m['wrong_prompt']:>8.3f}{m['mode_tv']:>9.3f}{m['mean_rho']:>8.3f}")


# ------------------------------------------------------------------------------------------ checkpoints (resume)
def training_state(nets: Nets) -> dict:
    """What parallel.save_training_state / load_training_state keep, besides the counters and RNG states."""
    trained = {"student": (nets.opt_student, nets.sched_student)}
    if nets.fake is not None:
        trained["fake"] = (nets.opt_fake, nets.sched_fake)
    return dict(nets={"ema": nets.ema, **{name: getattr(nets, name) for name in trained}},
                optimizers={name: opt for name, (opt, _) in trained.items()},
                schedulers={name: sched for name, (_, sched) in trained.items()})


def save_state(cfg: RunConfig, d: parallel.Dist, nets: Nets, iteration: int, data_batches: int):
    """state/{iteration}/ (every rank writes its shards), then state/latest.json names it (written atomically, so a
    run killed mid-save resumes from the previous one) and older folders go; the EMA student is gathered to rank 0
    and exported as ema.safetensors (official key names)."""
    folder = cfg.out_dir / "state" / f"{iteration:09d}"
    parallel.save_training_state(folder, **training_state(nets),
                                 counters={"iteration": iteration, "data_batches": data_batches})
    ema = parallel.full_state_dict(nets.ema)
    if d.is_main:
        latest = cfg.out_dir / "state" / "latest.json"
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"folder": folder.name, "iteration": iteration, "processes": dist.get_world_size()}))
        tmp.replace(latest)
        for old in (cfg.out_dir / "state").iterdir():
            if old.is_dir() and old.name != folder.name:
                shutil.rmtree(old)
        save_checkpoint(ema, cfg.out_dir / "ema.safetensors.tmp")
        (cfg.out_dir / "ema.safetensors.tmp").replace(cfg.out_dir / "ema.safetensors")
    dist.barrier()


def load_state(cfg: RunConfig, nets: Nets) -> tuple[int, int]:
    """Restore the newest checkpoint of the run folder, if any. Returns (iteration, data micro-batches consumed)."""
    latest = cfg.out_dir / "state" / "latest.json"
    if not latest.exists():
        return 0, 0
    info = json.loads(latest.read_text())
    if info["processes"] != dist.get_world_size():
        raise ValueError(f"{cfg.out_dir} was checkpointed by {info['processes']} processes; resume it on as many "
                         f"(this run has {dist.get_world_size()}) or pick another --out-dir")
    counters = parallel.load_training_state(cfg.out_dir / "state" / info["folder"], **training_state(nets),
                                            counters={"iteration": 0, "data_batches": 0})
    return counters["iteration"], counters["data_batches"]


# ---------------------------------------------------------------------------------------------------- training
def train(cfg: RCMConfig) -> dict:
    """Run (or resume) the distillation; returns the toy evaluation ({} without one). Joins torchrun's process group,
    or makes a one-process one for the run (an existing group, e.g. a test's, is used and left as it is)."""
    check_config(cfg)
    own_group = not dist.is_initialized()
    try:
        return run(cfg, parallel.init_distributed(cfg.cp_size, cfg.device))
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: RCMConfig, d: parallel.Dist) -> dict:
    """Set up (toy teacher and shards if asked, nets, resume, data), the training loop, the toy evaluation."""
    world = toy.make_world(cfg.world) if cfg.task == "toy" else None
    teacher_path = prepare_teacher(cfg, d, world)
    teacher_sd = read_weights(d, teacher_path, cfg.dit)
    student_sd = teacher_sd if cfg.student_ckpt is None else read_weights(d, cfg.student_ckpt, cfg.dit)
    nets = build_nets(cfg, d, teacher_sd, student_sd)
    del teacher_sd, student_sd

    # Resume: weights, optimisers, schedules, counters; the random draws are seeded per iteration, the data stream
    # skips what the interrupted run consumed, so the continued run repeats the losses it would have had.
    start, start_batches = load_state(cfg, nets)
    log_path = cfg.out_dir / "metrics.jsonl"
    if d.is_main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        if start:
            tqdm.write(f"resumed from {cfg.out_dir / 'state'} at iteration {start}")
        if log_path.exists():  # drop log lines written after the checkpoint by the interrupted run
            lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["iteration"] < start]
            log_path.write_text("".join(ln + "\n" for ln in lines))
    draw, skipped = data_stream(cfg, d, world, start_batches)

    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="rCM", disable=not d.is_main)
    t0 = time.time()
    for i in bar:
        step = student_step if is_student_iteration(cfg, i) else critic_step
        record = {"iteration": i, **step(cfg, nets, micro_batches(cfg, d, i, draw), i), **skipped}
        skipped.update({k: 0 for k in skipped})

        previewing = cfg.task == "toy" and ((i + 1) % cfg.preview_every == 0 or i + 1 == cfg.iterations)
        if i % cfg.log_every == 0 or previewing:
            record = reduce_metrics(record, d)
            if previewing:
                record.update(preview(cfg, world, nets.ema, i + 1, d.device, save_grids=d.is_main))
            record["time_s"] = round(time.time() - t0, 2)
            if d.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")})
        if (i + 1) % cfg.ckpt_every == 0 or i + 1 == cfg.iterations:
            save_state(cfg, d, nets, i + 1, start_batches + (i + 1 - start) * cfg.grad_accum)

    if cfg.task == "wan" or cfg.eval_per_prompt == 0:
        return {}
    results = evaluate(cfg, world, nets.teacher, nets.ema, d.device)
    if d.is_main:
        (cfg.out_dir / "eval.json").write_text(json.dumps(results, indent=2))
        print_table(results)
    return results


if __name__ == "__main__":
    train(tyro.extras.overridable_config_cli(PRESETS))
