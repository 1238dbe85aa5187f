"""image_encoder.py against the image side of Wan2.1's official CLIP (golden outputs of a tiny random config in
tests/golden): the preprocessing, the penultimate block's features, the full-size checkpoint's visual.* names and
shapes, and the strict loader that skips (and names) the text tower."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from image_encoder import CLIPConfig, CLIPVision, load_clip


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def tiny(golden):
    meta = json.loads((golden / "clip_tiny.json").read_text())["config"]
    cfg = CLIPConfig(**{k: meta[k] for k in ("image_size", "patch_size", "dim", "mlp_ratio", "out_dim", "num_heads",
                                             "num_layers", "norm_eps")})
    io = load_file(golden / "clip_tiny.io.safetensors")
    return cfg, io, [io["image.0"], io["image.1"]]


def test_golden_features_and_preprocessing(golden, tiny, capsys):
    cfg, io, images = tiny
    net = load_clip(CLIPVision(cfg), golden / "clip_tiny.weights.safetensors")
    assert rel(net.preprocess(images), io["pixels"]) < 1e-6           # images of two sizes, resized and normalised
    with torch.no_grad():
        out = net(images)
        batched = net(torch.stack([images[1], images[1]]))             # a [B, 3, H, W] tensor works too
    assert out.shape == io["out"].shape and rel(out, io["out"]) < 1e-5
    assert rel(batched[0], io["out"][1]) < 1e-5
    assert "skipped" not in capsys.readouterr().out                    # the golden file holds visual.* only


def test_full_size_names_and_shapes(golden):
    expected = json.loads((golden / "checkpoint_keys_i2v.json").read_text())
    keys = expected["models_clip_open-clip-xlm-roberta-large-vit-huge-14"]
    with torch.device("meta"):
        net = CLIPVision(CLIPConfig())
    assert {f"visual.{k}": list(v.shape) for k, v in net.state_dict().items()} == \
        {k: v for k, v in keys.items() if k.startswith("visual.")}


def test_strict_loader_skips_the_text_tower_and_names_bad_keys(golden, tiny, tmp_path, capsys):
    cfg, _, _ = tiny
    sd = load_file(golden / "clip_tiny.weights.safetensors")
    save_file({**sd, "textual.token_embedding.weight": torch.zeros(2, 2), "log_scale": torch.zeros(())},
              str(tmp_path / "whole.safetensors"))
    torch.save({**sd, "log_scale": torch.zeros(())}, tmp_path / "whole.pth")
    for name in ("whole.safetensors", "whole.pth"):
        with torch.device("meta"):
            net = CLIPVision(cfg)
        load_clip(net, tmp_path / name)
        assert not any(p.is_meta for p in net.parameters())
    assert "skipped 2 keys of the text tower (log_scale, textual)" in capsys.readouterr().out
    del sd["visual.head"]
    sd["visual.pos_embedding"] = sd["visual.pos_embedding"][:, :5]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)1 missing: head.*1 mis-shaped: pos_embedding"):
        load_clip(CLIPVision(cfg), tmp_path / "bad.safetensors")
