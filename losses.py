"""rCM in TrigFlow time: the maps to Wan's rectified flow, the preconditioning that turns a Wan velocity network into a
TrigFlow denoiser (with its tangent), time samplers, the sCM / dCM / DMD / critic losses, and the samplers (rcm.md).

Pure functions of tensors and callables; randomness comes from torch's global RNG (so saving its state makes a
resumed run reproduce its losses). Shapes: latents x [B, C, T, H, W]; TrigFlow time t [B] (or per frame [B, T]).
A `net` is any callable with Wan's signature: net(x, timestep, context) -> v, and
net(x, timestep, context, tangent=(tx, t_timestep)) -> (v, tv), where timestep = 1000·s is the rectified-flow time
and v = ε − x0 for x_s = (1 − s)·x0 + s·ε.
"""
import math
from dataclasses import dataclass
from typing import Literal

import torch

# ------------------------------------------------------------------------------------ time and parameterisation
# TrigFlow: x_t = cos t·x0 + sin t·ε, t ∈ [0, π/2].  Rectified flow: x_s = (1 − s)·x0 + s·ε, s ∈ [0, 1].
# They are the same path up to scale: EDM σ = s/(1 − s) = tan t, and x_s = x_t/(cos t + sin t).


def rf_to_trig(s: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time s -> TrigFlow time t = arctan(s/(1 − s)) (atan2 keeps s = 1 at t = π/2)."""
    return torch.atan2(s, 1 - s)


def trig_to_rf(t: torch.Tensor) -> torch.Tensor:
    """TrigFlow time t -> rectified-flow time s = sin t/(cos t + sin t)."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def precondition(t: torch.Tensor):
    """Coefficients that wrap a Wan velocity net as a TrigFlow denoiser (σ_data = 1), and their derivatives in t.

    t: float64. Returns (c_skip, c_out, c_in, c_noise) and (dc_skip, dc_out, dc_in, dc_noise)/dt, each t's shape.
    x̂0 = c_skip·x_t + c_out·net(c_in·x_t, c_noise) is x_s − s·v, written in TrigFlow variables.
    """
    cos, sin = torch.cos(t), torch.sin(t)
    D = cos + sin
    c = (1 / D, -sin / D, 1 / D, 1000 * sin / D)
    dc = ((sin - cos) / D**2, -1 / D**2, (sin - cos) / D**2, 1000 / D**2)
    return c, dc


def _per_sample(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample [B] or per-frame [B, T] coefficient against x [B, C, T, H, W], in fp32."""
    c = c.view(c.shape[0], 1, 1, 1, 1) if c.ndim == 1 else c.view(c.shape[0], 1, c.shape[1], 1, 1)
    return c.float()


def denoise(net, x_t: torch.Tensor, t: torch.Tensor, context, tangent=None):
    """The TrigFlow denoiser: x̂0 = c_skip·x_t + c_out·net(c_in·x_t, c_noise) and F = (cos t·x_t − x̂0)/sin t.

    x_t [B, C, T, H, W]; t [B] or [B, T] (coefficients in float64, applied in fp32, never bf16).
    Returns (x̂0, F). With tangent = (dx_t, dt) (dt has t's shape) returns ((x̂0, F), (dx̂0, dF)): the directional
    derivatives along (dx_t, dt) through the network's tangent path AND the t-dependent coefficients. Tangents never
    carry gradient: call that form under torch.no_grad().
    """
    if x_t.ndim != 5:
        raise ValueError(f"denoise expects latents [B, C, T, H, W], got shape {tuple(x_t.shape)}")
    t64 = t.double()
    (c_skip, c_out, c_in, c_noise), (dc_skip, dc_out, dc_in, dc_noise) = precondition(t64)
    cos, sin = _per_sample(torch.cos(t64), x_t), _per_sample(torch.sin(t64), x_t)
    x_t = x_t.float()
    x_in = _per_sample(c_in, x_t) * x_t
    if tangent is None:
        v = net(x_in, c_noise.float(), context).float()
        x0 = _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * v
        return x0, (cos * x_t - x0) / sin

    dx_t, dt = tangent[0].float(), tangent[1].double()
    dx_in = _per_sample(dc_in * dt, x_t) * x_t + _per_sample(c_in, x_t) * dx_t
    v, dv = net(x_in, c_noise.float(), context, tangent=(dx_in, (dc_noise * dt).float()))
    v, dv = v.float(), dv.float()
    x0 = _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * v
    dx0 = (_per_sample(dc_skip * dt, x_t) * x_t + _per_sample(c_skip, x_t) * dx_t
           + _per_sample(dc_out * dt, x_t) * v + _per_sample(c_out, x_t) * dv)
    F = (cos * x_t - x0) / sin
    # d/dt of (cos t·x_t − x̂0)/sin t, by the quotient rule.
    dt_ = _per_sample(dt, x_t)
    dF = (cos * dx_t - sin * dt_ * x_t - dx0 - cos * dt_ * F) / sin
    return (x0, F), (dx0, dF)


def guided_denoise(net, x_t: torch.Tensor, t: torch.Tensor, cond, uncond, w: float):
    """Classifier-free guidance: (x̂0, F) = uncond + w·(cond − uncond), the same linear rule in x̂0 and F.
    uncond is the negative-prompt embedding; w = 1 is the plain conditional net (one call)."""
    x0_c, F_c = denoise(net, x_t, t, cond)
    if w == 1:
        return x0_c, F_c
    x0_u, F_u = denoise(net, x_t, t, uncond)
    return x0_u + w * (x0_c - x0_u), F_u + w * (F_c - F_u)


# ------------------------------------------------------------------------------------------------- time samplers
@dataclass
class TimeDist:
    """A training-time distribution over TrigFlow t.
    lognormal: EDM σ = exp(p_mean + p_std·n), n ~ N(0, 1), t = arctan σ.
    shift: u ~ U[0, 1), rectified-flow s = shift·u/(1 + (shift − 1)·u), t = arctan(s/(1 − s))."""
    kind: Literal["lognormal", "shift"] = "lognormal"
    p_mean: float = 0.7
    p_std: float = 1.6
    shift: float = 5.0


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift of rectified-flow time: s = shift·u/(1 + (shift − 1)·u)."""
    return shift * u / (1 + (shift - 1) * u)


def sample_time(dist: TimeDist, n: int, device=None) -> torch.Tensor:
    """n TrigFlow times t ~ dist, float64 [n], drawn on the CPU (so the draw does not depend on the device)."""
    if dist.kind == "lognormal":
        t = torch.atan(torch.exp(dist.p_mean + dist.p_std * torch.randn(n, dtype=torch.float64)))
    else:
        t = rf_to_trig(shift_time(torch.rand(n, dtype=torch.float64), dist.shift))
    return t.to(device)


# ------------------------------------------------------------------------------------------------ sCM student loss
def scm_g(F_minus: torch.Tensor, dF: torch.Tensor, F_T: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, r: float):
    """sCM step 6, the tangent: g = −cos t·√(1 − r²·sin²t)·(F_θ⁻ − F_T) − (r·cos t·sin t·x_t + dF).
    dF = cos t·sin t·dF_θ/dt (the JVP with the cos·sin factor folded into the tangent); r = warm-up ratio."""
    cos, sin = _per_sample(torch.cos(t.double()), x_t), _per_sample(torch.sin(t.double()), x_t)
    return -cos * torch.sqrt(1 - r**2 * sin**2) * (F_minus - F_T) - (r * cos * sin * x_t + dF)


def scm_objective(F_theta: torch.Tensor, g: torch.Tensor, loss_scale: float = 100.0):
    """sCM steps 7-9: NaN/Inf guard, per-sample normalisation g/(‖g‖₂ + 0.1) in float64, and
    L = loss_scale·Σ(F_θ − sg(F_θ) − g)², whose gradient is −2·loss_scale·g·∂F_θ/∂θ.
    Returns (loss [B] float64, number of guarded samples)."""
    dims = tuple(range(1, g.ndim))
    bad = ~(torch.isfinite(g).all(dim=dims) & torch.isfinite(F_theta.detach()).all(dim=dims))
    mask = bad.view(-1, *[1] * (g.ndim - 1))
    g = torch.where(mask, torch.zeros_like(g), g).double()
    F_theta = torch.where(mask, torch.zeros_like(F_theta), F_theta)
    g = g / (g.norm(p=2, dim=dims, keepdim=True) + 0.1)
    loss = loss_scale * ((F_theta - F_theta.detach() - g) ** 2).sum(dim=dims)
    return loss, int(bad.sum())


def scm_loss(net, context, F_teacher, x0: torch.Tensor, p_G: TimeDist, r: float, loss_scale: float = 100.0):
    """Continuous-time consistency (sCM) loss of the student `net` on data x0 [B, C, T, H, W].
    F_teacher(x_t, t) -> F of the (CFG) teacher. r = min(1, iteration/tangent_warmup).
    Returns (loss [B] float64, number of NaN-guarded samples)."""
    t = sample_time(p_G, x0.shape[0], x0.device)
    eps = torch.randn_like(x0)
    cos, sin = _per_sample(torch.cos(t), x0), _per_sample(torch.sin(t), x0)
    x_t = cos * x0 + sin * eps
    with torch.no_grad():
        F_T = F_teacher(x_t, t)
        # JVP "rearrangement": tangents (cos t·sin t·F_T, cos t·sin t) keep dF in a good numerical range.
        (_, F_minus), (_, dF) = denoise(net, x_t, t, context, tangent=(cos * sin * F_T, torch.cos(t) * torch.sin(t)))
    _, F_theta = denoise(net, x_t, t, context)
    g = scm_g(F_minus, dF, F_T, x_t, t, r)
    return scm_objective(F_theta, g, loss_scale)


# ------------------------------------------------------------------------------------------------ dCM student loss
def dcm_loss(net, context, F_teacher, x0: torch.Tensor, total_steps: int = 48, skip: int = 1, shift: float = 5.0,
             loss_scale: float = 100.0) -> torch.Tensor:
    """Discrete-time consistency (dCM) loss, JVP-free: the student's f at t_0 against its own f (no grad) at t_k,
    reached by k Euler steps of the CFG teacher on a shifted N-step grid. Returns loss [B] (fp32)."""
    B = x0.shape[0]
    u = torch.rand(B, dtype=torch.float64) * (1 - skip / total_steps)
    t_grid = [rf_to_trig(shift_time(1 - (u + j / total_steps), shift)).to(x0.device) for j in range(skip + 1)]
    x = _per_sample(torch.cos(t_grid[0]), x0) * x0 + _per_sample(torch.sin(t_grid[0]), x0) * torch.randn_like(x0)
    x0_hat, _ = denoise(net, x, t_grid[0], context)
    with torch.no_grad():
        for t_j, t_next in zip(t_grid[:-1], t_grid[1:]):
            x = x - _per_sample(t_j - t_next, x) * F_teacher(x, t_j)
        target, _ = denoise(net, x, t_grid[-1], context)
    return loss_scale * ((x0_hat - target) ** 2).sum(dim=tuple(range(1, x0.ndim)))


# --------------------------------------------------------------- few-step generation (backward simulation, sampling)
def simulation_times(n: int, batch: int, p_D: TimeDist, fixed: tuple[float, ...] | None = None) -> torch.Tensor:
    """Times of an n-step backward simulation, [n + 1, batch] float64: t_0 = π/2 (pure noise), then n − 1 times,
    either monotonically decreasing draws t_{i+1} = min(t_i, t ~ p_D) or fixed[:n − 1], then 0."""
    t = [torch.full((batch,), math.pi / 2, dtype=torch.float64)]
    for i in range(n - 1):
        t.append(torch.minimum(t[-1], sample_time(p_D, batch)) if fixed is None else torch.full((batch,), fixed[i], dtype=torch.float64))
    return torch.stack(t + [torch.zeros(batch, dtype=torch.float64)])


def sampling_times(n: int, batch: int, sigma_max: float = 80.0, mid_t: tuple[float, ...] = (1.5, 1.4, 1.0)) -> torch.Tensor:
    """Times of the n-step rCM sampler, [n + 1, batch] float64: [arctan σ_max, *mid_t[:n − 1], 0]."""
    if not 1 <= n <= len(mid_t) + 1:
        raise ValueError(f"the rCM sampler takes 1..{len(mid_t) + 1} steps with mid_t={mid_t}, got {n}")
    t = torch.tensor([math.atan(sigma_max), *mid_t[: n - 1], 0.0], dtype=torch.float64)
    return t[:, None].expand(n + 1, batch).contiguous()


def rcm_sample(f, eps: torch.Tensor, t_steps: torch.Tensor, grad_last: bool = False, generator=None) -> torch.Tensor:
    """The student as a few-step generator: x = ε; each step x̂0 = f(x, t_i), then x = cos t_{i+1}·x̂0 + sin t_{i+1}·ε'
    with fresh noise ε'; returns the last x̂0. f(x, t [B]) -> x̂0 is the student's consistency function.
    t_steps [n + 1, B] ends at 0. Only the last step may keep the graph (grad_last); no CFG (it is distilled in)."""
    x, n = eps, t_steps.shape[0] - 1
    for i in range(n):
        with torch.set_grad_enabled(grad_last and i == n - 1):
            x0_hat = f(x, t_steps[i].to(eps.device))
        if i < n - 1:
            t_next = t_steps[i + 1].to(eps.device)
            noise = torch.randn(eps.shape, generator=generator, device=eps.device)
            x = _per_sample(torch.cos(t_next), x0_hat) * x0_hat + _per_sample(torch.sin(t_next), x0_hat) * noise
    return x0_hat


def euler_sample(velocity, eps: torch.Tensor, steps: int = 50, shift: float = 5.0) -> torch.Tensor:
    """The teacher's multi-step sampler: Euler on the rectified-flow ODE dx/ds = v from s = 1 (x = ε) to s = 0 on
    Wan's shifted grid s_i = shift(1 − i/steps). velocity(x, timestep [B]) -> v, timestep = 1000·s (CFG inside)."""
    s = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
    x = eps.float()
    for s_i, s_next in zip(s[:-1], s[1:]):
        v = velocity(x, torch.full((x.shape[0],), 1000 * float(s_i), device=x.device))
        x = x + float(s_next - s_i) * v.float()
    return x


# ------------------------------------------------------------------------------------------- DMD and critic losses
def dmd_loss(G: torch.Tensor, fake_x0, real_x0, p_D: TimeDist, loss_scale_dmd: float = 1.0) -> torch.Tensor:
    """Distribution matching (reverse KL) on generator samples G [B, C, T, H, W] (with grad).
    fake_x0 / real_x0 (x_D, t_D) -> x̂0 of the fake score (no CFG) / the CFG teacher, called without grad.
    The gradient w.r.t. G is 2·loss_scale_dmd·(x̂0_fake − x̂0_real)/weight. Returns loss [B] float64."""
    dims = tuple(range(1, G.ndim))
    t = sample_time(p_D, G.shape[0], G.device)
    x_D = _per_sample(torch.cos(t), G) * G + _per_sample(torch.sin(t), G) * torch.randn_like(G)
    with torch.no_grad():
        x_D = x_D.detach()
        x0_fake, x0_real = fake_x0(x_D, t).double(), real_x0(x_D, t).double()
        weight = (G.detach().double() - x0_real).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
        grad = (x0_fake - x0_real) / weight
        # Samples with a NaN/Inf anywhere contribute neither loss nor gradient.
        bad = ~(torch.isfinite(grad).all(dim=dims) & torch.isfinite(G.detach()).all(dim=dims)).view(-1, *[1] * len(dims))
        grad = torch.where(bad, torch.zeros_like(grad), grad)
    G = torch.where(bad, torch.zeros_like(G), G).double()
    return loss_scale_dmd * ((G - (G - grad).detach()) ** 2).sum(dim=dims)


def critic_loss(G: torch.Tensor, fake_x0, p_D: TimeDist) -> torch.Tensor:
    """Fake-score (critic) loss: denoising score matching on generator samples G (no grad) in x̂0 form,
    Σ(G − x̂0_fake(x_D, t_D))²/sin²t_D, with grad into the fake score. Returns loss [B]."""
    t = sample_time(p_D, G.shape[0], G.device)
    sin = _per_sample(torch.sin(t), G)
    x_D = _per_sample(torch.cos(t), G) * G + sin * torch.randn_like(G)
    return ((G - fake_x0(x_D, t)) ** 2 / sin**2).sum(dim=tuple(range(1, G.ndim)))
