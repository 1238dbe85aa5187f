"""Weights on disk: reading a state dict from the formats the official releases, NVlabs/rcm and diffusers use, the
strict check against a module, renaming keys between the official and the diffusers/transformers layouts (one table
per module, in both directions), and writing safetensors with the sampling settings a checkpoint was trained with in
its header (other tools ignore the metadata; sample.py reads it for its defaults). Nothing here unpickles arbitrary
objects: .pt/.pth files go through torch.load(weights_only=True)."""
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def read_state_dict(path, device="cpu") -> dict:
    """{name: tensor} of a .safetensors file, a sharded *.safetensors.index.json, a folder holding one of these, or a
    .pt/.pth file (read with weights_only=True, memory-mapped when in the zip format: a state dict, or the one tensor
    it holds). A file that cannot be read raises one
    error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():  # a diffusers/transformers model folder: one *.safetensors file, or the index of its shards
        found = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path} holds {len(found) or 'no'} *.safetensors files and no index: pass the "
                                    f"checkpoint file itself")
        path = found[0]
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a safetensors index (a JSON object with a weight_map)") from e
        sd = {}
        for shard in shards:
            if not (path.parent / shard).exists():
                raise FileNotFoundError(f"{path.parent / shard} (a shard listed in {path.name}) not found")
            sd.update(read_state_dict(path.parent / shard, device))
        return sd
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; use .safetensors, .index.json, .pt "
                         f"or .pth")
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device=str(device))
        # mmap spares a copy of a large file, but only the zip format (torch ≥ 1.6) allows it
        return torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects besides tensors, and only weights are read (weights_only): "
                         f"save its state dict instead") from e
    except Exception as e:  # safetensors' and torch's messages do not name the file
        raise ValueError(f"cannot read {path} as a {path.suffix} checkpoint: {str(e).splitlines()[0]}") from e


def rename(sd: dict, table, reverse: bool = False) -> dict:
    """sd with its keys renamed by a table of (official, other) dotted names: a key that starts with one side's name
    (at a "." boundary; "#" stands for a number, the same on both sides) gets the other side's; the first matching
    row wins and a key no row matches keeps its name. reverse: other -> official."""
    rows = [(b, a) if reverse else (a, b) for a, b in table]
    patterns = [(re.compile(re.escape(src).replace("\\#", r"(\d+)") + r"(?=\.|$)"), dst) for src, dst in rows]
    out = {}
    for key, value in sd.items():
        for pattern, dst in patterns:
            match = pattern.match(key)
            if match:
                numbers = iter(match.groups())
                key = re.sub("#", lambda _: next(numbers), dst) + key[match.end():]
                break
        out[key] = value
    return out


def check_state_dict(model: nn.Module, sd: dict, header: str):
    """Raise one ValueError, opening with `header`, that lists every missing, unexpected and mis-shaped key of `sd`
    against `model`'s state dict."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = {
        "missing": sorted(expected.keys() - sd.keys()),
        "unexpected": sorted(sd.keys() - expected.keys()),
        "mis-shaped": [f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k])})"
                       for k in sorted(expected.keys() & sd.keys()) if sd[k].shape != expected[k]]}
    if any(problems.values()):
        raise ValueError(header + "\n" + "\n".join(
            f"  {len(keys)} {kind}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
            for kind, keys in problems.items() if keys))


def load_strict(build, path, header: str, *, dtype, device="cpu", other_names=None) -> nn.Module:
    """build() on the meta device, filled strictly from `path` (the tensors are assigned: a large model is never in
    memory twice), in eval mode and frozen; a mismatch raises one error opening with `header`. other_names: the
    module's (official, diffusers/transformers) key table, for checkpoints in that layout."""
    sd = read_state_dict(path)
    with torch.device("meta"):
        module = build()
    if other_names is not None and not sd.keys() <= module.state_dict().keys():
        sd = rename(sd, other_names, reverse=True)
    check_state_dict(module, sd, header)
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ LoRA
# A LoRA file in the layout ComfyUI and diffusers read for Wan ("diffusion_model." + the official module name):
# every linear layer's delta W − W_base ≈ B·A as lora_B [out, r] and lora_A [r, in] (no alpha: scale 1), bias
# deltas as diff_b, and every other parameter's delta (norms, modulation, the patch embedding) as a full diff.
LORA_PREFIX = "diffusion_model."


