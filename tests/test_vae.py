"""vae.py against the official Wan2.1 VAE: golden outputs of a tiny random config (tests/golden,
produced by the official code), the full-size checkpoint's names and shapes, the strict loader, causality."""
import json

from safetensors.torch import load_file, save_file
import pytest
import torch

from vae import CausalConv3d, VAEConfig, WanVAE, load_vae


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def tiny_config(golden) -> VAEConfig:
    c = json.loads((golden / "vae_tiny.json").read_text())["config"]
    return VAEConfig(dim=c["dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]), num_res_blocks=c["num_res_blocks"],
                     attn_scales=tuple(c["attn_scales"]), temporal_downsample=tuple(c["temperal_downsample"]))


def test_golden_fp32(golden):
    vae = load_vae(golden / "vae_tiny.weights.safetensors", cfg=tiny_config(golden))
    io = load_file(golden / "vae_tiny.io.safetensors")
    assert rel_err(vae.encode(io["video"]), io["latent_mu"]) < 1e-4
    assert rel_err(vae.decode(io["z"]), io["decoded"]) < 1e-4


def test_golden_bf16(golden):
    # The official bf16-autocast path itself is ~2.5e-2 off its fp32 output on these random tiny weights.
    vae = load_vae(golden / "vae_tiny.weights.safetensors", cfg=tiny_config(golden), dtype=torch.bfloat16)
    io = load_file(golden / "vae_tiny.io.safetensors")
    assert vae.decoder.conv1.weight.dtype == torch.bfloat16
    assert rel_err(vae.encode(io["video"]), io["latent_mu"]) < 5e-2
    assert rel_err(vae.decode(io["z"]), io["decoded"]) < 5e-2


def test_full_size_names_and_shapes(golden):
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    expected = json.loads((golden / "checkpoint_keys.json").read_text())["Wan2.1_VAE"]
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == expected


def test_streaming_is_causal_and_cache_is_bounded(golden):
    """The first 1+4j frames fix the first 1+j latents and vice versa; the cache keeps ≤ 2 frames per layer."""
    vae = load_vae(golden / "vae_tiny.weights.safetensors", cfg=tiny_config(golden))
    torch.manual_seed(0)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 16, 3, 2, 2)
    assert torch.allclose(vae.encode(video[:, :, :5]), z[:, :, :2], atol=1e-5)
    x = vae.decode(z)
    assert x.shape == (1, 3, 9, 16, 16)
    assert torch.allclose(vae.decode(z[:, :, :2]), x[:, :, :5], atol=1e-5)
    cache = {}
    for chunk in (video[:, :, :1], video[:, :, 1:5], video[:, :, 5:9]):
        vae.encoder(chunk, cache)
    assert len(cache) > 0 and all(v.shape[2] <= 2 for v in cache.values())


def test_bad_shapes_raise(golden):
    vae = load_vae(golden / "vae_tiny.weights.safetensors", cfg=tiny_config(golden))
    with pytest.raises(ValueError, match="1\\+4k"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="decode expects"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))


