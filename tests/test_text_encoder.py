"""text_encoder.py against the official umT5 encoder (golden outputs of a tiny random config in
tests/golden, produced by the official code), the full-size checkpoint's names and shapes, the strict
loader, and the tokenizer wrapper on a small tokenizer.json built here."""
import json

from safetensors.torch import load_file, save_file
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
import torch

import text_encoder
from text_encoder import (UMT5Config, UMT5Encoder, clean_prompt, encode_prompts, encode_prompts_and_free,
                          load_tokenizer, load_umt5, relative_position_bucket, tokenize)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def tiny_config(golden) -> UMT5Config:
    return UMT5Config(**json.loads((golden / "t5_tiny.json").read_text())["config"])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_golden(golden, dtype, tol):
    encoder = load_umt5(golden / "t5_tiny.weights.safetensors", cfg=tiny_config(golden), dtype=dtype)
    io = load_file(golden / "t5_tiny.io.safetensors")
    assert rel_err(encoder(io["ids"], io["mask"]), io["out"]) < tol


def test_padding_length_does_not_matter(golden):
    """Padding to the longest prompt (ours) instead of to text_len (Wan's) leaves the real tokens unchanged."""
    encoder = load_umt5(golden / "t5_tiny.weights.safetensors", cfg=tiny_config(golden), dtype=torch.float32)
    io = load_file(golden / "t5_tiny.io.safetensors")
    lengths = io["mask"].sum(dim=1).tolist()
    longest = max(lengths)
    out = encoder(io["ids"][:, :longest], io["mask"][:, :longest])
    for i, n in enumerate(lengths):
        assert rel_err(out[i, :n], io["out"][i, :n]) < 1e-5
    alone = encoder(io["ids"][:1, :lengths[0]], io["mask"][:1, :lengths[0]])
    assert rel_err(alone[0], io["out"][0, :lengths[0]]) < 1e-5


def test_full_size_names_and_shapes(golden):
    with torch.device("meta"):
        encoder = UMT5Encoder(UMT5Config())
    expected = json.loads((golden / "checkpoint_keys.json").read_text())["umt5-xxl-encoder"]
    assert {k: list(v.shape) for k, v in encoder.state_dict().items()} == expected


def test_relative_position_buckets():
    rel = torch.tensor([0, -1, 1, -7, 7, -8, -12, 12, -127, -128, -1000, 1000])
    # 16 buckets per direction (keys after the query: +16); 0..7 exact, then log-spaced up to 128.
    expected = [0, 1, 17, 7, 23, 8, 9, 25, 15, 15, 15, 31]
    assert relative_position_bucket(rel, 32).tolist() == expected


