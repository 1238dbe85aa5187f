"""rCM: distil a Wan2.1 flow-matching teacher into a 1-4 step student by score-regularised continuous-time
consistency (sCM, JVP-based, forward divergence) plus distribution matching (DMD, reverse divergence, against a
fake-score critic), in one training loop that follows rcm.md.

    python train_rcm.py toy                                     # rCM on the toy video world, evaluated exactly
    python train_rcm.py toy --no-fake-score                     # pure sCM
    python train_rcm.py toy --loss-scale 0 --dmd-fix-timesteps  # pure DMD
    python train_rcm.py toy --dcm-iterations 100                # dCM warm-up, then sCM (+ DMD)

Four networks: the frozen teacher (with CFG), the student (trained), the fake score (trained on the student's
samples) and the EMA of the student (the one that is saved and evaluated). Iterations alternate between the
student and the critic; the "effective iteration" counts student iterations only. A run folder holds metrics.jsonl,
state.pt (everything needed to resume exactly: rerun the same command), ema.safetensors (official key names),
previews/ and, for the toy world, eval.json.
"""
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

import toy
from losses import (TimeDist, critic_loss, dcm_loss, denoise, dmd_loss, guided_denoise, rcm_sample, sampling_times,
                    scm_loss, simulation_times)
from model import WanConfig, WanModel, load_checkpoint, save_checkpoint


@dataclass
class RCMConfig:
    """rCM distillation (defaults: the Wan2.1 T2V 1.3B recipe of rcm.md; presets below)."""
    out_dir: Path = Path("runs/rcm")
    """run folder: metrics.jsonl, state.pt (resume), ema.safetensors, previews/, eval.json"""
    teacher_ckpt: Path | None = None
    """teacher weights in official key names; toy: trained on the toy world and cached under checkpoints/ if unset"""
    student_ckpt: Path | None = None
    """initialise the student from these weights instead of the teacher (e.g. the EMA of a dCM warm-up run)"""
    dit: WanConfig = field(default_factory=WanConfig)
    """network config of teacher, student and fake score"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    seed: int = 0
    """seed of the global RNG (time draws, noise, data); its state is saved, so a resumed run repeats its losses"""

    # optimisation
    iterations: int = 10000
    """total iterations (student and critic)"""
    batch: int = 1
    """clips per iteration"""
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

    # logging
    log_every: int = 10
    """iterations between lines of metrics.jsonl"""
    preview_every: int = 500
    """iterations between sample previews of the EMA student at 1, 2 and 4 steps (toy: with exact metrics)"""
    ckpt_every: int = 500
    """iterations between checkpoints (state.pt and ema.safetensors)"""

    # the toy world (the only data source wired in this file)
    world: toy.ToyConfig = field(default_factory=toy.ToyConfig)
    """the toy data distribution"""
    teacher_train: toy.TeacherConfig = field(default_factory=toy.TeacherConfig)
    """flow-matching training of the toy teacher when no teacher_ckpt is cached"""
    eval_per_prompt: int = 256
    """toy evaluation: samples per prompt for each sampler"""


PRESETS = {
    "toy": ("rCM on the toy video world (CPU, minutes): teacher, distillation, exact evaluation", RCMConfig(
        out_dir=Path("runs/toy"), dit=toy.TOY_DIT, iterations=600, batch=16, lr=1e-4, lr_fake=1e-4,
        lr_warmup=20, tangent_warmup=200, student_update_freq=3, teacher_guidance=3.0,
        log_every=10, preview_every=200, ckpt_every=100, eval_per_prompt=128,
        teacher_train=toy.TeacherConfig(steps=1500, batch=32, lr=2e-3))),
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
    """θ_ema ← β·θ_ema + (1 − β)·θ with β = (1 − 1/(n + 1))^(γ + 1) at effective iteration n (n = 0 copies)."""
    beta = (1 - 1 / (n + 1)) ** (gamma + 1)
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)


# ---------------------------------------------------------------------------------------------------- setup
def toy_teacher(cfg: RCMConfig, world: toy.World) -> Path:
    """The cached toy teacher for this world, DiT and training config (trained on first use)."""
    if cfg.teacher_ckpt is not None:
        return cfg.teacher_ckpt
    key = hashlib.sha1(repr((cfg.world, cfg.dit, cfg.teacher_train)).encode()).hexdigest()[:10]
    path = Path("checkpoints") / f"toy_teacher_{key}.safetensors"
    if not path.exists():
        tqdm.write(f"no cached toy teacher: training one ({cfg.teacher_train.steps} steps) -> {path}")
        toy.train_teacher(world, cfg.teacher_train, cfg.dit, path, cfg.device, log=tqdm.write)
    return path


def build_nets(cfg: RCMConfig, teacher_path: Path):
    """Teacher (frozen), student, fake score (None when off) and EMA student, all initialised from the teacher."""
    def load(path, trainable):
        net = load_checkpoint(WanModel(cfg.dit), path).to(cfg.device)
        return net.requires_grad_(trainable).train(trainable)
    teacher = load(teacher_path, False)
    student = load(cfg.student_ckpt or teacher_path, True)
    fake = load(teacher_path, True) if cfg.fake_score else None
    ema = load(cfg.student_ckpt or teacher_path, False)
    return teacher, student, fake, ema


def adamw(cfg: RCMConfig, net: WanModel, lr: float):
    """AdamW with a linear warm-up to lr, then constant."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg.lr_warmup))


