"""train_causal.py: the teacher-forcing loss (weights, only the noisy half), the TF-sCM tangent against torch.func.jvp,
the self-forcing rollout's graph (only each chunk's last step), and tiny toy runs of every stage that resume exactly."""
import dataclasses
import functools
import json
import math
import re
import shutil

import pytest
import torch
import tyro

import attention_jvp
import losses
import model as wan
import sample
import samplers
import toy
import train_causal
import training
from model import WanConfig, WanModel, chunk_frames, load_checkpoint

TINY_DIT = WanConfig(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64, freq_dim=32,
                     text_dim=32, out_dim=16, num_heads=2, num_layers=1, qk_norm=True, cross_attn_norm=True, eps=1e-6)
TINY_WORLD = toy.ToyConfig(shape=(16, 3, 4, 4))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = WanModel(TINY_DIT)
    with torch.no_grad():  # the official init zeroes the head: give it weights so outputs depend on the input
        net.head.head.weight.normal_(std=0.1)
    return net


def test_tf_loss_weights_frames_and_ignores_the_clean_half():
    """100·Σ_frames w(s)·mean(v̂ − (ε − x0))², the clean half's outputs never enter (NaN there changes nothing) and
    the clean half gets time 0 and the noisy half 1000·s."""
    B, C, T, H, W = 3, 16, 3, 4, 4
    x0 = torch.randn(B, C, T, H, W)
    seen = {}
    out = torch.randn(B, C, 2 * T, H, W, requires_grad=True)

    def net(x, t, context, chunks, teacher_forcing):
        seen.update(x=x, t=t, chunks=chunks, tf=teacher_forcing)
        return torch.where(torch.arange(2 * T)[None, None, :, None, None] < T, math.nan, out)
    loss = losses.tf_loss(net, x0, None, (1, 2), train_causal.TFConfig().p_s)
    assert seen["tf"] and seen["chunks"] == (1, 2)
    torch.testing.assert_close(seen["x"][:, :, :T], x0)
    assert (seen["t"][:, :T] == 0).all() and (seen["t"][:, T:] == seen["t"][:, T:T + 1]).all()
    s = seen["t"][:, T].double() / 1000
    eps = (seen["x"][:, :, T:] - (1 - s.float())[:, None, None, None, None] * x0) / s.float()[:, None, None, None, None]
    w = torch.exp(-2 * (s - 0.5) ** 2) - math.exp(-0.5)
    expected = 100 * (w[:, None] * (out[:, :, T:] - (eps - x0)).pow(2).mean(dim=(1, 3, 4))).sum(1)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-4, atol=1e-4)
    loss.sum().backward()
    assert (out.grad[:, :, :T] == 0).all() and (out.grad[:, :, T:] != 0).any()
    assert losses.tf_weight(torch.tensor([0.0, 1.0])).abs().max() < 1e-7   # no weight at the ends


def test_diffusion_forcing_draws_one_time_per_chunk():
    seen = {}

    def net(x, t, context, chunks):
        seen.update(t=t, chunks=chunks)
        return torch.zeros_like(x)
    loss = losses.tf_loss(net, torch.randn(4, 16, 5, 4, 4), None, (1, 2, 2), train_causal.TFConfig().p_s, "diffusion")
    t = seen["t"]
    assert t.shape == (4, 5) and seen["chunks"] == (1, 2, 2) and loss.shape == (4,)
    assert (t[:, 1] == t[:, 2]).all() and (t[:, 3] == t[:, 4]).all() and (t[:, 0] != t[:, 1]).any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tf_scm_tangent_is_the_jvp_with_a_constant_clean_half(monkeypatch, device):
    """(v, dv/ds) of the teacher-forced student along (v_T on the noisy half, 1 on its time) equals torch.func.jvp of
    the packed forward's noisy half as a function of (x_s, s) alone, i.e. with a zero tangent on the clean half.
    (CUDA: the tangent goes through the Triton kernel's teacher-forcing mask, the oracle through the reference.)"""
    net, chunks = tiny_net().to(device), (1, 1, 1)
    B, T = 2, 3
    x0, x_s, v_T = (torch.randn(B, 16, T, 4, 4, device=device) for _ in range(3))
    context, s = torch.randn(B, 8, 32, device=device), torch.tensor([0.3, 0.8], device=device)
    tangent = (v_T, torch.full((B,), 1000.0, device=device))
    f = losses.teacher_forced(net, x0, chunks)
    with torch.no_grad():
        v, dv = f(x_s, 1000 * s, context, tangent=tangent)
        # a clean half that mattered would change the tangent: noisy chunk 0 sees no clean frame, the others do
        _, dv_other = losses.teacher_forced(net, x0 + 1, chunks)(x_s, 1000 * s, context, tangent=tangent)
    monkeypatch.setattr(wan, "attention", functools.partial(attention_jvp.attention, backend="reference"))
    v_ref, dv_ref = torch.func.jvp(lambda x, s_: f(x, 1000 * s_, context), (x_s, s), (v_T, torch.ones_like(s)))
    tol = dict(rtol=1e-3, atol=1e-4) if device == "cpu" else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(v, v_ref, **tol)
    torch.testing.assert_close(dv, dv_ref, **tol)
    torch.testing.assert_close(dv_other[:, :, 0], dv[:, :, 0], **tol)
    assert (dv_other[:, :, 1:] - dv[:, :, 1:]).abs().max() > 1e-3