def extract_lora(weights: dict, base: dict, rank: int) -> tuple[dict, dict]:
    """The LoRA of weights − base at `rank` (truncated SVD of each 2-D weight delta; rank ≥ min(out, in) keeps it
    exactly), and {linear layer: kept energy Σ_kept s² / Σ s²}. Both dicts hold official names."""
    if weights.keys() != base.keys():
        raise ValueError(f"the two checkpoints hold different keys ({sorted(weights.keys() ^ base.keys())[:4]} ...): "
                         f"is the base the checkpoint the student was trained from?")
    lora, energy = {}, {}
    for key, w in weights.items():
        delta = w.float() - base[key].float()
        module, kind = key.rsplit(".", 1) if key.endswith((".weight", ".bias")) else (key, "")
        if kind == "weight" and delta.ndim == 2:
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, len(S))
            lora[f"{LORA_PREFIX}{module}.lora_B.weight"] = U[:, :r] * S[:r].sqrt()
            lora[f"{LORA_PREFIX}{module}.lora_A.weight"] = S[:r].sqrt()[:, None] * Vh[:r]
            energy[module] = (S[:r].square().sum() / S.square().sum().clamp_min(1e-30)).item()
        elif kind == "bias":
            lora[f"{LORA_PREFIX}{module}.diff_b"] = delta
        else:
            lora[f"{LORA_PREFIX}{key[:-len('.weight')] if kind else key}.diff"] = delta
    return lora, energy


def merge_lora(weights: dict, lora: dict, strength: float = 1.0) -> dict:
    """weights + strength · (the LoRA's deltas), each in its weight's dtype (official names on both sides; a LoRA key
    that names no weight raises one error listing them)."""
    out, unused = dict(weights), []
    for key, value in lora.items():
        name = key[len(LORA_PREFIX):] if key.startswith(LORA_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            continue
        if name.endswith(".lora_B.weight"):
            module = name[:-len(".lora_B.weight")]
            target, delta = f"{module}.weight", value.float() @ lora[key.replace("lora_B", "lora_A")].float()
        elif name.endswith(".diff_b"):
            target, delta = name[:-len(".diff_b")] + ".bias", value.float()
        elif name.endswith(".diff"):
            module = name[:-len(".diff")]
            target, delta = (f"{module}.weight" if f"{module}.weight" in weights else module), value.float()
        else:
            target, delta = None, None
        if target not in weights or weights[target].shape != delta.shape:
            unused.append(key)
            continue
        out[target] = (weights[target].float() + strength * delta).to(weights[target].dtype)
    if unused:
        raise ValueError(f"{len(unused)} LoRA keys fit no weight of the model ({', '.join(unused[:4])} ...): is it a "
                         f"LoRA of this architecture?")
    return out


def save_checkpoint(module_or_state_dict, path, settings: dict | None = None):
    """Write weights (official key names) as one safetensors file; `settings` (JSON-able) go into its header."""
    sd = module_or_state_dict
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    metadata = {"format": "pt"}
    if settings is not None:
        metadata["settings"] = json.dumps(settings)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path), metadata=metadata)


def read_settings(path) -> dict:
    """The settings stored with a safetensors checkpoint ({} for other files, or none stored); of a folder, those of
    its diffusion_pytorch_model.safetensors or (two experts) of its high_noise_model/'s."""
    path = Path(path)
    if path.is_dir():
        path = next((f for f in (path / "diffusion_pytorch_model.safetensors",
                                 path / "high_noise_model" / "diffusion_pytorch_model.safetensors") if f.exists()), path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors' message does not name the file
        raise ValueError(f"cannot read {path} as a .safetensors checkpoint: {str(e).splitlines()[0]}") from e
    # JSON has no tuples: the configs' tuples come back as lists
    tuples = lambda pairs: {k: tuple(v) if isinstance(v, list) else v for k, v in pairs}
    return json.loads(metadata["settings"], object_pairs_hook=tuples) if "settings" in metadata else {}
