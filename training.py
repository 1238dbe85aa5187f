"""What train_rcm.py and train_causal.py share: the run config, the nets (built on the meta device, FSDP2-sharded
over all ranks, filled from rank 0's read of each checkpoint), the optimiser and the EMA, the data stream, metrics,
saving and resuming, and the one training loop, which takes the method's step as a parameter.

The processes form a (data-parallel × context-parallel) mesh (parallel.py); with --cp-size P each clip's tokens are
split over P ranks, which see the same clip, noise and times. Every random draw of micro-batch m of iteration i comes
from a stream seeded by (seed, i, global micro-batch index): N ranks equal one process with N-fold gradient
accumulation, and a resumed run redraws what the interrupted one drew. A run folder holds metrics.jsonl, state/ (a
torch.distributed.checkpoint folder and latest.json: rerun the same command, on as many processes), ema.safetensors
(official key names, the run's sampling settings in its metadata), run.json (the settings a rerun must keep), .lock
(held while a run uses the folder) and previews/.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
import tyro
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import parallel
import toy
from toy import ToyRun
from checkpoint import save_checkpoint
from data import DataConfig, data_shape, list_shards, make_loader
from model import (CONFIGS, EXPERT_FOLDERS, TwoExperts, WanConfig, WanModel, expert_folders, load_checkpoint,
                   load_two_experts, read_checked)
from text_encoder import read_negative_embedding


@dataclass
class RunConfig:
    """What a training run needs besides its method: checkpoints, data, scale-out, logging, the toy world."""
    out_dir: Path = Path("runs/rcm")  # run folder: metrics.jsonl, state/ (resume), ema.safetensors, previews/
    teacher_ckpt: Path | None = None  # teacher weights (folder, .safetensors, .index.json, .pt); toy: cached
    student_ckpt: Path | None = None  # start the (first) trained net from these weights, not the teacher's
    dit: WanConfig = field(default_factory=WanConfig)  # network config of the trained nets (student, fake score, EMA)
    teacher_model: str | None = None  # the teacher's architecture if not --dit: a name in model.CONFIGS (t2v-14B)
    boundary: float | None = None
    """two experts (Wan2.2 A14B): every net is a high- and a low-noise expert of --dit's architecture, switched at this
    rectified-flow time (t2v-A14B 0.875, i2v-A14B 0.9); checkpoints are folders with high_noise_model/ and
    low_noise_model/, and so is the exported EMA (ema/)"""
    device: Literal["cuda", "cpu"] = "cuda" if torch.cuda.is_available() else "cpu"  # cuda (NCCL) or cpu (gloo)
    seed: int = 0  # seed of every random draw (noise, times, data order; the toy world's clips)

    # data
    data: Path | None = None  # folder of shard*.tar (data.py's format); toy: unset = fresh exact draws
    neg_embed: Path | None = None  # negative-prompt umT5 embedding [L,4096]: the teacher's CFG input (Wan)
    num_workers: int = 2  # data reader processes per rank
    shuffle_buffer: int = 64  # samples held for shuffling inside a data reader
    toy: tyro.conf.AvoidSubcommands[ToyRun | None] = None  # the toy world (data, teacher, exact eval); None: Wan

    # scale-out
    precision: Literal["bf16", "fp32"] = "fp32"  # bf16: fp32 masters, bf16 compute and teacher; fp32: all fp32
    cp_size: int = 1  # Ulysses context-parallel ranks per clip (divides processes and heads)
    cp_head_groups: int = 1  # Ulysses: pipeline each attention's all-to-alls over this many groups of heads
    checkpointing: Literal["none", "block", "attention", "matmul"] = "none"  # activation checkpointing, trained nets
    compile: bool = False  # torch.compile every transformer block (the attention kernel launch stays eager)
    batch: int = 1  # clips per iteration on each data-parallel rank
    grad_accum: int = 1  # micro-batches per rank's batch, gradients accumulated (less activation memory)

    # logging
    log_every: int = 10  # iterations between lines of metrics.jsonl (losses averaged over the ranks)
    log: Literal["none", "tensorboard", "wandb"] = "none"  # also send metrics.jsonl's scalars there (if installed)
    ckpt_every: int = 500  # iterations between checkpoints (state/ and ema.safetensors)
    accept_changes: bool = False  # rerunning a run folder with other settings (e.g. a new --lr) continues it with them


@dataclass
class Optim:
    """AdamW with a linear LR warm-up, and the power-function EMA (EDM2) of the trained net."""
    iterations: int = 2000  # iterations of the run (or stage)
    lr: float = 2e-6  # AdamW learning rate of the trained net
    betas: tuple[float, float] = (0.0, 0.999)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    lr_warmup: int = 100  # linear learning-rate warm-up (optimizer steps), then constant
    ema_sigma_rel: float = 0.1  # relative width σ_rel of the power-function EMA (EDM2)


def check_positive(cfg, *names: str, prefix: str = ""):
    """One clear message for a count flag (--{prefix}{name}) that must be at least 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{prefix}{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def check_config(cfg: RunConfig):
    """Every user mistake that can be seen before loading anything, as one clear message."""
    check_positive(cfg, "batch", "grad_accum", "cp_size", "log_every", "ckpt_every")
    if cfg.toy is not None and cfg.toy.preview_every < 0:
        raise ValueError(f"--toy.preview-every must be 0 (no previews) or more, got {cfg.toy.preview_every}")
    if cfg.log != "none":
        try:
            __import__({"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[cfg.log])
        except ImportError:
            raise ValueError(f"--log {cfg.log} needs the {cfg.log} package: pip install {cfg.log} (or --log none)") \
                from None
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this machine has no CUDA GPU: pass --device cpu")
    if cfg.batch % cfg.grad_accum:
        raise ValueError(f"--batch {cfg.batch} is not divisible by --grad-accum {cfg.grad_accum}: each rank splits "
                         f"its batch into grad_accum equal micro-batches")
    if cfg.dit.model_type not in ("t2v", "i2v"):
        raise ValueError(f"--dit.model-type {cfg.dit.model_type}: the trainers distil Wan's t2v and i2v models (Wan2.2's "
                         f"ti2v-5B conditions by its first frame's timestep, which they do not build)")
    if cfg.toy is not None and cfg.dit.model_type == "i2v" and cfg.dit.clip:
        raise ValueError("the toy world has no CLIP image features: an image-to-video toy DiT needs --dit.no-clip "
                         "(the toy-i2v config)")
    if cfg.teacher_model is not None:
        if cfg.teacher_model not in CONFIGS:
            raise ValueError(f"--teacher-model {cfg.teacher_model!r}: use one of {', '.join(CONFIGS)}")
        t, s = CONFIGS[cfg.teacher_model], cfg.dit
        if (t.model_type, t.in_dim, t.out_dim, t.text_dim, t.patch_size) != (s.model_type, s.in_dim, s.out_dim,
                                                                              s.text_dim, s.patch_size):
            raise ValueError(f"--teacher-model {cfg.teacher_model} and --dit differ in what they take or make (type, "
                             f"channels, text width, patch): a teacher of another size must share them")
        if t.num_heads % cfg.cp_size:
            raise ValueError(f"the teacher has {t.num_heads} attention heads, not divisible by --cp-size {cfg.cp_size}")
        if t != s and cfg.student_ckpt is None and cfg.toy is None:
            raise ValueError(f"the student (--dit) is another size than the teacher ({cfg.teacher_model}): pass its "
                             f"base weights with --student-ckpt (e.g. Wan2.1-T2V-1.3B)")
    if cfg.boundary is not None and not 0 < cfg.boundary < 1:
        raise ValueError(f"--boundary is a rectified-flow time strictly between 0 and 1, got {cfg.boundary}")
    if cfg.boundary is not None and cfg.teacher_model is not None and CONFIGS[cfg.teacher_model] != cfg.dit:
        raise ValueError("a two-expert run (--boundary) distils each expert into one of the same size: drop "
                         "--teacher-model")
    if cfg.dit.num_heads % cfg.cp_size:
        raise ValueError(f"the model has {cfg.dit.num_heads} attention heads, not divisible by --cp-size "
                         f"{cfg.cp_size}: pick a divisor of {cfg.dit.num_heads}")
    if cfg.toy is None:
        for flag, path in (("--teacher-ckpt", cfg.teacher_ckpt), ("--data", cfg.data), ("--neg-embed", cfg.neg_embed)):
            if path is None:
                raise ValueError(f"a Wan run needs {flag} (see --help)")
    elif cfg.toy.data_clips and cfg.data is None:
        raise ValueError("--toy.data-clips writes shards to --data: pass --data DIR")
    for flag, path in (("--teacher-ckpt", cfg.teacher_ckpt), ("--student-ckpt", cfg.student_ckpt),
                       ("--neg-embed", cfg.neg_embed),
                       ("--data", None if cfg.toy is not None and cfg.toy.data_clips else cfg.data)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")


def run_in_process_group(cfg: RunConfig, run: Callable[[parallel.Dist], dict]) -> dict:
    """run(d) in torchrun's process group, or in a one-process group made for it (an existing group, e.g. a test's,
    is used and left as it is), holding the run folder's lock."""
    own_group = not dist.is_initialized()
    try:
        d = parallel.init_distributed(cfg.cp_size, cfg.device)
        with run_folder_lock(cfg.out_dir, d):
            return run(d)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def run_folder_lock(folder: Path, d: parallel.Dist):
    """Rank 0 holds an exclusive lock on folder/.lock while the run lasts: a second run started in the same folder
    stops at once, on every rank, instead of deleting the first one's checkpoints mid-save."""
    handle, busy = None, 0.0
    if d.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS if the holder dies: never stale
            handle.seek(0)
            handle.truncate()
            handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            handle.flush()
        except BlockingIOError:
            busy = 1.0
    flag = torch.tensor(busy, device=d.device)
    dist.all_reduce(flag)
    try:
        if flag.item():
            holder = (folder / ".lock").read_text().strip() if d.is_main else "?"
            raise OSError(f"another run ({holder}) is using {folder}: wait for it to end, or pick another --out-dir")
        yield
    finally:
        if handle is not None:
            handle.close()


# Settings a rerun may change without asking: where and how fast it runs, logging, evaluation, and how long it runs.
FREE_SETTINGS = {"out_dir", "device", "compile", "checkpointing", "cp_head_groups", "log_every", "log", "ckpt_every", "accept_changes",
                 "stages", "eval_teacher_steps", "toy.eval_per_prompt", "toy.eval_seed", "toy.preview_every",
                 "toy.cache_dir"}


def flat_settings(cfg) -> dict:
    """A config as {dotted field name: JSON value}."""
    def flat(prefix, value):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                yield from flat(f"{prefix}{f.name}.", getattr(value, f.name))
        else:
            yield prefix[:-1], json.loads(json.dumps(value, default=str))
    return dict(flat("", cfg))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_run_folder(cfg: RunConfig, d: parallel.Dist, inputs: dict | None = None, ignore: tuple[str, ...] = ()):
    """A run folder records its settings (run.json: those that shape what it trains, less the `ignore`d prefixes,
    e.g. another stage's section) and what it was built from (`inputs`, e.g. train_causal's earlier stages).
    Rerunning a folder that holds a checkpoint with changed settings stops with one message listing them, unless
    --accept-changes (the new settings then take effect and are recorded); the architecture never changes."""
    shaping = lambda k: not (k in FREE_SETTINGS or k.split(".")[-1] == "iterations" or k.startswith(ignore))
    record = dict(settings={k: v for k, v in flat_settings(cfg).items() if shaping(k)}, inputs=inputs or {})
    path = cfg.out_dir / "run.json"
    if saved_iteration(cfg.out_dir) and path.exists():
        old = json.loads(path.read_text())["settings"]
        changed = {k: (old.get(k), v) for k, v in record["settings"].items() if old.get(k) != v}
        changes = "; ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in changed.items())
        if any(k.startswith("dit.") for k in changed):
            raise ValueError(f"{cfg.out_dir} holds a run of another architecture ({changes}), whose checkpoints "
                             f"cannot load into this one: pick another --out-dir")
        if changed and not cfg.accept_changes:
            raise ValueError(f"{cfg.out_dir} holds a run with other settings ({changes}): pass --accept-changes to "
                             f"continue it with the new ones, or pick another --out-dir")
        if changed and d.is_main:
            tqdm.write(f"{cfg.out_dir}: continuing with changed settings ({changes})")
    dist.barrier()  # every rank has read the old record
    if d.is_main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))


def recorded_inputs(folder: Path) -> dict | None:
    """The inputs a run folder with a checkpoint was built from (None: no checkpoint, nothing to go stale)."""
    path = folder / "run.json"
    return json.loads(path.read_text())["inputs"] if saved_iteration(folder) and path.exists() else None


def run_identity(folder: Path) -> str | None:
    """What a run folder's EMA is: its recorded settings, inputs and iteration (None: no run.json). A later stage built
    from it records this, and is stale once it changes."""
    path = folder / "run.json"
    if not path.exists():
        return None
    return hashlib.sha1(f"{path.read_text()} {saved_iteration(folder)}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------ the nets
def teacher_arch(cfg: RunConfig) -> WanConfig:
    """The teacher's network config: --teacher-model, else the trained nets' --dit."""
    return CONFIGS[cfg.teacher_model] if cfg.teacher_model is not None else cfg.dit


def checkpoints(cfg: RunConfig, d: parallel.Dist) -> tuple[Path, Path]:
    """(teacher, base of the trained nets): --teacher-ckpt and --student-ckpt (else the teacher). The toy world
    trains and caches what is missing: its teacher at the teacher's size and, for a student of another size, a toy
    teacher of the student's size as its base; toy runs with --toy.data-clips also get their shards written, and
    toy shards must hold the world's clip shape. Rank 0 does the work, the others wait."""
    sizes_differ = teacher_arch(cfg) != cfg.dit
    if cfg.toy is None:
        return cfg.teacher_ckpt, cfg.student_ckpt or cfg.teacher_ckpt

    def prepare():
        if cfg.teacher_ckpt is None:
            toy.cached_teacher(cfg.toy, teacher_arch(cfg), d.device, log=tqdm.write, boundary=cfg.boundary)
        if cfg.student_ckpt is None and sizes_differ:
            toy.cached_teacher(cfg.toy, cfg.dit, d.device, log=tqdm.write)
        if cfg.toy.data_clips and not any(Path(cfg.data).glob("shard*.tar")):
            toy.write_shards(toy.make_world(cfg.toy.world), cfg.toy.data_clips, cfg.data, cfg.seed,
                             image=bool(image_inputs(cfg.dit)))
        if cfg.data is not None:
            found, world = data_shape(list_shards(cfg.data)), toy.make_world(cfg.toy.world).cfg.shape
            if tuple(found) != tuple(world):
                raise ValueError(f"--data {cfg.data} holds clips of shape {found}, and this toy world's are {world}: "
                                 f"pass another --data folder (an empty one gets the world's shards with "
                                 f"--toy.data-clips N)")
    on_main_rank(d, prepare)
    teacher = cfg.teacher_ckpt or toy.teacher_path(cfg.toy, teacher_arch(cfg), cfg.boundary)
    return teacher, cfg.student_ckpt or (toy.teacher_path(cfg.toy, cfg.dit) if sizes_differ else teacher)


def on_main_rank(d: parallel.Dist, work: Callable, default=None):
    """work() on rank 0; the other ranks get `default`. A user error (a bad file, bad data) raises on every rank, rank
    0 with its message, and never leaves the others waiting in a collective."""
    result, error = default, None
    if d.is_main:
        try:
            result = work()
        except (OSError, ValueError) as e:
            error = e
    failed = torch.tensor(float(error is not None), device=d.device)
    dist.all_reduce(failed)
    if failed.item():
        raise error or ValueError("rank 0 stopped the run (its message says why)")
    return result


def read_weights(d: parallel.Dist, path, dit: WanConfig, two_experts: bool = False) -> dict:
    """Rank 0 reads a checkpoint (official key names) and checks it against the config; the other ranks get {}.
    two_experts: a folder with both (model.expert_folders), read as one dict keyed high.* and low.*."""
    def read():
        if not two_experts:
            return read_checked(path, dit, f"checkpoint {path} does not match --dit:")
        return {f"{name}.{k}": v for name, folder in zip(("high", "low"), expert_folders(path))
                for k, v in read_checked(folder, dit, f"expert {folder} does not match --dit:").items()}
    return on_main_rank(d, read, {})


def build_net(cfg: RunConfig, d: parallel.Dist, state_dict: dict, role: Literal["teacher", "trained", "ema"],
              dit: WanConfig):
    """One net, built on the meta device (nothing allocated), wrapped, sharded by FSDP2 over all ranks, then filled
    from rank 0's full state dict (its config: `dit`). trained (student, fake score): fp32 masters, checkpointed
    activations; teacher: frozen, stored in bf16 under bf16 precision; ema: fp32, never differentiated. With
    --boundary, two such nets (each sharded on its own; state dict keys high.*, low.*) routed by model.TwoExperts."""
    if cfg.boundary is not None:
        part = lambda name: {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
        high, low = (build_net(dataclasses.replace(cfg, boundary=None), d, part(name), role, dit)
                     for name in ("high", "low"))
        return TwoExperts(high, low, cfg.boundary, sharded=dist.get_world_size() > 1)
    bf16 = cfg.precision == "bf16"
    with torch.device("meta"):
        net = WanModel(dit)
    if role == "teacher" and bf16:
        net.to(torch.bfloat16)
    net.requires_grad_(role == "trained").train(role == "trained")
    if role == "trained":
        parallel.checkpoint_activations(net, cfg.checkpointing)
    if cfg.cp_size > 1:
        parallel.context_parallel(net, d.cp_group, cfg.cp_head_groups)
    if cfg.compile and role != "ema":  # the EMA only samples previews, at other batch sizes
        for block in net.blocks:
            block.compile()
    # a bf16-stored teacher computes in its own dtype; fp32 masters are gathered in bf16 under bf16 precision
    parallel.shard_model(net, d.fsdp_mesh, compute_dtype=torch.bfloat16 if bf16 and role != "teacher" else None)
    net.to_empty(device=d.device)
    parallel.load_full_state_dict(net, state_dict)
    return net


def load_frozen(cfg: RunConfig, path: Path, dit: WanConfig | None = None) -> WanModel:
    """A plain (unsharded) frozen net (config `dit`, else --dit) on this process's device in the run's precision:
    the toy evaluation runs the exported files, as sample.py does."""
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    if cfg.boundary is not None:
        return load_two_experts(None, path, dtype=dtype, device=cfg.device, arch=dit or cfg.dit, boundary=cfg.boundary)
    return load_checkpoint(WanModel(dit or cfg.dit), path, dtype=dtype).to(cfg.device).requires_grad_(False).eval()


@dataclass
class Nets:
    """The nets of a run: a frozen teacher (None when the method has none), the trained net (the student; the causal
    teacher in stage tf), a fake score (None when off) and the EMA of the trained net; the optimisers and LR schedules
    of the two that train."""
    teacher: WanModel | None
    trained: WanModel
    fake: WanModel | None
    ema: WanModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    opt_fake: torch.optim.Optimizer | None = None
    sched_fake: torch.optim.lr_scheduler.LRScheduler | None = None


def adamw(optim: Optim, net: WanModel, lr: float):
    """Fused AdamW with a linear warm-up to lr, then constant."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / optim.lr_warmup))


def build_nets(cfg: RunConfig, d: parallel.Dist, optim: Optim, *, teacher: Path | dict | None, trained: Path | dict,
               fake: Path | dict | None = None, lr_fake: float = 0.0) -> Nets:
    """The nets from their checkpoints (each file read once, by rank 0; or state dicts, e.g. bench.py's random
    weights): teacher (frozen, teacher_arch), trained net and EMA (from `trained`), fake score (from `fake`, trained
    at lr_fake); the trained nets and the fake score have --dit's config. Each is sharded on its own."""
    weights = {}

    def read(source, dit):
        if isinstance(source, dict):
            return source
        if str(source) not in weights:
            weights[str(source)] = read_weights(d, source, dit, cfg.boundary is not None)
        return weights[str(source)]
    nets = dict(teacher=build_net(cfg, d, read(teacher, teacher_arch(cfg)), "teacher", teacher_arch(cfg))
                if teacher is not None else None,
                trained=build_net(cfg, d, read(trained, cfg.dit), "trained", cfg.dit),
                fake=build_net(cfg, d, read(fake, cfg.dit), "trained", cfg.dit) if fake is not None else None,
                ema=build_net(cfg, d, read(trained, cfg.dit), "ema", cfg.dit))
    opt, sched = adamw(optim, nets["trained"], optim.lr)
    opt_fake, sched_fake = adamw(optim, nets["fake"], lr_fake) if fake is not None else (None, None)
    return Nets(**nets, opt=opt, sched=sched, opt_fake=opt_fake, sched_fake=sched_fake)


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
    """θ_ema ← β·θ_ema + (1 − β)·θ with β = (1 − 1/(n + 1))^(γ + 1) after n earlier updates (n = 0 copies).
    Works shard by shard on FSDP nets (the EMA is sharded as the trained net)."""
    beta = (1 - 1 / (n + 1)) ** (gamma + 1)
    local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # FSDP: this rank's shards, alike on both nets
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        local(p_ema).lerp_(local(p).to(p_ema.dtype), 1 - beta)


def optimizer_step(opt, sched, batches, losses_of, accum: int) -> dict:
    """One AdamW step over an iteration's micro-batches: losses_of(x0, cond, uncond, image) -> (loss, metrics) pairs
    on each (data_stream's micro-batches), their gradients accumulated; then the LR schedule. Each loss is
    backpropagated as soon as it is given, before the next is asked for, so a generator of losses (rCM's sCM, then
    DMD) never holds two losses' activations at once. Returns the metrics (micro-batch means) and the LR."""
    opt.zero_grad(set_to_none=True)
    metrics = {}
    for batch in batches:
        for loss, record in losses_of(*batch):
            (loss / accum).backward()
            accumulate_metrics(metrics, record, accum)
    opt.step()
    opt.zero_grad(set_to_none=True)  # free them now: the other nets' steps (critic, student) run without them
    sched.step()
    return {**metrics, "lr": sched.get_last_lr()[0]}


def student_update(nets: Nets, optim: Optim, n: int, batches, losses_of, accum: int) -> dict:
    """An update of the trained net (optimizer_step), then its EMA after n earlier updates."""
    metrics = optimizer_step(nets.opt, nets.sched, batches, losses_of, accum)
    ema_update(nets.ema, nets.trained, n, ema_gamma(optim.ema_sigma_rel))
    return metrics


def critic_update(nets: Nets, batches, losses_of, accum: int) -> dict:
    """An update of the fake score (optimizer_step); its LR is logged as lr_fake."""
    metrics = optimizer_step(nets.opt_fake, nets.sched_fake, batches, losses_of, accum)
    metrics["lr_fake"] = metrics.pop("lr")
    return metrics


def sampling_settings(cfg: RunConfig, **method) -> dict:
    """What the exported EMA carries for sample.py (its defaults): the architecture, the precision, the toy world's
    evaluation (world, samples per prompt, seed) and the method's sampler settings."""
    settings = {"dit": dataclasses.asdict(cfg.dit), "dtype": "bfloat16" if cfg.precision == "bf16" else "float32",
                **({"boundary": cfg.boundary} if cfg.boundary is not None else {}), **method}
    if cfg.toy is not None:
        settings["toy"] = {"world": dataclasses.asdict(cfg.toy.world), "seed": cfg.toy.eval_seed}
        if cfg.toy.eval_per_prompt:  # (a run without an evaluation leaves sample.py its own default)
            settings["toy"]["num_samples"] = cfg.toy.eval_per_prompt
    return settings


# ------------------------------------------------------------------------------------------------------ data
def image_inputs(dit: WanConfig) -> dict:
    """{net keyword: data key} of the conditioning an image-to-video DiT takes besides the text (none for T2V)."""
    if dit.model_type != "i2v":
        return {}
    return {"y": "y", "clip_fea": "clip"} if dit.clip else {"y": "y"}


def data_stream(cfg: RunConfig, d: parallel.Dist, start_batch: int):
    """(draw, skipped): draw() -> one micro-batch (x0 [b,C,T,H,W], cond [b,L,D], uncond [b,L',D], image) on the
    device, b = batch/grad_accum, image: the I2V conditioning as the nets' keyword arguments ({"y": [b,20,T,H,W],
    "clip_fea": [b,257,1280]}; {} for T2V; the trainers bind it with samplers.conditioned); skipped counts the corrupt samples and shards the loader passed over (the caller clears
    it). Shards are split by data-parallel rank and resume after `start_batch` micro-batches; the toy world without
    --data draws fresh clips from the global RNG (seeded per micro-batch)."""
    micro = cfg.batch // cfg.grad_accum
    skipped = {"data/bad_samples": 0, "data/wrong_shape": 0, "data/bad_shards": 0}
    world = toy.make_world(cfg.toy.world) if cfg.toy is not None else None
    negative = world.negative if world is not None and cfg.neg_embed is None else \
        read_negative_embedding(cfg.neg_embed, cfg.dit.text_dim)
    uncond = negative.to(d.device).expand(micro, -1, -1)
    inputs = image_inputs(cfg.dit)
    if cfg.data is None:
        def draw():
            x0, cond, _ = toy.sample_data(world, micro)
            image = {"y": toy.image_condition(x0[:, :, 0], x0.shape[2]).to(d.device)} if inputs else {}
            return x0.to(d.device), cond.to(d.device), uncond, image
        return draw, skipped

    # The data's latent shape: the toy world's, else the commonest of the first samples (rank 0's reading, so every
    # rank keeps the same samples); a sample of another shape is skipped and counted, never the reference.
    shape = world.cfg.shape if world is not None else \
        on_main_rank(d, lambda: data_shape(list_shards(cfg.data), cfg.dit.out_dim), (0,) * 4)
    shape = torch.tensor(shape, device=d.device)
    dist.broadcast(shape, 0)
    if d.is_main and world is None:
        tqdm.write(f"data: latents {tuple(shape.tolist())} (the commonest shape of the first samples of {cfg.data})")
    loader = make_loader(DataConfig(path=str(cfg.data), batch_size=micro, num_workers=cfg.num_workers,
                                    shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, shape=tuple(shape.tolist()),
                                    embed_dim=cfg.dit.text_dim, needs=tuple(inputs.values())),
                         rank=d.dp_rank, ranks=d.dp_size, start_batch=start_batch)

    def draw():
        b = next(loader)
        for reason in ("bad_samples", "wrong_shape", "bad_shards"):
            skipped[f"data/{reason}"] += b[reason]
        image = {arg: b[key].to(d.device) for arg, key in inputs.items()}
        return b["latent"].to(d.device), b["embed"].to(d.device), uncond, image
    return draw, skipped


def micro_batches(cfg: RunConfig, d: parallel.Dist, i: int, draw):
    """The grad_accum micro-batches of iteration i. The RNG is seeded right before each is drawn (a generator runs
    on demand), so its data, noise and times depend only on (seed, i, global micro-batch index)."""
    for m in range(cfg.grad_accum):
        parallel.seed_everything(cfg.seed, d, i, m, cfg.grad_accum)
        yield draw()


# ---------------------------------------------------------------------------------------------------- metrics
# metrics that add up (the others are means)
COUNTS = ("scm/nan_samples", "data/bad_samples", "data/wrong_shape", "data/bad_shards")


def accumulate_metrics(metrics: dict, record: dict, n: int):
    """Add one of n micro-batches' metrics into `metrics`."""
    for k, v in record.items():
        metrics[k] = metrics.get(k, 0.0) + (v if k in COUNTS else v / n)


def reduce_metrics(record: dict, d: parallel.Dist) -> dict:
    """Average the training metrics over the data-parallel ranks (counts add up; a CP group counts its clip once)."""
    keys = [k for k in record if k != "iteration"]
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(values)
    ranks = d.dp_size * d.cp_size
    return {"iteration": record["iteration"], **{k: v / (d.cp_size if k in COUNTS else ranks)
                                                 for k, v in zip(keys, values.tolist())}}


# ------------------------------------------------------------------------------------------- checkpoints (resume)
def training_state(nets: Nets) -> dict:
    """What parallel.save_training_state / load_training_state keep, besides the counters and RNG states."""
    trained = {"trained": (nets.opt, nets.sched)}
    if nets.fake is not None:
        trained["fake"] = (nets.opt_fake, nets.sched_fake)
    return dict(nets={"ema": nets.ema, **{name: getattr(nets, name) for name in trained}},
                optimizers={name: opt for name, (opt, _) in trained.items()},
                schedulers={name: sched for name, (_, sched) in trained.items()})


def save_state(folder: Path, d: parallel.Dist, nets: Nets, iteration: int, data_batches: int, settings: dict):
    """state/{iteration}/ (every rank writes its shards), then state/latest.json names it (written atomically, so a
    run killed mid-save resumes from the previous one) and older folders go; the EMA is gathered to rank 0 and
    exported as ema.safetensors (official key names; the run's sampling `settings` in its metadata; two experts: as
    ema/high_noise_model/ and ema/low_noise_model/, Wan2.2's layout, see ema_path)."""
    ckpt = folder / "state" / f"{iteration:09d}"
    parallel.save_training_state(ckpt, **training_state(nets),
                                 counters={"iteration": iteration, "data_batches": data_batches})
    ema = parallel.full_state_dict(nets.ema)
    if d.is_main:
        latest = folder / "state" / "latest.json"
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"folder": ckpt.name, "iteration": iteration, "processes": dist.get_world_size()}))
        tmp.replace(latest)
        for old in (folder / "state").iterdir():
            if old.is_dir() and old.name != ckpt.name:
                shutil.rmtree(old)
        if isinstance(nets.ema, TwoExperts):
            for name, part in zip(EXPERT_FOLDERS, ("high.", "low.")):
                path = folder / "ema" / name / "diffusion_pytorch_model.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint({k[len(part):]: v for k, v in ema.items() if k.startswith(part)},
                                path.with_suffix(".tmp"), settings)
                path.with_suffix(".tmp").replace(path)
        else:
            save_checkpoint(ema, folder / "ema.safetensors.tmp", settings)
            (folder / "ema.safetensors.tmp").replace(folder / "ema.safetensors")
    dist.barrier()