def test_tf_scm_is_the_trigflow_scm_of_losses_py(monkeypatch):
    """The TF-sCM tangent g = (v_T − v⁻) − s·dv/ds (= df/ds for f = x_s − s·v) equals the tangent of rCM's TrigFlow
    sCM (losses.scm_g at r = 1, checked by hand there) for the same teacher-forced student and teacher velocity, up
    to the per-sample factor cos t/(cos t + sin t)² = cos t·ds/dt: after the per-sample normalisation, the same loss."""
    net = tiny_net().double()
    B = 3
    x0, v_T = torch.randn(B, 16, 3, 4, 4, dtype=torch.float64), torch.randn(B, 16, 3, 4, 4, dtype=torch.float64)
    context = torch.randn(B, 8, 32, dtype=torch.float64)
    seen = {}

    def v_teacher(x_s, timestep):
        seen.update(x_s=x_s, s=timestep.double() / 1000)
        return v_T
    monkeypatch.setattr(losses, "scm_objective", lambda v, g, loss_scale: (seen.update(g=g), (g.sum(), 0))[1])
    losses.tf_scm_loss(net, v_teacher, x0, context, (1, 1, 1), train_causal.CMConfig().p_G, r=1.0)

    t = losses.rf_to_trig(seen["s"])
    cos, sin = (losses.per_sample(a, x0).double() for a in (torch.cos(t), torch.sin(t)))
    x_t = seen["x_s"] * (cos + sin)                                      # TrigFlow x_t = (cos t + sin t)·x_s
    F_T = (cos * x_t - (seen["x_s"] - losses.per_sample(seen["s"], x0).double() * v_T)) / sin  # same x̂0 as v_T
    f = losses.teacher_forced(net, x0, (1, 1, 1))
    with torch.no_grad():
        tangent = (cos * sin * F_T, torch.cos(t) * torch.sin(t))
        (_, F_minus), (_, dF) = losses.denoise(f, x_t, t, context, tangent=tangent)
    g_trig = losses.scm_g(F_minus, dF, F_T, x_t, t, 1.0)
    torch.testing.assert_close(g_trig, cos / (cos + sin) ** 2 * seen["g"], rtol=1e-3, atol=1e-5)


def test_tf_scm_loss_pulls_v_along_the_normalised_tangent():
    net, chunks = tiny_net(), (1, 2)
    x0, context = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 8, 32)
    v_teacher = lambda x, timestep: torch.zeros_like(x)
    loss, n_nan = losses.tf_scm_loss(net, v_teacher, x0, context, chunks, train_causal.CMConfig().p_G, r=1.0)
    assert loss.shape == (2,) and n_nan == 0
    # L = 100·‖v − sg(v) − g‖² = 100·‖g‖² at the current weights, and ‖g‖ < 1 after the normalisation
    assert ((loss > 0) & (loss < 100)).all()
    loss.sum().backward()
    assert net.head.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("noisy_context", [False, True])
