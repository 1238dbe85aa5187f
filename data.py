"""Training data: webdataset shards of precomputed Wan latents and text embeddings.

The public Wan synthetic-latent format is a folder of `shard*.tar` files; sample `KEY` is three members:

    KEY.latent.pt   [16, T, H, W]  VAE latents (normalised), saved with torch.save
    KEY.embed.pt    [L, 4096]      umT5 text embedding of the prompt (L ≤ 512 real tokens)
    KEY.prompt.txt  the prompt, utf-8

and, for image-to-video data (an extension: readers that do not know it ignore the members):

    KEY.y.pt        [20, T, H, W]  the I2V conditioning: first-frame mask (4 channels) and latents (vae.image_condition)
    KEY.clip.pt     [257, 1280]    the image's CLIP tokens (Wan2.1 I2V only)

`write_shards` builds such shards (the toy world writes real ones, so the toy preset trains through this loader).
`make_loader` streams batches forever: each epoch shuffles the shard list with the seed, deals the shards to
(data-parallel rank, worker) readers, and shuffles samples in a small buffer. Every rank of a context-parallel group
must get the same batches, so the loader is split by the *data-parallel* rank, never by the global rank.
Tensors are read with `torch.load(weights_only=True)`. A run never stops for bad data: a corrupt sample or shard, or a
sample of another shape than the run's (`DataConfig.shape`, else `data_shape`: the commonest among the first samples,
the same on every rank), is skipped with a warning and counted in the batch by reason (`bad_samples`, `wrong_shape`,
`bad_shards`); a reader whose own shards hold nothing usable that epoch reads the other readers' shards instead.

Resuming: batch k of a rank comes from reader k mod num_workers (PyTorch's DataLoader takes workers in turn and every
reader streams forever), so `make_loader(..., start_batch=n)` lets each reader drop exactly its share of the first n
batches and the stream continues where it stopped.
"""
import collections
import io
import math
import random
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds


@dataclass
class DataConfig:
    path: str = ""              # a folder of shard*.tar files, or one .tar file
    batch_size: int = 1         # per data-parallel rank
    num_workers: int = 2        # reader processes per rank (0: read in the training process)
    shuffle_buffer: int = 64    # samples held for shuffling inside a reader
    seed: int = 0
    shape: tuple[int, ...] | None = None  # the latent shape [C,T,H,W] a sample must have (None: data_shape's)
    embed_dim: int | None = None  # the width D an embedding must have (None: any)
    needs: tuple[str, ...] = ()  # the conditioning a sample must carry (I2V: "y", Wan2.1 I2V also "clip")


# ----------------------------------------------------------------------------------------------------------------
# Writing