def ema_path(cfg: RunConfig) -> Path:
    """The exported EMA of a run folder: ema.safetensors, or for two experts the folder ema/ (Wan2.2's layout, which
    sample.py and model.load_two_experts read)."""
    return cfg.out_dir / ("ema" if cfg.boundary is not None else "ema.safetensors")


def saved_iteration(folder: Path) -> int:
    """The iteration of the newest checkpoint in a run folder (0 without one)."""
    latest = folder / "state" / "latest.json"
    return json.loads(latest.read_text())["iteration"] if latest.exists() else 0


def load_state(folder: Path, nets: Nets) -> tuple[int, int]:
    """Restore the newest checkpoint of the run folder, if any. Returns (iteration, data micro-batches consumed)."""
    latest = folder / "state" / "latest.json"
    if not latest.exists():
        return 0, 0
    info = json.loads(latest.read_text())
    if info["processes"] != dist.get_world_size():
        raise ValueError(f"{folder} was checkpointed by {info['processes']} processes; resume it on as many "
                         f"(this run has {dist.get_world_size()}) or pick another --out-dir")
    state = training_state(nets)
    # this command's learning rates, betas and weight decay, which the loaded optimiser state would overwrite
    fresh = [(opt, state["schedulers"][name], list(state["schedulers"][name].base_lrs),
              [(g["betas"], g["weight_decay"]) for g in opt.param_groups]) for name, opt in state["optimizers"].items()]
    counters = parallel.load_training_state(folder / "state" / info["folder"], **state,
                                            counters={"iteration": 0, "data_batches": 0})
    for opt, sched, base_lrs, groups in fresh:  # (unchanged values give back the same numbers, bit for bit)
        sched.base_lrs = base_lrs
        for g, lr, (betas, weight_decay) in zip(opt.param_groups, base_lrs, groups):
            g.update(initial_lr=lr, lr=lr * sched.lr_lambdas[0](sched.last_epoch), betas=betas,
                     weight_decay=weight_decay)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    return counters["iteration"], counters["data_batches"]


