"""parallel.py: Ulysses CP = one device (forward, tangent, gradients), FSDP2 (+CP, +activation checkpointing) training
= one process (SGD: gradient scale errors show, which Adam would hide), distributed checkpoint resume, EMA export,
sharded bf16 teacher from an fp32 file. Two CPU processes with gloo."""
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
from checkpoint import save_checkpoint
from model import CONFIGS, WanConfig, WanModel, load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def random_tiny(seed=0, **overrides):
    """t2v-tiny (with config overrides) with every parameter random (the official init zeroes the output layer)."""
    torch.manual_seed(seed)
    net = WanModel(WanConfig(**{**CONFIGS["t2v-tiny"].__dict__, **overrides}))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


def inputs(seed=1, batch=2, device="cpu"):
    """A clip of 2 latent frames × 3 tokens per frame (3 is not divisible by 2 ranks: the padding path), per-frame t."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 2, 6, 2, generator=g)
    t = torch.rand(batch, 2, generator=g) * 1000
    context = torch.randn(batch, 5, CONFIGS["t2v-tiny"].text_dim, generator=g)
    tangent = (torch.randn(x.shape, generator=g), torch.randn(t.shape, generator=g))
    return x.to(device), t.to(device), context.to(device), tuple(a.to(device) for a in tangent)


def close(a, b, tol=1e-5):
    tol = tol if a.device.type == "cpu" else 10 * tol  # GPU kernels reduce in other orders
    return ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


def spawn(fn, tmp_path, *args, backend="gloo"):
    """fn(rank, tmp, *args) on 2 processes joined in one process group (gloo; NCCL with one GPU each)."""
    mp.spawn(_worker, args=(fn, str(tmp_path), backend, args), nprocs=2, join=True)


def _worker(rank, fn, tmp, backend, args):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        fn(rank, tmp, *args)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# One process

class _Group:
    """Stands in for a process group in the pure index arithmetic of token_layout."""
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("P, frames, per_frame", [(2, 3, 4), (3, 2, 5), (4, 1, 3)])
def test_token_layout_covers_each_token_once(P, frames, per_frame):
    layouts = [parallel.token_layout(_Group(P, r), frames, per_frame, "cpu") for r in range(P)]
    gathered = torch.cat([lay.local for lay in layouts])  # the rank-major concatenation
    assert torch.equal(gathered[layouts[0].order], torch.arange(frames * per_frame))
    for lay in layouts:  # each rank holds the same number of rows of every frame, frame by frame
        assert (lay.local.view(frames, -1) // per_frame == torch.arange(frames)[:, None]).all()
        assert torch.equal(lay.rank_major, gathered)  # every rank knows the whole concatenation


@pytest.mark.parametrize("mode", ["block", "attention", "matmul"])
def test_activation_checkpointing_two_forwards_same_gradients(mode):
    x, t, context, (tx, tt) = inputs()
    ref, net = random_tiny(), parallel.checkpoint_activations(random_tiny(), mode)
    grads = []
    for m in (ref, net):
        with torch.no_grad():
            _, tv = m(x, t, context, tangent=(tx, tt))
        loss = (m(x, t, context) * tv).mean() + m(x.flip(0), t.flip(0), context).square().mean()  # two forwards
        loss.backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(close(a, b, 1e-6) for a, b in zip(grads[1], grads[0]))
    with pytest.raises(ValueError, match="'none', 'block', 'attention' or 'matmul'"):
        parallel.checkpoint_activations(random_tiny(), "all")


def test_attention_checkpointing_keeps_self_attention_only():
    """--checkpointing attention keeps the outputs of attention whose keys are at least its queries (self-attention,
    also against a KV cache) and recomputes the cross-attention to the text rows and everything else."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    q, k_self, k_text = (torch.empty(1, 2, n, 8, device="meta") for n in (1560, 1560, 512))
    policy = parallel.CheckpointPolicy
    assert parallel._save_attention(None, op, q, k_self, k_self) == policy.MUST_SAVE
    assert parallel._save_attention(None, op, q, k_text, k_text) == policy.PREFER_RECOMPUTE
    assert parallel._save_attention(None, torch.ops.aten.mm.default, q, k_self) == policy.PREFER_RECOMPUTE


