"""Causal-rCM: distil a bidirectional Wan2.1 teacher into a streaming generator that denoises a video chunk by chunk
in 1-4 steps, each chunk attending to the clean K/V of the chunks before it in a KV cache (docs/causal_rcm.md).

Three stages, each starting from the EMA of the one before:

    tf       the causal teacher: the bidirectional teacher fine-tuned by teacher forcing, i.e. flow matching on the
             noisy half of the packed clip [x0 | x_s], where noisy chunk j sees the clean chunks < j and itself
    tf_scm   teacher-forcing consistency (forward divergence): sCM of the student against the causal teacher on the
    tf_dcm   same packed clip (tf_dcm: the JVP-free discrete-time variant, a warm-up or fallback)
    sf_dmd   self-forcing DMD (reverse divergence): the student rolls whole videos out chunk by chunk through its KV
             cache (samplers.stream, the streaming sampler itself), and DMD against the BIDIRECTIONAL teacher and a
             bidirectional fake score matches the rollouts' distribution to the teacher's

    python train_causal.py toy                                   # tf -> tf_scm -> sf_dmd on the toy world, exact eval
    python train_causal.py toy --stages tf tf_dcm sf_dmd         # the JVP-free consistency stage instead
    python train_causal.py toy --sf.steps-per-chunk 4 2          # first chunk 4 steps, the others 2
    torchrun --nproc_per_node=8 train_causal.py wan1.3b --teacher-ckpt Wan2.1-T2V-1.3B --data shards/ \
        --neg-embed umT5_wan_negative_emb.pt                     # chunk-wise (3 latent frames), 480p

The stage losses are losses.py's (rectified-flow time s inside the teacher-forcing ones; the bidirectional DMD and
critic losses are rCM's). Data, FSDP2 sharding, context parallelism, checkpoints and the loop are training.py's. A run
folder holds one training.py run folder per stage (its ema.safetensors carries the streaming settings that
`sample.py --causal` uses as defaults) and, for the toy world, eval.json with the exact metrics of samples streamed
chunk by chunk, and their gifs.
"""
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
import tyro

import parallel
import toy
import training
from losses import TimeDist, critic_loss, dcm_loss, denoise, dmd_loss, teacher_forced, tf_loss, tf_scm_loss
from model import CONFIGS, WanModel, chunk_frames
from samplers import (CAUSAL_MID_T, check_times, conditioned, flow_times, generate_stream, guidance, kv_cache, rcm_times,
                      sample_euler, steps_of_chunks, stream)
from training import Nets, Optim, RunConfig

Stage = Literal["tf", "tf_dcm", "tf_scm", "sf_dmd"]


@dataclass
class TFConfig(Optim):
    """Stage tf: the causal teacher by teacher forcing (or diffusion forcing)."""
    lr: float = 1e-5  # AdamW learning rate of the causal teacher
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (flow matching, not distillation: β1 = 0.9)
    p_s: TimeDist = field(default_factory=lambda: TimeDist("shift", shift=5.0))
    """distribution of the noisy half's time (as TrigFlow t; UniformShift(5) in s)"""
    forcing: Literal["teacher", "diffusion"] = "teacher"  # teacher: packed [clean | noisy]; diffusion: s per chunk
    loss_scale: float = 100.0  # weight of the flow-matching loss


@dataclass
class CMConfig(Optim):
    """Stages tf_scm and tf_dcm: teacher-forcing consistency distillation from the causal teacher."""
    teacher_guidance: float = 3.0  # classifier-free guidance weight of the causal teacher
    p_G: TimeDist = field(default_factory=lambda: TimeDist("lognormal", p_mean=-0.8, p_std=1.6))
    """sCM: distribution of the time (EDM σ = s/(1 − s) log-normal)"""
    tangent_warmup: int = 1000  # sCM: iterations over which the tangent warm-up ratio r grows to 1
    loss_scale: float = 100.0  # weight of the consistency loss
    dcm_total_steps: int = 48  # dCM: number of steps N of the discretisation grid
    dcm_shift: float = 3.0  # dCM: timestep shift of the grid


