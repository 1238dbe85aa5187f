"""Scale-out with PyTorch's own engine: torchrun init, a (data-parallel × context-parallel) mesh, FSDP2, Ulysses
context parallelism for primal and tangent, selective activation checkpointing, distributed checkpoints.

The ranks form a 2-D mesh ("dp", "cp"). The ranks of one "cp" row hold the same clip (same data, noise and time
draws: `seed_everything` seeds by data-parallel rank) and split its tokens; parameters are sharded by FSDP2 over all
ranks. Gradients: every rank of a CP group computes the same loss on the gathered output, the gather's adjoint sums
the ranks' copies of its gradient, and FSDP averages over all ranks, so the result is the data-parallel mean of the
per-clip gradients (see `gather_tokens`).

Ulysses attention (arXiv 2309.14509). A rank holds L/P tokens with all H heads. Before attention one all-to-all
trades tokens for heads, [B, L/P, H, D] -> [B, L, H/P, D]; attention runs over the whole sequence for H/P heads; a
second all-to-all trades back. The tangents tq, tk, tv of the JVP pass take the same two trips, and the all-to-alls
are differentiable (the adjoint of an all-to-all is the reverse all-to-all) for the with-grad forward.

Token layout. The blocks modulate per latent frame (tokens seen as [B, F, L/F, D]), so each rank keeps the same
slice of every frame: frame f's tokens [r·n, (r+1)·n), n = ⌈tokens per frame / P⌉. When P does not divide the
frame, the last slice is padded (with copies of a real token); padded rows are dropped before attention, where the
gathered sequence is also put back in its original order, so masks and results are exactly those of one device.
"""
import functools
import os
import pickle
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from attention_jvp import attention


# ----------------------------------------------------------------------------------------------------------------
# Processes and mesh

@dataclass(frozen=True)
class Dist:
    """Where this process stands. mesh: 2-D ("dp", "cp"); fsdp_mesh: all ranks, 1-D (FSDP shards over dp × cp)."""
    mesh: DeviceMesh
    fsdp_mesh: DeviceMesh
    device: torch.device
    rank: int
    dp_rank: int
    dp_size: int
    cp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cp_group(self):
        return self.mesh["cp"].get_group()


def init_distributed(cp_size: int = 1, device: str | None = None) -> Dist:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment), or a one-process
    group when run as plain `python` (an already initialised group, e.g. a test's, is used as it is). device "cuda"
    (one GPU per process, NCCL) or "cpu" (gloo); by default CUDA when there is a GPU."""
    if not dist.is_initialized():
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    processes = dist.get_world_size()
    if processes % cp_size:
        raise ValueError(f"the context-parallel size {cp_size} must divide the number of processes {processes}")
    # NCCL ranks own one GPU each; a gloo group computes on the CPU
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (processes // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    fsdp_mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
    rank = dist.get_rank()
    return Dist(mesh, fsdp_mesh, device, rank, rank // cp_size, processes // cp_size, cp_size)


def cli(main, cfg):
    """The scripts' entry point: main(cfg). What a user can fix (a flag, a file, the data: ValueError, OSError) and
    Ctrl-C outside a training loop end the process with one line from rank 0 and exit status 2 (Ctrl-C: 130), no
    traceback; other errors are bugs and keep theirs. RCM_TRACEBACK=1 shows every traceback."""
    try:
        return main(cfg)
    except (ValueError, OSError, KeyboardInterrupt) as e:
        if os.environ.get("RCM_TRACEBACK"):
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print("interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)


def seed_everything(seed: int, d: Dist, step: int = 0, micro: int = 0, accumulation: int = 1):
    """Seed torch's RNGs (CPU and CUDA) for micro-batch `micro` of step `step`. The stream depends only on (seed,
    step, global micro-batch index dp_rank·accumulation + micro): the ranks of a CP group draw identical noise and
    times, a resumed run redraws what the interrupted one drew, and N data-parallel ranks × A accumulation steps
    draw what one rank × N·A accumulation steps draws. (Python hashes tuples of ints the same in every process.)"""
    torch.manual_seed(hash((seed, step, d.dp_rank * accumulation + micro)) % 2**63)


# ----------------------------------------------------------------------------------------------------------------
# FSDP2: sharded parameters, meta-device construction, full state dicts

def shard_model(net, mesh: DeviceMesh, compute_dtype=torch.bfloat16):
    """FSDP2 on every transformer block and on the root. Parameters keep their stored dtype (fp32 masters for
    trained nets; the frozen teacher is stored in bf16 and passes compute_dtype=None), are gathered in
    `compute_dtype`, and gradients are reduced in fp32. Inputs are not cast: model.py keeps the residual stream,
    time embedding and modulation in fp32 itself."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # A block returns a view of its residual stream; model.py never updates it in place, which is what FSDP warns of.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in net.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The root reshards after forward too (FSDP2 keeps a root's parameters gathered until its backward by default):
    # a no-grad pass after the last backward (rCM's backward simulation, after sCM's loss is backpropagated, in
    # another expert than DMD's) would otherwise leave them gathered through the optimizer step and the EMA. They are
    # a few MB (embeddings, head).
    fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return net


