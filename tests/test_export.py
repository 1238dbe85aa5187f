"""export.py: the diffusers export and the LoRA (extraction, merge, sample.py --lora), without diffusers."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import export
import sample
from checkpoint import extract_lora, merge_lora, save_checkpoint
from model import WanConfig, WanModel, load_checkpoint, read_state_dict
from toy import TOY_DIT, ToyConfig

TINY = WanConfig(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64, freq_dim=32,
                 text_dim=32, out_dim=16, num_heads=2, num_layers=2, qk_norm=True, cross_attn_norm=True, eps=1e-6)


def pair(cfg, seed=0, step=0.05):
    """(base, student) state dicts: the student a small random step from the base."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(v.shape, generator=g) for k, v in WanModel(cfg).state_dict().items()}
    return base, {k: v + step * torch.randn(v.shape, generator=g) for k, v in base.items()}


def test_a_full_rank_lora_merges_back_to_the_student_and_a_low_rank_keeps_its_energy():
    base, student = pair(TINY)
    lora, energy = extract_lora(student, base, rank=64)  # ≥ every layer's smaller side: exact
    merged = merge_lora(base, lora)
    assert merged.keys() == student.keys()
    for k in student:
        torch.testing.assert_close(merged[k], student[k], rtol=0, atol=1e-5)
    assert min(energy.values()) > 1 - 1e-6 and len(energy) == 10 * TINY.num_layers + 6
    low, energy = extract_lora(student, base, rank=2)
    assert all(v.shape[0] == 2 for k, v in low.items() if k.endswith("lora_A.weight"))
    assert 0 < min(energy.values()) < max(energy.values()) < 1
    # the rank-2 merge is the best rank-2 approximation: closer to the student than the base is
    d = lambda a: sum((a[k] - student[k]).square().sum() for k in student)
    assert d(merge_lora(base, low)) < d(base)
    half = merge_lora(base, lora, 0.5)
    torch.testing.assert_close(half["head.head.weight"], (base["head.head.weight"] + student["head.head.weight"]) / 2)


def test_lora_keys_are_the_comfyui_wan_layout_and_a_foreign_lora_is_refused():
    base, student = pair(TINY)
    lora, _ = extract_lora(student, base, rank=4)
    assert "diffusion_model.blocks.1.self_attn.q.lora_A.weight" in lora
    assert "diffusion_model.blocks.1.self_attn.q.lora_B.weight" in lora
    assert "diffusion_model.blocks.1.ffn.0.diff_b" in lora and "diffusion_model.blocks.1.norm3.diff" in lora
    assert "diffusion_model.blocks.1.modulation.diff" in lora and "diffusion_model.patch_embedding.diff" in lora
    other, _ = pair(dataclasses.replace(TINY, dim=64, ffn_dim=128))
    with pytest.raises(ValueError, match="fit no weight of the model"):
        merge_lora(base, extract_lora(other, other, 4)[0])
    with pytest.raises(ValueError, match="hold different keys"):
        extract_lora(student, {k: v for k, v in base.items() if "head" not in k}, 4)


def test_export_lora_and_sample_with_it_at_full_rank_is_the_student(tmp_path):
    """A toy student exported as a full-rank LoRA of its base: sample.py --dit-path BASE --lora LORA takes the
    student's settings from the LoRA and samples with the student's weights (--lora-strength scales the delta)."""
    base, student = pair(TOY_DIT, step=0.02)
    settings = {"dit": dataclasses.asdict(TOY_DIT), "dtype": "float32", "method": "rcm", "sigma_max": 80.0,
                "mid_t": [1.2, 1.0, 0.6], "steps": 4, "eval_steps": [1, 2],
                "toy": {"world": dataclasses.asdict(ToyConfig()), "num_samples": 4, "seed": 2}}
    save_checkpoint(base, tmp_path / "base.safetensors")
    save_checkpoint(student, tmp_path / "student.safetensors", settings)
    export.export_lora(export.Lora(tmp_path / "student.safetensors", tmp_path / "base.safetensors",
                                   tmp_path / "lora.safetensors", rank=128, dtype="float32"))
    assert json.loads((tmp_path / "lora.energy.json").read_text())
    cfg, taken = sample.with_settings(sample.Config(dit_path=tmp_path / "base.safetensors", toy=True, device="cpu",
                                                    lora=tmp_path / "lora.safetensors"))
    assert cfg.sampler.mid_t == (1.2, 1.0, 0.6) and cfg.num_samples == 4 and taken["lora"]["rank"] == 128
    merged = sample.load_dit(sample.architecture(cfg, taken), cfg).state_dict()
    for k in student:
        torch.testing.assert_close(merged[k], student[k], rtol=0, atol=1e-5)
    weaker = sample.load_dit(TOY_DIT, dataclasses.replace(cfg, lora_strength=0.5)).state_dict()
    torch.testing.assert_close(weaker["head.head.weight"], (base["head.head.weight"] + student["head.head.weight"]) / 2)


def test_export_diffusers_writes_a_transformer_folder_that_reads_back(tmp_path):
    base, _ = pair(TINY)
    save_checkpoint(base, tmp_path / "ema.safetensors", {"dit": dataclasses.asdict(TINY), "method": "rcm"})
    export.export_diffusers(export.Diffusers(tmp_path / "ema.safetensors", tmp_path / "transformer"))
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["num_layers"] == 2
    written = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert "condition_embedder.time_proj.weight" in written and "blocks.1.attn2.to_out.0.weight" in written
    back = read_state_dict(tmp_path / "transformer")
    assert back.keys() == base.keys() and all(torch.equal(back[k], base[k]) for k in base)
    with pytest.raises(ValueError, match="stores no architecture: pass --model"):
        save_checkpoint(base, tmp_path / "bare.safetensors")
        export.export_diffusers(export.Diffusers(tmp_path / "bare.safetensors", tmp_path / "t2"))
