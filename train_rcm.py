"""rCM: distil a Wan2.1 flow-matching teacher into a 1-4 step student by score-regularised continuous-time
consistency (sCM, JVP-based, forward divergence) plus distribution matching (DMD, reverse divergence, against a
fake-score critic), in the one training loop of training.py (docs/rcm.md).

    python train_rcm.py toy                                     # rCM on the toy video world, evaluated exactly
                                                                # (dCM warm-up, then sCM + DMD)
    python train_rcm.py toy --no-fake-score --dcm-iterations 0  # pure sCM
    python train_rcm.py toy --loss-scale 0 --dmd-fix-timesteps  # pure DMD
    torchrun --nproc_per_node=8 train_rcm.py wan1.3b --teacher-ckpt Wan2.1-T2V-1.3B --data shards/ \
        --neg-embed umT5_wan_negative_emb.pt                    # the real thing (14B: wan14b, --cp-size 8)

Four networks: the frozen teacher (with CFG), the student (trained), the fake score (trained on the student's
samples) and the EMA of the student (the one that is exported and evaluated). Iterations alternate between the
student and the critic; the "effective iteration" counts student iterations only. The run folder is training.py's;
ema.safetensors carries the sampling settings (σ_max, mid_t, ...) that `sample.py` then uses as its defaults, and
toy runs add eval.json (the exact metrics printed at the end) and previews/.
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

import parallel
import toy
import training
from losses import TimeDist, critic_loss, dcm_loss, denoise, dmd_loss, scm_loss
from model import BOUNDARY, CONFIGS, WanModel
from samplers import check_times, conditioned, generate, guidance, sample_rcm, simulation_times
from training import Nets, Optim, RunConfig


@dataclass
class RCMConfig(Optim, RunConfig):
    """rCM distillation (defaults: the Wan2.1 T2V 1.3B recipe of docs/rcm.md; presets below)."""
    iterations: int = 10000  # total iterations (student and critic)
    lr_fake: float = 4e-7  # fake-score AdamW learning rate (the student's is --lr)

    # consistency loss (sCM / dCM)
    loss_scale: float = 100.0  # weight of the consistency loss; 0 disables it (pure DMD)
    p_G: TimeDist = field(default_factory=lambda: TimeDist("lognormal", p_mean=0.7, p_std=1.6))
    """time distribution of the consistency loss"""
    tangent_warmup: int = 1000  # iterations over which sCM's warm-up ratio r grows to 1; then DMD and critic
    dcm_iterations: int = 0  # JVP-free discrete-time CM (dCM) instead of sCM for the first N iterations
    dcm_total_steps: int = 48  # dCM: number of steps N of the discretisation grid
    dcm_skip: int = 1  # dCM: teacher Euler steps k between the two student evaluations
    dcm_shift: float = 5.0  # dCM: timestep shift of the grid
    teacher_guidance: float = 5.0  # classifier-free guidance weight of the teacher (distilled into the student)
    teacher_guidance_high: float | None = None  # two experts: the weight at times ≥ --boundary instead (Wan2.2 T2V: 4)

    # distribution matching (DMD) and its critic
    fake_score: bool = True  # train a fake score and add the DMD loss (off: pure sCM)
    loss_scale_dmd: float = 1.0  # weight of the DMD loss
    p_D: TimeDist = field(default_factory=lambda: TimeDist("shift", shift=5.0))
    """time distribution of DMD, the critic and the random backward-simulation times"""
    student_update_freq: int = 5  # after the warm-up, a student iteration every N; the others train the critic
    max_simulation_steps: int = 4  # backward simulation cycles through 1..this many student steps
    dmd_fix_timesteps: bool = False  # backward simulation at --mid-t, not random p_D draws (pure DMD)

    # the few-step sampler (saved with the student: sample.py's defaults)
    mid_t: tuple[float, ...] = (1.5, 1.4, 1.0)  # intermediate TrigFlow times of the few-step sampler
    sigma_max: float = 80.0  # the sampler starts at t = arctan(sigma_max)


# the toy preset, which the toy-i2v one varies
TOY = RCMConfig(
    out_dir=Path("runs/toy"), dit=toy.TOY_DIT, iterations=600, batch=16, lr=1e-4, lr_fake=1e-4,
    lr_warmup=20, tangent_warmup=300, student_update_freq=5, teacher_guidance=3.0,
    # The toy's modes are decided at s ≈ 0.85-0.98 (t ≈ 1.4-1.55), and the flow above that drifts every sample
    # towards the heavy modes. Learnt step by step (sCM, or dCM with skip 1) the student misses the drift and
    # flattens the mode weights (docs/toy_experiments.md, "Where the flattening comes from"); so, staged as
    # docs/rcm.md recommends, a dCM warm-up whose targets lie 4 teacher steps away carries it, then sCM + DMD.
    dcm_iterations=300, dcm_skip=4,
    # later mid times than docs/rcm.md's (1.5, 1.4, 1.0) leave the last steps to denoise
    mid_t=(1.2, 1.0, 0.6), log_every=10, ckpt_every=200,
    toy=toy.ToyRun(eval_per_prompt=128, preview_every=200))
# docs/rcm.md's defaults, the 14B values from NVlabs/rcm's wan2pt1_t2v experiment config
WAN14B = RCMConfig(out_dir=Path("runs/wan14b"), dit=CONFIGS["t2v-14B"], precision="bf16", checkpointing="matmul",
                   cp_size=8, lr=1e-6, lr_fake=1e-7, tangent_warmup=0, student_update_freq=10, sigma_max=200.0,
                   p_G=TimeDist("lognormal", p_mean=1.5, p_std=1.6), ckpt_every=250)
PRESETS = {
    "toy": ("rCM on the toy video world (CPU, minutes): teacher, distillation, exact evaluation", TOY),
    # (b) of the size/I2V/two-expert proofs: the image-conditioned toy world (docs/toy_world.md), Wan's I2V layout
    "toy-i2v": ("rCM of an image-to-video toy DiT (each clip given its first frame): CPU, minutes, exact evaluation",
                dataclasses.replace(TOY, out_dir=Path("runs/toy_i2v"), dit=CONFIGS["toy-i2v"])),
    # (c): a two-expert toy teacher (two toy DiTs, each trained on its side of the boundary) into a two-expert student
    "toy-experts": ("rCM of a two-expert toy model (Wan2.2's A14B layout, boundary 0.875): CPU, minutes, exact evaluation",
                    dataclasses.replace(TOY, out_dir=Path("runs/toy_experts"), boundary=0.875)),
    "wan1.3b": ("rCM of Wan2.1 T2V 1.3B at 480p (torchrun, 1+ GPUs; needs --teacher-ckpt, --data, --neg-embed)",
                # attention SAC, compiled: 50 % MFU on one H200 in 56.7 GiB (block: 46 %, 54.5 GiB; results §6)
                RCMConfig(out_dir=Path("runs/wan1.3b"), dit=CONFIGS["t2v-1.3B"], precision="bf16",
                          checkpointing="attention", compile=True)),
    "wan14b": ("rCM of Wan2.1 T2V 14B at 480p (torchrun, 8+ GPUs; needs --teacher-ckpt, --data, --neg-embed)", WAN14B),
    # the same recipe on the image-to-video and the two-expert releases (their shards carry y.pt, and clip.pt for
    # Wan2.1 I2V: sample.py --mode teacher --image ... --shard-dir); checkpoints and exports as the official folders
    "wan14b-i2v": ("rCM of Wan2.1 I2V 14B at 480p (torchrun, 8+ GPUs; needs --teacher-ckpt, I2V --data, --neg-embed)",
                   dataclasses.replace(WAN14B, out_dir=Path("runs/wan14b_i2v"), dit=CONFIGS["i2v-14B"])),
    "wan2.2-t2v-a14b": ("rCM of Wan2.2 T2V A14B, both experts (torchrun, 16+ GPUs; --teacher-ckpt: the folder with "
                        "high_noise_model/ and low_noise_model/)",
                        dataclasses.replace(WAN14B, out_dir=Path("runs/wan22_t2v_a14b"), dit=CONFIGS["t2v-A14B"],
                                            boundary=BOUNDARY["t2v-A14B"], teacher_guidance=3.0,
                                            teacher_guidance_high=4.0)),  # (the official sampler's per-expert CFG)
    "wan2.2-i2v-a14b": ("rCM of Wan2.2 I2V A14B, both experts (torchrun, 16+ GPUs; --teacher-ckpt: the official "
                        "folder; I2V --data)",
                        dataclasses.replace(WAN14B, out_dir=Path("runs/wan22_i2v_a14b"), dit=CONFIGS["i2v-A14B"],
                                            boundary=BOUNDARY["i2v-A14B"], teacher_guidance=3.5)),
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


def backward_simulation(cfg: RCMConfig, student, cond, x0, n_sim: int, grad_last: bool = False):
    """The student's samples G [B, C, T, H, W] of an n_sim-step backward simulation from fresh noise."""
    fixed = cfg.mid_t if cfg.dmd_fix_timesteps else None
    return sample_rcm(student, torch.randn_like(x0), cond, simulation_times(n_sim, len(x0), cfg.p_D, fixed),
                      grad_last=grad_last)


