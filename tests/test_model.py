"""model.py: exactness against the official Wan2.1 outputs, checkpoint I/O, and the tangent path."""
import dataclasses
import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import attention_jvp
import model as wan
from checkpoint import read_settings, save_checkpoint
from model import CONFIGS, WanConfig, WanModel, load_checkpoint


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def golden_case(golden, name):
    meta = json.loads((golden / f"{name}.json").read_text())
    io = load_file(golden / f"{name}.io.safetensors")
    cfg = WanConfig(model_type=meta["model_type"], clip="clip_fea" in io,  # Wan2.2's i2v has no CLIP tokens
                    **{**meta["config"], "patch_size": tuple(meta["config"]["patch_size"])})
    context = [io[f"context.{i}"] for i in range(len(meta["context_lengths"]))]
    cond = {k: io[k] for k in ("y", "clip_fea") if k in io}
    return cfg, io, context, cond


@pytest.mark.parametrize("name", ["dit_t2v_tiny", "dit_i2v_tiny"])
def test_golden_fp32(golden, name):
    cfg, io, context, cond = golden_case(golden, name)
    net = load_checkpoint(WanModel(cfg), golden / f"{name}.weights.safetensors")
    with torch.no_grad():
        out = net(io["x"], io["t"], context, **cond)
        out_t, tangent_out = net(io["x"], io["t"], context, tangent=(io["tangent_x"], io["tangent_t"]), **cond)
    assert out.dtype == torch.float32 and out.shape == io["out"].shape
    assert rel(out, io["out"]) < 1e-5
    assert rel(out_t, io["out"]) < 1e-5
    assert rel(tangent_out, io["tangent_out"]) < 1e-4


@pytest.mark.parametrize("name", ["dit_t2v_tiny", "dit_i2v_tiny"])
def test_golden_bf16_weights(golden, name):
    """bf16 weights with the official fp32 islands stay within bf16 accuracy of the fp32 reference."""
    cfg, io, context, cond = golden_case(golden, name)
    net = load_checkpoint(WanModel(cfg), golden / f"{name}.weights.safetensors", dtype=torch.bfloat16)
    assert net.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        out, tangent_out = net(io["x"], io["t"], context, tangent=(io["tangent_x"], io["tangent_t"]), **cond)
    assert rel(out, io["out"]) < 2e-2
    assert rel(tangent_out, io["tangent_out"]) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dit_t2v_tiny", "dit_i2v_tiny"])
def test_golden_gpu_bf16(golden, name):
    """On CUDA: bf16 weights, SDPA for the forward and the Triton kernel for the tangent."""
    cfg, io, context, cond = golden_case(golden, name)
    net = load_checkpoint(WanModel(cfg), golden / f"{name}.weights.safetensors", dtype=torch.bfloat16).cuda()
    cuda = lambda a: a.cuda() if torch.is_tensor(a) else [c.cuda() for c in a]
    io, context, cond = {k: cuda(v) for k, v in io.items()}, cuda(context), {k: cuda(v) for k, v in cond.items()}
    with torch.no_grad():
        out = net(io["x"], io["t"], context, **cond)
        _, tangent_out = net(io["x"], io["t"], context, tangent=(io["tangent_x"], io["tangent_t"]), **cond)
    assert rel(out, io["out"]) < 1e-2
    assert rel(tangent_out, io["tangent_out"]) < 3e-2


@pytest.mark.parametrize("name", ["dit22_i2v_tiny", "dit22_ti2v_tiny"])
def test_golden_wan22_fp32(golden, name):
    """Wan2.2's DiT: i2v without CLIP tokens (the A14B experts), and ti2v (TI2V-5B) with the image frame at t = 0
    through per-frame times."""
    cfg, io, context, cond = golden_case(golden, name)
    net = load_checkpoint(WanModel(cfg), golden / f"{name}.weights.safetensors")
    with torch.no_grad():
        out = net(io["x"], io.get("t_per_frame", io["t"]), context, **cond)
    assert not hasattr(net, "img_emb") and rel(out, io["out"]) < 1e-5
    with pytest.raises(ValueError, match="clip_fea is for Wan2.1"):
        net(io["x"], io["t"], context, **cond, clip_fea=torch.zeros(len(io["x"]), 257, 1280))


