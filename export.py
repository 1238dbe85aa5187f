"""Hand a distilled student to the tools users already have.

    python export.py diffusers runs/wan1.3b/ema.safetensors out/transformer   # a diffusers WanTransformer3DModel
    python export.py lora runs/wan1.3b/ema.safetensors Wan2.1-T2V-1.3B out/rcm_lora_r64.safetensors --rank 64

`diffusers` writes the weights under diffusers' names with their config.json, so
`WanTransformer3DModel.from_pretrained(out/transformer)` loads them into a diffusers pipeline. `lora` writes the
student − base delta as a LoRA in the layout ComfyUI and diffusers' Wan LoRA loader read (checkpoint.extract_lora):
every linear layer at rank r by truncated SVD, reporting the energy each keeps, and the other deltas (biases, norms,
modulation, patch embedding) in full. `sample.py --lora FILE --lora-strength s` applies one. The architecture comes
from the checkpoint's stored settings, else --model.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

import parallel
from checkpoint import extract_lora, read_settings, save_checkpoint
from model import CONFIGS, WanConfig, read_checked, save_diffusers


@dataclass
class Diffusers:
    """An official-named checkpoint (e.g. a run's ema.safetensors) as a diffusers transformer/ folder."""
    checkpoint: tyro.conf.Positional[Path]  # the weights (any format model.read_state_dict takes)
    out: tyro.conf.Positional[Path]  # the folder to write: config.json and diffusion_pytorch_model.safetensors
    model: str | None = None  # architecture, a name in model.CONFIGS [the checkpoint's stored one]


@dataclass
class Lora:
    """The delta of a student from its base (the checkpoint it was trained from) as a LoRA file."""
    student: tyro.conf.Positional[Path]  # the distilled weights (e.g. a run's ema.safetensors)
    base: tyro.conf.Positional[Path]  # the weights it started from (the teacher's folder or file)
    out: tyro.conf.Positional[Path]  # the .safetensors LoRA file to write
    rank: int = 64  # LoRA rank r of every linear layer (≥ its smaller side: exact)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # stored precision of the LoRA tensors
    model: str | None = None  # architecture, a name in model.CONFIGS [the student's stored one]


def architecture(path: Path, model: str | None) -> WanConfig:
    if model is not None:
        if model not in CONFIGS:
            raise ValueError(f"--model {model!r}: use one of {', '.join(CONFIGS)}")
        return CONFIGS[model]
    settings = read_settings(path)
    if "dit" not in settings:
        raise ValueError(f"{path} stores no architecture: pass --model (one of {', '.join(CONFIGS)})")
    return WanConfig(**settings["dit"])


def checked_weights(path: Path, cfg: WanConfig) -> dict:
    """The official-named weights of `path`, checked against the architecture."""
    return read_checked(path, cfg, f"{path} does not match the architecture (set --model):")


def export_diffusers(cfg: Diffusers):
    arch = architecture(cfg.checkpoint, cfg.model)
    save_diffusers(checked_weights(cfg.checkpoint, arch), arch, cfg.out, read_settings(cfg.checkpoint) or None)
    print(f"{cfg.checkpoint} -> {cfg.out} (diffusers WanTransformer3DModel)")


def export_lora(cfg: Lora):
    if cfg.rank < 1:
        raise ValueError(f"--rank must be at least 1, got {cfg.rank}")
    arch = architecture(cfg.student, cfg.model)
    lora, energy = extract_lora(checked_weights(cfg.student, arch), checked_weights(cfg.base, arch), cfg.rank)
    kept = sorted(energy.values())
    print(f"{len(energy)} linear layers at rank {cfg.rank}: kept energy min {kept[0]:.4f}, median "
          f"{kept[len(kept) // 2]:.4f}, mean {sum(kept) / len(kept):.4f}")
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    # the student's sampling settings travel with its LoRA (sample.py --lora takes them as its defaults)
    settings = {**read_settings(cfg.student), "lora": {"rank": cfg.rank, "base": str(cfg.base)}}
    save_checkpoint({k: v.to(dtype) for k, v in lora.items()}, cfg.out, settings)
    (cfg.out.with_suffix(".energy.json")).write_text(json.dumps(energy, indent=1))
    print(f"-> {cfg.out} ({cfg.out.stat().st_size / 2**20:.1f} MiB; kept energy per layer in "
          f"{cfg.out.with_suffix('.energy.json')})")


if __name__ == "__main__":
    command = tyro.extras.subcommand_cli_from_dict({"diffusers": Diffusers, "lora": Lora})
    parallel.cli({Diffusers: export_diffusers, Lora: export_lora}[type(command)], command)