# ------------------------------------------------------------------------------------------------- one iteration
def student_step(cfg: RCMConfig, nets: Nets, batches, i: int) -> dict:
    """One student iteration: on each micro-batch (x0, cond, uncond, image) of `batches`, the sCM (or dCM) loss and,
    after the tangent warm-up, the DMD loss through a backward simulation of 1..max_simulation_steps student steps;
    their gradients accumulate into one AdamW step, then the EMA follows. Every net sees the clip's I2V conditioning
    `image` (none for T2V); the teacher's unconditional CFG half drops only the text. Returns the metrics
    (micro-batch means)."""
    n_eff = effective_iteration(cfg, i)

    def losses_of(x0, cond, uncond, image):  # a generator: sCM's graph is freed (backpropagated) before DMD's is built
        teacher = guidance(conditioned(nets.teacher, **image), uncond, cfg.teacher_guidance,
                           cfg.teacher_guidance_high, cfg.boundary or 1.0)
        student, fake = conditioned(nets.trained, **image), conditioned(nets.fake, **image)
        if cfg.loss_scale > 0:
            F_teacher = lambda x, t: denoise(teacher, x, t, cond)[1]
            if i < cfg.dcm_iterations:
                l_cm = dcm_loss(student, cond, F_teacher, x0, cfg.dcm_total_steps, cfg.dcm_skip, cfg.dcm_shift,
                                cfg.loss_scale).mean()
                yield l_cm, {"loss/dcm": l_cm.item()}
            else:
                r = 1.0 if cfg.tangent_warmup == 0 else min(1.0, i / cfg.tangent_warmup)
                l_cm, n_nan = scm_loss(student, cond, F_teacher, x0, cfg.p_G, r, cfg.loss_scale)
                yield l_cm.mean(), {"loss/scm": l_cm.mean().item(), "scm/nan_samples": n_nan, "scm/r": r}
        if cfg.fake_score and i >= cfg.tangent_warmup:
            n_sim = n_eff % cfg.max_simulation_steps + 1
            G = backward_simulation(cfg, student, cond, x0, n_sim, grad_last=True)
            l_dmd = dmd_loss(G, lambda x, t: denoise(fake, x, t, cond)[0],
                             lambda x, t: denoise(teacher, x, t, cond)[0], cfg.p_D, cfg.loss_scale_dmd).mean()
            yield l_dmd, {"loss/dmd": l_dmd.item(), "dmd/steps": n_sim}
    return training.student_update(nets, cfg, n_eff, batches, losses_of, cfg.grad_accum)


