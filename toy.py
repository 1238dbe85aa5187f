"""The toy video world (docs/toy_world.md): a Gaussian mixture over small 16-channel latent clips whose velocity and
quality/diversity metrics are exact, so that rCM can be checked end to end on a CPU in minutes. The trainers use it
as a data source (exact draws or shards), a cached teacher and an evaluator (`ToyRun`, the toy presets).

Prompt p has M modes with unequal weights w_m; mode (p, m) is a blob whose colour names the prompt and whose motion
across frames names the mode, x0 | (p, m) ~ N(μ_{p,m}, σ²I). The unconditional distribution is the mixture over
all prompts (equal prompt weights). A tiny Wan DiT is the teacher (trained here by flow matching); `exact_velocity`
has the Wan call signature, so any code path can use the exact teacher instead.
"""
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v2 as imageio
import torch

from checkpoint import save_checkpoint
from data import write_shards as write_data_shards
from model import CONFIGS, WanConfig, WanModel
from samplers import flow_times, guidance, sample_euler


@dataclass
class ToyConfig:
    """The toy world: P prompts × len(weights) modes of [C, T, H, W] latent clips."""
    prompts: int = 4                                    # prompts (a blob colour each)
    weights: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)   # mode weights inside each prompt (unequal: mode dropping shows)
    shape: tuple[int, int, int, int] = (16, 3, 8, 8)    # [C, T, H, W]: 48 tokens after Wan's (1, 2, 2) patchify
    sigma: float = 0.2                                  # per-element std of a mode
    motion: float = 2.5                                 # blob displacement per frame in latent pixels
    text_len: int = 8                                   # rows of a prompt's "text embedding"
    text_dim: int = 32                                  # its width
    seed: int = 0                                       # seed of the means, colours and embeddings


# The toy teacher/student: a tiny Wan DiT (same model.py as the 1.3B/14B runs). Depth over width: after equal teacher
# steps, 5 layers of 128 err ~20% less at high noise than 3 layers (2 layers of 256: no better than 3 of 128).
TOY_DIT = CONFIGS["toy"]


@dataclass
class World:
    """A drawn toy world: means mu [P, M, C, T, H, W], weights [M], text [P, L, D], negative [L, D], colour [C, 3],
    paint [P, C] (a prompt's blob colour in latent channels)."""
    cfg: ToyConfig
    mu: torch.Tensor
    weights: torch.Tensor
    text: torch.Tensor
    negative: torch.Tensor
    colour: torch.Tensor
    paint: torch.Tensor