def test_rollout_keeps_the_graph_only_at_each_chunks_last_step(noisy_context):
    net, chunks = tiny_net(), chunk_frames(3, 1, 1)
    calls = []
    net.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((torch.is_grad_enabled(), kwargs.get("kv_append", False),
                                              float(args[1][0]) / 1000)), with_kwargs=True)
    eps, context = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 8, 32)
    times = [samplers.rcm_times(3, math.inf, samplers.CAUSAL_MID_T)] * 3   # s = 1, 15/16, 5/6
    cache = samplers.kv_cache(net, 2, eps.shape[1:], chunks)
    video = torch.cat(list(samplers.stream(net, eps, context, chunks, times, cache, grad_last=True,
                                           noisy_context=noisy_context)), 2)
    assert video.shape == eps.shape and video.requires_grad
    steps = [(False, False, 1.0), (False, False, 15 / 16), (True, noisy_context, 5 / 6)]
    clean_pass = [] if noisy_context else [(False, True, 0.0)]   # appends the chunk's K/V (not after the last chunk)
    expected = (steps + clean_pass) * 2 + steps
    assert [(g, a) for g, a, _ in calls] == [(g, a) for g, a, _ in expected]
    assert [s for *_, s in calls] == pytest.approx([s for *_, s in expected])
    video.square().sum().backward()
    assert net.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


def test_rollout_chunk_sees_the_cached_past():
    """Chunk 1 of a rollout depends on chunk 0 through the cache (not on the noise of later chunks)."""
    net, chunks = tiny_net(), (1, 1, 1)
    eps, context = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 8, 32)
    times = [samplers.rcm_times(1, math.inf, ())] * 3
    cache = samplers.kv_cache(net, 1, (16, 3, 4, 4), chunks)
    rollout = lambda *args: torch.cat(list(samplers.stream(*args)), 2)
    with torch.no_grad():
        a = rollout(net, eps, context, chunks, times, cache)
        eps_b = eps.clone()
        eps_b[:, :, 0] += 1
        b = rollout(net, eps_b, context, chunks, times, cache)
        eps_c = eps.clone()
        eps_c[:, :, 2] += 1
        c = rollout(net, eps_c, context, chunks, times, cache)   # (the cache is reused: emptied first)
    assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-5
    torch.testing.assert_close(a[:, :, :2], c[:, :, :2])


def test_rollout_steps_cycle_and_fixed_steps_per_chunk():
    sf = train_causal.SFConfig()
    assert [train_causal.rollout_steps(sf, 2, k) for k in range(5)] == [(1, 1), (2, 2), (3, 3), (4, 4), (1, 1)]
    assert train_causal.rollout_steps(dataclasses.replace(sf, steps_per_chunk=(4, 2)), 3, 0) == (4, 2, 2)
    times = samplers.stream_times((1, 1, 1), (2, 1), 1.0, (0.4, 0.2))
    assert [t.tolist() for t in times] == [[math.pi / 4, 0.4, 0.0], [math.pi / 4, 0.0], [math.pi / 4, 0.0]]
    with pytest.raises(ValueError, match="takes 1..2 steps"):
        samplers.stream_times((1,), (5,), 1.0, (0.9,))


def tiny_config(tmp_path, teacher, data_clips=0, **kw):
    base = train_causal.PRESETS["toy"][1]
    small = dict(iterations=6, lr_warmup=2)
    kw = {"device": "cpu", **kw}  # tests on CUDA pass device="cuda"
    run = dataclasses.replace(base.toy, world=TINY_WORLD, eval_per_prompt=2, data_clips=data_clips)
    kw = {"dit": TINY_DIT, **kw}
    return dataclasses.replace(
        base, toy=run, teacher_ckpt=teacher, batch=2, log_every=1, ckpt_every=3, eval_teacher_steps=3,
        tf=dataclasses.replace(base.tf, **small), cm=dataclasses.replace(base.cm, tangent_warmup=2, **small),
        sf=dataclasses.replace(base.sf, student_update_freq=2, **small), **kw)


