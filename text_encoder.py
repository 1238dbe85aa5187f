"""The umT5-XXL text encoder of Wan2.1, exact to `models_t5_umt5-xxl-enc-bf16.pth`, with its tokenizer.

prompt -> cleaned text -> google/umt5-xxl tokens, at most 511, then </s> -> 24 pre-norm T5 blocks
-> one [L_i, 4096] embedding per prompt, real tokens only (EOS included); the DiT pads to 512.

umT5 differs from T5 in that every block has its own relative-position bias table.
"""
from dataclasses import dataclass
import html
import math
from pathlib import Path
import re
import warnings

from einops import rearrange
from tokenizers import Tokenizer

import torch
import torch.nn as nn

from checkpoint import load_strict, read_state_dict

try:  # optional: Wan cleans prompts with ftfy; see clean_prompt for what changes without it
    import ftfy
except ImportError:
    ftfy = None

TEXT_LEN = 512  # tokens per prompt, </s> included
MAX_DISTANCE = 128  # relative offsets beyond this share the last bucket


@dataclass(frozen=True)
class UMT5Config:
    """Defaults are the umT5-XXL encoder used by Wan2.1."""
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32


# ----------------------------------------------------------------------------- model

class T5Norm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in fp32: w · x / √(mean(x²) + ε)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bidirectional T5 buckets of offsets rel = key - query.

    Half the buckets per direction; within one, offsets |rel| < half/2 get their own bucket and
    larger ones log-spaced buckets up to MAX_DISTANCE (the float ops follow T5 so boundaries agree).
    """
    half = num_buckets // 2
    exact = half // 2
    n = rel.abs()
    log_bucket = exact + (torch.log(n.float() / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class RelativeBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention logits."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """-> bias [1, heads, L_query, L_key]."""
        pos = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.embedding.num_embeddings)
        return rearrange(self.embedding(buckets), "q k n -> 1 n q k")


class Attention(nn.Module):
    """Multi-head self-attention without biases and, as in T5, without the 1/√d scale."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], bias [B, heads, L, L] (relative bias, padding keys at the dtype's minimum)."""
        q, k, v = (rearrange(proj(x), "b l (n c) -> b n l c", n=self.num_heads) for proj in (self.q, self.k, self.v))
        p = (q @ k.transpose(-1, -2) + bias).float().softmax(dim=-1).to(x.dtype)
        return self.o(rearrange(p @ v, "b n l c -> b l (n c)"))


class FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) · gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class Block(nn.Module):
    """Pre-norm encoder block with its own relative-position bias (umT5)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = T5Norm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5Norm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], mask [B, L] (1 = real token): padding is hidden as a key, not as a query."""
        bias = self.pos_embedding(x.shape[1]).masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """Token embedding, pre-norm blocks, final norm. Parameter names match the Wan2.1 checkpoint."""

    def __init__(self, cfg: UMT5Config = UMT5Config()):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = T5Norm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, L] int64, mask [B, L] (1 = real token) -> [B, L, dim] for every position."""
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


# The transformers UMT5EncoderModel names of the official keys (a diffusers pipeline's text_encoder/), for
# checkpoint.rename; the token embedding is stored under both of its tied names there.
TRANSFORMERS_NAMES = [
    ("token_embedding", "shared"),
    ("token_embedding", "encoder.embed_tokens"),
    ("blocks.#.norm1", "encoder.block.#.layer.0.layer_norm"),
    *((f"blocks.#.attn.{w}", f"encoder.block.#.layer.0.SelfAttention.{w}") for w in "qkvo"),
    ("blocks.#.pos_embedding.embedding", "encoder.block.#.layer.0.SelfAttention.relative_attention_bias"),
    ("blocks.#.norm2", "encoder.block.#.layer.1.layer_norm"),
    ("blocks.#.ffn.gate.0", "encoder.block.#.layer.1.DenseReluDense.wi_0"),
    ("blocks.#.ffn.fc1", "encoder.block.#.layer.1.DenseReluDense.wi_1"),
    ("blocks.#.ffn.fc2", "encoder.block.#.layer.1.DenseReluDense.wo"),
    ("norm", "encoder.final_layer_norm"),
]


def umt5_files(path: str | Path) -> tuple[Path, Path]:
    """(weights, tokenizer.json) of the encoder at `path`: the Wan2.1 release's .pth with google/umt5-xxl/ beside
    it, a diffusers pipeline folder (text_encoder/ and tokenizer/), or its text_encoder/ folder (tokenizer/ beside)."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path / "text_encoder", path / "tokenizer" / "tokenizer.json"
    if path.is_dir():
        return path, path.parent / "tokenizer" / "tokenizer.json"
    return path, path.parent / "google" / "umt5-xxl" / "tokenizer.json"