def _tensor_bytes(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(x.detach().cpu().contiguous(), buf)
    return buf.getvalue()


CONDITIONING = ("y", "clip")  # the optional per-sample tensors of I2V data


def write_shards(samples, out_dir, samples_per_shard: int = 256) -> list[Path]:
    """Write (latent [C,T,H,W], embed [L,D], prompt str[, conditioning {"y": [20,T,H,W], "clip": [257,1280]}])
    samples as out_dir/shard-000000.tar, ... Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, writer = [], None
    for i, (latent, embed, prompt, *rest) in enumerate(samples):
        conditioning = rest[0] if rest else {}
        if set(conditioning) - set(CONDITIONING):
            raise ValueError(f"sample {i}: unknown conditioning {sorted(set(conditioning) - set(CONDITIONING))}")
        if latent.ndim != 4 or embed.ndim != 2:
            raise ValueError(f"sample {i}: latent must be [C,T,H,W] and embed [L,D], got {tuple(latent.shape)} "
                             f"and {tuple(embed.shape)}")
        if i % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(out_dir / f"shard-{len(paths):06d}.tar")
            writer = wds.TarWriter(str(paths[-1]), encoder=False)
        writer.write({"__key__": f"{i:09d}", "latent.pt": _tensor_bytes(latent), "embed.pt": _tensor_bytes(embed),
                      "prompt.txt": prompt.encode("utf-8"),
                      **{f"{name}.pt": _tensor_bytes(x) for name, x in conditioning.items()}})
    if writer is not None:
        writer.close()
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Reading

def list_shards(path) -> list[str]:
    """The sorted shard*.tar files of a folder, or [path] for one .tar file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist: pass --data a folder of shard*.tar files")
    shards = sorted(path.glob("shard*.tar")) if path.is_dir() else [path]
    if not shards or shards[0].suffix != ".tar":
        raise FileNotFoundError(f"no shard*.tar files in {path}: pass --data a folder of webdataset shards")
    return [str(s) for s in shards]


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> {latent [C,T,H,W] fp32, embed [L,D] fp32, prompt, and y / clip fp32 where the sample has
    them}. Raises ValueError on a bad sample."""
    missing = {"latent.pt", "embed.pt", "prompt.txt"} - sample.keys()
    if missing:
        raise ValueError(f"missing members {sorted(missing)}")
    latent = torch.load(io.BytesIO(sample["latent.pt"]), weights_only=True)
    embed = torch.load(io.BytesIO(sample["embed.pt"]), weights_only=True)
    if not (torch.is_tensor(latent) and latent.ndim == 4 and torch.is_tensor(embed) and embed.ndim == 2):
        raise ValueError("latent.pt must hold a [C,T,H,W] tensor and embed.pt an [L,D] tensor")
    if not (latent.isfinite().all() and embed.isfinite().all()):
        raise ValueError("non-finite values")
    out = dict(latent=latent.float(), embed=embed.float(), prompt=sample["prompt.txt"].decode("utf-8"))
    for name in CONDITIONING:
        if f"{name}.pt" in sample:
            x = torch.load(io.BytesIO(sample[f"{name}.pt"]), weights_only=True)
            if not (torch.is_tensor(x) and x.isfinite().all()):
                raise ValueError(f"{name}.pt must hold a finite tensor")
            out[name] = x.float()
    return out


def collate(samples: list[dict]) -> dict:
    """Stack latents [B,C,T,H,W] (and y, clip where every sample has them); zero-pad embeddings to the longest
    [B,L,D] (the model pads with zeros too)."""
    L = max(s["embed"].shape[0] for s in samples)
    return dict(latent=torch.stack([s["latent"] for s in samples]),
                embed=torch.stack([F.pad(s["embed"], (0, 0, 0, L - s["embed"].shape[0])) for s in samples]),
                prompt=[s["prompt"] for s in samples],
                **{name: torch.stack([s[name] for s in samples]) for name in CONDITIONING
                   if all(name in s for s in samples)})


def data_shape(shards, channels: int | None = None, n: int = 16) -> tuple[int, ...]:
    """The data's latent shape [C,T,H,W]: the commonest among the first n readable samples (with `channels` channels,
    when given) of the shards in their sorted order. Every rank reads the same files, so every rank agrees."""
    counts = collections.Counter()
    for raw in wds.tarfile_samples(({"url": s} for s in shards), handler=lambda exn: True):
        try:
            shape = tuple(decode_sample(raw)["latent"].shape)
        except Exception:
            continue
        if channels is None or shape[0] == channels:
            counts[shape] += 1
            if counts.total() == n:
                break
    if not counts:
        raise ValueError(f"no readable sample{f' with {channels} latent channels' if channels else ''} in "
                         f"{len(shards)} shards ({shards[0]}, ...): check --data")
    return counts.most_common(1)[0][0]


def reader_batches(shards, cfg: DataConfig, rank: int, ranks: int, worker: int, workers: int, skip: int = 0):
    """The endless batch stream of one reader (rank, worker), the first `skip` batches dropped.

    Each batch also carries bad_samples / wrong_shape / bad_shards: what this reader skipped since its previous
    batch. cfg.shape must be set (make_loader sets it)."""
    readers = ranks * workers
    if len(shards) < readers:
        raise ValueError(f"{len(shards)} shards cannot feed {ranks} ranks × {workers} workers: write more shards "
                         f"or lower num_workers")
    bad = dict(bad_samples=0, wrong_shape=0, bad_shards=0)

    def shard_error(exn):  # webdataset calls this for an unreadable tar; returning True moves on to the next shard
        warnings.warn(f"skipping unreadable shard: {exn}")
        bad["bad_shards"] += 1
        return True

    def usable(raw_sample):  # the decoded sample, or None (counted by reason)
        where = f"sample {raw_sample.get('__key__')} of {raw_sample.get('__url__')}"
        try:
            sample = decode_sample(raw_sample)
        except Exception as exn:
            warnings.warn(f"skipping corrupt {where}: {exn}")
            bad["bad_samples"] += 1
            return None
        latent, embed = sample["latent"].shape, sample["embed"].shape
        if tuple(latent) != tuple(cfg.shape) or cfg.embed_dim not in (None, embed[1]):
            warnings.warn(f"skipping {where}: latent {tuple(latent)}, embedding width {embed[1]}; the run's data "
                          f"is {tuple(cfg.shape)}" + (f", width {cfg.embed_dim}" if cfg.embed_dim else ""))
            bad["wrong_shape"] += 1
            return None
        lacking = [name for name in cfg.needs if name not in sample or
                   (name == "y" and tuple(sample["y"].shape[1:]) != tuple(latent[1:]))]
        if lacking:
            warnings.warn(f"skipping {where}: no fitting {', '.join(f'{n}.pt' for n in lacking)} (the run distils an "
                          f"image-to-video model)")
            bad["wrong_shape"] += 1
            return None
        return sample

    batch, done = [], 0
    for epoch in range(2**62):
        order = random.Random(f"{cfg.seed}-{epoch}").sample(shards, len(shards))  # the same on every reader
        mine = order[rank * workers + worker::readers]
        rng = random.Random(f"{cfg.seed}-{epoch}-{rank}-{worker}")
        # this reader's shards; if none of them held a usable sample, the other readers' (never a stop for bad data)
        for attempt in (mine, [s for s in order if s not in mine]):
            good = 0
            raw = wds.tarfile_samples(({"url": s} for s in attempt), handler=shard_error)
            for sample in filter(None, map(usable, _shuffled(raw, cfg.shuffle_buffer, rng))):
                good += 1
                batch.append(sample)
                if len(batch) == cfg.batch_size:
                    if done >= skip:
                        yield {**collate(batch), **bad}
                        bad.update(bad_samples=0, wrong_shape=0, bad_shards=0)
                    batch, done = [], done + 1
            if good:
                break
            if attempt is mine:
                warnings.warn(f"reader {rank}.{worker}: no usable sample in its shards {attempt} of epoch "
                              f"{epoch}; reading the others'")
        else:
            needs = f" with {', '.join(f'{n}.pt' for n in cfg.needs)}" if cfg.needs else ""
            raise ValueError(f"no usable sample (latent {tuple(cfg.shape)}{needs}) in any of the {len(shards)} "
                             f"shards of the data: check --data" + (" (I2V shards: sample.py --mode teacher --image "
                                                                    "... --shard-dir)" if needs else ""))


def _shuffled(samples, size, rng):
    """Shuffle a stream through a buffer of `size` samples."""
    buffer = []
    for s in samples:
        buffer.append(s)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, cfg, shards, rank, ranks, start_batch):
        self.shards, self.cfg, self.rank, self.ranks, self.start_batch = shards, cfg, rank, ranks, start_batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = 1 if info is None else info.num_workers
        # the loader takes workers in turn from worker 0, and batch start_batch belongs to reader start_batch mod workers
        worker = (0 if info is None else info.id + self.start_batch) % workers
        skip = math.ceil(max(self.start_batch - worker, 0) / workers)  # this worker's share of batches 0..start-1
        return reader_batches(self.shards, self.cfg, self.rank, self.ranks, worker, workers, skip)


def make_loader(cfg: DataConfig, rank: int = 0, ranks: int = 1, start_batch: int = 0):
    """An endless iterator of batches {latent [B,C,T,H,W], embed [B,L,D], prompt [B], bad_samples, wrong_shape,
    bad_shards} for data-parallel rank `rank` of `ranks` ranks, starting after the first `start_batch` batches of
    that rank. Without cfg.shape, the data's commonest shape (data_shape) is the one kept."""
    shards = list_shards(cfg.path)
    if cfg.shape is None:
        cfg = dataclasses.replace(cfg, shape=data_shape(shards))
    return iter(torch.utils.data.DataLoader(_Stream(cfg, shards, rank, ranks, start_batch), batch_size=None,
                                            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0))
