"""The toy world: exact velocity (by sampling with it), exact metrics on hand-made sample sets, rendering, and a
shortened toy run of train_rcm.py against loose quality bounds."""
import dataclasses
import functools
import json
import math

import pytest
import torch

import sample
import samplers
import toy
import train_rcm

SMALL = toy.ToyConfig(shape=(16, 2, 4, 4))   # the same world-building code at a quarter of the size


def test_exact_velocity_sampling_recovers_the_mixture():
    world = toy.make_world(SMALL)
    prompt, _ = toy.eval_prompts(world, 1000)
    x = toy.teacher_sample(functools.partial(toy.exact_velocity, world), world, prompt, 1.0, 200, 1.0, seed=0)
    m = toy.metrics(world, x, prompt)
    assert m["precision"] >= 0.98 and m["mode_tv"] <= 0.03 and m["wrong_prompt"] == 0
    assert 0.9 < m["mean_rho"] < 1.1


def test_motion_sets_the_distance_between_modes():
    """Mode means keep RMS 1 at every blob speed; slower blobs bring a prompt's modes closer (at speed 0 they are
    one clip)."""
    gaps = []
    for motion in (2.5, 1.0, 0.0):
        world = toy.make_world(dataclasses.replace(toy.ToyConfig(), motion=motion))
        assert torch.allclose(world.mu.pow(2).flatten(2).mean(-1), torch.ones(world.mu.shape[:2]), atol=1e-5)
        mu = world.mu[0].flatten(1)
        gaps.append(torch.cdist(mu, mu)[0, 1].item())
    assert gaps[0] > 1.5 * gaps[1] > 0 and gaps[2] < 1e-4


def test_unconditional_velocity_covers_all_prompts():
    world = toy.make_world(SMALL)
    n = 400
    uncond = world.negative.expand(n, -1, -1)
    eps = torch.randn((n, *SMALL.shape), generator=torch.Generator().manual_seed(0))
    v = functools.partial(toy.exact_velocity, world)
    x = samplers.sample_euler(v, eps, uncond, samplers.flow_times(50, 5.0))
    mu = world.mu.flatten(2).flatten(0, 1)
    nearest_prompt = torch.cdist(x.flatten(1), mu).argmin(1) // len(SMALL.weights)
    share = torch.bincount(nearest_prompt, minlength=SMALL.prompts) / n
    assert torch.all((share - 1 / SMALL.prompts).abs() < 0.07)


def test_metrics_on_hand_made_sets():
    world = toy.make_world(SMALL)
    sigma, d = SMALL.sigma, world.mu[0, 0].numel()
    # Exact weights, every sample exactly at ρ = 1 from its mode: perfect.
    counts = [4, 3, 2, 1]
    mode = torch.tensor([m for m, c in enumerate(counts) for _ in range(c)])
    direction = torch.randn(len(mode), d)
    direction = direction / direction.norm(dim=1, keepdim=True) * sigma * d**0.5
    x = world.mu[1, mode] + direction.view(-1, *SMALL.shape)
    p = torch.full((len(mode),), 1)
    m = toy.metrics(world, x, p)
    assert m["precision"] == 1 and m["wrong_prompt"] == 0 and abs(m["mode_tv"]) < 1e-6
    assert abs(m["mean_rho"] - 1) < 1e-5
    # Mode collapse onto mode 0: TV = 1 − w_0.
    m = toy.metrics(world, world.mu[1, [0] * 10], torch.full((10,), 1))
    assert abs(m["mode_tv"] - (1 - world.weights[0].item())) < 1e-6
    # Another prompt's modes: all wrong, none precise.
    m = toy.metrics(world, world.mu[2, mode], p)
    assert m["wrong_prompt"] == 1 and m["precision"] == 0 and m["mode_tv"] == 1
    # A washed-out clip (the mode at a quarter of its amplitude) is far from every mode: not precise.
    m = toy.metrics(world, 0.25 * world.mu[1, 0][None], torch.tensor([1]))
    assert m["precision"] == 0


