"""samplers.py: the time grids, the few-step rCM sampler (graph only in the last step, the x̂0 it returns), the CFG
wrapper (guided denoising is the guided combination of x̂0 and F), and that streaming one chunk equals sampling it."""
import math

import pytest
import torch

import losses
import samplers
from model import CONFIGS, WanModel


def test_time_grids():
    torch.manual_seed(0)
    sim = samplers.simulation_times(4, 8, losses.TimeDist("shift", shift=5.0))
    assert sim.shape == (5, 8) and torch.all(sim[:-1] >= sim[1:]) and sim[0, 0] == math.pi / 2 and torch.all(sim[-1] == 0)
    fixed = samplers.simulation_times(3, 2, losses.TimeDist(), fixed=(1.5, 1.4, 1.0))
    assert fixed[:, 0].tolist() == [math.pi / 2, 1.5, 1.4, 0.0]
    assert samplers.rcm_times(2, 80.0, (1.5, 1.4, 1.0)).tolist() == [math.atan(80.0), 1.5, 0.0]
    assert samplers.rcm_times(1, math.inf, ())[0].item() == math.pi / 2
    with pytest.raises(ValueError, match="takes 1..3 steps"):
        samplers.rcm_times(4, 80.0, (1.0, 0.5))
    s = samplers.flow_times(4, 1.0, 0.999)
    assert s.tolist() == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0])
    assert samplers.steps_of_chunks((4, 2), 3) == (4, 2, 2)


def test_rcm_sample_keeps_graph_only_in_last_step_and_returns_x0():
    w = torch.tensor(0.5, requires_grad=True)
    grad_on = []

    def net(x, timestep, context):
        grad_on.append(torch.is_grad_enabled())
        return w * x
    eps = torch.randn(2, 1, 1, 2, 2)
    out = samplers.sample_rcm(net, eps, None, samplers.rcm_times(3, 80.0, (1.5, 1.4)), grad_last=True)
    assert grad_on == [False, False, True] and out.requires_grad
    # a net whose x̂0 = x_s − s·v is 3 everywhere: one step returns 3 (the time reaches the net as 1000·s)
    three = lambda x, timestep, context: (x - 3.0) / (timestep / 1000).view(-1, 1, 1, 1, 1)
    one = samplers.sample_rcm(three, eps, None, samplers.rcm_times(1, 80.0, ()))
    torch.testing.assert_close(one, torch.full_like(one, 3.0))


def test_guided_denoising_is_the_guided_combination():
    """x̂0 and F are affine in v with weights summing to one: denoising the CFG-wrapped net gives
    uncond + w·(cond − uncond) of the two denoisings, and w = 1 is the plain net."""
    torch.manual_seed(0)
    net = WanModel(CONFIGS["t2v-tiny"]).eval()
    with torch.no_grad():
        net.head.head.weight.normal_(std=0.1)
    x, t = torch.randn(2, 16, 1, 4, 4), torch.tensor([0.4, 1.2], dtype=torch.float64)
    cond, uncond = torch.randn(2, 5, 48), torch.randn(2, 7, 48)   # different lengths: batched as a list
    with torch.no_grad():
        guided = losses.denoise(samplers.guidance(net, uncond, 3.0), x, t, cond)
        (x0_c, F_c), (x0_u, F_u) = losses.denoise(net, x, t, cond), losses.denoise(net, x, t, uncond)
    torch.testing.assert_close(guided[0], x0_u + 3.0 * (x0_c - x0_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided[1], F_u + 3.0 * (F_c - F_u), rtol=1e-4, atol=1e-4)
    assert samplers.guidance(net, uncond, 1.0) is net


def test_streaming_one_chunk_is_the_few_step_sampler():
    """A clip that is one chunk: streaming through an empty KV cache gives the bidirectional few-step samples."""
    torch.manual_seed(0)
    net = WanModel(CONFIGS["t2v-tiny"]).eval()
    with torch.no_grad():
        net.head.head.weight.normal_(std=0.1)
    context, shape = torch.randn(2, 5, 48), (16, 2, 4, 4)
    with torch.no_grad():
        plain = samplers.generate(net, context, shape, 2, 80.0, (1.0,), torch.Generator().manual_seed(3))
        streamed = list(samplers.generate_stream(net, context, shape, (2,), (2,), 80.0, (1.0,),
                                                 torch.Generator().manual_seed(3)))
    assert len(streamed) == 1
    torch.testing.assert_close(streamed[0], plain, rtol=1e-5, atol=1e-5)


def test_causal_prefill_equals_the_block_causal_clip_with_the_image_frame_clean():
    """Image-to-video by prefill: the image's clean latent frame joins the cache first; the next chunk's velocity then
    equals the block-causal DiT on the whole clip [image frame at t = 0 | chunk at its time]."""
    torch.manual_seed(0)
    net = WanModel(CONFIGS["t2v-tiny"]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    prefix, noise, context = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, 48)
    seen = []
    net.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0], args[1], out)), with_kwargs=True)
    with torch.no_grad():
        out = list(samplers.stream(net, noise, context, (2,), [samplers.rcm_times(1, 80.0, ())],
                                   samplers.kv_cache(net, 1, (16, 3, 4, 4), (1, 2)), prefix=prefix))
        assert len(out) == 2 and torch.equal(out[0], prefix)
        x, t, v = seen[-1]                                    # the chunk's call, against the prefilled cache
        t_clip = torch.cat([torch.zeros(1, 1), t[:, None].expand(1, 2)], dim=1)
        v_clip = net(torch.cat([prefix, x], dim=2), t_clip, context, chunks=(1, 2))
    torch.testing.assert_close(v, v_clip[:, :, 1:], rtol=1e-4, atol=1e-5)


