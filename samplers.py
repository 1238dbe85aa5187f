"""Every sampler, behind one signature over a Wan-signature net (k-diffusion's sampling.py is the model).

A net is any callable with Wan's call: net(x, timestep, context, **kw) -> v [B, C, T, H, W], timestep = 1000·s in
rectified-flow time s (x_s = (1 − s)·x0 + s·ε, v = ε − x0); a WanModel, the toy world's exact velocity, a
`guidance` wrapper, a teacher-forced causal net. A sampler is

    x0 = sample_*(net, noise, context, times, ...)      noise [B, C, T, H, W]; times 1-D, from noise to data

    sample_rcm     the few-step consistency sampler of a distilled student, TrigFlow times t (docs/rcm.md)
    sample_euler   Euler on the flow-matching ODE, rectified-flow times s (the teacher; the toy's metrics)
    sample_unipc   UniPC order 2 with the UniC corrector (Wan's default teacher solver)

and `stream` runs one of them chunk by chunk against a KV cache (Causal-rCM streaming, and, keeping the last step's
graph, the self-forcing rollout of training). Classifier-free guidance is a net wrapper (`guidance`): x̂0 and F are
affine in v with weights that sum to one, so guided denoising is plain denoising of the wrapped net.
"""
import functools
import math

import torch

from losses import TimeDist, denoise, per_sample, sample_time, shift_time
from model import CacheConfig, KVCache


# ---------------------------------------------------------------------------------------------- guidance
def guidance(net, uncond, w: float, w_high: float | None = None, boundary: float = 1.0):
    """Classifier-free guidance as a Wan-signature net: v = v_uncond + w·(v_cond − v_uncond), both halves in one batch
    (so one KV cache serves both in streaming). uncond: the negative embedding(s), [B, L', D] or a list; w = 1: net.
    w_high: the weight at timesteps ≥ 1000·boundary instead (Wan2.2's per-expert guidance)."""
    if w == 1 and w_high in (None, 1):
        return net

    def guided(x, timestep, context, **kw):
        # per-clip keyword tensors (I2V conditioning bound outside the guidance) serve both halves
        kw = {k: torch.cat([v, v]) if torch.is_tensor(v) and len(v) == len(x) else v for k, v in kw.items()}
        v_c, v_u = net(torch.cat([x, x]), torch.cat([timestep, timestep]), _both(context, uncond), **kw).chunk(2)
        if w_high is None:
            return v_u + w * (v_c - v_u)
        high = timestep.reshape(len(x), -1).amax(1) >= 1000 * boundary
        return v_u + torch.where(high, w_high, w).view(-1, *[1] * (x.ndim - 1)).to(v_c) * (v_c - v_u)
    return guided