def test_stages_run_and_an_interrupted_run_resumes_with_the_same_losses(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=3, batch=4), TINY_DIT, teacher,
                      log=lambda s: None)
    full = train_causal.train(tiny_config(tmp_path, teacher, out_dir=tmp_path / "full"))

    # A second run finds tf and tf_scm finished (a rerun skips them) and is killed at sf_dmd's 3rd critic iteration
    # (iteration 5, after the checkpoint at 3); rerunning the command resumes it.
    for stage in ("tf", "tf_scm"):
        shutil.copytree(tmp_path / "full" / stage, tmp_path / "run" / stage)
    calls = {"n": 0}
    critic_loss = train_causal.critic_loss

    def dying_critic_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return critic_loss(*args, **kwargs)
    run = tiny_config(tmp_path, teacher, out_dir=tmp_path / "run")
    monkeypatch.setattr(train_causal, "critic_loss", dying_critic_loss)
    with pytest.raises(KeyboardInterrupt):
        train_causal.train(run)
    monkeypatch.setattr(train_causal, "critic_loss", critic_loss)
    resumed = train_causal.train(run)

    drop_time = lambda path: [{k: v for k, v in json.loads(ln).items() if k != "time_s"}
                              for ln in path.read_text().splitlines()]
    a, b = (drop_time(tmp_path / name / "sf_dmd" / "metrics.jsonl") for name in ("full", "run"))
    assert [r["iteration"] for r in b] == list(range(6))
    assert json.dumps(a) == json.dumps(b)       # (as text: NaN metrics compare equal)
    assert any("loss/dmd" in r for r in a) and any("loss/critic" in r for r in a)
    for stage, loss in (("tf", "loss/tf"), ("tf_scm", "loss/scm")):
        assert all(math.isfinite(r[loss]) for r in drop_time(tmp_path / "full" / stage / "metrics.jsonl"))
    assert json.dumps(resumed) == json.dumps(full)
    assert set(full) == {"exact", "teacher-3", "causal-teacher-3", *(f"{s}-{n}" for s in ("tf", "tf_scm", "sf_dmd")
                                                                     for n in (1, 2, 4))}
    load_checkpoint(WanModel(TINY_DIT), tmp_path / "run" / "sf_dmd" / "ema.safetensors")   # official key names
    # the exported student carries its streaming settings: `sample.py --causal --toy` with no sampling flags streams
    # the run's evaluation again
    again = sample.main(sample.Config(dit_path=tmp_path / "full" / "sf_dmd" / "ema.safetensors", toy=True, causal=True,
                                      device="cpu", save_path=tmp_path / "samples"))
    assert json.dumps(again) == json.dumps({k: v for k, v in full.items() if k.startswith("sf_dmd-")})  # NaN-safe


