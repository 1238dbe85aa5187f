"""The CLIP ViT-H/14 image encoder of Wan2.1 I2V, exact to the official module (the image side of Wan2.1's
`clip.py`, from the open-clip XLM-RoBERTa ViT-H/14 checkpoint): an image becomes 257 tokens of 1280 features that
the I2V DiT's `img_emb` turns into extra cross-attention rows.

    encoder = load_clip(CLIPVision(CLIPConfig()), "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    features = encoder([image])          # image [3, H, W] in [-1, 1], any size -> [1, 257, 1280]

Preprocessing, as the official: bicubic resize to image_size × image_size (align_corners False), [-1, 1] -> [0, 1],
CLIP's mean/std. The ViT: a patch convolution without bias, a class token, learnt positions, a pre-norm LayerNorm,
pre-norm blocks (LayerNorm, softmax attention, LayerNorm, MLP with erf GELU); the features are those after the
penultimate block (the official `use_31_block`). The last block, the post-norm and the projection head are loaded (the
checkpoint holds them) but not run. LayerNorms compute in fp32, as the official's.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import check_state_dict, read_state_dict

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPConfig:
    """The official VisionTransformer's arguments (defaults: ViT-H/14 at 224, as Wan2.1 I2V uses it)."""
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    out_dim: int = 1024  # the projection head's width (loaded, not used for the features)
    num_heads: int = 16
    num_layers: int = 32
    norm_eps: float = 1e-5


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The official LayerNorm: in fp32, back in x's dtype."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.to_qkv, self.proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        """x [B, S, dim] -> [B, S, dim]: full softmax attention, scale 1/√head_dim."""
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).transpose(1, 3).unbind(2)  # [B, H, S, d]
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        hidden = cfg.dim * cfg.mlp_ratio
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps), nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x):
        x = x + self.attn(layer_norm(self.norm1, x))
        return x + self.mlp(layer_norm(self.norm2, x))


class CLIPVision(nn.Module):
    """The image tower; `state_dict()` uses the official names without their `visual.` prefix."""

    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.cfg = cfg
        tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.randn(1, 1, cfg.dim) / cfg.dim**0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, cfg.dim) / cfg.dim**0.5)
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.transformer = nn.Sequential(*(Block(cfg) for _ in range(cfg.num_layers)))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Parameter(torch.randn(cfg.dim, cfg.out_dim) / cfg.dim**0.5)

    def preprocess(self, images) -> torch.Tensor:
        """[B, 3, H, W] or a list of [3, H, W] images in [-1, 1], of any size -> the normalised [B, 3, S, S] batch."""
        size = (self.cfg.image_size,) * 2
        resize = lambda x: F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False)
        x = resize(images) if torch.is_tensor(images) else torch.cat([resize(im[None]) for im in images])
        mean, std = (torch.tensor(c, device=x.device).view(1, 3, 1, 1) for c in (MEAN, STD))
        return (x * 0.5 + 0.5 - mean) / std

    def forward(self, images) -> torch.Tensor:
        """Images (see `preprocess`) -> the penultimate block's features [B, 1 + (S/p)², dim] in the weights' dtype."""
        x = self.preprocess(images).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)                                  # [B, (S/p)², dim]
        x = torch.cat([self.cls_embedding.expand(len(x), -1, -1).to(x.dtype), x], dim=1) + self.pos_embedding
        x = layer_norm(self.pre_norm, x)
        return self.transformer[:-1](x)


def load_clip(module: CLIPVision, path) -> CLIPVision:
    """Fill `module` strictly from the official CLIP checkpoint (.pth, read with weights_only) or a safetensors file:
    every `visual.*` key must match; the text tower's keys (`textual.*`, `log_scale`) are skipped, and named."""
    sd = read_state_dict(path)
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    skipped = sorted({k.split(".")[0] for k in sd if not k.startswith("visual.")})
    if skipped:
        print(f"load_clip: {path}: skipped {sum(not k.startswith('visual.') for k in sd)} keys of the text tower "
              f"({', '.join(skipped)}): Wan uses the image tower only")
    check_state_dict(module, visual, f"{path} does not fit CLIPVision({module.cfg}) on its visual.* keys:")
    module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in visual.items()}, strict=True,
                           assign=any(p.is_meta for p in module.parameters()))
    return module.eval().requires_grad_(False)