def critic_step(cfg: RCMConfig, nets: Nets, batches, i: int) -> dict:
    """One critic iteration: on each micro-batch, a no-grad backward simulation of the student, then the fake
    score's denoising loss on its samples; one AdamW step."""
    n_sim = (i - effective_iteration(cfg, i) - 1) % cfg.max_simulation_steps + 1  # cycles over the critic's iterations

    def losses_of(x0, cond, _, image):
        G = backward_simulation(cfg, conditioned(nets.trained, **image), cond, x0, n_sim)
        fake = conditioned(nets.fake, **image)
        loss = critic_loss(G, lambda x, t: denoise(fake, x, t, cond)[0], cfg.p_D).mean()
        return [(loss, {"loss/critic": loss.item(), "critic/steps": n_sim})]
    return training.critic_update(nets, batches, losses_of, cfg.grad_accum)


# --------------------------------------------------------------------------------------------------- toy evaluation
@torch.no_grad()
def student_samples(cfg: RCMConfig, world: toy.World, net: WanModel, prompt, seed: int, image: dict) -> dict:
    """The student's samples at 1, 2 and 4 steps for prompt ids [N] and their I2V conditioning `image`
    (toy.eval_conditioning; sample.py --toy repeats them)."""
    net = conditioned(net, **{k: v.to(cfg.device) for k, v in image.items()})
    return {f"student-{n}": generate(net, world.text[prompt].to(cfg.device), world.cfg.shape, n, cfg.sigma_max,
                                     cfg.mid_t, torch.Generator(cfg.device).manual_seed(seed)).cpu() for n in (1, 2, 4)}