@pytest.mark.parametrize("preset, official, keys", [
    ("t2v-1.3B", "Wan2.1-T2V-1.3B", "checkpoint_keys.json"), ("t2v-14B", "Wan2.1-T2V-14B", "checkpoint_keys.json"),
    ("i2v-14B", "Wan2.1-I2V-14B", "checkpoint_keys.json"),
    ("t2v-A14B", "Wan2.2-T2V-A14B (each of high_noise_model, low_noise_model)", "checkpoint_keys_i2v.json"),
    ("i2v-A14B", "Wan2.2-I2V-A14B (each of high_noise_model, low_noise_model)", "checkpoint_keys_i2v.json"),
    ("ti2v-5B", "Wan2.2-TI2V-5B", "checkpoint_keys_i2v.json")])
def test_full_size_state_dict_names_and_shapes(golden, preset, official, keys):
    expected = json.loads((golden / keys).read_text())[official]
    with torch.device("meta"):
        net = WanModel(CONFIGS[preset])
    sd = net.state_dict()
    assert all(v.is_meta for v in sd.values())  # nothing was allocated
    assert {k: list(v.shape) for k, v in sd.items()} == expected


def random_tiny(model_type="t2v", seed=0, **overrides):
    """A tiny model whose every parameter is random (the official init zeroes the output layer)."""
    torch.manual_seed(seed)
    net = WanModel(CONFIGS[f"{model_type}-tiny"] if not overrides else WanConfig(model_type=model_type, **overrides))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return net


def test_rcm_pt_and_official_layouts_load_identically(tmp_path):
    src = random_tiny()
    sd = src.state_dict()
    save_checkpoint(src, tmp_path / "diffusion_pytorch_model.safetensors")
    # sharded official layout: two shards and an index
    keys = sorted(sd)
    shards = {"m-00001-of-00002.safetensors": keys[::2], "m-00002-of-00002.safetensors": keys[1::2]}
    (tmp_path / "sharded").mkdir()
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / "sharded" / fname)
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    # rCM layout: prefixed names, bf16, patch embedding flattened to a Linear weight
    rcm = {f"net_ema.{k}": v.bfloat16() for k, v in sd.items()}
    rcm["net_ema.patch_embedding.weight"] = rcm["net_ema.patch_embedding.weight"].flatten(1)
    rcm.update({f"net.{k}": torch.zeros_like(v) for k, v in sd.items()})  # the non-EMA copy must not be picked
    torch.save(rcm, tmp_path / "student.pt")

    loaded = []
    for path in [tmp_path, tmp_path / "sharded", tmp_path / "student.pt"]:
        with torch.device("meta"):
            net = WanModel(CONFIGS["t2v-tiny"])
        load_checkpoint(net, path, dtype=torch.bfloat16)
        assert not any(p.is_meta for p in net.parameters())
        loaded.append(net.state_dict())
    for other in loaded[1:]:
        assert other.keys() == loaded[0].keys()
        for k in other:
            assert other[k].dtype == torch.bfloat16 and torch.equal(other[k], loaded[0][k]), k
    assert torch.equal(loaded[0]["blocks.1.ffn.0.weight"], sd["blocks.1.ffn.0.weight"].bfloat16())