@dataclass
class SFConfig(Optim):
    """Stage sf_dmd: self-forcing DMD against the bidirectional teacher, with a bidirectional fake score."""
    lr_fake: float = 4e-7  # fake-score AdamW learning rate
    teacher_guidance: float = 5.0  # classifier-free guidance weight of the bidirectional teacher
    p_D: TimeDist = field(default_factory=lambda: TimeDist("shift", shift=5.0))
    """time distribution of DMD and the critic"""
    loss_scale_dmd: float = 1.0  # weight of the DMD loss
    student_update_freq: int = 6  # one student iteration per this many iterations; the others train the fake score
    max_simulation_steps: int = 4  # the rollout's steps per chunk cycle through 1..this many
    steps_per_chunk: tuple[int, ...] = ()  # fixed steps per chunk, chunk i: entry min(i, len − 1); () cycles
    noisy_context: bool = False  # cache each chunk's last noisy input, not a clean pass at s = 0


@dataclass
class CausalConfig(RunConfig):
    """Causal-rCM (stage defaults: the Wan2.1 T2V 1.3B recipe of docs/causal_rcm.md; presets below). A run folder
    holds one sub-folder per stage; stage k draws its randomness from seed + k."""
    stages: tuple[Stage, ...] = ("tf", "tf_scm", "sf_dmd")  # stages in order, each from the EMA of the one before
    causal_teacher_ckpt: Path | None = None  # the causal teacher of tf_scm / tf_dcm when tf is not run

    # chunks and stages
    first_chunk_t: int = 3  # latent frames of the first chunk
    chunk_t: int = 3  # latent frames of every later chunk (3: chunk-wise, 1: frame-wise)
    tf: TFConfig = field(default_factory=TFConfig)  # stage tf
    cm: CMConfig = field(default_factory=CMConfig)  # stages tf_scm and tf_dcm
    sf: SFConfig = field(default_factory=SFConfig)  # stage sf_dmd
    sigma_max: float = 1600.0  # streaming starts each chunk at t = arctan(sigma_max)
    mid_t: tuple[float, ...] = CAUSAL_MID_T  # intermediate TrigFlow times of the rollout and of streaming
    eval_teacher_steps: int = 50  # toy evaluation: Euler steps of the teachers' samplers


# the toy preset, which toy-i2v varies
TOY = CausalConfig(
    out_dir=Path("runs/causal_toy"), dit=toy.TOY_DIT, precision="fp32", checkpointing="none", batch=16,
    first_chunk_t=1, chunk_t=1, ckpt_every=100,
    # the toy teacher of `train_rcm.py toy` (the same cached file), and its few-step times: where the modes are
    # decided
    toy=toy.ToyRun(eval_per_prompt=128, preview_every=0), mid_t=(1.2, 1.0, 0.6),
    tf=TFConfig(iterations=600, lr=3e-4, lr_warmup=20),
    cm=CMConfig(iterations=300, lr=3e-5, lr_warmup=20, tangent_warmup=100),
    sf=SFConfig(iterations=600, lr=1e-4, lr_fake=1e-4, lr_warmup=20, student_update_freq=3, teacher_guidance=3.0))
PRESETS = {
    "toy": ("Causal-rCM on the toy video world (CPU, minutes): tf -> tf_scm -> sf_dmd, frame-wise chunks", TOY),
    "toy-i2v": ("Causal-rCM of image-to-video toy DiTs (each clip given its first frame; every net gets it): CPU, minutes",
                replace(TOY, out_dir=Path("runs/causal_toy_i2v"), dit=CONFIGS["toy-i2v"])),
    "wan1.3b": ("Causal-rCM of Wan2.1 T2V 1.3B at 480p, chunk-wise (3 latent frames); torchrun, needs --teacher-ckpt, "
                "--data, --neg-embed",
                CausalConfig(out_dir=Path("runs/causal_wan1.3b"), dit=CONFIGS["t2v-1.3B"], precision="bf16",
                             checkpointing="block")),
    # the paper's headline setting: 14B causal and bidirectional teachers, a 1.3B student
    "wan14b-to-1.3b": ("Causal-rCM of a Wan2.1 T2V 1.3B student from 14B teachers (tf trains the 14B causal teacher); "
                       "torchrun on 8+ GPUs, needs --teacher-ckpt (14B), --student-ckpt (1.3B), --data, --neg-embed",
                       CausalConfig(out_dir=Path("runs/causal_wan14b_to_1.3b"), dit=CONFIGS["t2v-1.3B"],
                                    teacher_model="t2v-14B", precision="bf16", checkpointing="matmul", cp_size=4)),
}


