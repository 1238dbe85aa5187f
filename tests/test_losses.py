"""losses.py against hand-computed values and torch.func.jvp on small tensors."""
import math

import pytest
import torch

import losses


def stand_in_net(x, timestep, context, tangent=None):
    """A nonlinear function with Wan's call signature (tangent via torch.func.jvp)."""
    def v(x, timestep):
        s = (timestep / 1000).view(-1, 1, 1, 1, 1)
        return torch.tanh(x * (1 + s) + s**2 * x.roll(1, dims=-1)) + context.mean() * s
    if tangent is None:
        return v(x, timestep)
    return torch.func.jvp(v, (x, timestep), tangent)


def test_time_maps_round_trip():
    t = torch.linspace(0.0, math.pi / 2, 101, dtype=torch.float64)
    s = losses.trig_to_rf(t)
    torch.testing.assert_close(losses.rf_to_trig(s), t, rtol=0, atol=1e-12)
    torch.testing.assert_close((s / (1 - s))[:-1], torch.tan(t)[:-1], rtol=1e-9, atol=0)    # EDM σ = tan t
    # Same path up to scale: x_rf = x_trig/(cos t + sin t).
    x0, eps = torch.randn(5), torch.randn(5)
    t1 = torch.tensor(0.7, dtype=torch.float64)
    s1 = losses.trig_to_rf(t1)
    x_trig = torch.cos(t1) * x0 + torch.sin(t1) * eps
    torch.testing.assert_close(x_trig / (torch.cos(t1) + torch.sin(t1)), (1 - s1) * x0 + s1 * eps)