@pytest.mark.parametrize("mode", ["block", "attention"])
def test_checkpointed_blocks_compile(mode):
    """`block.compile()` on checkpointed blocks traces them (torch.compile skips a checkpoint called straight from
    the module, and the blocks ran eagerly): one graph per block shape, no graph break, eager gradients. The
    aot_eager backend runs the same tracing and partitioning as inductor, without generating kernels."""
    x, t, context, _ = inputs()
    ref, net = random_tiny(), parallel.checkpoint_activations(random_tiny(), mode)
    for block in net.blocks:
        block.compile(backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    grads = []
    for m in (ref, net):
        m(x, t, context).square().mean().backward()
        grads.append([p.grad for p in m.parameters()])
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert all(close(a, b, 1e-6) for a, b in zip(grads[1], grads[0]))


def test_init_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    d = parallel.init_distributed()
    try:
        assert (dist.get_world_size(), d.rank, d.dp_rank, d.dp_size, d.cp_size, d.is_main) == (1, 0, 0, 1, 1, True)
        assert d.mesh.mesh_dim_names == ("dp", "cp") and d.mesh.shape == (1, 1)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Two processes: context parallelism

def assert_equal_nets(net, ref, batch, what: str):
    """A CP net (on each of 2 ranks) against the one-device ref: the forward and tangent, then the gradients of one
    weighted sum (averaged over the ranks, as FSDP would)."""
    x, t, context, tangent = batch
    with torch.no_grad():
        v_ref, tv_ref = ref(x, t, context, tangent=tangent)
        v, tv = net(x, t, context, tangent=tangent)
    assert close(v, v_ref) and close(tv, tv_ref), f"{what}: forward differs"
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(2)).to(v.device)
    for m in (ref, net):
        (m(x, t, context) * w).sum().backward()
    for p_ref, p in zip(ref.parameters(), net.parameters()):
        dist.all_reduce(p.grad)  # FSDP's mean over the 2 ranks, written out
        assert close(p.grad / 2, p_ref.grad), f"{what}: gradient differs"


def _cp_equals_one_device(rank, tmp):
    d = parallel.init_distributed(cp_size=2)
    assert (d.dp_size, d.cp_size) == (1, 2)
    x, t, context, tangent = inputs(device=d.device)
    for heads, head_groups in [(2, 1), (4, 2)]:  # 4 heads in 2 groups: pipelined all-to-alls
        ref = random_tiny(num_heads=heads).to(d.device)
        net = parallel.context_parallel(copy.deepcopy(ref), d.cp_group, head_groups)
        assert_equal_nets(net, ref, (x, t, context, tangent), f"{head_groups} head groups")
    try:
        parallel.context_parallel(random_tiny(num_heads=4), d.cp_group, 3)
        raise AssertionError("no error for 4 heads in 3 groups on 2 CP ranks")
    except ValueError as e:
        assert "--cp-head-groups 3" in str(e) and "[1, 2]" in str(e)
    with torch.device("meta"):
        odd = WanModel(WanConfig(**{**CONFIGS["t2v-tiny"].__dict__, "num_heads": 1}))
    try:
        parallel.context_parallel(odd, d.cp_group)
        raise AssertionError("no error for 1 head on 2 CP ranks")
    except ValueError as e:
        assert "not divisible by the context-parallel size 2" in str(e)


def test_context_parallel_equals_one_device(tmp_path):
    spawn(_cp_equals_one_device, tmp_path)


def _compiled_cp_equals_one_device(rank, tmp):
    d = parallel.init_distributed(cp_size=2)
    x, t, context, tangent = inputs(device=d.device)
    for heads, head_groups, ac in [(2, 1, "block"), (4, 2, "attention")]:
        ref = random_tiny(num_heads=heads).to(d.device)
        net = copy.deepcopy(ref)
        parallel.checkpoint_activations(net, ac)
        parallel.context_parallel(net, d.cp_group, head_groups)
        for block in net.blocks:
            block.compile(backend="aot_eager")
        assert_equal_nets(net, ref, (x, t, context, tangent), f"{ac}, {head_groups} head groups")


def test_compiled_checkpointed_context_parallel_blocks_equal_one_device(tmp_path):
    """--compile with --cp-size (the wan1.3b preset compiles): blocks compiled (aot_eager) around the asynchronous
    all-to-alls, checkpointed, with and without head groups, give the one-device forward, tangent and gradients."""
    spawn(_compiled_cp_equals_one_device, tmp_path)


@pytest.mark.gpu
def test_context_parallel_equals_one_device_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_cp_equals_one_device, tmp_path, backend="nccl")


# ----------------------------------------------------------------------------------------------------------------
# Two processes: FSDP2 training, with and without CP

def sharded_copy(ref, d, ac="none", compute_dtype=None):
    """The meta-device path: build on meta, shard, allocate, then rank 0's full state dict is scattered."""
    with torch.device("meta"):
        net = WanModel(ref.cfg).to(ref.head.head.weight.dtype).requires_grad_(ref.head.head.weight.requires_grad)
    parallel.checkpoint_activations(net, ac)
    if d.cp_size > 1:
        parallel.context_parallel(net, d.cp_group)
    parallel.shard_model(net, d.fsdp_mesh, compute_dtype=compute_dtype)
    net.to_empty(device=d.device)
    parallel.load_full_state_dict(net, ref.state_dict() if d.is_main else {})
    return net