# ------------------------------------------------------------------------------------------------- sampling
def student_sample(net: WanModel, context, n_steps: int, shape, sigma_max: float, mid_t, seed: int, device):
    """The rCM few-step sampler with the student's consistency function f = x̂0, seeded."""
    gen = torch.Generator(device).manual_seed(seed)
    eps = torch.randn((len(context), *shape), generator=gen, device=device)
    f = lambda x, t: denoise(net, x, t, context)[0]
    return rcm_sample(f, eps, sampling_times(n_steps, len(context), sigma_max, mid_t), generator=gen)


@torch.no_grad()
def preview(cfg: RCMConfig, world: toy.World, ema: WanModel, i: int) -> dict:
    """Previews of the EMA student at 1, 2 and 4 steps: gif grids (rows = prompts) and exact toy metrics."""
    prompt, context = toy.eval_prompts(world, 64)
    out = {}
    for n in (1, 2, 4):
        x = student_sample(ema, context.to(cfg.device), n, world.cfg.shape, cfg.sigma_max, cfg.backward_timesteps,
                           seed=1, device=cfg.device).cpu()
        m = toy.metrics(world, x, prompt)
        out.update({f"preview/{n}step/{k}": v for k, v in m.items()})
        grid = x.view(world.cfg.prompts, 64, *x.shape[1:])[:, :8].flatten(0, 1)
        toy.save_grid(world, grid, world.cfg.prompts, cfg.out_dir / "previews" / f"{i:06d}_{n}step.gif")
    return out


@torch.no_grad()
def evaluate(cfg: RCMConfig, world: toy.World, teacher: WanModel, ema: WanModel) -> dict:
    """Exact metrics of the exact-velocity sampler (ground truth, 200 Euler steps, no CFG), the 50-step CFG
    teacher and the EMA student at 1, 2 and 4 steps, on eval_per_prompt samples per prompt."""
    prompt, context = toy.eval_prompts(world, cfg.eval_per_prompt)
    exact = functools.partial(toy.exact_velocity, world)
    samples = {
        "exact": toy.teacher_sample(exact, world, prompt, 1.0, 200, 1.0, seed=2, device=cfg.device),
        "teacher-50": toy.teacher_sample(teacher, world, prompt, cfg.teacher_guidance, 50, 5.0, seed=2,
                                         device=cfg.device),
    }
    for n in (1, 2, 4):
        samples[f"student-{n}"] = student_sample(ema, context.to(cfg.device), n, world.cfg.shape, cfg.sigma_max,
                                                 cfg.backward_timesteps, seed=2, device=cfg.device).cpu()
    return {name: toy.metrics(world, x, prompt) for name, x in samples.items()}


def print_table(results: dict):
    print(f"{'sampler':<12}{'precision':>10}{'wrong':>8}{'mode TV':>9}{'mean ρ':>8}")
    for name, m in results.items():
        print(f"{name:<12}{m['precision']:>10.3f}{m['wrong_prompt']:>8.3f}{m['mode_tv']:>9.3f}{m['mean_rho']:>8.3f}")