def conditioned(net, **image):
    """The net with each clip's I2V conditioning bound (y [B, 20, T, H, W], clip_fea [B, 257, 1280]; None entries
    dropped): a call on k·B rows gets k copies, so under `guidance` (applied on top) the unconditional half keeps the
    image and drops only the text, as Wan's I2V pipelines do. Nothing to bind: the net itself."""
    image = {k: v for k, v in image.items() if v is not None}
    if not image:
        return net

    def f(x, timestep, context, **kw):
        if any(len(x) % len(v) for v in image.values()):
            raise ValueError(f"a batch of {len(x)} clips, and I2V conditioning for {len(next(iter(image.values())))}")
        return net(x, timestep, context, **kw, **{k: v.repeat(len(x) // len(v), *[1] * (v.ndim - 1))
                                                  for k, v in image.items()})
    return f


def _both(cond, uncond):
    """[cond | uncond] contexts as one batch: a tensor when the shapes agree, else a list (the net pads each row)."""
    if torch.is_tensor(cond) and torch.is_tensor(uncond) and cond.shape[1:] == uncond.shape[1:]:
        return torch.cat([cond, uncond.to(cond)])
    return [*cond, *uncond]


# ------------------------------------------------------------------------------------------------ times
# Causal-rCM's few-step times s = 15/16, 5/6, 5/8 (rectified flow) as TrigFlow times t = arctan(s/(1 − s)).
CAUSAL_MID_T = tuple(math.atan(s / (1 - s)) for s in (15 / 16, 5 / 6, 5 / 8))


def check_times(sigma_max: float, mid_t: tuple[float, ...]):
    """One clear message for few-step times that would sample garbage: σ_max > 0 and the intermediate times strictly
    decreasing inside (0, arctan σ_max)."""
    if not sigma_max > 0:
        raise ValueError(f"--sigma-max must be positive, got {sigma_max}")
    t0 = math.atan(sigma_max)
    if any(not 0 < t < t0 for t in mid_t) or any(a <= b for a, b in zip(mid_t, mid_t[1:])):
        raise ValueError(f"--mid-t {' '.join(map(str, mid_t))}: the TrigFlow times of the steps after the first must "
                         f"decrease strictly inside (0, arctan σ_max = {t0:.4f})")


def rcm_times(n: int, sigma_max: float, mid_t: tuple[float, ...]) -> torch.Tensor:
    """TrigFlow times of the n-step rCM sampler, [n + 1] float64: [arctan σ_max, *mid_t[:n − 1], 0]
    (σ_max = inf starts at pure noise, t = π/2)."""
    if not 1 <= n <= len(mid_t) + 1:
        raise ValueError(f"the rCM sampler takes 1..{len(mid_t) + 1} steps with mid_t={tuple(mid_t)}, got {n}: lower "
                         f"the steps or give one more --mid-t time per extra step")
    return torch.tensor([math.atan(sigma_max), *mid_t[:n - 1], 0.0], dtype=torch.float64)


def simulation_times(n: int, batch: int, p_D: TimeDist, fixed: tuple[float, ...] | None = None) -> torch.Tensor:
    """Times of an n-step backward simulation (training), [n + 1, batch] float64: t_0 = π/2, then n − 1 times, either
    monotonically decreasing draws t_{i+1} = min(t_i, t ~ p_D) or fixed[:n − 1], then 0."""
    t = [torch.full((batch,), math.pi / 2, dtype=torch.float64)]
    for i in range(n - 1):
        t.append(torch.minimum(t[-1], sample_time(p_D, batch)) if fixed is None
                 else torch.full((batch,), fixed[i], dtype=torch.float64))
    return torch.stack(t + [torch.zeros(batch, dtype=torch.float64)])


def flow_times(steps: int, shift: float = 5.0, s_max: float = 1.0) -> torch.Tensor:
    """Wan's shifted flow-matching grid, [steps + 1] float64: s_i = shift(s_max·(1 − i/steps)), ending at 0."""
    return shift_time(s_max * torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)


def steps_of_chunks(steps_per_chunk: tuple[int, ...], n_chunks: int) -> tuple[int, ...]:
    """Steps of each chunk: chunk i takes entry min(i, len − 1) (e.g. (4, 2): 4 steps for the first chunk, then 2)."""
    return tuple(steps_per_chunk[min(i, len(steps_per_chunk) - 1)] for i in range(n_chunks))


# ---------------------------------------------------------------------------------------------- samplers
def sample_rcm(net, noise, context, t_steps, *, generator=None, grad_last: bool = False, final_kwargs=None, **kw):
    """The distilled student as a few-step generator (no CFG: it is distilled in). x = ε; each step
    x̂0 = denoise(net, x, t_i), then x = cos t_{i+1}·x̂0 + sin t_{i+1}·ε' with fresh noise ε' (from `generator`, or
    the global RNG); returns the last x̂0 (fp32). t_steps [n + 1] or per sample [n + 1, B], ending at 0.
    grad_last: only the last step keeps its graph (backward simulation, self forcing). kw reach every net call,
    final_kwargs the last one too (streaming's noisy context appends its K/V there)."""
    x, n = noise, t_steps.shape[0] - 1
    t_steps = t_steps.to(noise.device)
    if t_steps.ndim == 1:
        t_steps = t_steps[:, None].expand(-1, len(noise))
    for i in range(n):
        last = i == n - 1
        step_kw = {**kw, **(final_kwargs or {})} if last else kw
        step_net = functools.partial(net, **step_kw) if step_kw else net
        with torch.set_grad_enabled(grad_last and last and torch.is_grad_enabled()):
            x0 = denoise(step_net, x, t_steps[i], context)[0]
        if not last:
            fresh = torch.randn(x0.shape, generator=generator, device=x0.device)
            x = per_sample(torch.cos(t_steps[i + 1]), x0) * x0 + per_sample(torch.sin(t_steps[i + 1]), x0) * fresh
    return x0


def sample_euler(net, noise, context, s_steps, **kw):
    """Euler on the rectified-flow ODE dx/ds = v from x = ε at s_0 to s_n (= 0), e.g. on flow_times(steps, shift)."""
    x = noise.float()
    s = [float(s_i) for s_i in s_steps]
    for s_i, s_next in zip(s[:-1], s[1:]):
        v = net(x, torch.full((x.shape[0],), 1000 * s_i, device=x.device), context, **kw)
        x = x + (s_next - s_i) * v.float()
    return x


def unipc_update(x, s, s_next, lam, lam_next, m, m_prev=None, lam_prev=None, m_next=None):
    """One UniPC update (bh2 variant, data prediction) of x at rectified-flow time s to s_next, in float32.

    In half log-SNR λ = log((1 − s)/s) the ODE is solved exactly for a constant x0 prediction m (the DDIM step); the
    change of m along the path is taken from divided differences: D = (m_prev − m)/r with r = (λ_prev − λ)/h (order 2),
    and for the corrector UniC also from m_next, the prediction at the predicted point. B(h) = e^{−h} − 1.
    Predictor (m_next None): weight 1/2 on D. Corrector: weights ρ solve R·ρ = b (order 2) or ρ = 1/2 (order 1).
    """
    h = lam_next - lam
    B = math.expm1(-h)
    x_next = (s_next / s) * x - (1 - s_next) * B * m
    D, rho = [], []
    if m_prev is not None:
        r = (lam_prev - lam) / h
        D.append((m_prev - m) / r)
    if m_next is None:
        rho = [0.5] * len(D)
    else:
        D.append(m_next - m)
        if len(D) == 1:
            rho = [0.5]
        else:  # b_k = k!·φ_{k+1}(−h)/B(h) from the exponential integrator; R = [[1, 1], [r, 1]]
            phi2 = B / -h - 1
            b1, b2 = phi2 / B, 2 * (phi2 / -h - 0.5) / B
            rho0 = (b1 - b2) / (1 - r)
            rho = [rho0, b1 - rho0]
    for rho_k, D_k in zip(rho, D):
        x_next = x_next - (1 - s_next) * B * rho_k * D_k
    return x_next


def sample_unipc(net, noise, context, s_steps, **kw):
    """Wan's default teacher solver: UniPC order 2 with the UniC corrector on the flow-matching ODE, from x = ε.

    s_steps as Wan's scheduler, flow_times(steps, shift, s_max=0.999) (λ would be −∞ at s = 1), ending at 0; Wan
    rounds the timestep down to an integer, here it is not rounded. Each call gives the x0 prediction m_i = x_i − s_i·v_i;
    UniC first corrects x_i with it (no extra call), then UniP steps on; the order is 1 on the first and the last
    step. Returns x at s = 0 (fp32).
    """
    s = [float(s_i) for s_i in s_steps]
    steps = len(s) - 1
    lam = [math.log((1 - s_i) / s_i) for s_i in s[:-1]] + [math.inf]
    x, m, x_prev, order = noise.float(), [], None, 1
    for i in range(steps):
        v = net(x, torch.full((x.shape[0],), 1000 * s[i], device=x.device), context, **kw)
        m.append(x - s[i] * v.float())
        if i > 0:  # UniC: redo the last step with the prediction at its end point
            two = order == 2
            x = unipc_update(x_prev, s[i - 1], s[i], lam[i - 1], lam[i], m[-2], m[-3] if two else None,
                             lam[i - 2] if two else None, m_next=m[-1])
        order = min(2, i + 1, steps - i)
        x_prev = x
        x = unipc_update(x, s[i], s[i + 1], lam[i], lam[i + 1], m[-1], m[-2] if order == 2 else None,
                         lam[i - 1] if order == 2 else None)
        m = m[-2:]
    return x


# ---------------------------------------------------------------------------------------- streaming
def kv_cache(net, batch: int, shape, chunks: tuple[int, ...], cache: CacheConfig | None = None,
             dtype=None) -> KVCache:
    """The KV cache of `net` for `batch` clips of latent shape [C, T, H, W] cut into `chunks`: by default it holds
    the whole clip (nothing is evicted). dtype: the unquantised storage, default the weights' (bf16 for FSDP nets with
    fp32 masters that compute in bf16). Under context parallelism each rank holds its share of the heads."""
    _, T, H, W = shape
    ph, pw = net.cfg.patch_size[1:]
    weight = net.blocks[0].self_attn.q.weight
    ranks = 1 if net.cp_group is None else net.cp_group.size()
    return KVCache(cache or CacheConfig(max_frames=T), layers=net.cfg.num_layers, batch=batch,
                   frame_tokens=(H // ph) * (W // pw), heads=net.cfg.num_heads // ranks,
                   head_dim=net.cfg.dim // net.cfg.num_heads, max_chunk_t=max(chunks), device=weight.device,
                   dtype=weight.dtype if dtype is None else dtype)


def frames_of(image: dict, start: int, stop: int) -> dict:
    """The I2V conditioning of latent frames [start, stop): y's frames (5-D tensors are sliced), the rest whole."""
    return {k: v[:, :, start:stop] if v is not None and v.ndim == 5 else v for k, v in image.items()}


def stream(net, noise, context, chunks: tuple[int, ...], times, cache: KVCache, *, sampler=sample_rcm,
           noisy_context: bool = False, prefix=None, image: dict | None = None, **kw):
    """Causal-rCM streaming: yields each chunk's latents [B, C, Tc, H, W] as soon as `sampler` has denoised them.

    noise [B, C, T, H, W]: each chunk's starting noise; times[i]: chunk i's times for the sampler (rcm_times, or a
    flow grid for Euler); cache: a KVCache for B clips (emptied first); kw: the sampler's (generator, grad_last).
    Chunk i is sampled against [cached chunks | itself]; then its K/V join the cache: a clean pass of x̂0 at s = 0
    (no grad; run when the next chunk is asked for, so decoding this one need not wait, and none after the last), or,
    with noisy_context (rCM only), the last step's own pass on its noisy input, one forward less per chunk. The cache
    holds constants, so no gradient crosses chunks. prefix [B, C, Tp, H, W]: clean latent frames (image-to-video with
    a T2V net: the image's) that join the cache first, at s = 0, and are yielded as they are; `chunks` then cut the
    frames after it. image: an I2V net's conditioning of the whole clip (y [B, 20, T, H, W]; `conditioned`), each call
    given its own chunk's frames of it.
    """
    image, base = image or {}, net
    if noisy_context and sampler is not sample_rcm:
        raise ValueError("noisy_context appends the K/V of the few-step sampler's last step: it needs sample_rcm")
    cache.reset()
    Tp = 0 if prefix is None else prefix.shape[2]  # (the noise holds the frames after the prefix)
    if prefix is not None:
        with torch.no_grad():
            net = conditioned(base, **frames_of(image, 0, Tp))
            net(prefix, torch.zeros(len(prefix), device=prefix.device), context, kv_cache=cache, kv_append=True)
        yield prefix
    f0 = 0
    for i, (Tc, t) in enumerate(zip(chunks, times)):
        net = conditioned(base, **frames_of(image, Tp + f0, Tp + f0 + Tc))
        extra = {"final_kwargs": {"kv_append": True}} if noisy_context else {}
        x0 = sampler(net, noise[:, :, f0:f0 + Tc], context, t, kv_cache=cache, **extra, **kw)
        yield x0
        if not noisy_context and i < len(chunks) - 1:
            with torch.no_grad():
                net(x0.detach(), torch.zeros(len(x0), device=x0.device), context, kv_cache=cache, kv_append=True)
        f0 += Tc


def stream_times(chunks: tuple[int, ...], steps_per_chunk: tuple[int, ...], sigma_max: float,
                 mid_t: tuple[float, ...]) -> list[torch.Tensor]:
    """The few-step TrigFlow times of every chunk: rcm_times of its number of steps (steps_of_chunks)."""
    return [rcm_times(n, sigma_max, mid_t) for n in steps_of_chunks(steps_per_chunk, len(chunks))]


# ------------------------------------------------------------------------------- seeded generation
def draw_noise(batch: int, shape, generator: torch.Generator) -> torch.Tensor:
    """ε [batch, *shape] from `generator`, on its device."""
    return torch.randn((batch, *shape), generator=generator, device=generator.device)


@torch.no_grad()
def generate(net, context, shape, steps: int, sigma_max: float, mid_t: tuple[float, ...],
             generator: torch.Generator) -> torch.Tensor:
    """len(context) clips of latent shape [C, T, H, W] from the few-step student: ε, then the rCM sampler, all random
    draws from `generator` (the trainers' evaluation and sample.py call this, so a seed gives the same samples)."""
    noise = draw_noise(len(context), shape, generator)
    return sample_rcm(net, noise, context, rcm_times(steps, sigma_max, mid_t), generator=generator)


@torch.no_grad()
def generate_stream(net, context, shape, chunks: tuple[int, ...], steps_per_chunk: tuple[int, ...],
                    sigma_max: float, mid_t: tuple[float, ...], generator: torch.Generator,
                    cache: KVCache | None = None, noisy_context: bool = False, prefix=None, image: dict | None = None):
    """Like `generate`, streamed chunk by chunk (yields each chunk's latents); cache: default kv_cache of the net;
    prefix: clean first frames, then `chunks` cut the shape's remaining frames; image: an I2V net's conditioning of the
    whole clip (see `stream`)."""
    C, T, H, W = shape
    noise = draw_noise(len(context), (C, T - (0 if prefix is None else prefix.shape[2]), H, W), generator)
    cache = kv_cache(net, len(context), shape, chunks) if cache is None else cache
    # the times go to the GPU now, while it is idle: a copy from pageable memory inside the loop would wait for
    # the chunks queued before it and leave the GPU idle until the host has queued work again
    times = [t.to(noise.device) for t in stream_times(chunks, steps_per_chunk, sigma_max, mid_t)]
    yield from stream(net, noise, context, chunks, times, cache, noisy_context=noisy_context, prefix=prefix,
                      image=image, generator=generator)