def stage_config(cfg: CausalConfig, stage: Stage) -> Optim:
    return {"tf": cfg.tf, "tf_scm": cfg.cm, "tf_dcm": cfg.cm, "sf_dmd": cfg.sf}[stage]


# ----------------------------------------------------------------------------------- stage sf_dmd: self forcing
def rollout_steps(cfg: SFConfig, n_chunks: int, cycle: int) -> tuple[int, ...]:
    """Steps of each chunk: the fixed steps_per_chunk, or the same n = cycle mod max + 1 for every chunk."""
    return steps_of_chunks(cfg.steps_per_chunk or (cycle % cfg.max_simulation_steps + 1,), n_chunks)


def rollout(cfg: CausalConfig, net: WanModel, cond, x0: torch.Tensor, cycle: int, grad_last: bool = False,
            image: dict | None = None):
    """Self forcing: the net streams whole videos of x0's shape chunk by chunk from pure noise through its KV cache,
    as inference does, keeping the graph of each chunk's LAST step only (grad_last); image: the clips' I2V
    conditioning (each chunk gets its frames of it). Returns (video, steps)."""
    chunks = chunk_frames(x0.shape[2], cfg.first_chunk_t, cfg.chunk_t)
    steps = rollout_steps(cfg.sf, len(chunks), cycle)
    cache = kv_cache(net, len(x0), x0.shape[1:], chunks, dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    times = [rcm_times(n, math.inf, cfg.mid_t) for n in steps]
    chunks_out = stream(net, torch.randn_like(x0), cond, chunks, times, cache, noisy_context=cfg.sf.noisy_context,
                        grad_last=grad_last, image=image)
    return torch.cat(list(chunks_out), dim=2), steps


# ------------------------------------------------------------------------------------------------- one iteration
def student_step(cfg: CausalConfig, stage: Stage, nets: Nets, batches, i: int) -> dict:
    """One update of the trained net: the stage's loss on each micro-batch (x0, cond, uncond, image) of `batches`, gradients
    accumulated into one AdamW step, then the EMA. Returns the metrics (micro-batch means)."""
    n_eff = i // cfg.sf.student_update_freq if stage == "sf_dmd" else i   # student updates before this one

    def losses_of(x0, cond, uncond, image):
        chunks = chunk_frames(x0.shape[2], cfg.first_chunk_t, cfg.chunk_t)
        # I2V: every net gets the clip's conditioning; a teacher-forced net sees the clip twice ([clean | noisy]), and
        # so its y
        packed = {k: torch.cat([v, v], 2) if v.ndim == 5 else v for k, v in image.items()}
        if stage == "tf":
            trained = conditioned(nets.trained, **(packed if cfg.tf.forcing == "teacher" else image))
            loss = tf_loss(trained, x0, cond, chunks, cfg.tf.p_s, cfg.tf.forcing, cfg.tf.loss_scale).mean()
            return [(loss, {"loss/tf": loss.item()})]
        if stage in ("tf_scm", "tf_dcm"):
            teacher = teacher_forced(guidance(conditioned(nets.teacher, **packed), uncond, cfg.cm.teacher_guidance),
                                     x0, chunks)
            student = conditioned(nets.trained, **packed)
        if stage == "tf_scm":
            r = 1.0 if cfg.cm.tangent_warmup == 0 else min(1.0, i / cfg.cm.tangent_warmup)
            l_cm, n_nan = tf_scm_loss(student, lambda x, timestep: teacher(x, timestep, cond), x0, cond, chunks,
                                      cfg.cm.p_G, r, cfg.cm.loss_scale)
            return [(l_cm.mean(), {"loss/scm": l_cm.mean().item(), "scm/nan_samples": n_nan, "scm/r": r})]
        if stage == "tf_dcm":
            # the bidirectional dCM of losses.py on the teacher-forced nets (the same x̂0 = x_s − s·v): one Euler step
            # of the CFG causal teacher, the target from the same online student
            loss = dcm_loss(teacher_forced(student, x0, chunks), cond,
                            lambda x, t: denoise(teacher, x, t, cond)[1], x0, cfg.cm.dcm_total_steps, 1,
                            cfg.cm.dcm_shift, cfg.cm.loss_scale).mean()
            return [(loss, {"loss/dcm": loss.item()})]
        G, steps = rollout(cfg, nets.trained, cond, x0, n_eff, grad_last=True, image=image)
        teacher, fake = guidance(conditioned(nets.teacher, **image), uncond, cfg.sf.teacher_guidance), \
            conditioned(nets.fake, **image)
        loss = dmd_loss(G, lambda x, t: denoise(fake, x, t, cond)[0],
                        lambda x, t: denoise(teacher, x, t, cond)[0], cfg.sf.p_D, cfg.sf.loss_scale_dmd).mean()
        return [(loss, {"loss/dmd": loss.item(), "dmd/steps": steps[-1]})]
    return training.student_update(nets, stage_config(cfg, stage), n_eff, batches, losses_of, cfg.grad_accum)


def critic_step(cfg: CausalConfig, nets: Nets, batches, i: int) -> dict:
    """One fake-score update of sf_dmd: on each micro-batch, a no-grad self-forcing rollout of the student, then the
    fake score's denoising loss on it (as rCM's critic); one AdamW step."""
    critic_before = i - i // cfg.sf.student_update_freq - 1   # the cycle of rollout steps runs over critic updates

    def losses_of(x0, cond, _, image):
        with torch.no_grad():
            G, steps = rollout(cfg, nets.trained, cond, x0, critic_before, image=image)
        fake = conditioned(nets.fake, **image)
        loss = critic_loss(G, lambda x, t: denoise(fake, x, t, cond)[0], cfg.sf.p_D).mean()
        return [(loss, {"loss/critic": loss.item(), "critic/steps": steps[-1]})]
    return training.critic_update(nets, batches, losses_of, cfg.grad_accum)


# --------------------------------------------------------------------------------------------------- toy evaluation
@torch.no_grad()
def student_streams(cfg: CausalConfig, world: toy.World, stage: Stage, net: WanModel, prompt, seed: int,
                    image: dict) -> dict:
    """Streamed samples of a stage's net at 1, 2 and 4 steps per chunk, for prompt ids [N] and their I2V conditioning
    `image` (toy.eval_conditioning; `sample.py --causal --toy` repeats them)."""
    shape = world.cfg.shape
    chunks = chunk_frames(shape[1], cfg.first_chunk_t, cfg.chunk_t)
    context, image = world.text[prompt].to(cfg.device), {k: v.to(cfg.device) for k, v in image.items()}
    return {f"{stage}-{n}": torch.cat(list(generate_stream(
        net, context, shape, chunks, (n,), cfg.sigma_max, cfg.mid_t, torch.Generator(cfg.device).manual_seed(seed),
        noisy_context=cfg.sf.noisy_context, image=image)), 2).cpu() for n in (1, 2, 4)}


@torch.no_grad()
def teacher_streams(cfg: CausalConfig, world: toy.World, net: WanModel, prompt, seed: int, image: dict) -> torch.Tensor:
    """The causal teacher streamed: per chunk, eval_teacher_steps Euler steps with CFG (cond and uncond halves of one
    batch, so one KV cache serves both; both keep the image), then a clean pass at s = 0 appends the chunk's K/V."""
    shape, B = world.cfg.shape, len(prompt)
    chunks = chunk_frames(shape[1], cfg.first_chunk_t, cfg.chunk_t)
    noise = torch.randn((B, *shape), generator=torch.Generator().manual_seed(seed)).to(cfg.device)
    teacher = guidance(net, world.negative.expand(B, -1, -1).to(cfg.device), cfg.cm.teacher_guidance)
    times = [flow_times(cfg.eval_teacher_steps, 5.0)] * len(chunks)
    return torch.cat(list(stream(teacher, noise, world.text[prompt].to(cfg.device), chunks, times,
                                 kv_cache(net, 2 * B, shape, chunks), sampler=sample_euler,
                                 image={k: v.to(cfg.device) for k, v in image.items()})), 2).cpu()


def stage_samples(cfg: CausalConfig, world: toy.World, stage: Stage, net: WanModel, prompt, seed: int,
                  image: dict) -> dict:
    """A stage's streamed samples; for the causal teacher (stage tf) also its eval_teacher_steps Euler stream with CFG
    (its few-step rows are the baseline that distillation has to beat)."""
    out = student_streams(cfg, world, stage, net, prompt, seed, image)
    if stage == "tf":
        out[f"causal-teacher-{cfg.eval_teacher_steps}"] = teacher_streams(cfg, world, net, prompt, seed, image)
    return out


@torch.no_grad()
def evaluate(cfg: CausalConfig, world: toy.World, bidirectional: Path, results: dict[Stage, Path]) -> dict:
    """Exact metrics of the exact-velocity sampler (200 Euler steps), the bidirectional teacher (Euler with CFG), and
    every stage's EMA net streamed chunk by chunk: the causal teacher (Euler with CFG per chunk) and the students at
    1, 2 and 4 steps per chunk; eval_per_prompt samples per prompt. Writes eval.json and one preview gif per sampler."""
    per_prompt, seed = cfg.toy.eval_per_prompt, cfg.toy.eval_seed
    prompt, _ = toy.eval_prompts(world, per_prompt)
    image = toy.eval_conditioning(world, cfg.dit, prompt, seed)
    samples = {
        "exact": toy.teacher_sample(lambda *a, **kw: toy.exact_velocity(world, *a, **kw), world, prompt, 1.0, 200, 1.0,
                                    seed=seed, device=cfg.device, image=image),
        f"teacher-{cfg.eval_teacher_steps}": toy.teacher_sample(
            training.load_frozen(cfg, bidirectional, training.teacher_arch(cfg)), world, prompt,
            cfg.sf.teacher_guidance, cfg.eval_teacher_steps, 5.0, seed=seed, device=cfg.device, image=image)}
    for stage, path in results.items():
        samples.update(stage_samples(cfg, world, stage, training.load_frozen(cfg, path, stage_arch(cfg, stage)), prompt,
                                     seed, image))
    out = {name: toy.metrics(world, x, prompt, image.get("y")) for name, x in samples.items()}
    (cfg.out_dir / "eval.json").write_text(json.dumps(out, indent=2))
    toy.save_grids(world, samples, per_prompt, cfg.out_dir / "previews", "eval_")
    toy.print_table(out)
    return out


# ---------------------------------------------------------------------------------------------------- training
def stage_arch(cfg: CausalConfig, stage: Stage):
    """A stage's network config: the causal teacher (tf) has the teacher's size, the student stages --dit's."""
    return training.teacher_arch(cfg) if stage == "tf" else cfg.dit


def stage_checkpoints(cfg: CausalConfig, stage: Stage, bidirectional: Path, base: Path) -> tuple[Path, Path]:
    """(init of the trained net, its teacher) for a stage. The init is the EMA of the stage before it in cfg.stages
    when that one has the same size; else the pretrained net of the stage's size: for tf the bidirectional teacher, for
    a student stage --student-ckpt (`base`, the student's base when the teacher is of another size), else its
    teacher. tf learns from data (it has no teacher); tf_scm/tf_dcm distil the causal teacher; sf_dmd the
    bidirectional teacher."""
    k = cfg.stages.index(stage)
    teacher = bidirectional
    if stage in ("tf_scm", "tf_dcm"):
        teacher = cfg.out_dir / "tf" / "ema.safetensors" if "tf" in cfg.stages[:k] else cfg.causal_teacher_ckpt
        if teacher is None:
            raise ValueError(f"stage {stage} distils a causal teacher: pass --causal-teacher-ckpt or run the stage tf "
                             f"before it (--stages tf {stage} ...)")
    if k > 0 and stage_arch(cfg, cfg.stages[k - 1]) == stage_arch(cfg, stage):
        return cfg.out_dir / cfg.stages[k - 1] / "ema.safetensors", teacher
    if stage == "tf":
        return cfg.student_ckpt if training.teacher_arch(cfg) == cfg.dit and cfg.student_ckpt else bidirectional, None
    return (base if training.teacher_arch(cfg) != cfg.dit else cfg.student_ckpt or teacher), teacher


def train_stage(cfg: CausalConfig, d, stage: Stage, world: toy.World | None, bidirectional: Path, base: Path) -> Path:
    """Run one stage to its last iteration in its own run folder, resuming from its newest checkpoint if there is one
    (a finished stage is skipped); returns its EMA weights."""
    folder, k = cfg.out_dir / stage, cfg.stages.index(stage)
    scfg = stage_config(cfg, stage)
    # the stage's own run folder, random draws and size (tf, the causal teacher, has the teacher's and no teacher)
    run = replace(cfg, out_dir=folder, seed=cfg.seed + k, dit=stage_arch(cfg, stage),
                  teacher_model=None if stage == "tf" else cfg.teacher_model)
    # A stage built from earlier stages that have changed since (more iterations, accepted new settings) is stale: it
    # is moved aside, never deleted, and trained again.
    inputs = {s: training.run_identity(cfg.out_dir / s) for s in cfg.stages[:k]}
    recorded = training.recorded_inputs(folder)
    if recorded is not None and recorded != inputs:
        aside = next(folder.with_name(f"{stage}.stale-{n}") for n in range(1, 10**6)
                     if not folder.with_name(f"{stage}.stale-{n}").exists())
        if d.is_main:
            folder.rename(aside)
            tqdm.write(f"{stage}: the stages before it changed since it was trained; moved it to {aside} and "
                       f"training it again")
        torch.distributed.barrier()
    own = {"tf": "tf.", "tf_scm": "cm.", "tf_dcm": "cm.", "sf_dmd": "sf."}[stage]
    training.check_run_folder(run, d, inputs, ignore=tuple({"tf.", "cm.", "sf."} - {own}))
    if training.saved_iteration(folder) >= scfg.iterations:
        return folder / "ema.safetensors"
    init, teacher = stage_checkpoints(cfg, stage, bidirectional, base)
    # the fake score starts from the bidirectional teacher, or from the student's base when the two differ in size
    fake = (bidirectional if training.teacher_arch(cfg) == cfg.dit else base) if stage == "sf_dmd" else None
    nets = training.build_nets(run, d, scfg, teacher=teacher, trained=init, fake=fake, lr_fake=cfg.sf.lr_fake)

    def step(i, batches):  # sf_dmd gives one iteration in student_update_freq to the student, the others to the critic
        if stage == "sf_dmd" and i % cfg.sf.student_update_freq:
            return critic_step(cfg, nets, batches, i)
        return student_step(cfg, stage, nets, batches, i)
    preview_every = 0 if world is None else cfg.toy.preview_every
    training.train_loop(run, d, nets, scfg.iterations, step, desc=stage,
                        settings=training.sampling_settings(
                            run, method="causal", stage=stage, sigma_max=cfg.sigma_max, mid_t=cfg.mid_t,
                            first_chunk_t=cfg.first_chunk_t, chunk_t=cfg.chunk_t, eval_steps=[1, 2, 4],
                            steps_per_chunk=cfg.sf.steps_per_chunk or (2,), noisy_context=cfg.sf.noisy_context),
                        preview=lambda i: toy.preview(world, cfg.dit, lambda *a: stage_samples(
                            cfg, world, stage, nets.ema, *a), folder, i, d.is_main),
                        preview_every=preview_every)
    return folder / "ema.safetensors"


def train(cfg: CausalConfig) -> dict:
    """Run (or resume) the stages in order; returns the toy evaluation ({} for Wan runs)."""
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ValueError(f"each stage runs once, got --stages {' '.join(cfg.stages)}")
    training.check_config(cfg)
    if cfg.boundary is not None:
        raise ValueError("train_causal.py streams one causal net: two experts (--boundary) are for train_rcm.py")
    training.check_positive(cfg, "first_chunk_t", "chunk_t")
    training.check_positive(cfg.sf, "student_update_freq", "max_simulation_steps", prefix="sf.")
    check_times(cfg.sigma_max, cfg.mid_t)
    if max(cfg.sf.steps_per_chunk or (cfg.sf.max_simulation_steps,)) > len(cfg.mid_t) + 1:
        raise ValueError(f"the rollout's steps per chunk need one --mid-t time per step after the first: "
                         f"{len(cfg.mid_t)} given")
    if cfg.causal_teacher_ckpt is not None and not Path(cfg.causal_teacher_ckpt).exists():
        raise FileNotFoundError(f"--causal-teacher-ckpt {cfg.causal_teacher_ckpt} does not exist")
    return training.run_in_process_group(cfg, lambda d: run(cfg, d))


def run(cfg: CausalConfig, d) -> dict:
    world = toy.make_world(cfg.toy.world) if cfg.toy is not None else None
    bidirectional, base = training.checkpoints(cfg, d)  # toy: rCM's cached toy teacher(s)
    results = {stage: train_stage(cfg, d, stage, world, bidirectional, base) for stage in cfg.stages}
    if world is None or cfg.toy.eval_per_prompt == 0 or not d.is_main:
        return {}
    return evaluate(cfg, world, bidirectional, results)


if __name__ == "__main__":
    parallel.cli(train, tyro.extras.overridable_config_cli(PRESETS))