# ---------------------------------------------------------------------------------------------------- training
def train(cfg: RCMConfig) -> dict:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    world = toy.make_world(cfg.world)
    teacher, student, fake, ema = build_nets(cfg, toy_teacher(cfg, world))
    opt_s, sched_s = adamw(cfg, student, cfg.lr)
    opt_f, sched_f = adamw(cfg, fake, cfg.lr_fake) if fake is not None else (None, None)
    gamma = ema_gamma(cfg.ema_sigma_rel)
    torch.manual_seed(cfg.seed)

    # Resume: every piece of state, the RNG included, so the continued run repeats the losses it would have had.
    state_path, log_path, start = cfg.out_dir / "state.pt", cfg.out_dir / "metrics.jsonl", 0
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
        tqdm.write(f"resumed from {state_path} at iteration {start}")

    uncond = world.negative.expand(cfg.batch, -1, -1).to(cfg.device)
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="rCM")
    t0 = time.time()
    for i in bar:
        x0, cond, _ = toy.sample_data(world, cfg.batch)
        x0, cond = x0.to(cfg.device), cond.to(cfg.device)
        n_eff = effective_iteration(cfg, i)
        f_student = lambda x, t: denoise(student, x, t, cond)[0]
        record = {"iteration": i}

        if is_student_iteration(cfg, i):
            loss = torch.zeros((), device=cfg.device, dtype=torch.float64)
            if cfg.loss_scale > 0:
                F_teacher = lambda x, t: guided_denoise(teacher, x, t, cond, uncond, cfg.teacher_guidance)[1]
                if i < cfg.dcm_iterations:
                    l_cm = dcm_loss(student, cond, F_teacher, x0, cfg.dcm_total_steps, cfg.dcm_skip, cfg.dcm_shift,
                                    cfg.loss_scale)
                    record["loss/dcm"] = l_cm.mean().item()
                else:
                    r = 1.0 if cfg.tangent_warmup == 0 else min(1.0, i / cfg.tangent_warmup)
                    l_cm, n_nan = scm_loss(student, cond, F_teacher, x0, cfg.p_G, r, cfg.loss_scale)
                    record.update({"loss/scm": l_cm.mean().item(), "scm/nan_samples": n_nan, "scm/r": r})
                loss = loss + l_cm.mean()
            if cfg.fake_score and i >= cfg.tangent_warmup:
                n_sim = n_eff % cfg.max_simulation_steps + 1
                fixed = cfg.backward_timesteps if cfg.dmd_fix_timesteps else None
                G = rcm_sample(f_student, torch.randn_like(x0), simulation_times(n_sim, cfg.batch, cfg.p_D, fixed),
                               grad_last=True)
                l_dmd = dmd_loss(G, lambda x, t: denoise(fake, x, t, cond)[0],
                                 lambda x, t: guided_denoise(teacher, x, t, cond, uncond, cfg.teacher_guidance)[0],
                                 cfg.p_D, cfg.loss_scale_dmd)
                record.update({"loss/dmd": l_dmd.mean().item(), "dmd/steps": n_sim})
                loss = loss + l_dmd.mean()
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            sched_s.step()
            ema_update(ema, student, n_eff, gamma)
            record["lr"] = sched_s.get_last_lr()[0]
        else:
            n_sim = (i - n_eff - 1) % cfg.max_simulation_steps + 1   # cycles over the critic's own iterations
            fixed = cfg.backward_timesteps if cfg.dmd_fix_timesteps else None
            G = rcm_sample(f_student, torch.randn_like(x0), simulation_times(n_sim, cfg.batch, cfg.p_D, fixed))
            l_fake = critic_loss(G, lambda x, t: denoise(fake, x, t, cond)[0], cfg.p_D).mean()
            opt_f.zero_grad(set_to_none=True)
            l_fake.backward()
            opt_f.step()
            sched_f.step()
            record.update({"loss/critic": l_fake.item(), "critic/steps": n_sim, "lr_fake": sched_f.get_last_lr()[0]})

        previewing = (i + 1) % cfg.preview_every == 0 or i + 1 == cfg.iterations
        if previewing:
            record.update(preview(cfg, world, ema, i + 1))
        if i % cfg.log_every == 0 or previewing:
            record["time_s"] = round(time.time() - t0, 2)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")})
        if (i + 1) % cfg.ckpt_every == 0 or i + 1 == cfg.iterations:
            save_state(cfg, i + 1, student, fake, ema, opt_s, opt_f, sched_s, sched_f)

    results = evaluate(cfg, world, teacher, ema)
    (cfg.out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return results


def save_state(cfg, iteration, student, fake, ema, opt_s, opt_f, sched_s, sched_f):
    """state.pt (loads with weights_only=True) and the EMA student in official key names, written atomically."""
    state = {"iteration": iteration, "student": student.state_dict(), "ema": ema.state_dict(),
             "opt_student": opt_s.state_dict(), "sched_student": sched_s.state_dict(), "rng": torch.get_rng_state()}
    if fake is not None:
        state.update(fake=fake.state_dict(), opt_fake=opt_f.state_dict(), sched_fake=sched_f.state_dict())
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    tmp = cfg.out_dir / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(cfg.out_dir / "state.pt")
    save_checkpoint(ema, cfg.out_dir / "ema.safetensors")


if __name__ == "__main__":
    train(tyro.extras.overridable_config_cli(PRESETS))