def test_bad_checkpoints_name_the_keys(tmp_path):
    sd = random_tiny().state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.cross_attn.norm_k.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"1 missing: blocks\.1\.cross_attn\.norm_k\.weight"):
        load_checkpoint(WanModel(CONFIGS["t2v-tiny"]), tmp_path / "missing.safetensors")
    bad = dict(sd, **{"head.head.weight": torch.zeros(3, 3), "extra.weight": torch.zeros(1)})
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"(?s)1 unexpected: extra\.weight.*mis-shaped: head\.head\.weight"):
        load_checkpoint(WanModel(CONFIGS["t2v-tiny"]), tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(WanModel(CONFIGS["t2v-tiny"]), tmp_path / "nowhere.safetensors")
    # files that are not weights: one error naming the file, and nothing unpickled
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    torch.save({"net": sd, "optimizer": functools.partial(print)}, tmp_path / "objects.pt")
    torch.save(sd["head.head.weight"], tmp_path / "tensor.pt")
    for name, error in (("garbage.safetensors", "cannot read .*garbage.safetensors as a .safetensors checkpoint"),
                        ("objects.pt", "objects.pt holds Python objects besides tensors"),
                        ("tensor.pt", "tensor.pt holds a Tensor, not a state dict")):
        with pytest.raises(ValueError, match=error):
            load_checkpoint(WanModel(CONFIGS["t2v-tiny"]), tmp_path / name)


def test_settings_travel_with_the_weights(tmp_path):
    """save_checkpoint stores the settings in the safetensors header (JSON; tuples come back as tuples); plain
    safetensors readers see the weights only; files without settings, or not safetensors, give {}."""
    net = WanModel(CONFIGS["t2v-tiny"])
    settings = {"mode": "rcm", "steps": 4, "mid_t": (1.5, 1.4, 1.0)}
    save_checkpoint(net, tmp_path / "with.safetensors", settings)
    save_checkpoint(net.state_dict(), tmp_path / "without.safetensors")
    torch.save(net.state_dict(), tmp_path / "net.pt")
    assert read_settings(tmp_path / "with.safetensors") == settings
    assert read_settings(tmp_path / "without.safetensors") == read_settings(tmp_path / "net.pt") == {}
    assert load_file(tmp_path / "with.safetensors").keys() == net.state_dict().keys()
    load_checkpoint(WanModel(CONFIGS["t2v-tiny"]), tmp_path / "with.safetensors")


@pytest.mark.parametrize("model_type, per_frame", [("t2v", False), ("t2v", True), ("i2v", False)])
def test_tangent_equals_torch_func_jvp(monkeypatch, model_type, per_frame):
    """The hand-written tangent path equals forward-mode autodiff of the plain forward (reference attention)."""
    monkeypatch.setattr(wan, "attention", functools.partial(attention_jvp.attention, backend="reference"))
    net = random_tiny(model_type, seed=1)
    B, T, H, W = 2, 3, 4, 6
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.rand(B, T, generator=g) * 1000 if per_frame else torch.rand(B, generator=g) * 1000
    tx, tt = torch.randn(x.shape, generator=g), torch.randn(t.shape, generator=g) * 100
    context = [torch.randn(n, net.cfg.text_dim, generator=g) for n in (5, 11)]
    cond = {}
    if model_type == "i2v":
        cond = dict(y=torch.randn(B, 20, T, H, W, generator=g), clip_fea=torch.randn(B, 257, 1280, generator=g))
    with torch.no_grad():
        v, tv = net(x, t, context, tangent=(tx, tt), **cond)
        v_ref, tv_ref = torch.func.jvp(lambda x, t: net(x, t, context, **cond), (x, t), (tx, tt))
    assert rel(v, v_ref) < 1e-5
    assert rel(tv, tv_ref) < 1e-4


def test_per_frame_time_equals_per_clip_time_when_frames_agree():
    net = random_tiny(seed=3)
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = [torch.randn(4, 48)]
    with torch.no_grad():
        a = net(x, torch.tensor([321.0]), ctx)
        b = net(x, torch.tensor([[321.0, 321.0]]), ctx)
        c = net(x, torch.tensor([[321.0, 900.0]]), ctx)
    assert rel(b, a) < 1e-6
    assert rel(c, a) > 1e-3  # the second frame's time does reach its tokens


def test_user_errors_are_clear():
    net = random_tiny()
    with pytest.raises(ValueError, match="divisible by the patch size"):
        net(torch.randn(1, 16, 2, 5, 4), torch.tensor([1.0]), [torch.randn(3, 48)])
    with pytest.raises(ValueError, match="at most text_len=32"):
        net(torch.randn(1, 16, 2, 4, 4), torch.tensor([1.0]), [torch.randn(40, 48)])


def test_two_experts_route_by_time_and_split_a_straddling_batch():
    """Each sample goes to the high-noise expert at timesteps ≥ 1000·boundary, else to the low-noise one (checked
    call by call); a batch across the boundary is split and put back in order, tangents included."""
    high, low = random_tiny(seed=1), random_tiny(seed=2)
    calls = []
    for name, net in (("high", high), ("low", low)):
        net.register_forward_pre_hook(lambda m, args, n=name: calls.append((n, args[1].tolist())))
    both = wan.TwoExperts(high, low, boundary=0.9)
    x, context = torch.randn(3, 16, 2, 4, 4), torch.randn(3, 8, 48)
    t = torch.tensor([950.0, 100.0, 900.0])
    with torch.no_grad():
        v = both(x, t, context)
        v_high, v_low = high(x, t, context), low(x, t, context)
        (v2, tv), (_, tv_low) = both(x, t, context, tangent=(x, t)), low(x, t, context, tangent=(x, t))
    assert calls[:2] == [("high", [950.0, 900.0]), ("low", [100.0])]
    torch.testing.assert_close(v[[0, 2]], v_high[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v[1], v_low[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v2, v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tv[1], tv_low[1], rtol=1e-4, atol=1e-4)  # (batch size changes the rounding)
    calls.clear()
    with torch.no_grad():
        both(x[:1], torch.tensor([899.0]), context[:1])
    assert calls == [("low", [899.0])]


def test_two_experts_load_from_the_official_folder_or_two_rcm_files(tmp_path, monkeypatch):
    """Wan2.2's layout (high_noise_model/, low_noise_model/), a diffusers pipeline (transformer/, transformer_2/) and
    NVlabs's merged expert files (net. prefix, Linear patch embedding, .pth) give the same two-expert net; a folder
    without the experts is named."""
    cfg = dataclasses.replace(CONFIGS["i2v-tiny"], clip=False)
    monkeypatch.setitem(wan.CONFIGS, "i2v-A14B", cfg)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model_type"}
    experts = {"high_noise_model": random_tiny("i2v", seed=4, **fields),
               "low_noise_model": random_tiny("i2v", seed=5, **fields)}
    for name, net in experts.items():
        save_checkpoint(net, tmp_path / "a14b" / name / "diffusion_pytorch_model.safetensors")
        sd = {f"net.{k}": v for k, v in net.state_dict().items()}
        sd["net.patch_embedding.weight"] = sd["net.patch_embedding.weight"].flatten(1)
        torch.save(sd, tmp_path / f"{name}-rCM-merged.pth")
        # the diffusers pipeline layout: transformer/ is the high-noise expert, transformer_2/ the low-noise one
        part = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}[name]
        wan.save_diffusers(net.state_dict(), cfg, tmp_path / "a14b-diffusers" / part)
    (tmp_path / "a14b-diffusers" / "model_index.json").write_text("{}")
    folder = wan.load_two_experts("i2v-A14B", tmp_path / "a14b")
    files = wan.load_two_experts("i2v-A14B", tmp_path / "high_noise_model-rCM-merged.pth",
                                 tmp_path / "low_noise_model-rCM-merged.pth")
    pipeline = wan.load_two_experts("i2v-A14B", tmp_path / "a14b-diffusers")
    x, y, context = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 20, 1, 4, 4), torch.randn(2, 8, 48)
    with torch.no_grad():
        for t in (torch.tensor([950.0, 950.0]), torch.tensor([100.0, 950.0])):
            torch.testing.assert_close(folder(x, t, context, y=y), files(x, t, context, y=y))
            torch.testing.assert_close(folder(x, t, context, y=y), pipeline(x, t, context, y=y))
    assert folder.boundary == 0.9
    with pytest.raises(FileNotFoundError, match="high_noise_model"):
        wan.load_two_experts("i2v-A14B", tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_the_complex_product(dtype):
    """RoPE: the torch path equals the official complex product (h as complex pairs times e^{iθ}); the Triton kernel
    (interpreted on CPU) equals the torch path, forward in the requested dtype and backward (the inverse rotation)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, F_, H_, W_, heads, D = 2, 3, 2, 3, 3, 32  # (the kernel takes power-of-two head sizes, as Wan's 128)
    freqs = wan.rope_tables((F_, H_, W_), D, device, frame_offset=2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, F_ * H_ * W_, heads, D, generator=g).to(device, dtype)
    complex_product = torch.view_as_real(torch.view_as_complex(h.float().unflatten(-1, (-1, 2)))
                                         * torch.view_as_complex(freqs)).flatten(-2)
    ref = wan.rope(h, freqs, backend="torch")
    assert (ref - complex_product).abs().max() < 1e-6
    h_ref, h_ker = h.clone().requires_grad_(), h.clone().requires_grad_()
    out_ref, out_ker = wan.rope(h_ref, freqs, dtype, "torch"), wan.rope(h_ker, freqs, dtype, "triton")
    assert out_ker.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (out_ker.float() - out_ref.float()).abs().max() < tol * out_ref.float().abs().max()
    grad = torch.randn(out_ref.shape, generator=g).to(device, dtype)
    out_ref.backward(grad)
    out_ker.backward(grad)
    assert h_ker.grad.dtype == dtype
    assert (h_ker.grad.float() - h_ref.grad.float()).abs().max() < tol * h_ref.grad.float().abs().max()
    assert h_ref.grad.float().norm() > 0.5 * grad.float().norm()  # a rotation keeps the norm
