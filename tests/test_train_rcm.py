"""train_rcm.py: the student/critic bookkeeping, the EMA, and an interrupted toy run that resumes exactly."""
import dataclasses
import json

import pytest
import torch

import toy
import train_rcm
from model import WanConfig, WanModel, load_checkpoint

TINY_DIT = WanConfig(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64, freq_dim=32,
                     text_dim=32, out_dim=16, num_heads=2, num_layers=1, qk_norm=True, cross_attn_norm=True, eps=1e-6)
TINY_WORLD = toy.ToyConfig(shape=(16, 2, 4, 4))


def test_student_critic_schedule():
    cfg = train_rcm.RCMConfig(tangent_warmup=2, student_update_freq=3)
    student = [i for i in range(10) if train_rcm.is_student_iteration(cfg, i)]
    assert student == [0, 1, 2, 5, 8]
    # effective iteration = number of student iterations before a student iteration
    assert [train_rcm.effective_iteration(cfg, i) for i in student] == [0, 1, 2, 3, 4]
    # at a critic iteration, i − effective − 1 counts the critic iterations before it
    critic = [i for i in range(10) if i not in student]
    assert [i - train_rcm.effective_iteration(cfg, i) - 1 for i in critic] == [0, 1, 2, 3, 4]
    pure_scm = dataclasses.replace(cfg, fake_score=False)
    assert all(train_rcm.is_student_iteration(pure_scm, i) for i in range(10))


def test_power_ema():
    gamma = train_rcm.ema_gamma(0.1)
    assert ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5 == pytest.approx(0.1, rel=1e-9)
    ema, net = WanModel(TINY_DIT), WanModel(TINY_DIT)
    p_ema, p = next(ema.parameters()), next(net.parameters())
    train_rcm.ema_update(ema, net, 0, gamma)                 # n = 0 copies
    torch.testing.assert_close(p_ema, p)
    before = p_ema.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    train_rcm.ema_update(ema, net, 9, gamma)
    beta = (1 - 1 / 10) ** (gamma + 1)
    torch.testing.assert_close(p_ema, beta * before + (1 - beta) * p.detach())


def test_interrupted_run_resumes_with_the_same_losses(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=3, batch=4), TINY_DIT, teacher, log=lambda s: None)
    base = dataclasses.replace(
        train_rcm.PRESETS["toy"][1], dit=TINY_DIT, world=TINY_WORLD, teacher_ckpt=teacher, device="cpu",
        iterations=10, batch=2, tangent_warmup=2, student_update_freq=2, log_every=1, preview_every=100,
        ckpt_every=3, eval_per_prompt=2)
    full = train_rcm.train(dataclasses.replace(base, out_dir=tmp_path / "full"))

    # Kill the second run at its 3rd critic iteration (iteration 7, after the checkpoint at 6), then rerun it.
    calls = {"n": 0}
    critic_loss = train_rcm.critic_loss

    def dying_critic_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return critic_loss(*args, **kwargs)
    run = dataclasses.replace(base, out_dir=tmp_path / "run")
    monkeypatch.setattr(train_rcm, "critic_loss", dying_critic_loss)
    with pytest.raises(KeyboardInterrupt):
        train_rcm.train(run)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 6
    monkeypatch.setattr(train_rcm, "critic_loss", critic_loss)
    resumed = train_rcm.train(run)

    drop_time = lambda path: [{k: v for k, v in json.loads(ln).items() if k != "time_s"}
                              for ln in path.read_text().splitlines()]
    a, b = drop_time(tmp_path / "full" / "metrics.jsonl"), drop_time(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in b] == list(range(10))
    assert json.dumps(a) == json.dumps(b)       # (as text: NaN metrics compare equal)
    assert any("loss/dmd" in r for r in a) and any("loss/critic" in r for r in a)
    assert json.dumps(resumed) == json.dumps(full)
    assert set(full) == {"exact", "teacher-50", "student-1", "student-2", "student-4"}
    assert set(full["student-1"]) == {"precision", "wrong_prompt", "mode_tv", "mean_rho"}
    load_checkpoint(WanModel(TINY_DIT), tmp_path / "run" / "ema.safetensors")   # official key names