def test_tf_dcm_and_diffusion_forcing_stages_run_on_toy_shards(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=2, batch=4), TINY_DIT, teacher,
                      log=lambda s: None)
    # ... trained on toy clips written as shards (training.py's RunConfig flags and data stream)
    cfg = tiny_config(tmp_path, teacher, out_dir=tmp_path / "dcm", stages=("tf", "tf_dcm"), data=tmp_path / "shards",
                      data_clips=8, num_workers=0, shuffle_buffer=4)
    cfg = dataclasses.replace(cfg, tf=dataclasses.replace(cfg.tf, forcing="diffusion", iterations=2),
                              cm=dataclasses.replace(cfg.cm, iterations=2))
    out = train_causal.train(cfg)
    assert {"causal-teacher-3", "tf_dcm-1", "tf_dcm-4"} <= set(out)
    assert list((tmp_path / "shards").glob("shard*.tar"))
    log = [json.loads(ln) for ln in (tmp_path / "dcm" / "tf_dcm" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/dcm"]) for r in log)
    with pytest.raises(ValueError, match="causal-teacher-ckpt"):
        train_causal.train(dataclasses.replace(cfg, stages=("tf_scm",), out_dir=tmp_path / "x"))


def test_presets_take_every_knob_as_a_documented_flag(capsys):
    """The Wan preset is the 1.3B recipe (bf16, block checkpointing); every field of CausalConfig, training.py's
    RunConfig ones included, is a flag."""
    cfg = tyro.extras.overridable_config_cli(train_causal.PRESETS, args=["wan1.3b", "--cp-size", "2"])
    assert (cfg.toy, cfg.dit, cfg.precision, cfg.checkpointing, cfg.cp_size) == (
        None, wan.CONFIGS["t2v-1.3B"], "bf16", "block", 2)
    with pytest.raises(SystemExit):
        tyro.extras.overridable_config_cli(train_causal.PRESETS, args=["wan1.3b", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(train_causal.CausalConfig):
        if f.name not in ("dit", "toy", "tf", "cm", "sf"):  # nested configs: --tf.lr, ...
            assert re.search(f"--{f.name.replace('_', '-')}[ ,]", text), f.name
    assert "--sf.lr-fake" in text and "--cm.p-G.p-mean" in text
    toy_help = tyro.extras.overridable_config_cli
    with pytest.raises(SystemExit):
        toy_help(train_causal.PRESETS, args=["toy", "--help"])
    assert "--toy.data-clips" in " ".join(capsys.readouterr().out.split())


@pytest.mark.gpu
def test_every_stage_runs_on_cuda(tmp_path):
    """The CUDA paths: FlexAttention with grad and the Triton JVP kernel under the teacher-forcing mask, the KV cache
    with grad; dCM warm-up then sCM, self forcing with noisy context and fixed steps per chunk."""
    teacher = tmp_path / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=2, batch=4), TINY_DIT, teacher, "cuda",
                      log=lambda s: None)
    cfg = tiny_config(tmp_path, teacher, out_dir=tmp_path / "gpu", device="cuda",
                      stages=("tf", "tf_dcm", "tf_scm", "sf_dmd"))
    cfg = dataclasses.replace(cfg, sf=dataclasses.replace(cfg.sf, noisy_context=True, steps_per_chunk=(2, 1)))
    out = train_causal.train(cfg)
    assert {"causal-teacher-3", "tf_dcm-1", "tf_scm-2", "sf_dmd-4"} <= set(out)
    for stage, loss in (("tf", "loss/tf"), ("tf_dcm", "loss/dcm"), ("tf_scm", "loss/scm"), ("sf_dmd", "loss/dmd")):
        log = [json.loads(ln) for ln in (tmp_path / "gpu" / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r[loss]) for r in log if loss in r) and any(loss in r for r in log)


def test_a_stage_built_from_a_changed_stage_is_moved_aside_and_trained_again(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=2, batch=4), TINY_DIT, teacher,
                      log=lambda s: None)
    cfg = tiny_config(tmp_path, teacher, out_dir=tmp_path / "run", stages=("tf", "tf_scm"))
    cfg = dataclasses.replace(cfg, ckpt_every=100, toy=dataclasses.replace(cfg.toy, eval_per_prompt=0),
                              tf=dataclasses.replace(cfg.tf, iterations=2), cm=dataclasses.replace(cfg.cm, iterations=2))
    train_causal.train(cfg)
    first = (tmp_path / "run" / "tf_scm" / "ema.safetensors").read_bytes()
    train_causal.train(cfg)                                           # nothing changed: nothing retrained
    assert not list(tmp_path.glob("run/*.stale-*"))
    # a setting of stage tf_scm's section is that stage's alone: tf is not refused, tf_scm is
    with pytest.raises(ValueError, match=r"run/tf_scm holds a run with other settings \(--cm.lr"):
        train_causal.train(dataclasses.replace(cfg, cm=dataclasses.replace(cfg.cm, lr=1.0)))
    longer = dataclasses.replace(cfg, tf=dataclasses.replace(cfg.tf, iterations=3))  # tf trains on: tf_scm is stale
    train_causal.train(longer)
    assert training.saved_iteration(tmp_path / "run" / "tf") == 3
    assert (tmp_path / "run" / "tf_scm.stale-1" / "ema.safetensors").read_bytes() == first   # kept, not deleted
    assert (tmp_path / "run" / "tf_scm" / "ema.safetensors").read_bytes() != first
    train_causal.train(longer)
    assert not (tmp_path / "run" / "tf_scm.stale-2").exists()


def test_a_larger_teacher_gives_a_causal_teacher_of_its_size_and_students_of_theirs(tmp_path, monkeypatch):
    """The Causal-rCM recipe across sizes: tf trains the causal teacher at the teacher's size from the bidirectional
    teacher; tf_scm distils it into a student of --dit's size started from the student's base; sf_dmd continues that
    student against the bidirectional teacher with a fake score from the student's base."""
    import model
    large = dataclasses.replace(TINY_DIT, dim=48, ffn_dim=96)
    monkeypatch.setitem(model.CONFIGS, "tiny-large", large)
    teacher, base = tmp_path / "teacher.safetensors", tmp_path / "base.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=2, batch=4), large, teacher,
                      log=lambda s: None)
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=2, batch=4), TINY_DIT, base,
                      log=lambda s: None)
    cfg = tiny_config(tmp_path, teacher, out_dir=tmp_path / "run", teacher_model="tiny-large", student_ckpt=base)
    cfg = dataclasses.replace(cfg, tf=dataclasses.replace(cfg.tf, iterations=2),
                              cm=dataclasses.replace(cfg.cm, iterations=2), sf=dataclasses.replace(cfg.sf, iterations=3))
    out = train_causal.train(cfg)
    assert {"causal-teacher-3", "tf-1", "tf_scm-2", "sf_dmd-4"} <= out.keys()
    load_checkpoint(WanModel(large), tmp_path / "run" / "tf" / "ema.safetensors")
    for stage in ("tf_scm", "sf_dmd"):
        load_checkpoint(WanModel(TINY_DIT), tmp_path / "run" / stage / "ema.safetensors")
    tf_ema = tmp_path / "run" / "tf" / "ema.safetensors"
    assert train_causal.stage_checkpoints(cfg, "tf_scm", teacher, base) == (base, tf_ema)
    assert train_causal.stage_checkpoints(cfg, "tf", teacher, base) == (teacher, None)