def moving_blob(cfg: ToyConfig, paint: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Clips [B, C, T, H, W] of a Gaussian blob of colour paint [B, C] moving along direction angle [B] (radians),
    through the centre at the middle frame; per-element RMS 1."""
    C, T, H, W = cfg.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    step = cfg.motion * (torch.arange(T, dtype=torch.float32) - (T - 1) / 2)          # [T] pixels from the centre
    cy = (H - 1) / 2 + step * angle.float().sin()[:, None]                              # [B, T]
    cx = (W - 1) / 2 + step * angle.float().cos()[:, None]
    blob = torch.exp(-((yy - cy[..., None, None]) ** 2 + (xx - cx[..., None, None]) ** 2) / (2 * 1.5**2))
    clip = paint.float()[:, :, None, None, None] * blob[:, None]                       # [B, C, T, H, W]
    return clip / clip.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt()


def make_world(cfg: ToyConfig) -> World:
    """Draw the mode means, text embeddings and the negative (unconditional) embedding from cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    P, M = cfg.prompts, len(cfg.weights)
    # Colours: prompt p gets a hue in RGB, lifted to C channels by a fixed orthonormal map (rendering inverts it).
    colour = torch.linalg.qr(torch.randn(cfg.shape[0], 3, generator=g))[0]
    hue = torch.stack([torch.tensor([math.cos(a), math.cos(a - 2.1), math.cos(a + 2.1)]).clamp(min=0)
                       for a in (2 * math.pi * p / P for p in range(P))])                       # [P, 3]
    paint = hue @ colour.T                                                                      # [P, C]
    # Motion: mode m of prompt p moves the blob along direction m·2π/M + p/2.
    prompt, mode = torch.arange(P).repeat_interleave(M), torch.arange(M).repeat(P)
    mu = moving_blob(cfg, paint[prompt], 2 * math.pi * mode / M + 0.5 * prompt).view(P, M, *cfg.shape)
    text = torch.randn(P, cfg.text_len, cfg.text_dim, generator=g)
    negative = torch.randn(cfg.text_len, cfg.text_dim, generator=g)
    return World(cfg, mu, torch.tensor(cfg.weights) / sum(cfg.weights), text, negative, colour, paint)


def sample_data(world: World, n: int, generator=None):
    """n clips of the data distribution: x0 [n, C, T, H, W], their text embeddings [n, L, D] and prompt ids [n]."""
    P, M = world.mu.shape[:2]
    prompt = torch.randint(P, (n,), generator=generator)
    mode = torch.multinomial(world.weights, n, replacement=True, generator=generator)
    x0 = world.mu[prompt, mode] + world.cfg.sigma * torch.randn((n, *world.cfg.shape), generator=generator)
    return x0, world.text[prompt], prompt


def prompt_of(world: World, context: torch.Tensor) -> torch.Tensor:
    """The prompt id of each text embedding [B, L, D]; −1 for the negative (unconditional) embedding."""
    table = torch.cat([world.text, world.negative[None]]).to(context)            # [P + 1, L, D]
    d = (context[:, None] - table[None]).pow(2).flatten(2).sum(-1)                # [B, P + 1]
    dist, idx = d.min(dim=1)
    if dist.max() > 1e-6 * table[0].numel():
        raise ValueError("context is not one of this toy world's text embeddings (was the world drawn with another seed?)")
    return torch.where(idx == len(world.text), -1, idx)


def exact_velocity(world: World, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                   first: torch.Tensor | None = None) -> torch.Tensor:
    """The exact rectified-flow velocity v = (x_s − E[x0 | x_s])/s of the world, with Wan's call signature.

    x [B, C, T, H, W]; timestep [B] = 1000·s; context [B, L, D]: a prompt's embedding (its M modes) or the negative
    one (all P·M modes). Each mode k is N((1 − s)·μ_k, v_s·I) at time s, v_s = (1 − s)²σ² + s², so the posterior
    over modes and the posterior mean are closed-form; computed in float64.
    Image-conditioned (first [B, C, H, W], a clean first latent frame): x holds the other T − 1 frames. A Gaussian
    mixture with diagonal covariance conditioned on some coordinates is the mixture of the other coordinates with the
    weights reweighted by how well each mode explains the given ones (`log_prior`), so the same formula applies.
    """
    if timestep.ndim != 1:
        raise ValueError("exact_velocity takes one timestep per sample, [B]")
    sigma = world.cfg.sigma
    mu = world.mu.to(x.device, torch.float64).flatten(0, 1)                        # [K = P·M, C, T, H, W]
    log_prior = log_prior_of(world, context, first).to(x.device)                    # [B, K]
    mu = (mu if first is None else mu[:, :, 1:]).flatten(1)                         # [K, d]
    s = (timestep.double() / 1000).clamp(min=1e-6, max=1.0)[:, None]               # [B, 1]
    xs = x.double().flatten(1)
    v_s = (1 - s) ** 2 * sigma**2 + s**2
    sq = (xs.pow(2).sum(1, keepdim=True) - 2 * (1 - s) * xs @ mu.T + (1 - s) ** 2 * mu.pow(2).sum(1))   # ‖x − (1−s)μ_k‖²
    r = torch.softmax(log_prior - sq / (2 * v_s), dim=1)                           # responsibilities [B, K]
    mean_mu = r @ mu                                                               # Σ_k r_k μ_k
    x0 = mean_mu + (1 - s) * sigma**2 / v_s * (xs - (1 - s) * mean_mu)              # E[x0 | x_s]
    return ((xs - x0) / s).view_as(x).to(x.dtype)


def log_prior_of(world: World, context: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Log weights [B, P·M] of the mixture's components for each sample: the prompt's modes at w_m (all modes at
    w_m/P for the negative embedding), plus, given a first latent frame [B, C, H, W], its log likelihood under each
    mode, −‖first − μ_k[:, 0]‖²/(2σ²) (constants cancel in the softmax)."""
    P, M = world.mu.shape[:2]
    prompt = prompt_of(world, context)
    own = torch.arange(P * M)[None] // M == prompt.cpu()[:, None]                   # [B, K]
    log_prior = torch.where((prompt.cpu()[:, None] == -1) | own, world.weights.double().log().repeat(P), -math.inf)
    if first is not None:
        mu0 = world.mu[:, :, :, 0].flatten(0, 1).flatten(1).double()                # [K, C·H·W]
        log_prior = log_prior - torch.cdist(first.double().cpu().flatten(1), mu0) ** 2 / (2 * world.cfg.sigma**2)
    return log_prior


def conditional_weights(world: World, prompt: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The exact mode weights [B, M] of prompt ids [B] given first latent frames [B, C, H, W]."""
    M = world.mu.shape[1]
    post = torch.softmax(log_prior_of(world, world.text[prompt], first), dim=1)    # [B, P·M], zero off the prompt
    return post.view(len(prompt), -1, M).sum(1)


# --------------------------------------------------------------------------------------------------- exact metrics
def metrics(world: World, x: torch.Tensor, prompt: torch.Tensor, weights: torch.Tensor | None = None) -> dict:
    """Exact quality/diversity of samples x [N, C, T, H, W] drawn for prompt ids [N], per prompt then averaged.

    ρ_k = ‖x − μ_k‖/(σ√d). precision: nearest mode (over all prompts) is the prompt's own and ρ < 2;
    wrong_prompt: nearest mode is another prompt's; mode_tv: total variation between the nearest-mode histogram of
    precise samples and the weights w (1 when no sample is precise); mean_rho: mean ρ of precise samples.
    weights [N, M]: each sample's own mode weights (image-conditioned: `conditional_weights`); the histogram is then
    compared with their mean over the prompt's precise samples.
    """
    P, M = world.mu.shape[:2]
    d = x[0].numel()
    mu = world.mu.flatten(2).flatten(0, 1).double()
    rho = torch.cdist(x.double().flatten(1), mu) / (world.cfg.sigma * math.sqrt(d))  # [N, K]
    best_rho, k = rho.min(dim=1)
    right = k // M == prompt
    precise = right & (best_rho < 2)
    out = {"precision": [], "wrong_prompt": [], "mode_tv": [], "mean_rho": []}
    for p in prompt.unique():
        sel, good = prompt == p, precise & (prompt == p)
        hist = torch.bincount(k[good] % M, minlength=M).double()
        out["precision"].append(good.sum().item() / sel.sum().item())
        out["wrong_prompt"].append((~right & sel).sum().item() / sel.sum().item())
        target = world.weights.double() if weights is None else weights[good].double().mean(0)
        out["mode_tv"].append(0.5 * (hist / hist.sum() - target).abs().sum().item() if good.any() else 1.0)
        out["mean_rho"].append(best_rho[good].mean().item() if good.any() else math.nan)
    return {name: sum(v) / len(v) for name, v in out.items()}


def eval_prompts(world: World, per_prompt: int):
    """The evaluation set: per_prompt samples of every prompt, as prompt ids [P·per_prompt] and contexts."""
    prompt = torch.arange(world.mu.shape[0]).repeat_interleave(per_prompt)
    return prompt, world.text[prompt]


# ------------------------------------------------------------------------------------------------- toy teacher
@dataclass
class TeacherConfig:
    """Flow-matching training of the tiny Wan DiT teacher on the toy world (defaults: the toy presets' teacher; the
    off-mode clips and the hard times are why its 50-step samples are precise, docs/toy_experiments.md)."""
    steps: int = 3000  # optimizer steps
    batch: int = 32  # clips per step
    lr: float = 2e-3  # peak AdamW learning rate (linear warm-up, then cosine decay to 0)
    warmup: int = 100  # warm-up steps
    p_uncond: float = 0.1  # prompt dropout to the negative embedding, so the teacher supports CFG
    hard_fraction: float = 0.5  # share of the batch drawn at s ~ U(hard_from, 1) instead of U(0, 1) ...
    hard_from: float = 0.85  # ... where the posterior over modes is decided and the net errs most
    off_mode_fraction: float = 0.25  # share of clips moving in no mode's direction (train_teacher)


def train_teacher(world: World, cfg: TeacherConfig, dit: WanConfig, path: Path, device="cpu", log=print,
                  ckpt_every: int = 500) -> WanModel:
    """Train the teacher by flow matching and save it (official key names) at path; every ckpt_every steps a partial
    checkpoint beside it, from which an interrupted training resumes.

    x_s = (1 − s)·x0 + s·ε with s ~ U(0, 1) (a hard_fraction of the batch at s ~ U(hard_from, 1)); the regression
    target is the exact FM minimiser E[ε − x0 | x_s] (the toy world knows it), which trains the same function as the
    sampled target ε − x0 with far less variance. Trained on data alone, the net interpolates between modes: 22%
    of its 50-step samples are clean blobs moving about 30° off every mode (the motion direction is a continuous
    latent to it). An off_mode_fraction of the batch therefore starts from such clips (the prompt's blob in a
    random direction, σ noise added), at s ~ U(0, 1); their exact velocity pulls them onto the nearest mode.
    """
    torch.manual_seed(world.cfg.seed + 1)
    net = WanModel(dit).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    # Linear warm-up, then cosine decay to 0: the decay is what makes the tiny net precise.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / cfg.warmup, 0.5 * (1 + math.cos(math.pi * i / cfg.steps))))
    # An interrupted training resumes from its last partial checkpoint, the same steps following (the RNG is saved).
    partial, start = path.with_suffix(".partial.pt"), 0
    if partial.exists():
        state = torch.load(partial, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        log(f"toy teacher: resuming at step {start} from {partial}")
    for step in range(start, cfg.steps):
        if step > start and step % ckpt_every == 0:
            state = dict(net=net.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                         rng=torch.get_rng_state(), step=step)
            torch.save(state, partial.with_suffix(".tmp"))
            partial.with_suffix(".tmp").replace(partial)  # atomic: a kill mid-save keeps the previous one
        x0, context, prompt = sample_data(world, cfg.batch)
        off = torch.rand(cfg.batch) < cfg.off_mode_fraction
        x_off = moving_blob(world.cfg, world.paint[prompt], 2 * math.pi * torch.rand(cfg.batch))
        x0 = torch.where(off.view(-1, 1, 1, 1, 1), x_off + world.cfg.sigma * torch.randn_like(x0), x0)
        drop = torch.rand(cfg.batch) < cfg.p_uncond
        context = torch.where(drop[:, None, None], world.negative, context)
        u = torch.rand(cfg.batch)
        hard = (torch.rand(cfg.batch) < cfg.hard_fraction) & ~off
        s = torch.where(hard, cfg.hard_from + (1 - cfg.hard_from) * u, u)
        x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * torch.randn_like(x0)
        target = exact_velocity(world, x_s, 1000 * s, context)
        x_s, context, s, target = (a.to(device) for a in (x_s, context, s, target))
        loss = (net(x_s, 1000 * s, context) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"teacher step {step}: flow-matching loss {loss.item():.4f}")
    save_checkpoint(net, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    partial.unlink(missing_ok=True)
    return net


@torch.no_grad()
def teacher_sample(velocity, world: World, prompt: torch.Tensor, w: float, steps: int, shift: float, seed: int,
                   device="cpu") -> torch.Tensor:
    """Multi-step Euler sampling with CFG weight w of any Wan-signature velocity, for prompt ids [N]; seeded."""
    context, uncond = world.text[prompt].to(device), world.negative.expand(len(prompt), -1, -1).to(device)
    eps = torch.randn((len(prompt), *world.cfg.shape), generator=torch.Generator().manual_seed(seed)).to(device)
    return sample_euler(guidance(velocity, uncond, w), eps, context, flow_times(steps, shift)).cpu()


# -------------------------------------------------------------------------------------------------------- rendering
def render(world: World, x: torch.Tensor, rows: int, upscale: int = 8) -> torch.Tensor:
    """Samples x [rows·cols, C, T, H, W] -> video frames uint8 [T, rows·H·upscale, cols·W·upscale, 3]: the colour
    map of make_world is inverted (prompt = hue, mode = motion) and each latent pixel becomes an upscale² square."""
    rgb = torch.einsum("nc...,ck->nk...", x.float(), world.colour)                  # [N, 3, T, H, W]
    rgb = (rgb / world.mu.abs().amax() * 1.6).clamp(0, 1)
    rgb = rgb.repeat_interleave(upscale, -2).repeat_interleave(upscale, -1)
    N, _, T, H, W = rgb.shape
    grid = rgb.view(rows, N // rows, 3, T, H, W).permute(3, 0, 4, 1, 5, 2).reshape(T, rows * H, N // rows * W, 3)
    return (grid * 255).round().to(torch.uint8)


def save_grid(world: World, x: torch.Tensor, rows: int, path: Path, fps: int = 3):
    """Write samples as an animated grid (rows = prompts); .gif or .mp4 by the file suffix."""
    frames = list(render(world, x, rows).numpy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    elif path.suffix == ".mp4":
        imageio.mimsave(path, frames, fps=fps, macro_block_size=1, ffmpeg_log_level="error")
    else:
        raise ValueError(f"sample grids are written as .gif or .mp4, got {path}")


# --------------------------------------------------------------------------------- the toy world in a training run
@dataclass
class ToyRun:
    """The toy world as a trainer's data source, cached teacher and exact evaluator."""
    world: ToyConfig = field(default_factory=ToyConfig)  # the toy data distribution
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the toy teacher's training (cached: --toy.cache-dir)
    cache_dir: Path | None = None  # where toy teachers are cached; unset: $RCM_CACHE, else ~/.cache/rcm
    eval_per_prompt: int = 256  # evaluation: samples per prompt for each sampler (0: no evaluation)
    eval_seed: int = 2  # evaluation: seed of the samplers' noise (sample.py reproduces the evaluation with it)
    preview_every: int = 500  # iterations between sample previews of the EMA net (gifs and exact metrics; 0: none)
    data_clips: int = 0  # write this many clips of the world as shards to --data (if it holds none), then train on them


def teacher_path(run: ToyRun, dit: WanConfig) -> Path:
    """The cached toy teacher for this world, DiT and training config, in the user's cache folder (never the working
    directory, which may be read-only)."""
    key = hashlib.sha1(repr((run.world, dit, run.teacher)).encode()).hexdigest()[:10]
    folder = run.cache_dir or Path(os.environ.get("RCM_CACHE") or Path.home() / ".cache" / "rcm")
    return Path(folder) / f"toy_teacher_{key}.safetensors"


def cached_teacher(run: ToyRun, dit: WanConfig, device, log=print) -> Path:
    """The cached toy teacher's checkpoint, trained first if missing (resuming an interrupted training)."""
    path = teacher_path(run, dit)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".probe").touch()
            path.with_suffix(".probe").unlink()
        except OSError as e:
            raise OSError(f"cannot write the toy teacher's cache {path.parent} ({e.strerror}): set --toy.cache-dir "
                          f"or $RCM_CACHE to a writable folder") from None
        log(f"no cached toy teacher: training one ({run.teacher.steps} steps) -> {path}")
        train_teacher(make_world(run.world), run.teacher, dit, path, device, log=log)
    return path


def write_shards(world: World, n: int, folder: Path, seed: int):
    """n clips of the world (drawn from a generator seeded by `seed`) as training shards in `folder` (data.py)."""
    x0, cond, prompt = sample_data(world, n, generator=torch.Generator().manual_seed(seed))
    # clone: a view would save the whole batch's storage with every sample
    samples = ((x0[k].clone(), cond[k].clone(), f"toy prompt {prompt[k].item()}") for k in range(n))
    write_data_shards(samples, folder, samples_per_shard=-(-n // 16))


def print_table(results: dict):
    """One row of exact metrics per sampler."""
    width = max(12, max(map(len, results)) + 2)
    print(f"{'sampler':<{width}}{'precision':>10}{'wrong':>8}{'mode TV':>9}{'mean ρ':>8}")
    for name, m in results.items():
        print(f"{name:<{width}}{m['precision']:>10.3f}{m['wrong_prompt']:>8.3f}{m['mode_tv']:>9.3f}"
              f"{m['mean_rho']:>8.3f}")


def preview(world: World, sample, folder: Path, i: int, save: bool, per_prompt: int = 64) -> dict:
    """A training run's preview at iteration i: sample(prompt ids, seed) -> {name: clips} for per_prompt clips of every
    prompt (every rank samples: the net may be sharded); gif grids in folder/previews (when `save`) and the exact
    metrics as log entries."""
    prompt, _ = eval_prompts(world, per_prompt)
    samples = sample(prompt, 1)
    if save:
        save_grids(world, samples, per_prompt, Path(folder) / "previews", f"{i:06d}_")
    return {f"preview/{name}/{k}": v for name, x in samples.items() for k, v in metrics(world, x, prompt).items()}


def save_grids(world: World, samples: dict, per_prompt: int, folder: Path, prefix: str, cols: int = 8):
    """One gif per sampler of samples [P·per_prompt, ...] (rows = prompts, the first `cols` clips of each)."""
    for name, x in samples.items():
        grid = x.view(world.cfg.prompts, per_prompt, *x.shape[1:])[:, :cols].flatten(0, 1)
        save_grid(world, grid, world.cfg.prompts, Path(folder) / f"{prefix}{name}.gif")