# ---------------------------------------------------------------------------------------------- the loop
def train_loop(cfg: RunConfig, d: parallel.Dist, nets: Nets, iterations: int, step, *, settings: dict,
               desc: str = "train", preview=None, preview_every: int = 0):
    """Run (or resume) the iterations of cfg.out_dir: step(i, micro_batches) -> metrics of iteration i; every
    log_every iterations a line of metrics.jsonl (reduced over the ranks), every preview_every (and at the end)
    preview(i + 1) -> its metrics, every ckpt_every (and at the end) a checkpoint with the EMA export."""
    # Resume: weights, optimisers, schedules, counters; the random draws are seeded per iteration, the data stream
    # skips what the interrupted run consumed, so the continued run repeats the losses it would have had.
    start, start_batches = load_state(cfg.out_dir, nets)
    log_path = cfg.out_dir / "metrics.jsonl"
    if d.is_main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        if start:
            tqdm.write(f"{desc}: resumed from {cfg.out_dir / 'state'} at iteration {start}")
        if log_path.exists():  # drop log lines written after the checkpoint by the interrupted run
            lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["iteration"] < start]
            log_path.write_text("".join(ln + "\n" for ln in lines))
    draw, skipped = data_stream(cfg, d, start_batches)
    write_scalars = scalar_logger(cfg) if d.is_main else None

    bar = tqdm(range(start, iterations), initial=start, total=iterations, desc=desc, disable=not d.is_main)
    t0 = time.time()
    with stop_requests() as caught:
        for i in bar:
            record = {"iteration": i, **step(i, micro_batches(cfg, d, i, draw)), **skipped}
            skipped.update({k: 0 for k in skipped})
            previewing = preview is not None and preview_every > 0 and ((i + 1) % preview_every == 0 or
                                                                        i + 1 == iterations)
            if i % cfg.log_every == 0 or previewing:
                record = reduce_metrics(record, d)
                if previewing:
                    record.update(preview(i + 1))
                record["time_s"] = round(time.time() - t0, 2)
                if d.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    write_scalars(record)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")})
            stop = torch.tensor(float(len(caught)), device=d.device)
            dist.all_reduce(stop)  # a signal to any rank stops every rank after the same iteration
            if (i + 1) % cfg.ckpt_every == 0 or i + 1 == iterations or stop.item():
                save_state(cfg.out_dir, d, nets, i + 1, start_batches + (i + 1 - start) * cfg.grad_accum, settings)
            if stop.item():
                bar.close()
                name = signal.Signals(caught[0]).name if caught else "a signal to another rank"
                if d.is_main:
                    print(f"{desc}: stopped by {name} after iteration {i + 1}, its state saved in {cfg.out_dir}; "
                          f"rerun the same command to resume", flush=True)
                raise SystemExit(128 + (caught[0] if caught else signal.SIGTERM))