def rcm_like_step(net, opt, x, t, context, tangent):
    """A no-grad JVP pass then two with-grad forwards into one loss, as in an rCM student step. Returns the loss."""
    with torch.no_grad():
        _, tv = net(x, t, context, tangent=tangent)
    noise = torch.randn_like(x)  # a draw from the (per data-parallel rank) seeded RNG
    loss = (net(x, t, context) * tv).mean() + (net(x + noise, t * 0.5, context) - x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _fsdp_equals_one_process(rank, tmp):
    for cp, ac in [(1, "block"), (2, "matmul")]:
        d = parallel.init_distributed(cp_size=cp)
        x, t, context, (tx, tt) = inputs(device=d.device)
        ref = random_tiny().to(d.device)
        net = sharded_copy(ref, d, ac)
        # SGD: linear in the gradient, so the comparison is not at the mercy of Adam's sign-like first steps
        opt_ref, opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, net))
        mine = lambda a: a.chunk(d.dp_size)[d.dp_rank]  # data parallel: rank r takes sample r; CP: the whole batch
        for step in range(2):
            parallel.seed_everything(step, d)
            loss = rcm_like_step(net, opt, mine(x), mine(t), mine(context), (mine(tx), mine(tt)))
            losses = [torch.zeros((), device=d.device) for _ in range(2)]
            dist.all_gather(losses, loss)
            if d.cp_size == 2:
                assert torch.equal(losses[0], losses[1]), "the CP ranks drew different noise"
            # one process, one batch, the same draws (the loss is a batch mean, FSDP's gradient a mean over ranks)
            with torch.no_grad():
                _, tv = ref(x, t, context, tangent=(tx, tt))
            noise = []
            for r, a in enumerate(x.chunk(d.dp_size)):  # data-parallel rank r's draw
                parallel.seed_everything(step, dataclasses.replace(d, dp_rank=r))
                noise.append(torch.randn_like(a))
            noise = torch.cat(noise)
            loss_ref = (ref(x, t, context) * tv).mean() + (ref(x + noise, t * 0.5, context) - x).square().mean()
            opt_ref.zero_grad()
            loss_ref.backward()
            opt_ref.step()
        full = parallel.full_state_dict(net)
        if d.is_main:
            for k, v in ref.state_dict().items():
                assert close(full[k], v.cpu(), 1e-5), f"cp={cp} ac={ac}: {k} differs after 2 steps"
        dist.barrier()


def test_fsdp_and_cp_training_equals_one_process(tmp_path):
    spawn(_fsdp_equals_one_process, tmp_path)


@pytest.mark.gpu
def test_fsdp_and_cp_training_equals_one_process_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_fsdp_equals_one_process, tmp_path, backend="nccl")


# ----------------------------------------------------------------------------------------------------------------
# Two processes: resume from a distributed checkpoint, export the EMA student, a sharded bf16 teacher

def _checkpoint_resume_and_export(rank, tmp):
    d = parallel.init_distributed()
    x, t, context, tangent = inputs()
    ref = random_tiny()
    student, ema = sharded_copy(ref, d), sharded_copy(ref, d)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10))
    mine = slice(d.dp_rank, d.dp_rank + 1)
    parallel.seed_everything(0, d)

    def step():
        rcm_like_step(student, opt, x[mine], t[mine], context[mine], (tangent[0][mine], tangent[1][mine]))
        sched.step()
        with torch.no_grad():
            for e, s in zip(ema.parameters(), student.parameters()):
                e.lerp_(s, 0.5)

    step()
    folder = f"{tmp}/ckpt"
    state = dict(nets={"student": student, "ema": ema}, optimizers={"student": opt}, schedulers={"student": sched})
    parallel.save_training_state(folder, **state, counters={"iteration": 1, "data_batches": 7})
    step()
    after = {k: v.full_tensor() for k, v in {**student.state_dict(), **{"ema." + k: v for k, v in ema.state_dict().items()}}.items()}
    lr = sched.get_last_lr()
    torch.manual_seed(1234)  # scramble the RNG: the checkpoint restores it
    counters = parallel.load_training_state(folder, **state, counters={"iteration": 0, "data_batches": 0})
    assert counters == {"iteration": 1, "data_batches": 7}
    step()
    again = {k: v.full_tensor() for k, v in {**student.state_dict(), **{"ema." + k: v for k, v in ema.state_dict().items()}}.items()}
    assert sched.get_last_lr() == lr
    for k in after:
        assert torch.equal(after[k], again[k]), f"{k} differs after resuming"

    full = parallel.full_state_dict(ema)
    if d.is_main:
        save_checkpoint(full, f"{tmp}/ema.safetensors")
        exported = load_checkpoint(WanModel(ref.cfg), f"{tmp}/ema.safetensors")
        for k, v in exported.state_dict().items():
            assert torch.equal(v, again["ema." + k])

    teacher_ref = random_tiny().to(torch.bfloat16).requires_grad_(False)
    teacher = sharded_copy(teacher_ref, d)  # bf16 storage, no compute cast
    parallel.load_full_state_dict(teacher, random_tiny().state_dict() if d.is_main else {})  # from an fp32 file
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert torch.equal(teacher(x, t, context), teacher_ref(x, t, context))


def test_checkpoint_resume_export_and_bf16_teacher(tmp_path):
    spawn(_checkpoint_resume_and_export, tmp_path)
