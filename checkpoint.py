"""Weights on disk: reading a state dict from the formats the official releases and NVlabs/rcm use, the strict check
against a module, and writing safetensors with the sampling settings a checkpoint was trained with in its header
(other tools ignore the metadata; sample.py reads it for its defaults). Nothing here unpickles arbitrary objects:
.pt/.pth files go through torch.load(weights_only=True)."""
import json
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def read_state_dict(path, device="cpu") -> dict:
    """{name: tensor} of a .safetensors file, a sharded *.safetensors.index.json, or a .pt/.pth file (read with
    weights_only=True and mmap: a state dict, or the one tensor it holds). A file that cannot be read raises one
    error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
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


def load_strict(build, path, header: str, *, dtype, device="cpu") -> nn.Module:
    """build() on the meta device, filled strictly from `path` (the tensors are assigned: a large model is never in
    memory twice), in eval mode and frozen; a mismatch raises one error opening with `header`."""
    sd = read_state_dict(path)
    with torch.device("meta"):
        module = build()
    check_state_dict(module, sd, header)
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


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
    """The settings stored with a safetensors checkpoint ({} for other files, or none stored)."""
    path = Path(path)
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