def test_strict_loader_round_trip(golden, tmp_path):
    cfg = tiny_config(golden)
    state = load_file(golden / "vae_tiny.weights.safetensors")
    torch.save(state, tmp_path / "vae.pth")
    vae = load_vae(tmp_path / "vae.pth", cfg=cfg)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())

    missing = dict(state)
    del missing["decoder.head.2.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"1 missing: decoder\.head\.2\.bias"):
        load_vae(tmp_path / "missing.safetensors", cfg=cfg)

    misshaped = dict(state, **{"conv2.weight": torch.zeros(16, 16, 1, 1, 2)})
    save_file(misshaped, tmp_path / "misshaped.safetensors")
    with pytest.raises(ValueError, match=r"1 mis-shaped: conv2\.weight \(checkpoint \(16, 16, 1, 1, 2\)"):
        load_vae(tmp_path / "misshaped.safetensors", cfg=cfg)

    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        load_vae(tmp_path / "absent.pth", cfg=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_compiled_blocks_meet_the_golden_bounds(golden, dtype, bound, monkeypatch):
    """sample.py --compile: the VAE with compiled blocks, on the GPU, within the golden bounds of its precision (fp32:
    full fp32 convolutions, not TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    vae = load_vae(golden / "vae_tiny.weights.safetensors", cfg=tiny_config(golden), dtype=dtype,
                   device="cuda").compile_blocks()
    io = {k: v.cuda() for k, v in load_file(golden / "vae_tiny.io.safetensors").items()}
    assert rel_err(vae.encode(io["video"]), io["latent_mu"]) < bound
    assert rel_err(vae.decode(io["z"]), io["decoded"]) < bound


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("silu", [True, False])
def test_fused_norm_silu_kernel_matches_torch(dtype, tol, silu, layout):
    """The Triton norm + SiLU (Triton's interpreter on CPU) against the plain ops in fp32, written into the tail of a
    time-padded buffer as the causal convolutions use it, channels first or last; odd channel and pixel counts
    exercise the masks."""
    import vae as vae_module
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 37, 3, 5, 7, generator=g) * 3).to(device, dtype).contiguous(memory_format=layout)
    gamma = (torch.rand(37, 1, 1, 1, generator=g) + 0.5).to(device, dtype)
    ref = vae_module.norm_silu(x.float(), gamma.float(), silu, backend="torch")
    padded = torch.full((2, 37, 5, 5, 7), 7.0, device=device, dtype=dtype).contiguous(memory_format=layout)
    out = vae_module.norm_silu(x, gamma, silu, out=padded[:, :, 2:], backend="triton")
    assert out.dtype == dtype and out.data_ptr() == padded[:, :, 2:].data_ptr()
    assert rel_err(padded[:, :, 2:], ref) < tol
    assert (padded[:, :, :2] == 7).all()  # the buffer's head (the conv's past frames) is untouched
    alone = vae_module.norm_silu(x, gamma, silu, backend="triton")
    assert rel_err(alone, ref) < tol and alone.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_fused_vae_meets_the_golden_bounds(golden, layout, monkeypatch):
    """The whole tiny VAE with every norm through the Triton kernel (interpreted on CPU), activations channels-first
    or channels-last (WanVAE.channels_last): the fp32 golden bound. On a GPU with full fp32 convolutions."""
    import functools
    import vae as vae_module
    monkeypatch.setattr(vae_module, "norm_silu", functools.partial(vae_module.norm_silu, backend="triton"))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(golden / "vae_tiny.weights.safetensors", cfg=tiny_config(golden), device=device)
    vae.channels_last(layout == "channels_last")
    assert vae.decoder.conv1.weight.is_contiguous(memory_format=vae.layout) and vae.layout == getattr(
        torch, "channels_last_3d" if layout == "channels_last" else "contiguous_format")
    io = {k: v.to(device) for k, v in load_file(golden / "vae_tiny.io.safetensors").items()}
    assert rel_err(vae.encode(io["video"]), io["latent_mu"]) < 1e-4
    decoded = vae.decode(io["z"])
    assert rel_err(decoded, io["decoded"]) < 1e-4
    if device == "cuda":  # cuDNN keeps the layout to the end (the CPU's 3-D convolutions answer channels-first)
        assert (decoded.stride(1) == 1) == (layout == "channels_last")


def test_several_latent_frames_per_decoder_call(golden):
    """decode(frames_per_call=k) equals the frame-by-frame decode, streamed in chunks or not."""
    vae = load_vae(golden / "vae_tiny.weights.safetensors", cfg=tiny_config(golden))
    z = torch.randn(1, 16, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(z)
    assert ref.shape[2] == 21
    assert rel_err(vae.decode(z, frames_per_call=3), ref) < 1e-5
    vae.frames_per_call = 4  # the default of decode (sample.py --vae-frames-per-call)
    assert rel_err(vae.decode(z), ref) < 1e-5
    cache = {}
    streamed = torch.cat([vae.decode(z[:, :, :3], cache, 2), vae.decode(z[:, :, 3:], cache, 2)], dim=2)
    assert rel_err(streamed, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("c_out", [96, 3, 128])
@pytest.mark.parametrize("batch", [1, 2])
def test_tap_convolutions_equal_the_3d_one(c_out, batch, monkeypatch):
    """CausalConv3d on CUDA, bf16 channels-last, < 128 output channels: the sum of one 2-D convolution per temporal
    tap, against the 3-D convolution in fp32 (within bf16 rounding), channels-last out, the cache carried the same."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, f=torch.nn.functional.conv2d: calls.append(1) or f(*a))
    conv = CausalConv3d(96, c_out, 3).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last_3d)
    ref_conv = CausalConv3d(96, c_out, 3).to("cuda").to(memory_format=torch.channels_last_3d)
    ref_conv.load_state_dict({k: v.float() for k, v in conv.state_dict().items()})
    cache, ref_cache = {}, {}
    for t in (3, 4):  # a first chunk (zero past) and one with the cached past
        x = torch.randn(batch, 96, t, 24, 40, device="cuda").contiguous(memory_format=torch.channels_last_3d)
        out, ref = conv(x.bfloat16(), cache), ref_conv(x.bfloat16().float(), ref_cache)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last_3d)
        assert rel_err(out.float(), ref) < 1e-2
    assert len(calls) == (6 if c_out < 128 else 0)  # three taps a call below 128 channels, else the 3-D one

