"""train_rcm.py: the student/critic bookkeeping, the EMA, interrupted toy runs that resume exactly (one process, and
two processes reading shards), two processes (FSDP, and CP) equal to one, and the user errors."""
import dataclasses
import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import tyro
from safetensors.torch import load_file

import toy
import parallel
import train_rcm
import training
from data import write_shards
from model import CONFIGS, WanConfig, WanModel, load_checkpoint
from test_parallel import spawn

TINY_DIT = WanConfig(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64, freq_dim=32,
                     text_dim=32, out_dim=16, num_heads=2, num_layers=1, qk_norm=True, cross_attn_norm=True, eps=1e-6)
TINY_WORLD = toy.ToyConfig(shape=(16, 2, 4, 4))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=3, batch=4), TINY_DIT, path, log=lambda s: None)
    return path


def tiny_run(teacher, out_dir, eval_per_prompt=2, data_clips=0, wan=False, **kwargs) -> train_rcm.RCMConfig:
    """6 iterations of the toy preset on a tiny DiT: students at 0, 1 (sCM), 2, 4 (sCM + DMD), critics at 3, 5.
    wan: no toy section (a Wan run: shards and a negative embedding)."""
    preset = train_rcm.PRESETS["toy"][1]
    run = None if wan else dataclasses.replace(preset.toy, world=TINY_WORLD, eval_per_prompt=eval_per_prompt,
                                               preview_every=100, data_clips=data_clips)
    return dataclasses.replace(preset, **{
        **dict(dit=TINY_DIT, toy=run, teacher_ckpt=teacher, device="cpu", out_dir=out_dir, iterations=6,
               batch=2, tangent_warmup=2, student_update_freq=2, log_every=1, ckpt_every=100), **kwargs})


