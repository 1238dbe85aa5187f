"""data.py: shards written by the writer read back exactly; corrupt samples/shards skipped and counted; resuming."""
import io
import tarfile
from itertools import islice

import pytest
import torch

from data import DataConfig, list_shards, make_loader, write_shards


def toy_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # embeddings of different lengths, as real prompts have
    return [(torch.randn(16, 3, 4, 4, generator=g), torch.randn(3 + i % 4, 8, generator=g), f"prompt {i} ✓")
            for i in range(n)]


def by_prompt(batches):
    out = {}
    for b in batches:
        for i, p in enumerate(b["prompt"]):
            out[p] = (b["latent"][i], b["embed"][i])
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_round_trip_one_epoch(tmp_path, num_workers):
    samples = toy_samples(12)
    paths = write_shards(samples, tmp_path, samples_per_shard=3)
    assert [p.name for p in paths] == [f"shard-{i:06d}.tar" for i in range(4)]
    cfg = DataConfig(path=str(tmp_path), batch_size=1, num_workers=num_workers, shuffle_buffer=4)
    got = by_prompt(islice(make_loader(cfg), 12))  # one epoch: every sample exactly once
    assert sorted(got) == sorted(p for *_, p in samples)
    for latent, embed, prompt in samples:
        assert torch.equal(got[prompt][0], latent)
        assert torch.equal(got[prompt][1][:len(embed)], embed)
        assert not got[prompt][1][len(embed):].any()  # zero padding only