def load_full_state_dict(net, state_dict: dict):
    """Fill a sharded net (built on the meta device, sharded, then `net.to_empty(device=...)`) from a full state
    dict that only rank 0 holds (e.g. `model.read_state_dict(path)`; {} on the other ranks). Rank 0 reads the file
    once and each rank receives only its shards, copied into the net's dtypes (e.g. an fp32 file into a bf16
    teacher). The dict itself is left as it is (PyTorch swaps its values), so one read can fill several nets."""
    set_model_state_dict(net, dict(state_dict), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_state_dict(net) -> dict:
    """The unsharded state dict on rank 0's CPU ({} on other ranks), e.g. to export the EMA student with
    `checkpoint.save_checkpoint(full_state_dict(ema), path)` on rank 0."""
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------------------------
# Context parallelism (Ulysses)

def context_parallel(net, group, head_groups: int = 1):
    """Make `net` (a WanModel) split its tokens over the ranks of `group` (a CP group of size > 1). head_groups > 1
    pipelines each self-attention's all-to-alls over that many groups of heads (ulysses_attention)."""
    P, H = group.size(), net.cfg.num_heads
    if H % P:
        raise ValueError(f"the model has {H} attention heads, not divisible by the context-parallel size {P}: "
                         f"pick a --cp that divides {H}")
    if head_groups < 1 or H % (P * head_groups):
        raise ValueError(f"--cp-head-groups {head_groups}: the model's {H} heads must split into that many groups of "
                         f"a multiple of the context-parallel size {P} heads; pick one of "
                         f"{[g for g in range(1, H // P + 1) if H % (P * g) == 0]}")
    net.cp_group, net.cp_head_groups = group, head_groups
    return net


@dataclass(frozen=True)
class TokenLayout:
    """The split of one clip's L tokens over a CP group. local [F·n]: the tokens this rank holds (frame by frame);
    order [L]: where token i sits in the rank-major concatenation [rank 0's | rank 1's | ...] of all ranks' tokens;
    rank_major [P·F·n]: that concatenation's tokens (every rank's `local`, padding included); head_groups: see
    ulysses_attention."""
    group: dist.ProcessGroup
    local: torch.Tensor
    order: torch.Tensor
    rank_major: torch.Tensor
    head_groups: int = 1


def token_layout(group, frames: int, tokens_per_frame: int, device, head_groups: int = 1) -> TokenLayout:
    P, r = group.size(), group.rank()
    n = -(-tokens_per_frame // P)
    f = torch.arange(frames, device=device)[:, None]
    j = torch.arange(n, device=device)
    ranks = torch.arange(P, device=device)[:, None, None]
    rank_major = f * tokens_per_frame + (ranks * n + j).clamp(max=tokens_per_frame - 1)  # padding repeats a real token
    i = torch.arange(tokens_per_frame, device=device)
    order = (i // n) * (frames * n) + f * n + i % n
    return TokenLayout(group, rank_major[r].flatten(), order.flatten(), rank_major.flatten(), head_groups)


def shard_tokens(h, cp: TokenLayout, dim: int = 1):
    """This rank's tokens of h (all tokens along `dim`); None stays None."""
    return None if h is None else h.index_select(dim, cp.local)


def gather_tokens(h, cp: TokenLayout):
    """[B, F·n, ...] local tokens -> [B, L, ...] all tokens in their original order, on every rank of the group."""
    return None if h is None else _AllGather.apply(h, cp.group).index_select(1, cp.order)


class _AllGather(torch.autograd.Function):
    """Concatenate the ranks' tensors along dim 1. Adjoint: sum the ranks' gradients, keep this rank's slice (every
    rank computes the same loss, so this makes each rank's gradient P times its share; FSDP's mean over the ranks
    divides the P back out)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.group.size(), dim=1)[ctx.group.rank()], None


class _Exchange(torch.autograd.Function):
    """all_to_all_single of a [P, ...] buffer: part j goes to rank j, part j of the result came from rank j. Started
    asynchronously (NCCL works on its own stream): the work handle is appended to `pending`; wait on it before the
    result is read. The exchange is its own adjoint, run synchronously in backward."""

    @staticmethod
    def forward(ctx, send, group, pending: list):
        ctx.group = group
        recv = torch.empty_like(send)
        pending.append(dist.all_to_all_single(recv, send, group=group, async_op=True))
        return recv

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None, None


def _start_all_to_all(x, group, scatter_dim: int, pending: list):
    """Split x into P parts along scatter_dim and start sending part j to rank j; returns the receive buffer
    [P, ...] (read it after pending's new handle is waited on; _finish_all_to_all). One copy into the send buffer,
    none where the parts already lie rank-major, as a batch of one's tokens do."""
    send = x.unflatten(scatter_dim, (group.size(), -1)).movedim(scatter_dim, 0).contiguous()
    return _Exchange.apply(send, group, pending)


def _finish_all_to_all(recv, gather_dim: int):
    """The arrivals concatenated along gather_dim (a view where the layout allows, as for a batch of one's tokens)."""
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def ulysses_attention(q, k, v, tq=None, tk=None, tv=None, *, cp: TokenLayout, attend=attention, **kwargs):
    """`attention_jvp.attention` for tokens split over a CP group: q, k, v (and tangents) [B, F·n, H, D] local
    tokens -> o (or (o, to)) [B, F·n, H, D]. kwargs (scale, mask) are those of the unsplit sequence; `attend` runs
    on the head shards (model.py's KV cache passes one that prepends its cached keys and values).

    With cp.head_groups = G > 1 (and the plain `attention`) the heads go in G groups: every group's all-to-alls
    start at once, group g's attention runs while later groups' inputs and earlier groups' outputs are in flight,
    and no rank waits for the whole exchange before it computes (forward and tangent passes; backward exchanges
    run synchronously). Each head's attention is the same either way."""
    H, P = q.shape[2], cp.group.size()
    G = cp.head_groups if attend is attention else 1  # (a KV cache's attend writes all of a block's heads at once)
    if H % (P * G):
        raise ValueError(f"{H} attention heads are not divisible by the context-parallel size {P} times "
                         f"{G} head groups")
    pending = []

    def send(a, scatter_dim):  # start an all-to-all; (receive buffer, its work handle)
        return _start_all_to_all(a, cp.group, scatter_dim, pending), pending[-1]

    def heads_arrived(sent):  # -> all L tokens in order, this rank's heads [B, L, h/P, D]
        if sent is None:
            return None
        sent[1].wait()
        return _finish_all_to_all(sent[0], 1).index_select(1, cp.order)

    def tokens_arrived(sent):  # -> this rank's tokens, all heads [B, F·n, h, D]
        sent[1].wait()
        return _finish_all_to_all(sent[0], 2)

    groups = [slice(g * H // G, (g + 1) * H // G) for g in range(G)]
    inputs = [[None if a is None else send(a[:, :, heads], 2) for a in (q, k, v, tq, tk, tv)] for heads in groups]
    returned = []
    for sent in inputs:
        out = attend(*map(heads_arrived, sent), **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        # back to the rank-major layout (padded rows: the token they repeat), then all heads
        returned.append([send(o.index_select(1, cp.rank_major), 1) for o in outs])
    outs = [[tokens_arrived(sent) for sent in parts] for parts in zip(*returned)]
    outs = [parts[0] if G == 1 else torch.cat(parts, dim=2) for parts in outs]
    return tuple(outs) if isinstance(out, tuple) else outs[0]


# ----------------------------------------------------------------------------------------------------------------
# Selective activation checkpointing

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_cudnn_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


_ATTENTION = {op for op in _MATMULS if "attention" in str(op)}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention(ctx, op, *args, **kwargs):
    """Self-attention's outputs (keys at least as many as queries); the cross-attention to the 512 text rows costs
    little to recompute, and saving it too would double the memory this mode adds."""
    self_attention = op in _ATTENTION and args[1].shape[-2] >= args[0].shape[-2]
    return CheckpointPolicy.MUST_SAVE if self_attention else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_activations(net, mode: str):
    """Activation checkpointing per transformer block. "block": keep only each block's inputs and recompute the
    block in backward; "attention": also keep the self-attention outputs (the block's costliest op at long
    sequences; one [B, L, dim] bf16 tensor and its log-sum-exp per block), recompute the rest; "matmul": keep the
    matmul and attention outputs, recompute the cheap elementwise ops and norms; "none": keep everything.
    Non-reentrant checkpoints: any number of with-grad forwards may precede one backward (rCM's student step
    backpropagates its sCM loss before DMD's forwards, which keeps one graph alive at a time). The recompute repeats
    the Ulysses all-to-alls."""
    if mode not in ("none", "block", "attention", "matmul"):
        raise ValueError(f"activation checkpointing mode must be 'none', 'block', 'attention' or 'matmul', "
                         f"got {mode!r}")
    if mode == "none":
        return net
    policy = {"attention": _save_attention, "matmul": _save_matmuls}.get(mode)
    for block in net.blocks:
        block.forward = functools.partial(_checkpointed, block.forward, policy)
    return net


def _checkpointed(forward, policy, *args, **kwargs):
    """forward(*args) under a non-reentrant checkpoint (selective with a policy). A frame of this file, not torch's,
    so that a compiled block (`block.compile()`) traces it and turns the checkpoint into one graph; called straight
    from the module, torch's checkpoint is a frame torch.compile skips, and the block would silently run eagerly."""
    if policy is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, policy), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Distributed checkpoints of the training state

class _MetadataUnpickler(pickle.Unpickler):
    """DCP reads a checkpoint's .metadata with a full unpickler, so a run folder from elsewhere could run code on resume.
    This one lets through only what that metadata is made of: DCP's metadata classes, torch.Size, dtypes, layouts
    and paths."""
    SAFE = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        if (module == "torch.distributed.checkpoint.metadata" or (module, name) in self.SAFE
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata: this state/ folder was "
                                     f"not written by this code, and is not loaded")


class _SafeReader(FileSystemReader):
    """A FileSystemReader whose .metadata goes through _MetadataUnpickler."""

    def read_metadata(self, *args, **kwargs):
        path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP reads non-tensor entries (optimiser hyper-parameters, counters) with a full unpickler; ours are plain
    numbers and lists, so read them with weights_only=True."""

    def load_bytes(self, read_item, value):
        self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def _training_state(nets, optimizers, schedulers, counters) -> dict:
    """One flat {name: tensor or plain value} dict; FSDP parameters and optimiser moments stay sharded DTensors."""
    state = {}
    for name, net in nets.items():
        if name in optimizers:
            model_sd, optim_sd = get_state_dict(net, optimizers[name],
                                                options=StateDictOptions(flatten_optimizer_state_dict=True))
            state.update({f"{name}.optim.{k}": v for k, v in optim_sd.items()})
        else:
            model_sd = get_model_state_dict(net)
        state.update({f"{name}.model.{k}": v for k, v in model_sd.items()})
    for name, scheduler in schedulers.items():
        state.update({f"{name}.scheduler.{k}": v for k, v in scheduler.state_dict().items()})
    state.update({f"counter.{k}": v for k, v in counters.items()})
    state[f"rng.{dist.get_rank()}.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state[f"rng.{dist.get_rank()}.cuda"] = torch.cuda.get_rng_state()
    return state


def save_training_state(folder, *, nets: dict, optimizers: dict, schedulers: dict, counters: dict):
    """Write everything a resume needs to a DCP folder: nets (student, EMA, fake score; by name), the optimisers and
    LR schedulers of those that train (same names), counters (iteration, data batches consumed, ...) and every
    rank's RNG state. Each rank writes its own shards."""
    dcp.save(_training_state(nets, optimizers, schedulers, counters), checkpoint_id=str(folder))


def load_training_state(folder, *, nets: dict, optimizers: dict, schedulers: dict, counters: dict) -> dict:
    """Restore in place what `save_training_state` wrote (same names, same number of processes); `counters` names the
    counters to read. Returns them with their saved values."""
    state = _training_state(nets, optimizers, schedulers, counters)
    reader = _SafeReader(str(folder))
    try:
        reader.read_metadata()  # every rank, before DCP's collectives: a refusal is one plain error, not a hang
    except pickle.UnpicklingError as e:
        raise ValueError(f"{folder}: {e}") from None
    dcp.load(state, storage_reader=reader, planner=_WeightsOnlyLoadPlanner(flatten_state_dict=False))
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for name, net in nets.items():
        if name in optimizers:
            set_state_dict(net, optimizers[name], model_state_dict=part(f"{name}.model."),
                           optim_state_dict=part(f"{name}.optim."),
                           options=StateDictOptions(flatten_optimizer_state_dict=True))
        else:
            set_model_state_dict(net, part(f"{name}.model."))
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(part(f"{name}.scheduler."))
    torch.set_rng_state(state[f"rng.{dist.get_rank()}.cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"rng.{dist.get_rank()}.cuda"])
    return part("counter.")