def test_per_expert_guidance_switches_at_the_boundary():
    """Wan2.2's teacher: one guidance weight at timesteps ≥ 1000·boundary, another below."""
    net = lambda x, timestep, context: x * context[:, :1, :1, None, None]    # v_cond = 2x, v_uncond = x
    x, cond, uncond = torch.ones(2, 1, 1, 1, 1), torch.full((2, 1, 1), 2.0), torch.ones(2, 1, 1)
    v = samplers.guidance(net, uncond, 3.0, w_high=5.0, boundary=0.9)(x, torch.tensor([950.0, 100.0]), cond)
    assert v.flatten().tolist() == [1 + 5.0, 1 + 3.0]


def test_conditioned_binds_each_clips_image_and_cfg_keeps_it_in_both_halves():
    """conditioned(net, y=Y): every call gets Y, tiled when CFG doubles the batch (the unconditional half keeps the
    image, only the text changes); guidance also tiles per-clip tensors bound outside it; a wrong batch is refused."""
    seen = []

    def net(x, t, context, y=None):
        seen.append((context.clone(), y))
        return torch.zeros_like(x)
    B = 3
    x, Y = torch.randn(B, 16, 2, 4, 4), torch.randn(B, 20, 2, 4, 4)
    cond, uncond = torch.ones(B, 4, 8), torch.zeros(B, 4, 8)
    samplers.guidance(samplers.conditioned(net, y=Y), uncond, 3.0)(x, torch.zeros(B), cond)
    samplers.conditioned(samplers.guidance(net, uncond, 3.0), y=Y)(x, torch.zeros(B), cond)
    for context, y in seen:
        assert torch.equal(y, torch.cat([Y, Y])) and torch.equal(context, torch.cat([cond, uncond]))
    assert samplers.conditioned(net) is net and samplers.conditioned(net, y=None, clip_fea=None) is net
    with pytest.raises(ValueError, match="I2V conditioning for 3"):
        samplers.conditioned(net, y=Y)(torch.randn(2, 16, 2, 4, 4), torch.zeros(2), cond[:2])


def test_stream_gives_each_chunk_its_own_frames_of_the_image_conditioning():
    """stream(..., image={"y": y}) with a clean prefix: the prefix call gets y's first frames, each chunk (its sampling
    steps and its clean pass) the frames it covers."""
    from model import CacheConfig, KVCache
    frames = []

    def net(x, t, context, y=None, kv_cache=None, kv_append=False, **kw):
        frames.append((x.shape[2], y[0, 0, :, 0, 0].tolist()))
        return torch.zeros_like(x)
    T, y = 5, torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 20, 5, 2, 2)
    cache = KVCache(CacheConfig(max_frames=T), layers=1, batch=1, frame_tokens=1, heads=1, head_dim=8, max_chunk_t=2,
                    device="cpu", dtype=torch.float32)
    out = list(samplers.stream(net, torch.randn(1, 16, 4, 2, 2), torch.zeros(1, 4, 8), (2, 2),
                               [samplers.rcm_times(1, 80.0, (1.0,))] * 2, cache, prefix=torch.zeros(1, 16, 1, 2, 2),
                               image={"y": y}))
    assert [o.shape[2] for o in out] == [1, 2, 2]
    assert frames == [(1, [0.0]), (2, [1.0, 2.0]), (2, [1.0, 2.0]), (2, [3.0, 4.0])]