def test_mode_interpolation_is_imprecise_and_the_exact_flow_snaps_it():
    """A blob moving halfway between two modes' directions (what an under-trained teacher hallucinates) is no precise
    sample, and the exact velocity, started from it at s = 0.5, carries it onto a mode: the teacher's off-mode
    training clips have targets that commit to one mode."""
    cfg = toy.ToyConfig()
    world = toy.make_world(cfg)
    P, M = world.mu.shape[:2]
    prompt = torch.arange(P).repeat(32)
    between = toy.moving_blob(cfg, world.paint[prompt], 2 * math.pi * 0.5 / M + 0.5 * prompt)
    assert torch.allclose(toy.moving_blob(cfg, world.paint[:1], torch.tensor([0.0])), world.mu[0, 0:1], atol=1e-5)
    m = toy.metrics(world, between, prompt)
    assert m["precision"] == 0 and m["wrong_prompt"] == 0
    g = torch.Generator().manual_seed(0)
    x = 0.5 * between + 0.5 * torch.randn(between.shape, generator=g)
    s = torch.linspace(0.5, 0, 51)
    for s_i, s_next in zip(s[:-1], s[1:]):
        x = x + (s_next - s_i) * toy.exact_velocity(world, x, torch.full((len(x),), 1000 * s_i.item()), world.text[prompt])
    m = toy.metrics(world, x, prompt)
    assert m["precision"] >= 0.98 and m["wrong_prompt"] == 0


def test_context_must_come_from_the_world():
    world = toy.make_world(SMALL)
    x = torch.zeros(1, *SMALL.shape)
    try:
        toy.exact_velocity(world, x, torch.tensor([500.0]), torch.randn(1, SMALL.text_len, SMALL.text_dim))
    except ValueError as e:
        assert "text embeddings" in str(e)
    else:
        raise AssertionError("a foreign context must be refused")


def test_render_and_save_grid(tmp_path):
    world = toy.make_world(SMALL)
    x = world.mu.flatten(0, 1)                               # [P·M, C, T, H, W]
    frames = toy.render(world, x, rows=SMALL.prompts)
    assert frames.shape == (2, SMALL.prompts * 32, len(SMALL.weights) * 32, 3) and frames.dtype == torch.uint8
    assert frames.float().std() > 10                        # blobs on black, not a flat image
    toy.save_grid(world, x, SMALL.prompts, tmp_path / "grid.gif")
    assert (tmp_path / "grid.gif").stat().st_size > 100


@pytest.mark.parametrize("teacher_size", ["same", "larger", "i2v", "experts"])
def test_short_toy_run_meets_loose_bounds(tmp_path, monkeypatch, teacher_size):
    """The toy preset end to end at a fraction of its size (a smaller, wider-moded world, a smaller DiT, a short
    teacher training and rCM run): loose bounds that an untrained or broken pipeline misses. "larger": a teacher of
    twice the width distilled into the small student, which starts from a small teacher (its base). "i2v": every
    net an image-to-video DiT, each clip given its first frame, measured against the exact conditional mode weights.
    "experts": a two-expert teacher (each expert trained on its side of the boundary) into a two-expert student."""
    import model
    preset = train_rcm.PRESETS["toy"][1]
    world_cfg = toy.ToyConfig(shape=(16, 2, 4, 4), sigma=0.3)
    dit = dataclasses.replace(toy.TOY_DIT, dim=64, ffn_dim=128, num_layers=2)
    if teacher_size == "i2v":
        dit = dataclasses.replace(dit, model_type="i2v", in_dim=36, clip=False)
    # (each expert of a two-expert teacher sees only its times: 800 steps each, measured to pass where 400 did not)
    teacher_train = dataclasses.replace(preset.toy.teacher, steps=800 if teacher_size == "experts" else 400)
    teacher = tmp_path / "teacher.safetensors"
    if teacher_size == "experts":
        teacher = toy.cached_teacher(toy.ToyRun(world=world_cfg, teacher=teacher_train, cache_dir=tmp_path), dit,
                                     "cpu", log=lambda s: None, boundary=0.875)
    else:
        toy.train_teacher(toy.make_world(world_cfg), teacher_train, dit, teacher, log=lambda s: None)
    sizes = dict(teacher_ckpt=teacher, boundary=0.875 if teacher_size == "experts" else None)
    if teacher_size == "larger":
        monkeypatch.setitem(model.CONFIGS, "toy-test-large", dataclasses.replace(dit, dim=128, ffn_dim=256))
        sizes = dict(teacher_model="toy-test-large", student_ckpt=teacher, teacher_ckpt=tmp_path / "large.safetensors")
        toy.train_teacher(toy.make_world(world_cfg), teacher_train, model.CONFIGS["toy-test-large"],
                          sizes["teacher_ckpt"], log=lambda s: None)
    results = train_rcm.train(dataclasses.replace(
        preset, toy=dataclasses.replace(preset.toy, world=world_cfg, preview_every=10**6, eval_per_prompt=64), dit=dit,
        out_dir=tmp_path / "run", device="cpu", iterations=90, batch=8, dcm_iterations=15, tangent_warmup=30,
        ckpt_every=10**6, **sizes))
    assert results["exact"]["precision"] >= 0.98 and results["exact"]["mode_tv"] <= 0.2
    assert all(m["wrong_prompt"] <= 0.02 for m in results.values())     # every sampler follows its prompt
    for n in (1, 2, 4):  # measured 0.93 / 0.91 / 0.75 precision, TV 0.11 / 0.23 / 0.21
        assert results[f"student-{n}"]["precision"] >= 0.5 and results[f"student-{n}"]["mode_tv"] <= 0.35

    # The exported student carries its sampling settings: sample.py with no sampling flags repeats the evaluation
    # (same world, architecture, σ_max, mid_t, samples and seed), so it prints the run's student figures.
    export = tmp_path / "run" / ("ema" if teacher_size == "experts" else "ema.safetensors")  # (two experts: a folder)
    again = sample.main(sample.Config(dit_path=export, toy=True, device="cpu",
                                      save_path=tmp_path / "samples"))
    assert json.dumps(again) == json.dumps({k: v for k, v in results.items() if k.startswith("student-")})
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 3


