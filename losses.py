"""The losses of rCM and Causal-rCM: the TrigFlow ↔ rectified-flow time maps, the preconditioning that turns a Wan
velocity network into a TrigFlow denoiser (with its tangent), time samplers, the sCM / dCM / DMD / critic losses
(docs/rcm.md), and the causal stages' teacher-forcing losses (docs/causal_rcm.md). The samplers are in samplers.py.

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


def per_sample(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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
    cos, sin = per_sample(torch.cos(t64), x_t), per_sample(torch.sin(t64), x_t)
    x_t = x_t.float()
    x_in = per_sample(c_in, x_t) * x_t
    if tangent is None:
        v = net(x_in, c_noise.float(), context).float()
        x0 = per_sample(c_skip, x_t) * x_t + per_sample(c_out, x_t) * v
        return x0, (cos * x_t - x0) / sin

    dx_t, dt = tangent[0].float(), tangent[1].double()
    dx_in = per_sample(dc_in * dt, x_t) * x_t + per_sample(c_in, x_t) * dx_t
    v, dv = net(x_in, c_noise.float(), context, tangent=(dx_in, (dc_noise * dt).float()))
    v, dv = v.float(), dv.float()
    x0 = per_sample(c_skip, x_t) * x_t + per_sample(c_out, x_t) * v
    dx0 = (per_sample(dc_skip * dt, x_t) * x_t + per_sample(c_skip, x_t) * dx_t
           + per_sample(dc_out * dt, x_t) * v + per_sample(c_out, x_t) * dv)
    F = (cos * x_t - x0) / sin
    # d/dt of (cos t·x_t − x̂0)/sin t, by the quotient rule.
    dt_ = per_sample(dt, x_t)
    dF = (cos * dx_t - sin * dt_ * x_t - dx0 - cos * dt_ * F) / sin
    return (x0, F), (dx0, dF)


# ------------------------------------------------------------------------------------------------- time samplers
@dataclass
class TimeDist:
    """A training-time distribution over TrigFlow t.
    lognormal: EDM σ = exp(p_mean + p_std·n), n ~ N(0, 1), t = arctan σ.
    shift: u ~ U[0, 1), rectified-flow s = shift·u/(1 + (shift − 1)·u), t = arctan(s/(1 − s))."""
    kind: Literal["lognormal", "shift"] = "lognormal"  # log-normal in EDM σ, or Wan's shifted uniform
    p_mean: float = 0.7  # lognormal: mean of log σ
    p_std: float = 1.6  # lognormal: standard deviation of log σ
    shift: float = 5.0  # shift: the timestep shift


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
    cos, sin = per_sample(torch.cos(t.double()), x_t), per_sample(torch.sin(t.double()), x_t)
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
    cos, sin = per_sample(torch.cos(t), x0), per_sample(torch.sin(t), x0)
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
    x = per_sample(torch.cos(t_grid[0]), x0) * x0 + per_sample(torch.sin(t_grid[0]), x0) * torch.randn_like(x0)
    x0_hat, _ = denoise(net, x, t_grid[0], context)
    with torch.no_grad():
        for t_j, t_next in zip(t_grid[:-1], t_grid[1:]):
            x = x - per_sample(t_j - t_next, x) * F_teacher(x, t_j)
        target, _ = denoise(net, x, t_grid[-1], context)
    return loss_scale * ((x0_hat - target) ** 2).sum(dim=tuple(range(1, x0.ndim)))


# ------------------------------------------------------------------------------------------- DMD and critic losses
def dmd_loss(G: torch.Tensor, fake_x0, real_x0, p_D: TimeDist, loss_scale_dmd: float = 1.0) -> torch.Tensor:
    """Distribution matching (reverse KL) on generator samples G [B, C, T, H, W] (with grad).
    fake_x0 / real_x0 (x_D, t_D) -> x̂0 of the fake score (no CFG) / the CFG teacher, called without grad.
    The gradient w.r.t. G is 2·loss_scale_dmd·(x̂0_fake − x̂0_real)/weight. Returns loss [B] float64."""
    dims = tuple(range(1, G.ndim))
    t = sample_time(p_D, G.shape[0], G.device)
    x_D = per_sample(torch.cos(t), G) * G + per_sample(torch.sin(t), G) * torch.randn_like(G)
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
    sin = per_sample(torch.sin(t), G)
    x_D = per_sample(torch.cos(t), G) * G + sin * torch.randn_like(G)
    return ((G - fake_x0(x_D, t)) ** 2 / sin**2).sum(dim=tuple(range(1, G.ndim)))


# ------------------------------------------------------------------- Causal-rCM: teacher forcing (docs/causal_rcm.md)
# The causal stages work in rectified-flow time s (x_s = (1 − s)·x0 + s·ε, v = ε − x0, timestep 1000·s per frame).
def per_frame(timestep: torch.Tensor, frames: int) -> torch.Tensor:
    """A timestep per clip [B] or per frame [B, T] -> per frame [B, T]."""
    return timestep[:, None].expand(-1, frames) if timestep.ndim == 1 else timestep


def teacher_forced(net, x0: torch.Tensor, chunks: tuple[int, ...]):
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


def sample_rf_time(dist: TimeDist, shape, device) -> torch.Tensor:
    """Rectified-flow times s ~ dist (a TimeDist over TrigFlow t), float64 of the given shape."""
    return trig_to_rf(sample_time(dist, math.prod(shape), device)).view(shape)


def noised(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 − s)·x0 + s·ε with s per clip [B] or per frame [B, T]."""
    s = per_frame(s, x0.shape[2])[:, None, :, None, None].float()
    return (1 - s) * x0 + s * eps