TINY_I2V = dataclasses.replace(TINY_DIT, model_type="i2v", in_dim=36, clip=False)


def test_i2v_conditioning_reaches_every_causal_net_chunk_by_chunk(tmp_path, monkeypatch):
    """With I2V nets in every stage (teacher forcing, diffusion forcing, TF-sCM, self forcing, the critic, the
    evaluation), every call gets its rows' own y: whole (bidirectional teacher, fake score), packed as [y | y]
    (teacher-forced calls), or the frames of its chunk (streaming, the rollout); never zeros or another clip's. Then
    `sample.py --causal --toy` streams the I2V student's evaluation again."""
    teacher = tmp_path / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=3, batch=4), TINY_I2V, teacher,
                      log=lambda s: None)
    made, image_condition = [], toy.image_condition
    monkeypatch.setattr(toy, "image_condition", lambda first, frames: made.append(image_condition(first, frames))
                        or made[-1])
    calls, forward = [], WanModel.forward

    def spy(self, x, t, context, **kw):
        calls.append((len(x), x.shape[2], kw.get("y"), kw.get("teacher_forcing", False)))
        return forward(self, x, t, context, **kw)
    monkeypatch.setattr(WanModel, "forward", spy)
    cfg = tiny_config(tmp_path, teacher, out_dir=tmp_path / "run", dit=TINY_I2V)
    out = train_causal.train(cfg)
    T = TINY_WORLD.shape[1]
    for n, frames, y, packed in calls:
        assert y is not None and y.shape[0] == n and y.shape[2] == frames
        whole = torch.cat([y[:, :, :T], y[:, :, :T]], 2) if packed else None
        if packed:  # [clean | noisy]: the clip's y twice
            assert torch.equal(y, whole)
            y = y[:, :, :T]
        found = False
        for b in made:  # the y of one batch (or the evaluation's), its rows in order, tiled for CFG's second half
            rows = b.repeat(n // len(b), 1, 1, 1, 1) if n % len(b) == 0 else None
            if rows is not None and any(torch.equal(y, rows[:, :, f:f + y.shape[2]]) for f in range(T - y.shape[2] + 1)):
                found = True
                break
        assert found
    assert any(p for *_, p in calls) and any(f < T and not p for _, f, _, p in calls)  # packed and chunk calls seen
    assert any(y[:, :4].amax() == 0 for _, f, y, p in calls if f < T)                 # (later chunks: no mask)
    assert {"tf-1", "tf_scm-2", "sf_dmd-4", "causal-teacher-3"} <= set(out)
    monkeypatch.setattr(WanModel, "forward", forward)
    again = sample.main(sample.Config(dit_path=tmp_path / "run" / "sf_dmd" / "ema.safetensors", toy=True, causal=True,
                                      device="cpu", save_path=tmp_path / "samples"))
    assert json.dumps(again) == json.dumps({k: v for k, v in out.items() if k.startswith("sf_dmd-")})
    # diffusion forcing: the unpacked y
    calls.clear()
    monkeypatch.setattr(WanModel, "forward", spy)
    df = dataclasses.replace(cfg, out_dir=tmp_path / "df", stages=("tf",), toy=dataclasses.replace(cfg.toy, eval_per_prompt=0),
                             tf=dataclasses.replace(cfg.tf, forcing="diffusion", iterations=2))
    train_causal.train(df)
    assert calls and all(y.shape[2] == f == T and not p for _, f, y, p in calls)