def test_image_conditioned_world_exact_sampler():
    """Given a clip's first latent frame (Wan's I2V conditioning y), the world is the mixture of the other frames with
    reweighted modes: at pure noise the exact denoiser returns the first frame itself and Σ w'_k μ_k of the other
    frames, and the exact sampler (200 Euler steps) meets the bar against the exact conditional mode weights
    (precision ≥ 0.98, mode TV ≤ 0.03), its first frame the given one."""
    world = toy.make_world(toy.ToyConfig())
    g = torch.Generator().manual_seed(0)
    x0, context, prompt = toy.sample_data(world, 512, generator=g)
    first = x0[:, :, 0]
    y = toy.image_condition(first, x0.shape[2])
    assert y.shape == (512, 20, *x0.shape[2:]) and (y[:, :4, 0] == 1).all() and (y[:, :, 1:] == 0).all()
    w = toy.conditional_weights(world, prompt, first)                       # [N, M]
    assert torch.allclose(w.sum(1), torch.ones(len(w), dtype=w.dtype))
    # at s = 1 the denoiser's mean is the first frame, then the reweighted mixture mean of the later frames
    rest_mu = world.mu[:, :, :, 1:].double()                                # [P, M, C, T − 1, H, W]
    expected = torch.einsum("nm,nm...->n...", w, rest_mu[prompt])
    noise = torch.randn(x0.shape, generator=g)
    v = toy.exact_velocity(world, noise, torch.full((len(noise),), 1000.0), context, y=y)
    torch.testing.assert_close((noise - v)[:, :, 0], first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((noise - v)[:, :, 1:].double(), expected, rtol=1e-4, atol=1e-4)
    # the exact conditional sampler, as a Wan-signature I2V net with the conditioning bound (both CFG halves keep it)
    net = samplers.conditioned(functools.partial(toy.exact_velocity, world), y=y)
    x = samplers.sample_euler(samplers.guidance(net, world.negative.expand(512, -1, -1), 1.0), noise, context,
                              samplers.flow_times(200, 1.0))
    torch.testing.assert_close(x[:, :, 0], first, rtol=0, atol=1e-3)
    m = toy.metrics(world, x, prompt, y)
    assert m["precision"] >= 0.98 and m["mode_tv"] <= 0.03 and m["wrong_prompt"] == 0
    # a sampler that ignores the image follows the weights of the prompt alone: the marginal histogram is right (TV
    # against the prompt's weights is small), the conditional one is not
    blind = samplers.sample_euler(functools.partial(toy.exact_velocity, world), noise, context,
                                  samplers.flow_times(200, 1.0))
    assert toy.metrics(world, blind, prompt)["mode_tv"] < 0.1 and toy.metrics(world, blind, prompt, y)["mode_tv"] > 0.4
    # in this world a blob's position in the first frame already names its direction of motion, i.e. its mode
    assert (w.max(1).values > 0.99).all() and (w.argmax(1) != w[torch.randperm(len(w), generator=g)].argmax(1)).any()


def test_toy_shards_hold_one_clip_per_sample(tmp_path):
    """--toy.data-clips N writes N clips, not N views of the whole batch (each sample's latent.pt is one clip)."""
    import data
    world = toy.make_world(toy.ToyConfig())
    toy.write_shards(world, 64, tmp_path, seed=0)
    clip_bytes = math.prod(world.cfg.shape) * 4
    total = sum(p.stat().st_size for p in tmp_path.glob("shard*.tar"))
    assert total < 64 * clip_bytes * 3                     # (the whole batch per sample would be 64× that)
    loader = data.make_loader(data.DataConfig(path=str(tmp_path), batch_size=8, num_workers=0, shuffle_buffer=1))
    assert next(loader)["latent"].shape == (8, *world.cfg.shape)