def load_umt5(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              cfg: UMT5Config = UMT5Config()) -> UMT5Encoder:
    """Build UMT5Encoder on the meta device and assign the weights of `path` (the release's .pth or .safetensors, or
    a diffusers text_encoder/ or pipeline folder) strictly, so the 11 GB of weights are never in memory twice.
    dtype: bfloat16 (as released) or float32. device='cpu' keeps the GPU free for the DiT. Returns the model in eval
    mode, frozen."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} is not supported: umT5 activations overflow float16; use bfloat16 or float32")
    path = umt5_files(path)[0]
    if not path.exists():
        raise FileNotFoundError(f"T5 checkpoint not found: {path} "
                                "(expected models_t5_umt5-xxl-enc-bf16.pth from the Wan2.1 release)")
    return load_strict(lambda: UMT5Encoder(cfg), path, f"{path} does not fit UMT5Encoder({cfg}); is it the umT5-XXL "
                       "encoder, and does the config match?", dtype=dtype, device=device,
                       other_names=TRANSFORMERS_NAMES)


# ----------------------------------------------------------------------------- tokenizer

# Unicode White_Space, which is what Wan's `regex` \s matches; Python's re \s also takes \x1c-\x1f.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def clean_prompt(text: str) -> str:
    """Clean a prompt as Wan does: ftfy.fix_text, HTML-unescape twice, collapse whitespace runs to one space, strip.

    ftfy is used when installed (it is not a dependency of this project). Without it, text that ftfy
    would repair (mojibake, curly quotes, ligatures, full-width characters, non-NFC forms, control
    characters) is kept as is and may tokenize differently from Wan; plain prompts are unaffected.
    """
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The google/umt5-xxl tokenizer from its tokenizer.json (Wan2.1 ships it in google/umt5-xxl/ beside the T5)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.json not found at {path}: the Wan2.1 release has it in "
                                "google/umt5-xxl/ next to models_t5_umt5-xxl-enc-bf16.pth, a diffusers pipeline in "
                                "tokenizer/")
    tokenizer = Tokenizer.from_file(str(path))
    for token in ("</s>", "<pad>"):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{path} has no {token} token: it is not a T5 tokenizer")
    tokenizer.no_truncation()  # tokenize() truncates, keeping room for </s>
    tokenizer.no_padding()
    return tokenizer


def tokenize(tokenizer: Tokenizer, prompts: list[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> ids [B, L], mask [B, L] (1 = real token): each prompt cleaned, cut to text_len - 1 tokens, then </s>.

    L is the longest prompt, not text_len: the extra padding Wan adds changes nothing, since padding
    keys get zero attention weight and the relative bias depends on offsets only.
    """
    eos, pad = tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<pad>")
    encodings = tokenizer.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=False)
    for k, enc in enumerate(encodings):
        if len(enc.ids) > text_len - 1:  # Wan cuts it too; the user should know the end is not seen
            warnings.warn(f"prompt {k} is {len(enc.ids)} tokens; the text encoder reads its first {text_len - 1} "
                          f"(\"...{tokenizer.decode(enc.ids[text_len - 6:text_len - 1])}\" is the last text it sees)")
    rows = [enc.ids[:text_len - 1] + [eos] for enc in encodings]
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- prompts -> embeddings

@torch.no_grad()
def encode_prompts(encoder: UMT5Encoder, tokenizer: Tokenizer, prompts: list[str],
                   text_len: int = TEXT_LEN) -> list[torch.Tensor]:
    """prompts -> one embedding [L_i, dim] per prompt (real tokens, </s> included), on the encoder's device and dtype."""
    ids, mask = tokenize(tokenizer, prompts, text_len)
    device = encoder.token_embedding.weight.device
    out = encoder(ids.to(device), mask.to(device))
    return [o[:n] for o, n in zip(out, mask.sum(dim=1).tolist())]


def encode_prompts_and_free(checkpoint: str | Path, prompts: list[str], *, device: str | torch.device,
                            out_device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                            tokenizer_json: str | Path | None = None, cfg: UMT5Config = UMT5Config()) -> list[torch.Tensor]:
    """Load umT5 on `device` ('cpu' spares the GPU), encode the prompts, free the encoder, and return
    the embeddings [L_i, 4096] on out_device (default: device). The tokenizer defaults to the one beside the
    checkpoint (umt5_files)."""
    tokenizer = load_tokenizer(tokenizer_json or umt5_files(checkpoint)[1])
    encoder = load_umt5(checkpoint, dtype=dtype, device=device, cfg=cfg)
    embeddings = [e.to(out_device or device) for e in encode_prompts(encoder, tokenizer, prompts)]
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return embeddings


def read_negative_embedding(path, text_dim: int) -> torch.Tensor:
    """A precomputed negative-prompt embedding [L, text_dim] (the CFG unconditional input): one tensor in a
    .safetensors file, or a .pt/.pth file holding a tensor or a dict with one (weights_only); leading 1s dropped."""
    content = read_state_dict(path)
    held = list(content.values()) if isinstance(content, dict) else [content]
    emb = held[0].float() if len(held) == 1 and torch.is_tensor(held[0]) else None
    while emb is not None and emb.ndim > 2 and emb.shape[0] == 1:
        emb = emb[0]
    if emb is None or emb.ndim != 2 or emb.shape[1] != text_dim:
        what = ", ".join(str(tuple(t.shape)) if torch.is_tensor(t) else type(t).__name__ for t in held)
        raise ValueError(f"negative embedding {path} holds {what or 'nothing'}; expected one tensor [L, {text_dim}]")
    return emb