def test_batches_are_shuffled_padded_and_split_by_rank(tmp_path):
    write_shards(toy_samples(16), tmp_path, samples_per_shard=4)
    cfg = DataConfig(path=str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=8, seed=3)
    ranks = [list(islice(make_loader(cfg, rank=r, ranks=2), 2)) for r in range(2)]
    for batches in ranks:
        for b in batches:
            assert b["latent"].shape == (4, 16, 3, 4, 4) and b["embed"].shape[::2] == (4, 8) and len(b["prompt"]) == 4
    seen = [{p for b in batches for p in b["prompt"]} for batches in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16  # the two ranks read disjoint halves of an epoch
    order = [p for b in ranks[0] for p in b["prompt"]]
    assert order != sorted(order, key=lambda p: int(p.split()[1]))  # shuffled
    again = [p for b in islice(make_loader(cfg, rank=0, ranks=2), 2) for p in b["prompt"]]
    assert again == order  # the seed fixes the order


def test_resume_continues_the_stream(tmp_path):
    write_shards(toy_samples(16), tmp_path, samples_per_shard=2)
    cfg = DataConfig(path=str(tmp_path), batch_size=2, num_workers=2, shuffle_buffer=3)
    full = [b["prompt"] for b in islice(make_loader(cfg), 13)]  # crosses an epoch boundary
    resumed = [b["prompt"] for b in islice(make_loader(cfg, start_batch=5), 8)]
    assert resumed == full[5:]


def test_corrupt_sample_and_shard_are_skipped_and_counted(tmp_path):
    write_shards(toy_samples(6), tmp_path, samples_per_shard=3)
    # one sample whose latent.pt is garbage, in an otherwise valid shard
    with tarfile.open(tmp_path / "shard-000002.tar", "w") as tar:
        for name, data in [("bad.latent.pt", b"not a tensor"), ("bad.embed.pt", b"x"), ("bad.prompt.txt", b"bad"),
                           ("ok.prompt.txt", b"fine")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shard-000003.tar").write_bytes(b"\x00garbage" * 100)  # not a tar at all
    cfg = DataConfig(path=str(tmp_path), batch_size=1, num_workers=0, shuffle_buffer=1)
    with pytest.warns(UserWarning, match="skipping"):
        batches = list(islice(make_loader(cfg), 12))  # two epochs of the 6 good samples
    assert sorted({p for b in batches for p in b["prompt"]}) == sorted(p for *_, p in toy_samples(6))
    # per epoch "bad" (garbage tensor) and "ok" (missing members) are bad samples and shard 3 is a bad shard; a batch
    # reports what was skipped before it, so 12 batches report all of epoch 0 and part of epoch 1
    assert 2 <= sum(b["bad_samples"] for b in batches) <= 4
    assert 1 <= sum(b["bad_shards"] for b in batches) <= 2
    clean = list(islice(make_loader(DataConfig(path=str(tmp_path / "shard-000000.tar"), num_workers=0)), 6))
    assert sum(b["bad_samples"] + b["bad_shards"] for b in clean) == 0


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no shard"):
        make_loader(DataConfig(path=str(tmp_path)))


def other_shape(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randn(3, 8, generator=g), f"odd {i}") for i in range(n)]


@pytest.mark.parametrize("odd", [(16, 5, 4, 4), (8, 3, 4, 4)])  # other frames; 8 channels
def test_samples_of_another_shape_are_skipped_and_never_become_the_reference(tmp_path, odd):
    # shard 0 sorts first and holds the odd shape: the data's shape is still the commonest one
    write_shards(other_shape(2, odd), tmp_path / "a")
    (tmp_path / "a" / "shard-000000.tar").rename(tmp_path / "shard-000000.tar")
    for k, path in enumerate(write_shards(toy_samples(9), tmp_path / "b", samples_per_shard=3)):
        path.rename(tmp_path / f"shard-{k + 1:06d}.tar")
    cfg = DataConfig(path=str(tmp_path), batch_size=1, num_workers=0, shuffle_buffer=1)
    with pytest.warns(UserWarning, match="skipping sample"):
        batches = list(islice(make_loader(cfg), 27))  # three epochs
    assert {p for b in batches for p in b["prompt"]} == {p for *_, p in toy_samples(9)}  # no good sample lost
    assert all(b["latent"].shape == (1, 16, 3, 4, 4) for b in batches)
    assert sum(b["wrong_shape"] for b in batches) >= 4 and sum(b["bad_samples"] for b in batches) == 0


def test_a_reader_whose_shards_are_all_corrupt_reads_the_others(tmp_path):
    write_shards(toy_samples(6), tmp_path, samples_per_shard=2)
    (tmp_path / "shard-000003.tar").write_bytes(b"\x00garbage" * 100)
    cfg = DataConfig(path=str(tmp_path), batch_size=1, num_workers=4, shuffle_buffer=1)
    batches = list(islice(make_loader(cfg), 20))  # 4 workers, one of them with only the corrupt shard
    assert {p for b in batches for p in b["prompt"]} == {p for *_, p in toy_samples(6)}
    assert sum(b["bad_shards"] for b in batches) >= 1


def test_no_usable_sample_anywhere_is_one_clear_error(tmp_path):
    write_shards(toy_samples(4), tmp_path, samples_per_shard=2)
    cfg = DataConfig(path=str(tmp_path), batch_size=1, num_workers=0, shape=(16, 9, 4, 4))
    with pytest.raises(ValueError, match="no usable sample"), pytest.warns(UserWarning):
        next(make_loader(cfg))


def test_i2v_conditioning_travels_with_its_samples(tmp_path):
    """y and clip members round-trip and are stacked per batch; shards without them read as before."""
    g = torch.Generator().manual_seed(2)
    samples = [(torch.randn(16, 3, 4, 4, generator=g), torch.randn(3, 8, generator=g), f"i2v {i}",
                {"y": torch.randn(20, 3, 4, 4, generator=g), "clip": torch.randn(257, 12, generator=g)})
               for i in range(4)]
    write_shards(samples, tmp_path, samples_per_shard=2)
    batches = list(islice(make_loader(DataConfig(path=str(tmp_path), batch_size=2, num_workers=0)), 2))
    assert all(b["y"].shape == (2, 20, 3, 4, 4) and b["clip"].shape == (2, 257, 12) for b in batches)
    by_name = {p: (b["y"][i], b["clip"][i]) for b in batches for i, p in enumerate(b["prompt"])}
    for _, _, prompt, cond in samples:
        assert torch.equal(by_name[prompt][0], cond["y"]) and torch.equal(by_name[prompt][1], cond["clip"])
    plain = next(make_loader(DataConfig(path=str(tmp_path / "t2v"), num_workers=0))
                 if write_shards(toy_samples(2), tmp_path / "t2v") else None)
    assert "y" not in plain and "clip" not in plain
    with pytest.raises(ValueError, match="unknown conditioning"):
        write_shards([(*samples[0][:3], {"mask": torch.zeros(1)})], tmp_path / "bad")