def logged(out_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock times."""
    return [{k: v for k, v in json.loads(ln).items() if k != "time_s"}
            for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]


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
    gamma = training.ema_gamma(0.1)
    assert ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5 == pytest.approx(0.1, rel=1e-9)
    ema, net = WanModel(TINY_DIT), WanModel(TINY_DIT)
    p_ema, p = next(ema.parameters()), next(net.parameters())
    training.ema_update(ema, net, 0, gamma)                 # n = 0 copies
    torch.testing.assert_close(p_ema, p)
    before = p_ema.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    training.ema_update(ema, net, 9, gamma)
    beta = (1 - 1 / 10) ** (gamma + 1)
    torch.testing.assert_close(p_ema, beta * before + (1 - beta) * p.detach())


def test_an_optimizer_step_backpropagates_each_loss_at_once_and_frees_the_gradients():
    """The losses of two micro-batches (two per micro-batch) accumulate into one AdamW step; each is backpropagated
    before the next is asked for (its graph freed), and the gradients are freed after the step (so that the other
    net's step does not run beside them)."""
    net = torch.nn.Linear(4, 3)
    opt, sched = training.adamw(training.Optim(lr_warmup=1), net, 0.1)
    x = torch.randn(2, 4)
    grads_seen = []

    def losses_of(xi):
        yield net(xi).square().sum(), {"loss": 1.0}
        grads_seen.append(net.weight.grad.clone())  # (None, and so an error, had the first loss not been taken)
        yield net(xi).abs().sum(), {"loss": 2.0}
    before = net.weight.detach().clone()
    metrics = training.optimizer_step(opt, sched, [(x[:1],), (x[1:],)], losses_of, 2)
    assert not torch.equal(net.weight, before) and metrics == {"loss": 3.0, "lr": pytest.approx(0.1)}
    assert len(grads_seen) == 2 and not torch.equal(grads_seen[0], grads_seen[1])
    assert all(p.grad is None for p in net.parameters())


def test_the_student_step_gives_scm_then_dmd_with_the_gradient_of_their_sum(tmp_path, monkeypatch, teacher):
    """student_step's losses come one at a time, sCM then DMD, so DMD's student passes run after sCM's graph is gone;
    the accumulated gradient equals one backward of their sum."""
    cfg = tiny_run(teacher, tmp_path, dcm_iterations=0)
    d = parallel.init_distributed(1, "cpu")
    try:
        nets = training.build_nets(cfg, d, cfg, teacher=teacher, trained=teacher, fake=teacher)
        taken = {}
        monkeypatch.setattr(training, "optimizer_step", lambda opt, sched, batches, losses_of, accum:
                            taken.update(losses_of=losses_of, batch=batches[0]) or {})
        train_rcm.student_step(cfg, nets, [training.data_stream(cfg, d, 0)[0]()], cfg.tangent_warmup)

        def gradient(one_at_a_time: bool):
            torch.manual_seed(0)
            nets.trained.zero_grad(set_to_none=True)
            losses, names = taken["losses_of"](*taken["batch"]), []
            if one_at_a_time:  # as optimizer_step: each backpropagated before the next is built
                for loss, record in losses:
                    loss.backward()
                    names.append(next(iter(record)))
            else:  # both graphs built, then one backward of the sum
                pairs = list(losses)
                names = [next(iter(record)) for _, record in pairs]
                sum(loss for loss, _ in pairs).backward()
            return names, [p.grad.clone() for p in nets.trained.parameters()]
        names, sequential = gradient(True)
        assert names == ["loss/scm", "loss/dmd"]
        for g, ref in zip(sequential, gradient(False)[1], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_interrupted_run_resumes_with_the_same_losses(tmp_path, monkeypatch, teacher):
    base = tiny_run(teacher, tmp_path, iterations=10, ckpt_every=6)
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

    a, b = logged(tmp_path / "full"), logged(tmp_path / "run")
    assert [r["iteration"] for r in b] == list(range(10))
    assert json.dumps(a) == json.dumps(b)       # (as text: NaN metrics compare equal)
    assert any("loss/dmd" in r for r in a) and any("loss/critic" in r for r in a)
    assert json.dumps(resumed) == json.dumps(full)
    assert set(full) == {"exact", "teacher-50", "student-1", "student-2", "student-4"}
    assert set(full["student-1"]) == {"precision", "wrong_prompt", "mode_tv", "mean_rho"}
    load_checkpoint(WanModel(TINY_DIT), tmp_path / "run" / "ema.safetensors")   # official key names


def test_wan_task_trains_on_shards_with_a_negative_embedding(tmp_path, teacher):
    g = torch.Generator().manual_seed(0)
    write_shards([(torch.randn(16, 2, 4, 4, generator=g), torch.randn(3 + k % 3, 32, generator=g), f"clip {k}")
                  for k in range(4)], tmp_path / "shards", samples_per_shard=1)
    torch.save({"neg": torch.randn(1, 5, 32, generator=g)}, tmp_path / "neg.pt")
    cfg = tiny_run(teacher, tmp_path / "run", wan=True, data=tmp_path / "shards", neg_embed=tmp_path / "neg.pt",
                   iterations=4, num_workers=0, checkpointing="block")
    assert train_rcm.train(cfg) == {}  # no toy evaluation
    records = logged(tmp_path / "run")
    assert [r["iteration"] for r in records] == [0, 1, 2, 3] and "loss/critic" in records[3]
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert records[0]["data/bad_samples"] == 0
    load_checkpoint(WanModel(TINY_DIT), tmp_path / "run" / "ema.safetensors")


def test_presets_take_every_knob_as_a_documented_flag(capsys):
    cfg = tyro.extras.overridable_config_cli(train_rcm.PRESETS, args=["wan14b", "--cp-size", "4", "--grad-accum", "2"])
    assert (cfg.dit, cfg.cp_size, cfg.grad_accum, cfg.lr, cfg.checkpointing) == (CONFIGS["t2v-14B"], 4, 2, 1e-6, "matmul")
    with pytest.raises(SystemExit):
        tyro.extras.overridable_config_cli(train_rcm.PRESETS, args=["wan1.3b", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(train_rcm.RCMConfig):
        if f.name not in ("dit", "p_G", "p_D", "toy"):  # nested configs: --dit.dim, ...
            assert re.search(f"--{f.name.replace('_', '-')}[ ,]", text), f.name
    assert "--p-G.p-mean" in text and "--dit.num-heads" in text


def test_user_errors_are_clear(tmp_path, teacher):
    def error(match, **kwargs):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            train_rcm.train(tiny_run(teacher, tmp_path / "run", **kwargs))
    error("--batch 3 is not divisible by --grad-accum 2", batch=3, grad_accum=2)
    error("2 attention heads, not divisible by --cp-size 4", cp_size=4)
    error("must divide the number of processes 1", cp_size=2)
    error("a Wan run needs --data", wan=True, neg_embed=teacher)
    error("--teacher-ckpt .*nowhere.safetensors does not exist", teacher_ckpt=tmp_path / "nowhere.safetensors")
    error("--data .*nowhere does not exist", data=tmp_path / "nowhere")
    error("no shard.*pass --data a folder", data=tmp_path)
    other = tmp_path / "other.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=1, batch=2), dataclasses.replace(TINY_DIT, dim=64),
                      other, log=lambda s: None)
    error("does not match --dit", teacher_ckpt=other)
    torch.save(torch.zeros(5, 7), tmp_path / "neg.pt")
    error(r"neg.pt holds \(5, 7\); expected one tensor \[L, 32\]", wan=True, data=tmp_path, neg_embed=tmp_path / "neg.pt")
    for flag in ("ckpt_every", "log_every", "grad_accum", "batch", "cp_size", "student_update_freq",
                 "max_simulation_steps"):
        error(f"--{flag.replace('_', '-')} must be at least 1, got 0", **{flag: 0})
    error("--sigma-max must be positive", sigma_max=0.0)
    error("--mid-t 1.0 1.2 0.6: .* decrease strictly", mid_t=(1.0, 1.2, 0.6))
    error("needs 3 --mid-t times", dmd_fix_timesteps=True, max_simulation_steps=4, mid_t=(1.0, 0.5))
    if not torch.cuda.is_available():
        error("--device cuda, but this machine has no CUDA GPU", device="cuda")
    assert not dist.is_initialized()  # every failed run took its process group down


# ----------------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU; NCCL on 2 GPUs for the `gpu` versions)

def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item() <= tol


def assert_same_training(run, ref, tol):
    """Same logged losses at every iteration and the same EMA student at the end, within tol."""
    a, b = logged(run), logged(ref)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] and any("loss/critic" in r for r in a)
    for ra, rb in zip(a, b):
        for k in (k for k in rb if k.startswith("loss/")):
            assert abs(ra[k] - rb[k]) <= tol * abs(rb[k]) + 1e-12, f"iteration {rb['iteration']}: {k} {ra[k]} vs {rb[k]}"
    ema, ema_ref = load_file(run / "ema.safetensors"), load_file(ref / "ema.safetensors")
    assert all(close(ema[k], v, tol) for k, v in ema_ref.items())


def shards(tmp) -> dict:
    """Train on 24 toy clips written as shards (by the first run) and read through data.make_loader."""
    return dict(data=tmp / "shards", data_clips=24, num_workers=0, shuffle_buffer=4)


def train_killed_in_second_critic_iteration(cfg):
    """train_rcm.train(cfg), killed (KeyboardInterrupt) in its second critic iteration."""
    critic_loss, calls = train_rcm.critic_loss, []

    def dying_critic_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return critic_loss(*args, **kwargs)
    train_rcm.critic_loss = dying_critic_loss
    try:
        train_rcm.train(cfg)
        raise AssertionError("the run was not killed")
    except KeyboardInterrupt:
        pass
    finally:
        train_rcm.critic_loss = critic_loss


def _two_process_runs(rank, tmp, teacher, device):
    tmp = Path(tmp)
    # FSDP: 2 data-parallel ranks of 2 fresh toy clips each; CP: both ranks split the tokens of the same 2 clips, read
    # from shards (with activation checkpointing, which must not change the math either)
    train_rcm.train(tiny_run(teacher, tmp / "dp2", device=device, eval_per_prompt=0, checkpointing="block"))
    train_rcm.train(tiny_run(teacher, tmp / "cp2", device=device, eval_per_prompt=0, cp_size=2, checkpointing="matmul",
                             **shards(tmp)))

    # shards split over the 2 data-parallel ranks; a run killed in iteration 5 (its second critic iteration, after the
    # checkpoint at 4) and restarted
    run = lambda name: tiny_run(teacher, tmp / name, device=device, iterations=7, ckpt_every=4, **shards(tmp))
    train_rcm.train(run("full"))
    train_killed_in_second_critic_iteration(run("run"))
    if dist.get_rank() == 0:
        assert json.loads((tmp / "run" / "state" / "latest.json").read_text())["iteration"] == 4
    train_rcm.train(run("run"))


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def two_process_runs(request, tmp_path_factory, teacher):
    """The runs of `_two_process_runs` on 2 processes (gloo on CPU, NCCL on 2 GPUs), and their one-process
    references: 2 ranks × 2 clips draw what one process × 2 accumulation steps of 2 clips draws."""
    device, tmp = request.param, tmp_path_factory.mktemp("runs")
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    train_rcm.train(tiny_run(teacher, tmp / "one_accum", device=device, eval_per_prompt=0, batch=4, grad_accum=2))
    train_rcm.train(tiny_run(teacher, tmp / "one", device=device, eval_per_prompt=0, **shards(tmp)))
    spawn(_two_process_runs, tmp, teacher, device, backend="nccl" if device == "cuda" else "gloo")
    return tmp, 1e-5 if device == "cpu" else 1e-3  # (GPU kernels reduce in other orders)


def test_two_ranks_fsdp_and_cp_equal_one_process(two_process_runs):
    tmp, tol = two_process_runs
    assert_same_training(tmp / "dp2", tmp / "one_accum", tol)
    assert_same_training(tmp / "cp2", tmp / "one", tol)
    assert logged(tmp / "one_accum") != logged(tmp / "one")  # (the comparison can tell runs apart)


def test_two_process_run_killed_and_restarted_continues(two_process_runs):
    tmp, tol = two_process_runs
    full, run = logged(tmp / "full"), logged(tmp / "run")
    assert [r["iteration"] for r in run] == list(range(7))
    if tol < 1e-4:  # on the CPU the restarted run repeats the uninterrupted one bit for bit
        assert json.dumps(run) == json.dumps(full)
    assert_same_training(tmp / "run", tmp / "full", tol)
    assert json.loads((tmp / "run" / "eval.json").read_text()).keys() == {"exact", "teacher-50", "student-1",
                                                                          "student-2", "student-4"}


@pytest.mark.gpu
def test_compiled_blocks_train_as_eager_ones(tmp_path, teacher):
    runs = {c: tiny_run(teacher, tmp_path / str(c), device="cuda", eval_per_prompt=0, checkpointing="matmul", compile=c)
            for c in (False, True)}
    for cfg in runs.values():
        train_rcm.train(cfg)
    assert_same_training(tmp_path / "True", tmp_path / "False", 1e-3)


class _Touch:
    """A pickle that creates a file when loaded (what a hostile run folder could hold)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_resume_never_unpickles_code(tmp_path, teacher):
    """A run folder's DCP metadata is read with a restricted unpickler: a .metadata replaced by a pickle with code in
    it is refused with a message naming the folder, and the code does not run."""
    cfg = tiny_run(teacher, tmp_path / "run", iterations=2, ckpt_every=1, eval_per_prompt=0)
    train_rcm.train(cfg)
    folder = next(p for p in (tmp_path / "run" / "state").iterdir() if p.is_dir())
    (folder / ".metadata").write_bytes(pickle.dumps(_Touch(tmp_path / "pwned")))
    with pytest.raises(ValueError, match=r"state/.*io.open is not part of a checkpoint's metadata"):
        train_rcm.train(dataclasses.replace(cfg, iterations=3))
    assert not (tmp_path / "pwned").exists()


def test_a_second_run_in_the_same_folder_stops(tmp_path, teacher):
    """Two runs never share a run folder: while one holds its lock, a second stops at once with a clear message."""
    import fcntl
    cfg = tiny_run(teacher, tmp_path / "run", iterations=1, eval_per_prompt=0)
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run
        with pytest.raises(OSError, match="another run .* is using .*run.*pick another --out-dir"):
            train_rcm.train(cfg)
    assert not dist.is_initialized()
    train_rcm.train(cfg)                                 # once it has ended, the folder is free
    assert (tmp_path / "run" / "ema.safetensors").exists()


def test_sigint_and_sigterm_save_and_the_rerun_continues_with_the_same_losses(tmp_path, monkeypatch, teacher):
    """A signal mid-iteration lets the iteration finish, saves, exits non-zero; rerunning resumes as if never stopped."""
    import os
    import signal
    base = tiny_run(teacher, tmp_path, eval_per_prompt=0, iterations=6)
    train_rcm.train(dataclasses.replace(base, out_dir=tmp_path / "full"))
    critic_loss = train_rcm.critic_loss
    for sig in (signal.SIGINT, signal.SIGTERM):
        calls = {"n": 0}

        def signalled_critic_loss(*args, **kwargs):  # iteration 3 is the first critic iteration
            calls["n"] += 1
            if calls["n"] == 1:
                os.kill(os.getpid(), sig)
            return critic_loss(*args, **kwargs)
        run = dataclasses.replace(base, out_dir=tmp_path / sig.name)
        monkeypatch.setattr(train_rcm, "critic_loss", signalled_critic_loss)
        with pytest.raises(SystemExit) as stop:
            train_rcm.train(run)
        assert stop.value.code == 128 + sig and training.saved_iteration(run.out_dir) == 4
        assert signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL)  # handlers given back
        monkeypatch.setattr(train_rcm, "critic_loss", critic_loss)
        train_rcm.train(run)
        assert json.dumps(logged(tmp_path / "full")) == json.dumps(logged(run.out_dir))


def test_a_rerun_with_changed_settings_stops_unless_accepted_and_then_uses_them(tmp_path, teacher):
    cfg = tiny_run(teacher, tmp_path / "run", eval_per_prompt=0, iterations=2, ckpt_every=1)
    train_rcm.train(cfg)
    train_rcm.train(dataclasses.replace(cfg, iterations=3))     # more iterations: the same run, longer
    changed = dataclasses.replace(cfg, iterations=5, lr=5e-3, teacher_guidance=2.0)
    with pytest.raises(ValueError, match=r"other settings \(--lr 0.0001 -> 0.005; --teacher-guidance 3.0 -> 2.0\): "
                                         r"pass --accept-changes"):
        train_rcm.train(changed)
    with pytest.raises(ValueError, match=r"another architecture \(--dit.dim 32 -> 64\).*pick another --out-dir"):
        train_rcm.train(dataclasses.replace(cfg, dit=dataclasses.replace(TINY_DIT, dim=64), accept_changes=True))
    train_rcm.train(dataclasses.replace(changed, accept_changes=True))
    lr = {r["iteration"]: r["lr"] for r in logged(tmp_path / "run") if "lr" in r}  # student iterations 0, 1, 2, 4
    assert max(lr[i] for i in range(3)) <= 1e-4 < lr[4]    # the new learning rate took effect (warm-up included)
    train_rcm.train(dataclasses.replace(changed, iterations=6))  # the accepted settings are the run's now


def test_toy_shards_of_another_clip_shape_are_refused(tmp_path, teacher):
    g = torch.Generator().manual_seed(0)
    write_shards([(torch.randn(16, 3, 4, 4, generator=g), torch.randn(4, 32, generator=g), "x")],
                 tmp_path / "shards")
    with pytest.raises(ValueError, match=r"holds clips of shape \(16, 3, 4, 4\), and this toy world's are "
                                         r"\(16, 2, 4, 4\)"):
        train_rcm.train(tiny_run(teacher, tmp_path / "run", data=tmp_path / "shards", num_workers=0))


def test_the_toy_teacher_resumes_an_interrupted_training_exactly(tmp_path, monkeypatch):
    world, tcfg = toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=5, batch=4)
    toy.train_teacher(world, tcfg, TINY_DIT, tmp_path / "full.safetensors", log=lambda s: None, ckpt_every=2)
    sample_data, calls = toy.sample_data, {"n": 0}

    def dying_sample_data(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # step 3, after the partial checkpoint at step 2
            raise KeyboardInterrupt
        return sample_data(*args, **kwargs)
    monkeypatch.setattr(toy, "sample_data", dying_sample_data)
    path = tmp_path / "cache" / "teacher.safetensors"
    path.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        toy.train_teacher(world, tcfg, TINY_DIT, path, log=lambda s: None, ckpt_every=2)
    assert path.with_suffix(".partial.pt").exists() and not path.exists()
    monkeypatch.setattr(toy, "sample_data", sample_data)
    seen = []
    toy.train_teacher(world, tcfg, TINY_DIT, path, log=seen.append, ckpt_every=2)
    assert any("resuming at step 2" in line for line in seen) and not path.with_suffix(".partial.pt").exists()
    a, b = load_file(tmp_path / "full.safetensors"), load_file(path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_toy_teacher_cache_is_the_users_and_an_unwritable_one_is_named(tmp_path, monkeypatch):
    run = toy.ToyRun(world=TINY_WORLD)
    monkeypatch.setenv("RCM_CACHE", str(tmp_path / "cache"))
    assert toy.teacher_path(run, TINY_DIT).parent == tmp_path / "cache"
    assert toy.teacher_path(dataclasses.replace(run, cache_dir=tmp_path / "mine"), TINY_DIT).parent == tmp_path / "mine"
    monkeypatch.delenv("RCM_CACHE")
    assert toy.teacher_path(run, TINY_DIT).parent == Path.home() / ".cache" / "rcm"
    (tmp_path / "file").write_text("")  # a cache folder that cannot be created
    with pytest.raises(OSError, match="cannot write the toy teacher's cache .*set --toy.cache-dir"):
        toy.cached_teacher(dataclasses.replace(run, cache_dir=tmp_path / "file" / "sub"), TINY_DIT, "cpu")


def test_the_clis_print_a_user_error_as_one_line_without_a_traceback(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).parent.parent
    for argv, message in (([root / "train_rcm.py", "toy", "--batch", "0"], "error: --batch must be at least 1, got 0\n"),
                          ([root / "sample.py", "--dit-path", tmp_path / "none.safetensors", "--toy"],
                           "not found (the DiT weights); set --dit-path")):
        out = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=tmp_path,
                             timeout=300)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_log_tensorboard_writes_the_scalars_of_metrics_jsonl(tmp_path, teacher):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_run(teacher, tmp_path / "run", eval_per_prompt=0, iterations=4, log="tensorboard")
    train_rcm.train(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged_ = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    want = {(k, r["iteration"]): v for r in logged_ for k, v in r.items() if k != "iteration"}
    got = {(k, e.step): e.value for k in events.Tags()["scalars"] for e in events.Scalars(k)}
    assert got.keys() == want.keys() and "loss/dmd" in {k for k, _ in got}
    assert all(got[k] == pytest.approx(v, rel=1e-6, nan_ok=True) for k, v in want.items())


def test_log_needs_its_package(tmp_path, teacher, monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real_import(name, *a, **k))
    with pytest.raises(ValueError, match="--log wandb needs the wandb package: pip install wandb"):
        train_rcm.train(tiny_run(teacher, tmp_path / "run", log="wandb"))


# ------------------------------------------------------------------------------ a teacher of another size
TINY_LARGE = dataclasses.replace(TINY_DIT, dim=48, ffn_dim=96, num_layers=2)


@pytest.fixture(scope="module")
def large_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=3, batch=4), TINY_LARGE, path,
                      log=lambda s: None)
    return path


def test_a_larger_teacher_distils_into_a_student_of_its_own_size(tmp_path, monkeypatch, teacher, large_teacher):
    """--teacher-model: the teacher is built at its size, the student, EMA and fake score at --dit's from the
    student's base weights; the export and the toy evaluation follow (the toy world caches a base of each size)."""
    import model
    monkeypatch.setitem(model.CONFIGS, "tiny-large", TINY_LARGE)
    cfg = tiny_run(large_teacher, tmp_path / "run", teacher_model="tiny-large", student_ckpt=teacher, iterations=5)
    d = parallel.init_distributed(1, "cpu")
    try:
        nets = training.build_nets(cfg, d, cfg, teacher=large_teacher, trained=teacher, fake=teacher)
        assert nets.teacher.cfg == TINY_LARGE and nets.trained.cfg == nets.fake.cfg == nets.ema.cfg == TINY_DIT
        base = load_file(teacher)
        assert all(torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v, base[k])
                   for k, v in nets.fake.state_dict().items())
    finally:
        dist.destroy_process_group()
    out = train_rcm.train(cfg)
    assert {"teacher-50", "student-4"} <= out.keys()
    load_checkpoint(WanModel(TINY_DIT), tmp_path / "run" / "ema.safetensors")
    # the toy world without checkpoints: a teacher of each size trained and cached
    small = dataclasses.replace(cfg, out_dir=tmp_path / "cached", teacher_ckpt=None, student_ckpt=None, iterations=2,
                                toy=dataclasses.replace(cfg.toy, cache_dir=tmp_path / "cache", eval_per_prompt=0,
                                                        teacher=toy.TeacherConfig(steps=2, batch=2)))
    train_rcm.train(small)
    assert len(list((tmp_path / "cache").glob("toy_teacher_*.safetensors"))) == 2
    with pytest.raises(ValueError, match="differ in what they take or make"):
        train_rcm.train(dataclasses.replace(cfg, dit=dataclasses.replace(TINY_DIT, text_dim=16)))
    with pytest.raises(ValueError, match="pass its base weights with --student-ckpt"):
        train_rcm.train(dataclasses.replace(cfg, toy=None, student_ckpt=None, data=tmp_path, neg_embed=teacher))


def _mixed_sizes(rank, tmp, teacher, large_teacher):
    import model
    model.CONFIGS["tiny-large"] = TINY_LARGE  # (this process's own registry)
    tmp = Path(tmp)
    run = lambda name: tiny_run(large_teacher, tmp / name, teacher_model="tiny-large", student_ckpt=teacher,
                                iterations=7, ckpt_every=4, eval_per_prompt=0)
    train_rcm.train(run("full"))
    train_killed_in_second_critic_iteration(run("run"))
    train_rcm.train(run("run"))


def test_a_killed_two_process_mixed_size_run_resumes_bit_for_bit(tmp_path, teacher, large_teacher):
    spawn(_mixed_sizes, tmp_path, teacher, large_teacher, backend="gloo")
    full, run = logged(tmp_path / "full"), logged(tmp_path / "run")
    assert [r["iteration"] for r in run] == list(range(7)) and json.dumps(run) == json.dumps(full)
    a, b = load_file(tmp_path / "full" / "ema.safetensors"), load_file(tmp_path / "run" / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_log_wandb_sends_the_scalars_and_resumes_the_same_wandb_run(tmp_path, teacher, monkeypatch):
    """--log wandb against a stand-in wandb module: one W&B run per run folder (its id kept in the folder, so a
    resumed run continues it), the settings as its config, and every metrics.jsonl line logged at its iteration."""
    import sys
    import types
    calls = []
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
        log=lambda record, step: calls.append(("log", step, record)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_run(teacher, tmp_path / "run", eval_per_prompt=0, iterations=2, ckpt_every=1, log="wandb")
    train_rcm.train(cfg)
    train_rcm.train(dataclasses.replace(cfg, iterations=3))
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["abc123", "abc123"] and all(i["resume"] == "allow" for i in inits)
    assert inits[0]["config"]["lr"] == cfg.lr and (tmp_path / "run" / "wandb_id").read_text() == "abc123"
    logged_ = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sent = {c[1]: c[2] for c in calls if c[0] == "log"}
    assert sorted(sent) == [r["iteration"] for r in logged_] == [0, 1, 2]
    assert all(json.dumps(sent[r["iteration"]]) == json.dumps({k: v for k, v in r.items() if k != "iteration"})
               for r in logged_)  # (as text: NaN metrics compare equal)


def test_unsupported_model_types_are_refused_with_one_message(tmp_path, teacher):
    import train_causal
    cfg = tiny_run(teacher, tmp_path / "run", dit=dataclasses.replace(TINY_DIT, model_type="ti2v", in_dim=48, out_dim=48))
    with pytest.raises(ValueError, match="ti2v-5B conditions by its first frame's timestep"):
        train_rcm.train(cfg)
    with pytest.raises(ValueError, match="the toy world has no CLIP image features"):
        train_rcm.train(tiny_run(teacher, tmp_path / "run", dit=TINY_I2V_CLIP))
    causal = dataclasses.replace(train_causal.PRESETS["toy"][1], dit=TINY_DIT, out_dir=tmp_path / "causal", device="cpu")
    with pytest.raises(ValueError, match="two experts .* are for train_rcm.py"):
        train_causal.train(dataclasses.replace(causal, boundary=0.9))


# ------------------------------------------------------------------------------------ image-to-video distillation
TINY_I2V = dataclasses.replace(TINY_DIT, model_type="i2v", in_dim=36, clip=False)
TINY_I2V_CLIP = dataclasses.replace(TINY_I2V, clip=True)


@pytest.fixture(scope="module")
def i2v_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("i2v") / "teacher.safetensors"
    toy.train_teacher(toy.make_world(TINY_WORLD), toy.TeacherConfig(steps=3, batch=4), TINY_I2V, path, log=lambda s: None)
    return path


def record_calls(monkeypatch):
    """Every WanModel call as (net, x rows, y, clip_fea)."""
    calls, forward = [], WanModel.forward

    def spy(self, x, t, context, **kw):
        calls.append((self, len(x), kw.get("y"), kw.get("clip_fea")))
        return forward(self, x, t, context, **kw)
    monkeypatch.setattr(WanModel, "forward", spy)
    return calls


def test_i2v_conditioning_reaches_every_net(tmp_path, monkeypatch, i2v_teacher):
    """Every call of the teacher (both CFG halves), the student (sCM, its tangent pass, dCM, the backward simulation)
    and the fake score gets, for each of its rows, the first-frame conditioning of that row's own clip: never zeros,
    never another clip's. The toy run draws the clips, so the test records the y it made of each batch."""
    made, image_condition = [], toy.image_condition
    monkeypatch.setattr(toy, "image_condition", lambda first, frames: made.append(image_condition(first, frames))
                        or made[-1])
    calls = record_calls(monkeypatch)
    cfg = tiny_run(i2v_teacher, tmp_path / "run", dit=TINY_I2V, eval_per_prompt=0, dcm_iterations=1)
    train_rcm.train(dataclasses.replace(cfg, toy=dataclasses.replace(cfg.toy, preview_every=0)))
    assert len(made) == 6 and all(y.shape == (2, 20, *TINY_WORLD.shape[1:]) for y in made)
    rows = torch.cat(made)
    nets = set()
    for net, n, y, clip_fea in calls:
        assert y is not None and y.shape[0] == n and clip_fea is None
        assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all() and (y[:, 4:, 1:] == 0).all()
        assert y[:, 4:, 0].abs().amax() > 0                       # the image itself, not a blank
        batch = next(b for b in made if torch.equal(y[:len(b)], b))  # the batch's own y, row by row, in order ...
        assert torch.equal(y, batch.repeat(n // len(batch), 1, 1, 1, 1))  # ... and again for CFG's second half
        nets.add(net)
    assert len(nets) == 3 and len(rows) == 12       # teacher, student, fake score; (the EMA only samples previews)


def test_i2v_shards_feed_the_conditioning_and_samples_without_it_are_skipped(tmp_path, i2v_teacher):
    """An I2V run on shards reads each sample's y.pt; a sample without one is skipped and counted, and shards with
    none stop the run with one message that says how to write them."""
    world = toy.make_world(TINY_WORLD)
    toy.write_shards(world, 8, tmp_path / "with", seed=0, image=True)
    toy.write_shards(world, 4, tmp_path / "without", seed=1)
    for shard in (tmp_path / "without").glob("shard*.tar"):
        (tmp_path / "with" / f"shard-plain-{shard.name}").write_bytes(shard.read_bytes())
    out = tiny_run(i2v_teacher, tmp_path / "run", dit=TINY_I2V, eval_per_prompt=0, data=tmp_path / "with",
                   num_workers=0, shuffle_buffer=1)
    train_rcm.train(out)
    assert sum(r["data/wrong_shape"] for r in logged(tmp_path / "run")) > 0
    with pytest.raises(ValueError, match="with y.pt.*sample.py --mode teacher --image"):
        train_rcm.train(dataclasses.replace(out, data=tmp_path / "without", out_dir=tmp_path / "run2"))


# ------------------------------------------------------------------------------------------ two-expert distillation
@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """A tiny two-expert toy teacher (Wan2.2's folder layout), each expert trained on its side of 0.875."""
    run = toy.ToyRun(world=TINY_WORLD, teacher=toy.TeacherConfig(steps=3, batch=4),
                     cache_dir=tmp_path_factory.mktemp("experts"))
    return toy.cached_teacher(run, TINY_DIT, "cpu", log=lambda s: None, boundary=0.875)


def record_routing(monkeypatch):
    """Every expert call of a TwoExperts as (which expert, its timesteps)."""
    from model import TwoExperts
    calls, expert = [], TwoExperts.expert

    def spy(self, high):
        net = expert(self, high)
        return lambda x, t, *a, **kw: calls.append((high, t.detach().clone(), self.boundary)) or net(x, t, *a, **kw)
    monkeypatch.setattr(TwoExperts, "expert", spy)
    return calls


def test_two_expert_routing_in_training_and_sampling(tmp_path, monkeypatch, experts):
    """--boundary: every net is a pair of experts; each call sends every sample to the expert that owns its time
    (s ≥ boundary: the high-noise one), in training (sCM, DMD's backward simulation that crosses the boundary, the
    critic) and in sampling (the evaluation, and sample.py on the exported ema/ folder, which repeats it)."""
    import sample
    from model import TwoExperts
    calls = record_routing(monkeypatch)
    cfg = tiny_run(experts, tmp_path / "run", boundary=0.875, eval_per_prompt=4)
    d = parallel.init_distributed(1, "cpu")
    try:
        nets = training.build_nets(cfg, d, cfg, teacher=experts, trained=experts, fake=experts)
        assert all(isinstance(n, TwoExperts) for n in (nets.teacher, nets.trained, nets.fake, nets.ema))
        low = load_file(experts / "low_noise_model" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(v.full_tensor(), low[k]) for k, v in nets.trained.low.state_dict().items())
    finally:
        dist.destroy_process_group()
    results = train_rcm.train(cfg)
    def check(calls):
        for high, t, boundary in calls:
            assert ((t.reshape(len(t), -1).amax(1) >= 1000 * boundary) == high).all()
        assert {high for high, *_ in calls} == {True, False}
    check(calls)
    for name in ("high_noise_model", "low_noise_model"):
        load_checkpoint(WanModel(TINY_DIT), tmp_path / "run" / "ema" / name / "diffusion_pytorch_model.safetensors")
    calls.clear()
    again = sample.main(sample.Config(dit_path=tmp_path / "run" / "ema", toy=True, device="cpu",
                                      save_path=tmp_path / "samples"))
    check(calls)
    assert json.dumps(again) == json.dumps({k: v for k, v in results.items() if k.startswith("student-")})


def test_each_expert_learns_from_its_own_times_only():
    """A loss over a batch that straddles the boundary sends each sample's gradient to its own expert: the same as
    each expert's loss on its own samples."""
    from model import TwoExperts
    torch.manual_seed(0)
    high, low = WanModel(TINY_DIT), WanModel(TINY_DIT)
    two = TwoExperts(high, low, 0.5)
    x, ctx = torch.randn(4, 16, 2, 4, 4), torch.randn(4, 8, 32)
    t = torch.tensor([900.0, 100.0, 600.0, 400.0])
    two(x, t, ctx).pow(2).sum().backward()
    grads = [p.grad.clone() for p in two.parameters()]
    two.zero_grad()
    (high(x[[0, 2]], t[[0, 2]], ctx[[0, 2]]).pow(2).sum() + low(x[[1, 3]], t[[1, 3]], ctx[[1, 3]]).pow(2).sum()).backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, two.parameters()))
    two.zero_grad()
    two(x[[1, 3]], t[[1, 3]], ctx[[1, 3]]).sum().backward()  # only low-noise times: the high expert gets nothing
    assert all(p.grad is None for p in high.parameters()) and any(p.grad.abs().sum() > 0 for p in low.parameters())


def _two_experts(rank, tmp, experts):
    tmp = Path(tmp)
    train_rcm.train(tiny_run(experts, tmp / "dp2", boundary=0.875, eval_per_prompt=0))
    run = lambda name: tiny_run(experts, tmp / name, boundary=0.875, iterations=7, ckpt_every=4, eval_per_prompt=0)
    train_rcm.train(run("full"))
    train_killed_in_second_critic_iteration(run("run"))
    train_rcm.train(run("run"))


def test_two_process_two_expert_runs_equal_one_process_and_resume_bit_for_bit(tmp_path, experts):
    """Two data-parallel ranks draw their own times, so one rank's batch may need an expert the other's does not:
    both still run it (its collectives must match), and the run equals one process with 2 accumulation steps.
    Killed and restarted, it repeats the uninterrupted run bit for bit."""
    train_rcm.train(tiny_run(experts, tmp_path / "one_accum", boundary=0.875, eval_per_prompt=0, batch=4,
                             grad_accum=2))
    spawn(_two_experts, tmp_path, experts, backend="gloo")
    a, b = logged(tmp_path / "dp2"), logged(tmp_path / "one_accum")
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b):
        assert all(abs(ra[k] - rb[k]) <= 1e-5 * abs(rb[k]) + 1e-12 for k in rb if k.startswith("loss/"))
    full, run = logged(tmp_path / "full"), logged(tmp_path / "run")
    assert [r["iteration"] for r in run] == list(range(7)) and json.dumps(run) == json.dumps(full)
    for name in ("high_noise_model", "low_noise_model"):
        f = lambda r: load_file(tmp_path / r / "ema" / name / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(v, f("run")[k]) for k, v in f("full").items())


def _straddling_experts(rank, tmp):
    from model import TwoExperts
    torch.manual_seed(0)
    experts = [WanModel(TINY_DIT), WanModel(TINY_DIT)]
    d = parallel.init_distributed(1, "cpu")
    for net in experts:
        parallel.shard_model(net, d.fsdp_mesh, compute_dtype=None)
    two = TwoExperts(*experts, 0.5, sharded=True)
    x, ctx, t = _straddle_inputs(rank)
    out = two(x, t, ctx)
    out.pow(2).sum().backward()
    grads = {k: p.grad.full_tensor() for k, p in two.named_parameters() if p.grad is not None}
    torch.save({"out": out.detach(), "grads": grads}, Path(tmp) / f"rank{rank}.pt")


def _straddle_inputs(rank):
    """Rank 0's two samples both belong to the high-noise expert; rank 1's straddle the boundary."""
    g = torch.Generator().manual_seed(10 + rank)
    t = torch.tensor([900.0, 800.0]) if rank == 0 else torch.tensor([900.0, 100.0])
    return torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 8, 32, generator=g), t


def test_sharded_experts_run_when_another_rank_needs_them_and_match_one_process(tmp_path):
    """FSDP experts on 2 ranks where only rank 1 needs the low-noise expert: rank 0 runs it too (its collectives must
    match, else the ranks hang), its outputs and the averaged gradients equal one process's."""
    from model import TwoExperts
    spawn(_straddling_experts, tmp_path, backend="gloo")
    torch.manual_seed(0)
    two = TwoExperts(WanModel(TINY_DIT), WanModel(TINY_DIT), 0.5)
    for rank in (0, 1):
        x, ctx, t = _straddle_inputs(rank)
        out = two(x, t, ctx)
        (out.pow(2).sum() / 2).backward()  # (FSDP averages the ranks' gradients)
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(saved["out"], out.detach(), atol=1e-5)
    grads = {k: p.grad for k, p in two.named_parameters() if p.grad is not None}
    assert any(k.startswith("low.") for k in grads) and any(k.startswith("high.") for k in grads)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["grads"]
        assert saved.keys() == grads.keys()
        assert all(torch.allclose(saved[k], v, atol=1e-5, rtol=1e-4) for k, v in grads.items())


def test_two_expert_teacher_guidance_per_expert(tmp_path, monkeypatch, experts):
    """--teacher-guidance-high: the teacher's CFG weight at times ≥ the boundary (Wan2.2 T2V's official 4 above, 3
    below); refused without --boundary."""
    seen, guidance = [], train_rcm.guidance
    monkeypatch.setattr(train_rcm, "guidance", lambda net, uncond, w, w_high=None, boundary=1.0: seen.append(
        (w, w_high, boundary)) or guidance(net, uncond, w, w_high, boundary))
    train_rcm.train(tiny_run(experts, tmp_path / "run", boundary=0.875, teacher_guidance=3.0, teacher_guidance_high=4.0,
                             eval_per_prompt=0, iterations=3))
    assert seen and set(seen) == {(3.0, 4.0, 0.875)}
    with pytest.raises(ValueError, match="needs --boundary"):
        train_rcm.train(tiny_run(experts, tmp_path / "x", teacher_guidance_high=4.0))
    assert train_rcm.PRESETS["wan2.2-t2v-a14b"][1].teacher_guidance_high == 4.0
