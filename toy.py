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
from model import CONFIGS, EXPERT_FOLDERS, WanConfig, WanModel
from samplers import conditioned, flow_times, guidance, sample_euler


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


def draw_clips(world: World, prompt: torch.Tensor, generator=None) -> torch.Tensor:
    """Clips x0 [N, C, T, H, W] of the given prompt ids [N]: a mode by its weight, then σ noise."""
    mode = torch.multinomial(world.weights, len(prompt), replacement=True, generator=generator)
    return world.mu[prompt, mode] + world.cfg.sigma * torch.randn((len(prompt), *world.cfg.shape), generator=generator)


def sample_data(world: World, n: int, generator=None):
    """n clips of the data distribution: x0 [n, C, T, H, W], their text embeddings [n, L, D] and prompt ids [n]."""
    prompt = torch.randint(world.mu.shape[0], (n,), generator=generator)
    return draw_clips(world, prompt, generator), world.text[prompt], prompt


def image_condition(first: torch.Tensor, frames: int) -> torch.Tensor:
    """Wan's I2V conditioning y [B, 20, T, H, W] (vae.image_condition's layout) for first latent frames [B, 16, H, W]:
    a 4-channel mask that is 1 on frame 0, then the latents of [image, blank frames], which in the toy world (no VAE)
    are the first frame followed by zeros."""
    B, C, H, W = first.shape
    y = first.new_zeros(B, 4 + C, frames, H, W)
    y[:, :4, 0] = 1
    y[:, 4:, 0] = first
    return y


def prompt_of(world: World, context: torch.Tensor) -> torch.Tensor:
    """The prompt id of each text embedding [B, L, D]; −1 for the negative (unconditional) embedding."""
    table = torch.cat([world.text, world.negative[None]]).to(context)            # [P + 1, L, D]
    d = (context[:, None] - table[None]).pow(2).flatten(2).sum(-1)                # [B, P + 1]
    dist, idx = d.min(dim=1)
    if dist.max() > 1e-6 * table[0].numel():
        raise ValueError("context is not one of this toy world's text embeddings (was the world drawn with another seed?)")
    return torch.where(idx == len(world.text), -1, idx)


