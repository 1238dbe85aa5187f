"""Diffusers-format checkpoints (where diffusers/transformers are installed): a tiny WanTransformer3DModel,
AutoencoderKLWan and transformers UMT5EncoderModel saved with save_pretrained load through the project's loaders and
give the same outputs (fp32); the project's diffusers export reloads in diffusers with no missing or unexpected key.
The key renaming itself (checkpoint.rename) is tested without them."""
import dataclasses

import pytest
import torch

import checkpoint
from model import CLIP_DIM, DIFFUSERS_NAMES, WanConfig, WanModel, load_checkpoint

TINY = WanConfig(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64, freq_dim=32,
                 text_dim=24, out_dim=16, num_heads=2, num_layers=2, qk_norm=True, cross_attn_norm=True, eps=1e-6)
TINY_I2V = dataclasses.replace(TINY, model_type="i2v", in_dim=36)


def randomised(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_rename_is_its_own_inverse_on_every_official_key():
    for cfg in (TINY, TINY_I2V):
        keys = {k: None for k in WanModel(cfg).state_dict()}
        theirs = checkpoint.rename(keys, DIFFUSERS_NAMES)
        assert len(theirs) == len(keys) and not any(k.startswith(("text_embedding", "self_attn", "head.")) for k in theirs)
        assert list(checkpoint.rename(theirs, DIFFUSERS_NAMES, reverse=True)) == list(keys)


def diffusers_transformer(cfg, seed=0):
    diffusers = pytest.importorskip("diffusers")
    from model import diffusers_config
    config = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    return randomised(diffusers.WanTransformer3DModel(**config), seed).eval()


@pytest.mark.parametrize("cfg", [TINY, TINY_I2V], ids=["t2v", "i2v"])
def test_a_diffusers_transformer_loads_and_gives_the_same_velocity(tmp_path, cfg):
    theirs = diffusers_transformer(cfg)
    theirs.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 3, 4, 4, generator=g), torch.tensor([300.0, 870.0])
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)  # padded to text_len, as both pipelines do
    y = torch.randn(2, 20, 3, 4, 4, generator=g) if cfg.model_type == "i2v" else None
    clip = torch.randn(2, 257, CLIP_DIM, generator=g) if cfg.model_type == "i2v" else None
    with torch.no_grad():
        want = theirs(x if y is None else torch.cat([x, y], 1), t, context, encoder_hidden_states_image=clip,
                      return_dict=False)[0]
        for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):  # the pipeline folder, or its transformer/
            ours = load_checkpoint(WanModel(cfg), path).eval()
            got = ours(x, t, list(context), y=y, clip_fea=clip)
            assert rel_err(got, want) < 1e-5


def test_a_diffusers_vae_loads_and_encodes_and_decodes_alike(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from vae import LATENT_MEAN, LATENT_STD, VAEConfig, load_vae
    theirs = randomised(diffusers.AutoencoderKLWan(base_dim=8, z_dim=16), 2).eval()
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae", cfg=VAEConfig(dim=8))
    mean, std = (torch.tensor(s).view(1, -1, 1, 1, 1) for s in (LATENT_MEAN, LATENT_STD))
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
    z = torch.randn(1, 16, 2, 4, 4, generator=g)  # normalised, as the DiT makes them
    with torch.no_grad():  # (diffusers works on raw latents and clamps its output)
        assert rel_err(ours.encode(video) * std + mean, theirs.encode(video).latent_dist.mean) < 1e-5
        assert rel_err(ours.decode(z).clamp(-1, 1), theirs.decode(z * std + mean).sample) < 1e-5


def test_a_transformers_umt5_encoder_loads_and_encodes_alike(tmp_path):
    transformers = pytest.importorskip("transformers")
    from text_encoder import UMT5Config, load_umt5
    cfg = UMT5Config(vocab=40, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
    hf = transformers.UMT5Config(vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads,
                                 d_ff=cfg.dim_ffn, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                 relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=128,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)
    theirs = randomised(transformers.UMT5EncoderModel(hf), 4).eval()
    theirs.save_pretrained(tmp_path / "text_encoder")
    ours = load_umt5(tmp_path / "text_encoder", dtype=torch.float32, cfg=cfg)
    ids = torch.randint(0, cfg.vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a shorter prompt, padded
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1, :6], want[1, :6]) < 1e-5


def test_the_diffusers_export_reloads_in_diffusers_with_every_key(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from model import save_diffusers
    ours = randomised(WanModel(TINY_I2V), 6).eval()
    save_diffusers(ours.state_dict(), TINY_I2V, tmp_path / "transformer", {"method": "rcm"})
    theirs, info = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "transformer", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    context, clip = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g), torch.randn(1, 257, CLIP_DIM, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        want = theirs.eval()(torch.cat([x, y], 1), t, context, encoder_hidden_states_image=clip, return_dict=False)[0]
        assert rel_err(ours(x, t, list(context), y=y, clip_fea=clip), want) < 1e-5


def test_the_lora_loads_in_diffusers_with_no_unexpected_key_and_merges_alike(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from safetensors.torch import save_file
    from model import save_diffusers
    base, student = randomised(WanModel(TINY), 8).state_dict(), randomised(WanModel(TINY), 9).state_dict()
    student = {k: base[k] + 0.05 * (student[k] - base[k]) for k in base}  # a small delta, as distillation makes
    lora, _ = checkpoint.extract_lora(student, base, rank=4)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp_path / "lora.safetensors"))
    save_diffusers(base, TINY, tmp_path / "transformer")
    pipe_transformer = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "transformer")
    state = diffusers.WanPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"))
    state = state[0] if isinstance(state, tuple) else state
    modules = dict(pipe_transformer.named_modules())
    targets = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in state}
    assert targets <= modules.keys() and all(k.startswith("transformer.") for k in state)  # no unexpected key
    assert len(targets) == 10 * TINY.num_layers + 6  # every linear layer: 10 per block, 6 outside the blocks
    diffusers.WanPipeline.load_lora_into_transformer(state, transformer=pipe_transformer, adapter_name="rcm")
    pipe_transformer.fuse_lora(lora_scale=0.5)
    pipe_transformer.unload_lora()
    theirs = checkpoint.rename(pipe_transformer.state_dict(), DIFFUSERS_NAMES, reverse=True)
    ours = checkpoint.merge_lora(base, lora, 0.5)
    merged_by_both = [k for k in base if not torch.equal(theirs[k], base[k])]
    assert len(merged_by_both) > 10
    for k in merged_by_both:  # the linear layers and their biases (diffusers skips norm and modulation diffs)
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6)