def test_denoise_reproduces_teacher_velocity():
    torch.manual_seed(0)
    x_t, ctx = torch.randn(3, 2, 2, 2, 2), torch.randn(3, 4, 8)
    t = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64)
    x0, F = losses.denoise(stand_in_net, x_t, t, ctx)
    s = losses.trig_to_rf(t).view(-1, 1, 1, 1, 1)
    x_rf = (x_t / (torch.cos(t) + torch.sin(t)).view(-1, 1, 1, 1, 1)).float()
    v = stand_in_net(x_rf, (1000 * s).flatten().float(), ctx)
    # x̂0 from F and back to the network's velocity v = (x_s − x̂0)/s.
    c, si = torch.cos(t).view(-1, 1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1, 1)
    x0_from_F = (c * x_t - si * F)
    torch.testing.assert_close(x0_from_F.float(), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(((x_rf - x0_from_F) / s).float(), v, atol=1e-4, rtol=1e-4)


def test_denoise_tangent_matches_func_jvp():
    torch.manual_seed(0)
    x_t, ctx = torch.randn(2, 3, 2, 2, 4), torch.randn(2, 4, 8)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    F_T = torch.randn_like(x_t)
    cs = torch.cos(t) * torch.sin(t)
    dx, dt = cs.view(-1, 1, 1, 1, 1).float() * F_T, cs
    with torch.no_grad():
        (x0, F), (dx0, dF) = losses.denoise(stand_in_net, x_t, t, ctx, tangent=(dx, dt))
    ref = lambda x, t: losses.denoise(stand_in_net, x, t, ctx)
    (x0_ref, F_ref), (dx0_ref, dF_ref) = torch.func.jvp(ref, (x_t, t), (dx, dt))
    torch.testing.assert_close(F, F_ref)
    torch.testing.assert_close(dx0, dx0_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dF, dF_ref, atol=1e-5, rtol=1e-4)


def _scm_g_by_hand(Fm, dF, FT, x, t, r):
    c, s = math.cos(t), math.sin(t)
    return -c * math.sqrt(1 - r * r * s * s) * (Fm - FT) - (r * c * s * x + dF)


def test_scm_g_normalisation_and_nan_guard():
    shape = (3, 1, 1, 1, 2)
    vals = torch.tensor([[0.5, -1.0, 2.0, 0.25, 1.5, -0.5],
                         [1.0, 0.5, -0.5, 2.0, -1.0, 0.0],
                         [0.2, 0.1, -0.3, 0.4, 0.0, 1.0],
                         [-1.0, 1.0, 0.5, -0.5, 2.0, 0.3]])
    Fm, dF, FT, x = (v.view(shape) for v in vals)
    t = torch.tensor([math.pi / 4, math.pi / 3, 0.3], dtype=torch.float64)
    r = 0.5
    g = losses.scm_g(Fm, dF, FT, x, t, r)
    for b in range(3):
        for k in range(2):
            i = (b, 0, 0, 0, k)
            assert g[i].item() == pytest.approx(_scm_g_by_hand(Fm[i].item(), dF[i].item(), FT[i].item(), x[i].item(), t[b].item(), r), rel=1e-6)

    F_theta = torch.randn(shape)
    F_theta[2, 0, 0, 0, 1] = float("inf")                      # sample 2: Inf prediction
    F_theta.requires_grad_()
    g_bad = g.clone()
    g_bad[1, 0, 0, 0, 0] = float("nan")                        # sample 1: NaN tangent
    loss, n_bad = losses.scm_objective(F_theta, g_bad, loss_scale=100.0)
    assert n_bad == 2
    g0 = g[0].double().flatten()
    g0n = g0 / (math.sqrt(sum(v * v for v in g0.tolist())) + 0.1)
    assert loss[0].item() == pytest.approx(100.0 * float((g0n**2).sum()), rel=1e-9)
    assert loss[1].item() == 0 and loss[2].item() == 0
    loss.sum().backward()
    torch.testing.assert_close(F_theta.grad[0].double().flatten(), -2 * 100.0 * g0n)
    assert torch.all(F_theta.grad[1:] == 0)


def test_dmd_gradient_direction():
    torch.manual_seed(0)
    G = torch.randn(2, 2, 1, 2, 2, requires_grad=True)
    x0_fake, x0_real = torch.randn(2, 2, 1, 2, 2), torch.randn(2, 2, 1, 2, 2)
    loss = losses.dmd_loss(G, lambda x, t: x0_fake, lambda x, t: x0_real, losses.TimeDist("shift", shift=5.0), 3.0)
    loss.sum().backward()
    weight = (G.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(G.grad, 2 * 3.0 * (x0_fake - x0_real) / weight)
    # NaN from the teacher on one sample: no loss and no gradient there.
    G.grad = None
    x0_real[1, 0, 0, 0, 0] = float("nan")
    loss = losses.dmd_loss(G, lambda x, t: x0_fake, lambda x, t: x0_real, losses.TimeDist("shift"), 1.0)
    loss.sum().backward()
    assert loss[1].item() == 0 and torch.all(G.grad[1] == 0) and torch.isfinite(G.grad).all()


def test_critic_loss_weighting():
    torch.manual_seed(0)
    G = torch.randn(3, 2, 1, 2, 2)
    c = torch.randn(3, 2, 1, 2, 2)
    seen = {}

    def fake_x0(x_D, t):
        seen["t"] = t
        return c
    loss = losses.critic_loss(G, fake_x0, losses.TimeDist("lognormal", 0.0, 1.6))
    expected = ((G - c) ** 2).sum(dim=(1, 2, 3, 4)) / torch.sin(seen["t"]) ** 2
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-6, atol=0)


def test_time_samplers_and_schedules():
    torch.manual_seed(0)
    t = losses.sample_time(losses.TimeDist("lognormal", 0.7, 1.6), 20000)
    assert t.min() > 0 and t.max() < math.pi / 2
    assert torch.log(torch.tan(t)).mean().item() == pytest.approx(0.7, abs=0.05)
    s = losses.trig_to_rf(losses.sample_time(losses.TimeDist("shift", shift=5.0), 20000))
    u = s / (5 - 4 * s)    # inverse shift: uniform on [0, 1)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)


def test_student_tangent_through_wan_model_matches_func_jvp(monkeypatch):
    """The sCM JVP pass as training runs it (WanModel's tangent path + preconditioning) vs forward-mode autodiff
    of the plain forward with reference attention."""
    import functools
    import attention_jvp
    import model
    monkeypatch.setattr(model, "attention", functools.partial(attention_jvp.attention, backend="reference"))
    torch.manual_seed(0)
    net = model.WanModel(model.WanConfig(text_len=8, dim=64, ffn_dim=128, freq_dim=32, text_dim=16, num_heads=2,
                                         num_layers=1))
    torch.nn.init.normal_(net.head.head.weight, std=0.1)       # the zero-initialised head would hide everything
    x_t, ctx = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 8, 16)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    cs = torch.cos(t) * torch.sin(t)
    dx, dt = cs.view(-1, 1, 1, 1, 1).float() * torch.randn_like(x_t), cs
    with torch.no_grad():
        (_, F), (_, dF) = losses.denoise(net, x_t, t, ctx, tangent=(dx, dt))
        (_, F_ref), (_, dF_ref) = torch.func.jvp(lambda x, t: losses.denoise(net, x, t, ctx), (x_t, t), (dx, dt))
    torch.testing.assert_close(F, F_ref, atol=1e-5, rtol=1e-5)
    assert (dF - dF_ref).norm() / dF_ref.norm() < 1e-4