def exact_velocity(world: World, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """The exact rectified-flow velocity v = (x_s − E[x0 | x_s])/s of the world, with Wan's call signature.

    x [B, C, T, H, W]; timestep [B] = 1000·s; context [B, L, D]: a prompt's embedding (its M modes) or the negative
    one (all P·M modes). Each mode k is N((1 − s)·μ_k, v_s·I) at time s, v_s = (1 − s)²σ² + s², so the posterior
    over modes and the posterior mean are closed-form; computed in float64.
    Image-conditioned (y [B, 20, T, H, W] from `image_condition`: the clean first latent frame f is given): frame 0's
    velocity is (x_s − f)/s exactly. A Gaussian mixture with diagonal covariance, conditioned on some coordinates, is
    the mixture of the other coordinates with the weights reweighted by how well each mode explains the given ones
    (`log_prior_of`), so the same formula applies to the other frames.
    """
    if timestep.ndim != 1:
        raise ValueError("exact_velocity takes one timestep per sample, [B]")
    sigma = world.cfg.sigma
    first = None if y is None else y[:, 4:, 0].double()
    mu = world.mu.to(x.device, torch.float64).flatten(0, 1)                        # [K = P·M, C, T, H, W]
    log_prior = log_prior_of(world, context, first).to(x.device)                    # [B, K]
    mu = (mu if first is None else mu[:, :, 1:]).flatten(1)                         # [K, d]
    s = (timestep.double() / 1000).clamp(min=1e-6, max=1.0)[:, None]               # [B, 1]
    xs = (x if first is None else x[:, :, 1:]).double().flatten(1)
    v_s = (1 - s) ** 2 * sigma**2 + s**2
    sq = (xs.pow(2).sum(1, keepdim=True) - 2 * (1 - s) * xs @ mu.T + (1 - s) ** 2 * mu.pow(2).sum(1))   # ‖x − (1−s)μ_k‖²
    r = torch.softmax(log_prior - sq / (2 * v_s), dim=1)                           # responsibilities [B, K]
    mean_mu = r @ mu                                                               # Σ_k r_k μ_k
    x0 = mean_mu + (1 - s) * sigma**2 / v_s * (xs - (1 - s) * mean_mu)              # E[x0 | x_s]
    v = (xs - x0) / s
    if first is None:
        return v.view_as(x).to(x.dtype)
    v0 = (x[:, :, 0].double() - first) / s.view(-1, 1, 1, 1)                       # frame 0 is known: x0 = f
    return torch.cat([v0[:, :, None], v.view(len(x), x.shape[1], -1, *x.shape[3:])], 2).to(x.dtype)


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
def metrics(world: World, x: torch.Tensor, prompt: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """Exact quality/diversity of samples x [N, C, T, H, W] drawn for prompt ids [N], per prompt then averaged.

    ρ_k = ‖x − μ_k‖/(σ√d). precision: nearest mode (over all prompts) is the prompt's own and ρ < 2;
    wrong_prompt: nearest mode is another prompt's; mode_tv: total variation between the nearest-mode histogram of
    precise samples and the weights w (1 when no sample is precise); mean_rho: mean ρ of precise samples.
    Image-conditioned samples (y [N, 20, T, H, W]: the conditioning they were drawn with): the precise samples are
    grouped by the mode their image makes likeliest (`conditional_weights`), and mode_tv is the size-weighted mean over
    groups of the TV between the group's histogram and its mean conditional weights; a sampler that ignores the
    image keeps the marginal histogram but fails this.
    """
    P, M = world.mu.shape[:2]
    weights = None if y is None else conditional_weights(world, prompt, y[:, 4:, 0])
    d = x[0].numel()
    mu = world.mu.flatten(2).flatten(0, 1).double()
    rho = torch.cdist(x.double().flatten(1), mu) / (world.cfg.sigma * math.sqrt(d))  # [N, K]
    best_rho, k = rho.min(dim=1)
    right = k // M == prompt
    precise = right & (best_rho < 2)
    out = {"precision": [], "wrong_prompt": [], "mode_tv": [], "mean_rho": []}
    for p in prompt.unique():
        sel, good = prompt == p, precise & (prompt == p)
        out["precision"].append(good.sum().item() / sel.sum().item())
        out["wrong_prompt"].append((~right & sel).sum().item() / sel.sum().item())
        if weights is None:
            out["mode_tv"].append(_tv(k[good] % M, world.weights.double()) if good.any() else 1.0)
        else:  # per group of samples whose image makes the same mode likeliest, weighted by the group's size
            group = weights.argmax(1)
            out["mode_tv"].append(sum((good & (group == g)).sum().item() / good.sum().item() *
                                      _tv(k[good & (group == g)] % M, weights[good & (group == g)].double().mean(0))
                                      for g in group[good].unique()) if good.any() else 1.0)
        out["mean_rho"].append(best_rho[good].mean().item() if good.any() else math.nan)
    return {name: sum(v) / len(v) for name, v in out.items()}


def _tv(modes: torch.Tensor, target: torch.Tensor) -> float:
    """Total variation between the histogram of mode ids [n] (n ≥ 1) and the weights target [M]."""
    hist = torch.bincount(modes, minlength=len(target)).double()
    return 0.5 * (hist / hist.sum() - target).abs().sum().item()


def eval_prompts(world: World, per_prompt: int):
    """The evaluation set: per_prompt samples of every prompt, as prompt ids [P·per_prompt] and contexts."""
    prompt = torch.arange(world.mu.shape[0]).repeat_interleave(per_prompt)
    return prompt, world.text[prompt]


def eval_images(world: World, prompt: torch.Tensor, seed: int) -> torch.Tensor:
    """The image-conditioned evaluation's conditioning y [N, 20, T, H, W] for prompt ids [N]: the first frames of
    clips of each prompt drawn from the world (seeded apart from the samplers' noise)."""
    x0 = draw_clips(world, prompt, torch.Generator().manual_seed(10_000 + seed))
    return image_condition(x0[:, :, 0], world.cfg.shape[1])


def eval_conditioning(world: World, dit: WanConfig, prompt: torch.Tensor, seed: int) -> dict:
    """The keyword arguments every net of an evaluation takes for prompt ids [N]: {"y": eval_images} for an
    image-to-video DiT (`samplers.conditioned` binds them), else none."""
    return {"y": eval_images(world, prompt, seed)} if dit.model_type == "i2v" else {}


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
                  ckpt_every: int = 500, s_range: tuple[float, float] = (0.0, 1.0)) -> WanModel:
    """Train the teacher by flow matching and save it (official key names) at path; every ckpt_every steps a partial
    checkpoint beside it, from which an interrupted training resumes.

    x_s = (1 − s)·x0 + s·ε with s ~ U(0, 1) (a hard_fraction of the batch at s ~ U(hard_from, 1)); the regression
    target is the exact FM minimiser E[ε − x0 | x_s] (the toy world knows it), which trains the same function as the
    sampled target ε − x0 with far less variance. Trained on data alone, the net interpolates between modes: 22%
    of its 50-step samples are clean blobs moving about 30° off every mode (the motion direction is a continuous
    latent to it). An off_mode_fraction of the batch therefore starts from such clips (the prompt's blob in a
    random direction, σ noise added), at s ~ U(0, 1); their exact velocity pulls them onto the nearest mode.
    An image-to-video DiT (model_type "i2v") is trained the same way, each clip conditioned on its own first frame
    (`image_condition`), against the exact image-conditioned velocity. s_range: the times this net serves (an
    expert of a two-expert teacher); every draw is mapped into it.
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
        torch.set_rng_state(state["rng"].cpu())  # (map_location moved it to the device)
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
        lo, hi = s_range
        hard &= hi == 1.0  # (the hard times s ≥ hard_from are the top of the axis: a low-noise expert has none)
        hard_lo = max(cfg.hard_from, lo)
        s = torch.where(hard, hard_lo + (1 - hard_lo) * u, lo + (hi - lo) * u)
        x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * torch.randn_like(x0)
        image = {"y": image_condition(x0[:, :, 0], x0.shape[2])} if dit.model_type == "i2v" else {}
        target = exact_velocity(world, x_s, 1000 * s, context, **image)
        x_s, context, s, target = (a.to(device) for a in (x_s, context, s, target))
        loss = (net(x_s, 1000 * s, context, **{k: v.to(device) for k, v in image.items()}) - target).pow(2).mean()
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
                   device="cpu", image: dict | None = None) -> torch.Tensor:
    """Multi-step Euler sampling with CFG weight w of any Wan-signature velocity, for prompt ids [N]; seeded.
    image: the I2V conditioning of each sample (`eval_conditioning`), kept by both CFG halves."""
    context, uncond = world.text[prompt].to(device), world.negative.expand(len(prompt), -1, -1).to(device)
    eps = torch.randn((len(prompt), *world.cfg.shape), generator=torch.Generator().manual_seed(seed)).to(device)
    velocity = conditioned(velocity, **{k: v.to(device) for k, v in (image or {}).items()})
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


def teacher_path(run: ToyRun, dit: WanConfig, boundary: float | None = None) -> Path:
    """The cached toy teacher for this world, DiT and training config, in the user's cache folder (never the working
    directory, which may be read-only). Two experts switched at `boundary`: a folder in Wan2.2's layout,
    high_noise_model/ and low_noise_model/ (model.EXPERT_FOLDERS)."""
    key = hashlib.sha1(repr((run.world, dit, run.teacher) + ((boundary,) if boundary is not None else ()))
                       .encode()).hexdigest()[:10]
    folder = run.cache_dir or Path(os.environ.get("RCM_CACHE") or Path.home() / ".cache" / "rcm")
    return Path(folder) / (f"toy_teacher_{key}.safetensors" if boundary is None else f"toy_experts_{key}")


def cached_teacher(run: ToyRun, dit: WanConfig, device, log=print, boundary: float | None = None) -> Path:
    """The cached toy teacher's checkpoint, trained first if missing (resuming an interrupted training); with a
    boundary, two experts, each trained by flow matching on its side of it (s ≥ boundary: the high-noise one)."""
    path = teacher_path(run, dit, boundary)
    files = [path] if boundary is None else [path / name / "diffusion_pytorch_model.safetensors" for name in EXPERT_FOLDERS]
    ranges = [(0.0, 1.0)] if boundary is None else [(boundary, 1.0), (0.0, boundary)]
    for file, s_range in zip(files, ranges):
        if file.exists():
            continue
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.with_suffix(".probe").touch()
            file.with_suffix(".probe").unlink()
        except OSError as e:
            raise OSError(f"cannot write the toy teacher's cache {path.parent} ({e.strerror}): set --toy.cache-dir "
                          f"or $RCM_CACHE to a writable folder") from None
        log(f"no cached toy teacher: training one ({run.teacher.steps} steps" +
            ("" if boundary is None else f", the expert for s in {s_range}") + f") -> {file}")
        train_teacher(make_world(run.world), run.teacher, dit, file, device, log=log, s_range=s_range)
    return path


def write_shards(world: World, n: int, folder: Path, seed: int, image: bool = False):
    """n clips of the world (drawn from a generator seeded by `seed`) as training shards in `folder` (data.py);
    image: with each clip's I2V conditioning y (its first frame)."""
    x0, cond, prompt = sample_data(world, n, generator=torch.Generator().manual_seed(seed))
    y = image_condition(x0[:, :, 0], x0.shape[2]) if image else None
    # clone: a view would save the whole batch's storage with every sample
    samples = ((x0[k].clone(), cond[k].clone(), f"toy prompt {prompt[k].item()}",
                {} if y is None else {"y": y[k].clone()}) for k in range(n))
    write_data_shards(samples, folder, samples_per_shard=-(-n // 16))


def print_table(results: dict):
    """One row of exact metrics per sampler."""
    width = max(12, max(map(len, results)) + 2)
    print(f"{'sampler':<{width}}{'precision':>10}{'wrong':>8}{'mode TV':>9}{'mean ρ':>8}")
    for name, m in results.items():
        print(f"{name:<{width}}{m['precision']:>10.3f}{m['wrong_prompt']:>8.3f}{m['mode_tv']:>9.3f}"
              f"{m['mean_rho']:>8.3f}")


def preview(world: World, dit: WanConfig, sample, folder: Path, i: int, save: bool, per_prompt: int = 64) -> dict:
    """A training run's preview at iteration i: sample(prompt ids, seed, image) -> {name: clips} for per_prompt clips
    of every prompt (image: `eval_conditioning` for the trained DiT `dit`; every rank samples: the net may be
    sharded); gif grids in folder/previews (when `save`) and the exact metrics as log entries."""
    prompt, _ = eval_prompts(world, per_prompt)
    image = eval_conditioning(world, dit, prompt, 1)
    samples = sample(prompt, 1, image)
    if save:
        save_grids(world, samples, per_prompt, Path(folder) / "previews", f"{i:06d}_")
    return {f"preview/{name}/{k}": v for name, x in samples.items()
            for k, v in metrics(world, x, prompt, image.get("y")).items()}


def save_grids(world: World, samples: dict, per_prompt: int, folder: Path, prefix: str, cols: int = 8):
    """One gif per sampler of samples [P·per_prompt, ...] (rows = prompts, the first `cols` clips of each)."""
    for name, x in samples.items():
        grid = x.view(world.cfg.prompts, per_prompt, *x.shape[1:])[:, :cols].flatten(0, 1)
        save_grid(world, grid, world.cfg.prompts, Path(folder) / f"{prefix}{name}.gif")