def tf_weight(s: torch.Tensor) -> torch.Tensor:
    """w(s) = exp(−2(s − 0.5)²) − e^(−1/2): zero at s = 0 and 1, largest at s = 1/2."""
    return torch.exp(-2 * (s - 0.5) ** 2) - math.exp(-0.5)


def tf_loss(net, x0: torch.Tensor, context, chunks: tuple[int, ...], p_s: TimeDist,
            forcing: Literal["teacher", "diffusion"] = "teacher", loss_scale: float = 100.0) -> torch.Tensor:
    """Flow matching of the causal net (stage tf): loss_scale·Σ_frames w(s)·mean_{C,H,W}(v̂ − (ε − x0))² over the noisy
    frames. Teacher forcing: one s ~ p_s per clip, v̂ from the packed [x0 | x_s] forward (the clean half is never a
    target). Diffusion forcing: one s per chunk, v̂ from the block-causal forward of x_s. Returns loss [B] (fp32)."""
    B, T = x0.shape[0], x0.shape[2]
    eps = torch.randn_like(x0)
    if forcing == "teacher":
        s = per_frame(sample_rf_time(p_s, (B,), x0.device), T)
        v = teacher_forced(net, x0, chunks)(noised(x0, eps, s), (1000 * s).float(), context)
    else:
        s = sample_rf_time(p_s, (B, len(chunks)), x0.device).repeat_interleave(torch.tensor(chunks, device=x0.device), 1)
        v = net(noised(x0, eps, s), (1000 * s).float(), context, chunks=chunks)
    per_frame_mse = (v.float() - (eps - x0)).pow(2).mean(dim=(1, 3, 4))                 # [B, T]
    return loss_scale * (tf_weight(s).float() * per_frame_mse).sum(1)


def tf_scm_loss(student, v_teacher, x0: torch.Tensor, context, chunks, p_G: TimeDist, r: float,
                loss_scale: float = 100.0):
    """Teacher-forcing sCM (stage tf_scm), written for the consistency function f = x_s − s·v_θ of the noisy half:
    1. s ~ p_G, x_s = (1 − s)·x0 + s·ε;  v_T = v_teacher(x_s, timestep) (the CFG causal teacher, no grad).
    2. JVP of the student velocity along the PF-ODE, tangent v_T on the noisy half and 1 on its time, ZERO on the
       clean half: (v⁻, dv_θ/ds) (no grad).
    3. g = (v_T − v⁻) − r·s·dv_θ/ds = df/ds along the ODE at r = 1 (r: the tangent warm-up ratio);
    4. NaN → 0, g ← g/(‖g‖₂ + 0.1), L = loss_scale·‖v_θ − sg(v_θ) − g‖² (scm_objective), so v_θ moves along g.
    Returns (loss [B] float64, number of NaN-guarded samples)."""
    s = sample_rf_time(p_G, (x0.shape[0],), x0.device)
    x_s = noised(x0, torch.randn_like(x0), s)
    timestep = (1000 * s).float()
    f = teacher_forced(student, x0, chunks)
    with torch.no_grad():
        v_T = v_teacher(x_s, timestep)
        v_minus, dv_ds = f(x_s, timestep, context, tangent=(v_T, torch.full_like(timestep, 1000.0)))  # d(1000 s)/ds
    v = f(x_s, timestep, context)
    g = (v_T - v_minus) - r * s.float()[:, None, None, None, None] * dv_ds
    return scm_objective(v.float(), g, loss_scale)