@torch.no_grad()
def evaluate(cfg: RCMConfig, world: toy.World, teacher: Path, student: Path) -> dict:
    """Exact metrics of the exact-velocity sampler (ground truth, 200 Euler steps, no CFG), the 50-step CFG
    teacher and the exported EMA student at 1, 2 and 4 steps, on eval_per_prompt samples per prompt (each given a
    first frame of its prompt's data for an I2V DiT, the mode weights then the exact conditional ones)."""
    per_prompt, seed, device = cfg.toy.eval_per_prompt, cfg.toy.eval_seed, cfg.device
    prompt, _ = toy.eval_prompts(world, per_prompt)
    image = toy.eval_conditioning(world, cfg.dit, prompt, seed)
    samples = {
        "exact": toy.teacher_sample(lambda *a, **kw: toy.exact_velocity(world, *a, **kw), world, prompt, 1.0, 200,
                                    1.0, seed=seed, device=device, image=image),
        "teacher-50": toy.teacher_sample(training.load_frozen(cfg, teacher, training.teacher_arch(cfg)), world,
                                         prompt, cfg.teacher_guidance, 50, 5.0, seed=seed, device=device, image=image),
        **student_samples(cfg, world, training.load_frozen(cfg, student), prompt, seed, image)}
    return {name: toy.metrics(world, x, prompt, image.get("y")) for name, x in samples.items()}


# ---------------------------------------------------------------------------------------------------- training
def train(cfg: RCMConfig) -> dict:
    """Run (or resume) the distillation; returns the toy evaluation ({} without one)."""
    training.check_config(cfg)
    training.check_positive(cfg, "student_update_freq", "max_simulation_steps")
    check_times(cfg.sigma_max, cfg.mid_t)
    if cfg.teacher_guidance_high is not None and cfg.boundary is None:
        raise ValueError("--teacher-guidance-high is the CFG weight of the high-noise expert: it needs --boundary")
    if cfg.dmd_fix_timesteps and cfg.max_simulation_steps > len(cfg.mid_t) + 1:
        raise ValueError(f"--dmd-fix-timesteps simulates at --mid-t: --max-simulation-steps "
                         f"{cfg.max_simulation_steps} needs {cfg.max_simulation_steps - 1} --mid-t times")
    return training.run_in_process_group(cfg, lambda d: run(cfg, d))


def run(cfg: RCMConfig, d) -> dict:
    training.check_run_folder(cfg, d)
    teacher, base = training.checkpoints(cfg, d)
    # the fake score starts from the teacher, or from the student's base when the two differ in size
    fake = (teacher if training.teacher_arch(cfg) == cfg.dit else base) if cfg.fake_score else None
    nets = training.build_nets(cfg, d, cfg, teacher=teacher, trained=base, fake=fake, lr_fake=cfg.lr_fake)
    world = toy.make_world(cfg.toy.world) if cfg.toy is not None else None
    step = lambda i, batches: (student_step if is_student_iteration(cfg, i) else critic_step)(cfg, nets, batches, i)
    training.train_loop(cfg, d, nets, cfg.iterations, step, desc="rCM",
                        settings=training.sampling_settings(cfg, method="rcm", sigma_max=cfg.sigma_max, mid_t=cfg.mid_t,
                                                            steps=4, eval_steps=[1, 2, 4]),
                        preview=None if world is None else lambda i: toy.preview(
                            world, cfg.dit, lambda *a: student_samples(cfg, world, nets.ema, *a), cfg.out_dir, i,
                            d.is_main),
                        preview_every=0 if world is None else cfg.toy.preview_every)
    if world is None or cfg.toy.eval_per_prompt == 0 or not d.is_main:
        return {}
    results = evaluate(cfg, world, teacher, training.ema_path(cfg))
    (cfg.out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    toy.print_table(results)
    return results


if __name__ == "__main__":
    parallel.cli(train, tyro.extras.overridable_config_cli(PRESETS))