def scalar_logger(cfg: RunConfig) -> Callable[[dict], None]:
    """record -> the same scalars as metrics.jsonl, to TensorBoard (out_dir/tensorboard) or W&B (one run per run
    folder, resumed with it; project rcm), or nowhere."""
    if cfg.log == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(cfg.out_dir / "tensorboard"))

        def write(record):
            for k, v in record.items():
                if k != "iteration":
                    writer.add_scalar(k, v, record["iteration"])
            writer.flush()
        return write
    if cfg.log == "wandb":
        import wandb
        run_id = cfg.out_dir / "wandb_id"  # the same W&B run continues when the folder resumes
        if not run_id.exists():
            run_id.write_text(wandb.util.generate_id())
        run = wandb.init(project="rcm", id=run_id.read_text(), name=str(cfg.out_dir), dir=str(cfg.out_dir),
                         config=flat_settings(cfg), resume="allow")
        return lambda record: run.log({k: v for k, v in record.items() if k != "iteration"}, step=record["iteration"])
    return lambda record: None


@contextlib.contextmanager
def stop_requests():
    """SIGINT (Ctrl-C) and SIGTERM (torchrun, a cluster's scheduler) are noted in the yielded list instead of stopping
    a step halfway; the loop then saves and exits. A second one of a kind acts at once (the previous handler)."""
    caught = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield caught
        return

    def note(signum, frame):
        caught.append(signum)
        signal.signal(signum, previous[signum])
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