def test_strict_loader_round_trip(golden, tmp_path):
    cfg = tiny_config(golden)
    state = load_file(golden / "t5_tiny.weights.safetensors")
    torch.save({k: v.bfloat16() for k, v in state.items()}, tmp_path / "t5.pth")
    encoder = load_umt5(tmp_path / "t5.pth", cfg=cfg)
    assert encoder.blocks[1].attn.q.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(encoder.state_dict()[k], v.bfloat16()) for k, v in state.items())

    missing = {k: v for k, v in state.items() if k != "blocks.1.pos_embedding.embedding.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"1 missing: blocks\.1\.pos_embedding\.embedding\.weight"):
        load_umt5(tmp_path / "missing.safetensors", cfg=cfg)

    save_file(dict(state, **{"norm.weight": torch.ones(65)}), tmp_path / "misshaped.safetensors")
    with pytest.raises(ValueError, match=r"1 mis-shaped: norm\.weight \(checkpoint \(65,\), model \(64,\)\)"):
        load_umt5(tmp_path / "misshaped.safetensors", cfg=cfg)

    with pytest.raises(ValueError, match="float16"):
        load_umt5(tmp_path / "t5.pth", cfg=cfg, dtype=torch.float16)


# ----------------------------------------------------------------------------- tokenizer

WORDS = ["a", "cat", "sits", "on", "the", "mat", "&", "<"]


@pytest.fixture
def tokenizer_json(tmp_path):
    """A word-level stand-in for google/umt5-xxl's tokenizer.json, with the same special tokens
    (<pad> 0, </s> 1, <unk> 2) and, like the real one, a post-processor that appends </s>."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path / "google" / "umt5-xxl" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    tok.save(str(path))
    return path


def ids_of(*words):
    return [3 + WORDS.index(w) for w in words]


@pytest.mark.skipif(text_encoder.ftfy is not None, reason="ftfy changes control characters")
def test_clean_prompt():
    assert clean_prompt("  a\tcat\n\n sits\u3000on&amp;amp;the mat \u00a0") == "a cat sits on&the mat"
    assert clean_prompt("&amp;lt;") == "<"
    # Wan's `regex` \s is Unicode White_Space, without the separators \x1c-\x1f that Python's re adds.
    assert clean_prompt("a\x1cb  c") == "a\x1cb c"


def test_tokenize_ids_eos_padding_truncation(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    with pytest.warns(UserWarning, match="prompt 2 is 20 tokens; the text encoder reads its first 5"):
        ids, mask = tokenize(tok, ["a  cat\nsits", "the &amp;amp; mat dog", "on " * 20], text_len=6)
    eos, pad, unk = 1, 0, 2
    assert ids.tolist() == [ids_of("a", "cat", "sits") + [eos, pad, pad],
                            ids_of("the", "&", "mat") + [unk, eos, pad],
                            ids_of("on") * 5 + [eos]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1] * 6]
    ids, mask = tokenize(tok, [""])
    assert ids.tolist() == [[eos]] and mask.tolist() == [[1]]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        load_tokenizer(tmp_path / "tokenizer.json")
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="no </s> token"):
        load_tokenizer(tmp_path / "bad.json")


def test_encode_prompts(golden, tokenizer_json):
    cfg = tiny_config(golden)
    checkpoint = tokenizer_json.parents[2] / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(load_file(golden / "t5_tiny.weights.safetensors"), checkpoint)
    encoder = load_umt5(checkpoint, cfg=cfg, dtype=torch.float32)
    tok = load_tokenizer(tokenizer_json)
    prompts = ["a cat sits on the mat", "the mat"]
    embeddings = encode_prompts(encoder, tok, prompts)
    assert [tuple(e.shape) for e in embeddings] == [(7, cfg.dim), (3, cfg.dim)]
    # Each prompt's real tokens do not depend on the batch it is encoded with.
    ids, mask = tokenize(tok, prompts[1:])
    assert torch.allclose(embeddings[1], encoder(ids, mask)[0], atol=1e-5)
    # The one-shot path finds the tokenizer beside the checkpoint and gives the same embeddings.
    once = encode_prompts_and_free(checkpoint, prompts, device="cpu", dtype=torch.float32, cfg=cfg)
    assert all(torch.equal(a, b) for a, b in zip(once, embeddings))


def test_read_negative_embedding(tmp_path):
    """The one reader of a precomputed negative embedding: safetensors or .pt, leading singleton dims dropped, and
    one clear error for what is not a single [L, dim] tensor."""
    emb = torch.randn(5, 8)
    save_file({"neg": emb}, str(tmp_path / "neg.safetensors"))
    torch.save(emb[None], tmp_path / "neg.pt")
    torch.save({"a": emb, "b": emb}, tmp_path / "two.pt")
    for name in ("neg.safetensors", "neg.pt"):
        assert torch.equal(text_encoder.read_negative_embedding(tmp_path / name, 8), emb)
    with pytest.raises(ValueError, match=r"holds \(5, 8\), \(5, 8\); expected one tensor"):
        text_encoder.read_negative_embedding(tmp_path / "two.pt", 8)
    with pytest.raises(ValueError, match=r"neg.pt holds \(1, 5, 8\); expected one tensor \[L, 16\]"):
        text_encoder.read_negative_embedding(tmp_path / "neg.pt", 16)
    torch.save({"neg": [1.0, 2.0]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt holds list; expected one tensor \[L, 8\]"):
        text_encoder.read_negative_embedding(tmp_path / "list.pt", 8)
