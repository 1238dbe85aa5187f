"""The causal mode of model.py and causal streaming in sample.py: block-causal and teacher-forcing forwards against
chunk-by-chunk generation through the KV cache, the tangent under the teacher-forcing mask, the sliding window, the
quantised cache, and `sample.py --causal` end to end."""
import functools

import pytest
import torch

import attention_jvp
import model as wan
import samplers
from model import CONFIGS, CacheConfig, WanModel, chunk_frames, dequantize, quantize, rope_tables
from sample import Sampler, Streaming, decode, main, stream_video
from test_sample import files, mp4s, tiny  # noqa: F401 (files is a fixture)

B, T, H, W = 2, 5, 4, 6  # 5 latent frames of 2x3 tokens
FRAME_TOKENS = (H // 2) * (W // 2)


def cache_for(net, batch, frame_tokens, cfg, max_chunk_t, dtype=None):
    """samplers.kv_cache (the one cache builder) for frames of `frame_tokens` tokens and chunks of ≤ max_chunk_t."""
    return samplers.kv_cache(net, batch, (16, max_chunk_t, 2, 2 * frame_tokens), (max_chunk_t,), cfg, dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = WanModel(CONFIGS["t2v-tiny"])
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return net


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.rand(B, T, generator=g) * 1000
    context = [torch.randn(n, 48, generator=g) for n in (5, 9)]
    return x, t, context


def stream(net, x, t, context, chunks, cfg):
    """Every chunk's velocity through a KV cache that each chunk joins after its forward."""
    cache = cache_for(net, B, FRAME_TOKENS, cfg, max(chunks))
    out, f = [], 0
    for c in chunks:
        out.append(net(x[:, :, f:f + c], t[:, f:f + c], context, kv_cache=cache, kv_append=True))
        f += c
    return torch.cat(out, 2), cache


def test_chunk_frames():
    assert chunk_frames(21, 3, 3) == (3,) * 7
    assert chunk_frames(21, 1, 4) == (1, 4, 4, 4, 4, 4)
    assert chunk_frames(6, 1, 2) == (1, 2, 2, 1)
    with pytest.raises(ValueError, match="positive"):
        chunk_frames(5, 0, 1)


@pytest.mark.parametrize("rope", ["after", "before"])
def test_block_causal_clip_equals_streaming_through_kv_cache(net, inputs, rope):
    """Keys cached after or before RoPE give the block-causal forward of the whole clip, chunk by chunk."""
    x, t, context = inputs
    chunks = chunk_frames(T, 1, 2)
    with torch.no_grad():
        v = net(x, t, context, chunks=chunks)
        v_stream, cache = stream(net, x, t, context, chunks, CacheConfig(max_frames=T, rope=rope))
        v_full = net(x, t, context)
    assert cache.frames == T and cache.position == T
    assert rel(v_stream, v) < 1e-5
    assert rel(v[:, :, :1], v_full[:, :, :1]) > 1e-3  # the mask does change the result


def test_read_only_forward_leaves_the_cache_alone(net, inputs):
    x, t, context = inputs
    cache = cache_for(net, B, FRAME_TOKENS, CacheConfig(max_frames=T), 2)
    with torch.no_grad():
        net(x[:, :, :1], t[:, :1], context, kv_cache=cache, kv_append=True)
        a = net(x[:, :, 1:3], t[:, 1:3], context, kv_cache=cache)
        b = net(x[:, :, 1:3], t[:, 1:3], context, kv_cache=cache)
    assert cache.chunks == [1] and torch.equal(a, b)


def test_teacher_forcing_halves_equal_block_causal_and_the_cached_clean_context(net, inputs):
    """Packed [clean | noisy]: the clean half is the block-causal forward of the clean clip; noisy chunk c equals a
    forward of that chunk with the clean chunks < c (at their clean times) in the KV cache."""
    x_noisy, t_noisy, context = inputs
    x_clean = torch.randn(x_noisy.shape, generator=torch.Generator().manual_seed(5))
    t_clean = torch.zeros(B, T)
    chunks = chunk_frames(T, 1, 2)
    with torch.no_grad():
        v = net(torch.cat([x_clean, x_noisy], 2), torch.cat([t_clean, t_noisy], 1), context, chunks=chunks,
                teacher_forcing=True)
        v_clean = net(x_clean, t_clean, context, chunks=chunks)
        cache = cache_for(net, B, FRAME_TOKENS, CacheConfig(max_frames=T), max(chunks))
        per_chunk, f = [], 0
        for c in chunks:
            per_chunk.append(net(x_noisy[:, :, f:f + c], t_noisy[:, f:f + c], context, kv_cache=cache))
            net(x_clean[:, :, f:f + c], t_clean[:, f:f + c], context, kv_cache=cache, kv_append=True)
            f += c
    assert v.shape == (B, 16, 2 * T, H, W)
    assert rel(v[:, :, :T], v_clean) < 1e-5
    assert rel(v[:, :, T:], torch.cat(per_chunk, 2)) < 1e-5


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_causal_tangent_equals_torch_func_jvp(monkeypatch, net, inputs, teacher_forcing):
    """The tangent path under the block-causal and teacher-forcing masks (zero tangent on the clean half) equals
    forward-mode autodiff of the plain forward, both on the reference attention."""
    monkeypatch.setattr(wan, "attention", functools.partial(attention_jvp.attention, backend="reference"))
    x, t, context = inputs
    g = torch.Generator().manual_seed(7)
    tx, tt = torch.randn(x.shape, generator=g), torch.randn(t.shape, generator=g) * 100
    if teacher_forcing:  # [clean at s = 0 | noisy], the tangent only on the noisy half
        x, t = torch.cat([torch.randn(x.shape, generator=g), x], 2), torch.cat([torch.zeros(B, T), t], 1)
        tx, tt = torch.cat([torch.zeros_like(tx), tx], 2), torch.cat([torch.zeros(B, T), tt], 1)
    causal = dict(chunks=chunk_frames(T, 1, 2), teacher_forcing=teacher_forcing)
    with torch.no_grad():
        v, tv = net(x, t, context, tangent=(tx, tt), **causal)
        v_ref, tv_ref = torch.func.jvp(lambda x, t: net(x, t, context, **causal), (x, t), (tx, tt))
    assert rel(v, v_ref) < 1e-5
    assert rel(tv, tv_ref) < 1e-4
    if teacher_forcing:  # clean queries never see noisy keys, so the clean half carries no tangent
        assert tv[:, :, :T].abs().max() == 0 and tv[:, :, T:].abs().max() > 0


def test_sliding_window_keeps_sinks_and_bounds_memory(net, inputs):
    """Eight one-frame chunks into a 3-frame window with one sink chunk: the buffers never grow or move, the cache
    holds [sink | the newest chunks] in order, and keys cached before RoPE keep positions below window + chunk."""
    cfg = CacheConfig(max_frames=3, sink_chunks=1, rope="before")
    cache = cache_for(net, 1, FRAME_TOKENS, cfg, max_chunk_t=1)
    D = net.cfg.dim // net.cfg.num_heads
    nbytes, ptr = cache.nbytes(), cache.k[0].data_ptr()
    for j in range(8):  # chunk j's keys and values are all j, so the buffer says which chunks it holds
        rope = lambda frames, first: rope_tables((frames, H // 2, W // 2), D, "cpu", first)
        chunk = torch.full((1, FRAME_TOKENS, net.cfg.num_heads, D), float(j))
        cache.extend(0, chunk, chunk, append=True, **cache.snapshot(1, rope))
        cache.commit(1)
        held = cache.k[0][0, :cache.frames * FRAME_TOKENS, 0, 0].view(cache.frames, FRAME_TOKENS)[:, 0].tolist()
        assert held == [0.0, *range(max(1, j - 1), j + 1)]
        assert cache.frames <= 3 and cache.position == cache.frames
    assert cache.nbytes() == nbytes and cache.k[0].data_ptr() == ptr
    # through the model: positions stay bounded with keys before RoPE and keep counting with keys after RoPE
    x, t, context = inputs
    for rope, position in (("before", 3), ("after", 8)):
        cache = cache_for(net, B, FRAME_TOKENS, CacheConfig(max_frames=3, sink_chunks=1, rope=rope), 1)
        with torch.no_grad():
            for j in range(8):
                v = net(x[:, :, j % T:j % T + 1], t[:, j % T:j % T + 1], context, kv_cache=cache, kv_append=True)
        assert torch.isfinite(v).all() and cache.frames == 3 and cache.position == position
    with pytest.raises(ValueError, match="raise max_frames"):
        cache = cache_for(net, B, FRAME_TOKENS, CacheConfig(max_frames=1, sink_chunks=1), 1)
        with torch.no_grad():
            for j in range(2):
                net(x[:, :, :1], t[:, :1], context, kv_cache=cache, kv_append=True)


@pytest.mark.parametrize("kind, scale_by", [("int8", "token"), ("int8", "channel"), ("fp8", "token"), ("fp8", "channel")])
def test_quantisation_error_bounds(kind, scale_by):
    """int8: |x − x̂| ≤ s/2 with s = amax/127 over the scale's group. fp8 e4m3 (3 mantissa bits): |x − x̂| ≤ |x|/16,
    or half the subnormal spacing s·2^-10 near zero."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4 * FRAME_TOKENS, 3, 16, generator=g) * torch.rand(1, 1, 1, 16, generator=g) * 10
    codes, scale = quantize(x, kind, scale_by, FRAME_TOKENS)
    assert codes.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    assert scale.shape == ((2, 4 * FRAME_TOKENS, 3, 1) if scale_by == "token" else (2, 4, 3, 16))
    err = (dequantize(codes, scale, FRAME_TOKENS, torch.float32) - x).abs()
    s = scale if scale_by == "token" else scale.repeat_interleave(FRAME_TOKENS, 1)
    bound = s / 2 if kind == "int8" else torch.maximum(x.abs() / 16, s * 2**-10)
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    assert err.max() > 0


@pytest.mark.parametrize("quant, scale_by, bound", [("int8", "token", 2e-4), ("int8", "channel", 2e-4),
                                                    ("fp8", "token", 1e-3), ("fp8", "channel", 1e-3)])
def test_quantised_cache_output_error_and_memory(net, inputs, quant, scale_by, bound):
    """Streaming through a quantised cache stays within `bound` (relative) of the fp32 cache; the int8/fp8 codes
    take a quarter of the fp32 buffers' bytes."""
    x, t, context = inputs
    chunks = chunk_frames(T, 1, 2)
    with torch.no_grad():
        v, exact = stream(net, x, t, context, chunks, CacheConfig(max_frames=T))
        v_q, cache = stream(net, x, t, context, chunks, CacheConfig(max_frames=T, quant=quant, scale=scale_by))
    err = rel(v_q, v)
    assert 0 < err < bound
    codes = sum(b.numel() * b.element_size() for b in cache.k + cache.v)
    assert 4 * codes == exact.nbytes() and cache.nbytes() > codes  # (the scales come on top)


def test_causal_mode_user_errors(net, inputs):
    x, t, context = inputs
    with pytest.raises(ValueError, match="add up to the frames"):
        net(x, t, context, chunks=(1, 2))
    with pytest.raises(ValueError, match="needs chunks"):
        net(x, t, context, teacher_forcing=True)
    cache = cache_for(net, B, FRAME_TOKENS, CacheConfig(max_frames=4), 1)
    with pytest.raises(ValueError, match="build a KVCache to match"):
        net(x[:, :, :2], t[:, :2], context, kv_cache=cache)
    with pytest.raises(ValueError, match="one chunk"):
        net(x[:, :, :1], t[:, :1], context, kv_cache=cache, frame_offset=3)


def test_sample_causal_writes_streamed_mp4(files, tmp_path):  # noqa: F811
    """sample.py --causal on a tiny random model: an mp4 with every frame; the chunk-by-chunk VAE decode equals
    decoding the whole latent clip; the noisy-context option and per-chunk steps change the video."""
    main(tiny(files, tmp_path / "a", causal=True, num_frames=9, shard_dir=None,
              streaming=Streaming(first_chunk_t=1, chunk_t=1, steps_per_chunk=(2, 1))))
    (video,) = mp4s(tmp_path / "a")
    assert video.shape == (9, 32, 32, 3)

    from sample import load_dit
    from vae import load_vae
    cfg = tiny(files, tmp_path / "b")
    dit, vae = load_dit(CONFIGS["t2v-tiny"], cfg), load_vae(files / "vae.safetensors", cfg=cfg.vae_cfg)
    context = [torch.randn(4, 48, generator=torch.Generator().manual_seed(0))]
    sampler = Sampler(sigma_max=1600.0, mid_t=samplers.CAUSAL_MID_T)
    z, frames, ready = stream_video(dit, vae, context, (16, 3, 4, 4), Streaming(1, 1, (2,), False), sampler,
                                    torch.Generator().manual_seed(1))
    assert z.shape == (1, 16, 3, 4, 4) and frames.shape == (1, 9, 32, 32, 3) and len(ready) == 3
    assert 0 < ready[0] < ready[1] < ready[2]  # seconds from the start until each chunk's frames
    assert torch.equal(decode(vae, z), frames)  # chunk-by-chunk decoding is exact
    for st in (Streaming(1, 1, (2,), noisy_context=True), Streaming(1, 1, (4, 2), noisy_context=False)):
        other = stream_video(dit, None, context, (16, 3, 4, 4), st, sampler, torch.Generator().manual_seed(1))[0]
        assert torch.equal(other[:, :, :1], z[:, :, :1]) == st.noisy_context  # chunk 0 has no context to differ by
        assert rel(other, z) > 1e-4


def test_cache_storage_dtype_differs_from_compute(net, inputs):
    """A cache stored in fp32 (e.g. built from an FSDP net's fp32 master weights) serves bf16 attention."""
    x, t, context = inputs
    half = WanModel(CONFIGS["t2v-tiny"]).to(torch.bfloat16)
    half.load_state_dict(net.state_dict())
    chunks = chunk_frames(T, 1, 2)
    with torch.no_grad():
        outs = [torch.cat([half(x[:, :, f:f + c], t[:, f:f + c], context, kv_cache=cache, kv_append=True)
                           for f, c in zip((0, 1, 3), chunks)], 2)
                for cache in (cache_for(half, B, FRAME_TOKENS, CacheConfig(max_frames=T), 2, dtype=dtype)
                              for dtype in (torch.float32, torch.bfloat16))]
        v = net(x, t, context, chunks=chunks)
    assert rel(outs[0], outs[1]) < 1e-2 and rel(outs[0], v) < 3e-2


@pytest.mark.gpu
def test_gpu_bf16_causal_modes(net, inputs):
    """On CUDA in bf16: the block-causal clip (FlexAttention) equals streaming through the KV cache (SDPA with
    Lq < Lk); the teacher-forcing tangent (Triton kernel) and the with-grad teacher-forcing gradient (FlexAttention
    backward) agree with the fp32 reference path on the CPU."""
    x, t, context = inputs
    g = torch.Generator().manual_seed(7)
    chunks = chunk_frames(T, 1, 2)
    x_tf = torch.cat([torch.randn(x.shape, generator=g), x], 2)
    t_tf = torch.cat([torch.zeros(B, T), t], 1)
    tx = torch.cat([torch.zeros(x.shape), torch.randn(x.shape, generator=g)], 2)
    tt = torch.cat([torch.zeros(B, T), torch.randn(B, T, generator=g) * 100], 1)
    with torch.no_grad():
        v_ref = net(x, t, context, chunks=chunks)
        tf_ref, ttf_ref = net(x_tf, t_tf, context, tangent=(tx, tt), chunks=chunks, teacher_forcing=True)
    gpu = WanModel(CONFIGS["t2v-tiny"]).cuda().to(torch.bfloat16)
    gpu.load_state_dict(net.state_dict())
    x, t, x_tf, t_tf, tx, tt = (a.cuda() for a in (x, t, x_tf, t_tf, tx, tt))
    context = [c.cuda() for c in context]
    with torch.no_grad():
        v = gpu(x, t, context, chunks=chunks)
        cache = cache_for(gpu, B, FRAME_TOKENS, CacheConfig(max_frames=T), max(chunks))
        v_stream = torch.cat([gpu(x[:, :, f:f + c], t[:, f:f + c], context, kv_cache=cache, kv_append=True)
                              for f, c in zip((0, 1, 3), chunks)], 2)
        tf, ttf = gpu(x_tf, t_tf, context, tangent=(tx, tt), chunks=chunks, teacher_forcing=True)
    assert rel(v.cpu(), v_ref) < 2e-2 and rel(v_stream.cpu(), v_ref) < 2e-2
    assert rel(tf.cpu(), tf_ref) < 2e-2 and rel(ttf.cpu(), ttf_ref) < 3e-2

    def grads(model, device):
        model.zero_grad()
        out = model(x_tf.to(device), t_tf.to(device), [c.to(device) for c in context], chunks=chunks,
                    teacher_forcing=True)
        out[:, :, T:].float().square().mean().backward()
        return model.blocks[0].self_attn.q.weight.grad.float().cpu()

    assert rel(grads(gpu, "cuda"), grads(net, "cpu")) < 5e-2


def _causal_cp_equals_one_device(rank, tmp):
    import copy
    import parallel
    d = parallel.init_distributed(cp_size=2)
    torch.manual_seed(0)
    ref = WanModel(CONFIGS["t2v-tiny"])
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    net = parallel.context_parallel(copy.deepcopy(ref), d.cp_group)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 6, 6, 2, generator=g)  # 3 tokens per frame: the padded CP layout
    t = torch.rand(1, 6, generator=g) * 1000
    context = torch.randn(1, 5, 48, generator=g)
    tx = torch.cat([torch.zeros(1, 16, 3, 6, 2), torch.randn(1, 16, 3, 6, 2, generator=g)], 2)
    tt = torch.cat([torch.zeros(1, 3), torch.randn(1, 3, generator=g)], 1)
    tf = dict(chunks=(1, 2), teacher_forcing=True)
    with torch.no_grad():
        v_ref, tv_ref = ref(x, t, context, tangent=(tx, tt), **tf)
        v, tv = net(x, t, context, tangent=(tx, tt), **tf)
    assert rel(v, v_ref) < 1e-5 and rel(tv, tv_ref) < 1e-4
    for cfg in (CacheConfig(max_frames=6), CacheConfig(max_frames=3, sink_chunks=1, rope="before", quant="int8")):
        outs = []
        for m in (ref, net):  # one-frame chunks; the window slides from the fourth on
            cache = cache_for(m, 1, 3, cfg, max_chunk_t=1)
            assert cache.k[0].shape[2] == (2 if m is ref else 1)  # each rank caches its head shard
            with torch.no_grad():
                outs.append(torch.cat([m(x[:, :, f:f + 1], t[:, f:f + 1], context, kv_cache=cache, kv_append=True)
                                       for f in range(6)], 2))
        assert rel(outs[1], outs[0]) < 1e-5


def test_causal_context_parallel_equals_one_device(tmp_path):
    """Ulysses CP over 2 gloo ranks: the teacher-forcing forward and tangent, and streaming through a KV cache
    that holds each rank's head shard (full and windowed/int8), equal one process."""
    from test_parallel import spawn
    spawn(_causal_cp_equals_one_device, tmp_path)


@pytest.mark.parametrize("rope", ["after", "before"])
def test_with_grad_chunk_under_activation_checkpointing(net, inputs, rope):
    """Self forcing's pattern: a with-grad forward of chunk 1 against the cache, then later chunks appended, then the
    backward. Block checkpointing recomputes chunk 1 in the backward; it must read the cache as the forward did."""
    import copy
    import parallel
    x, t, context = inputs

    def grad(model):
        cache = cache_for(model, B, FRAME_TOKENS, CacheConfig(max_frames=T, rope=rope), 2)
        model.zero_grad()
        with torch.no_grad():
            model(x[:, :, :2], t[:, :2], context, kv_cache=cache, kv_append=True)
        out = model(x[:, :, 2:3], t[:, 2:3], context, kv_cache=cache)
        with torch.no_grad():
            model(x[:, :, 2:4], t[:, 2:4], context, kv_cache=cache, kv_append=True)
        out.square().mean().backward()
        return model.blocks[0].self_attn.q.weight.grad.clone()

    ref = grad(net)
    assert rel(grad(parallel.checkpoint_activations(copy.deepcopy(net), "block")), ref) < 1e-6
    windowed = parallel.checkpoint_activations(copy.deepcopy(net), "block")
    cache = cache_for(windowed, B, FRAME_TOKENS, CacheConfig(max_frames=2, rope=rope), 2)
    with torch.no_grad():
        windowed(x[:, :, :2], t[:, :2], context, kv_cache=cache, kv_append=True)
    out = windowed(x[:, :, 2:3], t[:, 2:3], context, kv_cache=cache)
    with torch.no_grad():
        windowed(x[:, :, 2:4], t[:, 2:4], context, kv_cache=cache, kv_append=True)  # the window slides
    with pytest.raises(RuntimeError, match="slid its window"):
        out.square().mean().backward()


@pytest.mark.gpu
def test_gpu_overlapped_decode_equals_decoding_after(files, tmp_path):  # noqa: F811
    """Streaming on CUDA: decoding chunk i on a second CUDA stream while the DiT makes chunk i + 1 gives the frames of
    decoding each chunk after its DiT steps, and of decoding the whole clip at the end."""
    from sample import load_dit
    from vae import load_vae
    cfg = tiny(files, tmp_path, device="cuda")
    dit, vae = load_dit(CONFIGS["t2v-tiny"], cfg), load_vae(files / "vae.safetensors", cfg=cfg.vae_cfg, device="cuda")
    context = [torch.randn(4, 48, device="cuda", generator=torch.Generator("cuda").manual_seed(0))]
    sampler = Sampler(sigma_max=1600.0, mid_t=samplers.CAUSAL_MID_T)
    runs = [stream_video(dit, vae, context, (16, 5, 4, 4), Streaming(1, 2, (2,), overlap_decode=overlap), sampler,
                         torch.Generator("cuda").manual_seed(1)) for overlap in (True, False)]
    (z, frames, ready), (z_serial, frames_serial, _) = runs
    assert torch.equal(z, z_serial) and frames.shape == (1, 17, 32, 32, 3)
    assert (frames.int() - frames_serial.int()).abs().max() <= 1
    assert (decode(vae, z).int() - frames.int()).abs().max() <= 1
    assert len(ready) == 3 and 0 < ready[0] < ready[1] < ready[2]


@pytest.mark.gpu
def test_gpu_streaming_loop_never_waits_for_the_gpu(files, tmp_path):  # noqa: F811
    """After the first chunk, neither the DiT's chunks nor their decode make the host wait for the GPU (no copy from
    pageable memory, no .item()): a wait would leave the GPU idle until the host has queued work again."""
    from sample import load_dit
    from samplers import generate_stream
    from vae import load_vae
    cfg = tiny(files, tmp_path, device="cuda")
    dit, vae = load_dit(CONFIGS["t2v-tiny"], cfg), load_vae(files / "vae.safetensors", cfg=cfg.vae_cfg, device="cuda")
    context = [torch.randn(4, 48, device="cuda", generator=torch.Generator("cuda").manual_seed(0))]
    shape, cache = (16, 7, 4, 4), {}
    chunks = generate_stream(dit, context, shape, (1, 2, 2, 2), (2,), 1600.0, samplers.CAUSAL_MID_T,
                             torch.Generator("cuda").manual_seed(1))
    frames = [decode(vae, next(chunks), cache)]  # the first chunk may wait (set-up: the times go to the GPU)
    torch.cuda.set_sync_debug_mode("error")
    try:
        frames += [decode(vae, z, cache) for z in chunks]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cat(frames, 1).shape == (1, 25, 32, 32, 3)
