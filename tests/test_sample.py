"""sample.py end to end on tiny random nets saved to disk (so the CLI's real loading path runs): reproducible seeds,
the teacher solvers and CFG inputs, checkpoint layouts, shards in data.py's format, the toy mode's mp4, user errors,
and UniPC's accuracy on a Gaussian whose flow-matching velocity is exact."""
import dataclasses
import functools
import json
import math
import tarfile

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import data
import sample
from checkpoint import save_checkpoint
from model import CLIP_DIM, CONFIGS, WanModel, load_checkpoint
from sample import Config, Sampler, Streaming, generate_latents, main
from samplers import flow_times, sample_euler, sample_unipc
from image_encoder import CLIPConfig, CLIPVision
from text_encoder import UMT5Config, UMT5Encoder, encode_prompts, load_tokenizer, load_umt5
from toy import TOY_DIT, ToyConfig, eval_prompts, exact_velocity, make_world, metrics
from vae import VAEConfig, WanVAE

T5 = UMT5Config(vocab=16, dim=CONFIGS["t2v-tiny"].text_dim, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=1)
VAE = VAEConfig(dim=8)
WORDS = ["a", "cat", "dog", "runs", "sits", "bad", "blurry"]


def randomise(module: torch.nn.Module, seed: int):
    """Every weight random (the official init zeroes the DiT's output layer, which would make v ≡ 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0  # norm gains around 1
            p.copy_(scale + 0.1 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny T2V DiT, VAE and umT5 (+ a word-level tokenizer.json in the Wan layout), saved as on disk."""
    root = tmp_path_factory.mktemp("nets")
    save_checkpoint(randomise(WanModel(CONFIGS["t2v-tiny"]), 0), root / "dit.safetensors")
    save_file(randomise(WanVAE(VAE), 1).state_dict(), str(root / "vae.safetensors"))
    save_file({k: v.contiguous() for k, v in randomise(UMT5Encoder(T5), 2).state_dict().items()},
              str(root / "t5.safetensors"))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    tok.save(str(root / "google" / "umt5-xxl" / "tokenizer.json"))
    return root


def tiny(files, out, **kw) -> Config:
    sampler = Sampler(**{k: kw.pop(k) for k in list(kw) if k in Sampler.__dataclass_fields__})
    fields = dict(dit_path=files / "dit.safetensors", vae_path=files / "vae.safetensors", t5_path=files / "t5.safetensors",
                  model="t2v-tiny", prompt="a cat runs", resolution="32x32", num_frames=5, save_path=out,
                  shard_dir=out / "shards", dtype="float32", device="cpu", vae_cfg=VAE, t5_cfg=T5)
    return Config(**{**fields, **kw}, sampler=sampler)


def shard_samples(folder):
    """Every sample of the shards in a folder, decoded by data.py's reader."""
    out = []
    for shard in data.list_shards(folder):
        with tarfile.open(shard) as tar:
            members = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        out += [data.decode_sample(members[k]) for k in sorted(members)]
    return out


def mp4s(folder):
    return [torch.from_numpy(np.stack(imageio.mimread(p))) for p in sorted(folder.glob("*.mp4"))]


def test_rcm_same_seed_same_video(files, tmp_path):
    main(tiny(files, tmp_path / "a", num_samples=2, seed=3))
    main(tiny(files, tmp_path / "b", num_samples=2, seed=3))
    main(tiny(files, tmp_path / "c", num_samples=1, seed=4))
    a, b, c = (shard_samples(tmp_path / d / "shards") for d in "abc")
    assert a[0]["latent"].shape == (16, 2, 4, 4) and a[0]["embed"].shape == (4, 48) and a[0]["prompt"] == "a cat runs"
    assert torch.isfinite(a[0]["latent"]).all()
    assert all(torch.equal(x["latent"], y["latent"]) for x, y in zip(a, b))
    assert not torch.allclose(a[0]["latent"], a[1]["latent"])   # video k uses seed + k
    assert torch.equal(a[1]["latent"], c[0]["latent"])          # ... so seed 3's second video is seed 4's first
    va, vb = mp4s(tmp_path / "a"), mp4s(tmp_path / "b")
    assert len(va) == 2 and va[0].shape == (5, 32, 32, 3)
    assert all(torch.equal(x, y) for x, y in zip(va, vb)) and not torch.equal(va[0], va[1])


def test_teacher_solvers_and_negative_embedding(files, tmp_path):
    """UniPC and Euler (3 steps, CFG) both run the CLI; a precomputed negative embedding equals the negative text."""
    tokenizer = load_tokenizer(files / "google" / "umt5-xxl" / "tokenizer.json")
    neg = encode_prompts(load_umt5(files / "t5.safetensors", cfg=T5), tokenizer, ["bad blurry"])[0]
    torch.save(neg, tmp_path / "neg.pt")
    runs = {"text": tiny(files, tmp_path / "text", mode="teacher", steps=3, negative_prompt="bad blurry", videos=False),
            "embed": tiny(files, tmp_path / "embed", mode="teacher", steps=3, neg_embed=tmp_path / "neg.pt",
                          videos=False),
            "other": tiny(files, tmp_path / "other", mode="teacher", steps=3, negative_prompt="dog", videos=False),
            "euler": tiny(files, tmp_path / "euler", mode="teacher", steps=3, solver="euler", negative_prompt="bad blurry",
                          videos=False)}
    z = {}
    for name, cfg in runs.items():
        main(cfg)
        z[name] = shard_samples(cfg.shard_dir)[0]["latent"]
        assert not list(cfg.save_path.glob("*.mp4"))
    assert torch.allclose(z["text"], z["embed"], atol=1e-5)
    assert not torch.allclose(z["text"], z["other"], atol=1e-3)   # the negative prompt matters under CFG
    assert not torch.allclose(z["text"], z["euler"], atol=1e-3)


def test_prompts_file(files, tmp_path):
    (tmp_path / "prompts.txt").write_text("a dog sits\n\n  a cat  \n", encoding="utf-8")
    main(tiny(files, tmp_path, prompts_file=tmp_path / "prompts.txt", steps=1))
    samples = shard_samples(tmp_path / "shards")
    assert [s["prompt"] for s in samples] == ["a dog sits", "a cat"]
    assert [len(s["embed"]) for s in samples] == [4, 3]   # real tokens and </s>
    assert [p.name for p in sorted(tmp_path.glob("*.mp4"))] == ["0000_a_dog_sits_seed0.mp4", "0001_a_cat_seed1.mp4"]


def test_rcm_checkpoint_layout(files, tmp_path):
    """An rCM-style .pt (net_ema. prefix, bf16, patch embedding stored as a Linear) samples like the safetensors."""
    net = WanModel(CONFIGS["t2v-tiny"])
    load_checkpoint(net, files / "dit.safetensors")
    sd = {f"net_ema.{k}": v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    sd["net_ema.patch_embedding.weight"] = sd["net_ema.patch_embedding.weight"].flatten(1)
    torch.save(sd, tmp_path / "student.pt")
    main(tiny(files, tmp_path / "pt", dit_path=tmp_path / "student.pt", dtype="bfloat16", videos=False))
    main(tiny(files, tmp_path / "st", dtype="bfloat16", videos=False))
    assert torch.equal(shard_samples(tmp_path / "pt" / "shards")[0]["latent"],
                       shard_samples(tmp_path / "st" / "shards")[0]["latent"])


def test_toy_mode_writes_mp4(tmp_path):
    world = ToyConfig()
    save_checkpoint(randomise(WanModel(TOY_DIT), 5), tmp_path / "toy.safetensors")
    cfg = Config(dit_path=tmp_path / "toy.safetensors", toy=True, num_samples=2, save_path=tmp_path, device="cpu",
                 dtype="float32", sampler=Sampler(steps=2))   # weights without stored settings: the default world
    main(cfg)
    (path,) = tmp_path.glob("*.mp4")
    frames = imageio.mimread(path)
    assert len(frames) == world.shape[1]
    assert frames[0].shape == (world.prompts * world.shape[2] * 8, 2 * world.shape[3] * 8, 3)


def test_teacher_with_the_exact_toy_velocity():
    """generate_latents' teacher path (UniPC, CFG with [B, L, D] contexts) on the toy world's exact velocity lands its
    samples on the modes of the right prompt."""
    world = make_world(ToyConfig())
    prompt, context = eval_prompts(world, 16)
    negative = world.negative.expand(len(prompt), -1, -1)
    x = generate_latents(functools.partial(exact_velocity, world), context, negative, world.cfg.shape,
                         Sampler(mode="teacher", steps=10, guidance=3.0), torch.Generator().manual_seed(0))
    m = metrics(world, x, prompt)
    assert m["precision"] >= 0.95 and m["wrong_prompt"] <= 0.02


@pytest.mark.parametrize("change, message", [
    (dict(num_frames=80), "not 4k\\+1"),
    (dict(resolution="830x480"), "multiples of 16"),
    (dict(resolution="big"), "WIDTHxHEIGHT"),
    (dict(steps=5), "at most 4 steps"),
    (dict(model="i2v-14B"), "text-to-video"),
    (dict(prompt=""), "--prompt"),
    (dict(sigma_max=0.0), "--sigma-max must be positive"),
    (dict(mid_t=(1.0, 1.4, 0.5)), "decrease strictly"),
    (dict(mode="teacher", shift=0.0), "--shift must be positive"),
    (dict(vae_frames_per_call=0), "--vae-frames-per-call must be at least 1"),
])
def test_user_errors(files, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        main(tiny(files, tmp_path, **change))


def test_missing_files_are_named(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/Wan2.1_VAE.pth.*--vae-path"):
        main(tiny(files, tmp_path, vae_path=tmp_path / "nowhere" / "Wan2.1_VAE.pth"))
    (tmp_path / "t5").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "t5" / "t5.safetensors"))
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl/tokenizer.json"):
        main(tiny(files, tmp_path, t5_path=tmp_path / "t5" / "t5.safetensors"))


def test_unipc_beats_euler_on_a_gaussian():
    """x0 ~ N(μ, σ0²) in 1-D: v(x, s) = (x − E[x0 | x_s])/s is exact and the ODE maps noise z at time s to
    μ + σ0·(z − (1 − s)μ)/√v_s, v_s = (1 − s)²σ0² + s². With 10 steps UniPC (order 2 + UniC) must be far closer to
    that than Euler. Each is compared from its own start (UniPC's grid starts at s = 0.999, as Wan's)."""
    mu, sigma0 = 2.0, 0.5

    def velocity(x, timestep):
        s = (timestep.double() / 1000).view(-1, 1, 1, 1, 1)
        v_s = (1 - s) ** 2 * sigma0**2 + s**2
        x0 = mu + (1 - s) * sigma0**2 / v_s * (x.double() - (1 - s) * mu)
        return ((x.double() - x0) / s).float()

    def exact(z, s):
        return mu + sigma0 * (z.double() - (1 - s) * mu) / math.sqrt((1 - s) ** 2 * sigma0**2 + s**2)

    z = torch.randn(256, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    net = lambda x, timestep, context: velocity(x, timestep)
    err_unipc = (sample_unipc(net, z, None, flow_times(10, 1.0, 0.999)) - exact(z, 0.999)).abs().max().item()
    err_euler = (sample_euler(net, z, None, flow_times(10, 1.0)) - exact(z, 1.0)).abs().max().item()
    assert err_unipc < 0.03 and err_unipc < err_euler / 10
    err_unipc_50 = (sample_unipc(net, z, None, flow_times(50, 5.0, 0.999)) - exact(z, 0.999)).abs().max().item()
    assert err_unipc_50 < 0.01


def test_defaults_come_from_the_checkpoint_settings(tmp_path, capsys):
    """Weights saved with sampling settings: unset flags take them (and the first line says so), flags override them,
    and the toy world, architecture, sample count and seed travel too."""
    world = ToyConfig(prompts=2, weights=(0.7, 0.3), shape=(16, 2, 4, 4))
    settings = {"method": "rcm", "dit": dataclasses.asdict(TOY_DIT), "sigma_max": 5.0, "mid_t": [1.0],
                "eval_steps": [1, 2], "dtype": "float32",
                "toy": {"world": dataclasses.asdict(world), "num_samples": 3, "seed": 7}}
    save_checkpoint(randomise(WanModel(TOY_DIT), 5), tmp_path / "toy.safetensors", settings)
    run = lambda **kw: main(Config(dit_path=tmp_path / "toy.safetensors", toy=True, save_path=tmp_path / "out",
                                   device="cpu", **kw))
    stored = run()
    first = capsys.readouterr().out.splitlines()[0]
    assert "from its stored settings: sigma_max, mid_t" in first and "architecture" in first
    assert set(stored) == {"student-1", "student-2"}                     # the run's evaluated step counts
    grids = sorted(p.name for p in (tmp_path / "out").glob("*.mp4"))
    assert grids == ["toy_student-1_seed7.mp4", "toy_student-2_seed7.mp4"]
    frames = lambda: np.stack(imageio.mimread(tmp_path / "out" / grids[0]))
    stored_frames = frames()
    assert stored_frames.shape[1:] == (2 * 4 * 8, 3 * 4 * 8, 3)         # rows = prompts, columns = samples
    assert json.dumps(run(num_samples=3, seed=7, dtype="float32")) == json.dumps(stored)  # the stored values as flags
    assert np.array_equal(frames(), stored_frames)
    run(sampler=Sampler(sigma_max=3.0))                                 # a flag overrides the stored value
    assert "from its stored settings: mid_t," in capsys.readouterr().out.splitlines()[-5]
    assert not np.array_equal(frames(), stored_frames)


CLIP = CLIPConfig(image_size=28, patch_size=7, dim=1280, mlp_ratio=1, out_dim=8, num_heads=4, num_layers=1)


@pytest.fixture(scope="module")
def i2v_files(files):
    """A tiny Wan2.1 I2V DiT (CLIP tokens), a CLIP image tower of the width the DiT expects, a tiny Wan2.2-style
    two-expert folder (no CLIP), and a 40x56 RGBA image."""
    save_checkpoint(randomise(WanModel(CONFIGS["i2v-tiny"]), 7), files / "i2v.safetensors")
    save_file({f"visual.{k}": v.contiguous() for k, v in randomise(CLIPVision(CLIP), 8).state_dict().items()},
              str(files / "clip.safetensors"))
    for seed, name in ((9, "high_noise_model"), (10, "low_noise_model")):
        (files / "a14b" / name).mkdir(parents=True, exist_ok=True)
        save_checkpoint(randomise(WanModel(dataclasses.replace(CONFIGS["i2v-tiny"], clip=False)), seed),
                        files / "a14b" / name / "diffusion_pytorch_model.safetensors")
    g = np.random.default_rng(0)
    imageio.imwrite(files / "image.png", g.integers(0, 255, (40, 56, 4), dtype=np.uint8))
    return files


def conditioning(files, frames=5):
    """The VAE and the conditioning y of the test image at 32x32, as sample.py builds them."""
    from vae import image_condition, load_vae
    vae = load_vae(files / "vae.safetensors", cfg=VAE)
    image = torch.from_numpy(np.asarray(imageio.imread(files / "image.png"))[..., :3]).permute(2, 0, 1).float()
    resized = torch.nn.functional.interpolate(image[None] / 127.5 - 1, size=(32, 32), mode="bicubic",
                                              align_corners=False)[0]
    return vae, image_condition(vae, resized.clamp(-1, 1), frames)


def assert_first_frame_is(folder, vae, y):
    """The run's one mp4 opens with the decoded conditioning image (up to the mp4's lossy coding)."""
    (video,) = mp4s(folder)
    first = ((vae.decode(y[:, 4:, :1]).clamp(-1, 1) + 1) * 127.5).round()[0, :, 0].permute(1, 2, 0)
    assert (video[0].float() - first).abs().mean() < 6


def test_image_to_video_wan21_with_clip(i2v_files, tmp_path):
    """Wan2.1 I2V: y and the CLIP tokens reach the DiT (rCM and teacher with CFG), the image's latent frame is the
    video's first, and the mp4's first frame is the decoded conditioning image."""
    f = i2v_files
    kw = dict(model="i2v-tiny", dit_path=f / "i2v.safetensors", image=f / "image.png", clip_path=f / "clip.safetensors",
              clip_cfg=CLIP, num_frames=5)
    for mode in ("rcm", "teacher"):
        main(tiny(f, tmp_path / mode, mode=mode, steps=2, **kw))
    vae, y = conditioning(f)
    for mode in ("rcm", "teacher"):
        (sample,) = shard_samples(tmp_path / mode / "shards")
        z = sample["latent"]
        assert torch.allclose(z[:, :1], y[0, 4:, :1], atol=1e-6)       # the image's latent frame comes first
        # the shards carry the conditioning an I2V trainer needs: y and the CLIP tokens
        assert torch.allclose(sample["y"], y[0].float(), atol=1e-6) and sample["clip"].shape[1] == CLIP_DIM
        assert_first_frame_is(tmp_path / mode, vae, y)
    assert not torch.allclose(*[shard_samples(tmp_path / m / "shards")[0]["latent"][:, 1:] for m in ("rcm", "teacher")])


def test_image_to_video_two_experts_route_every_call(i2v_files, tmp_path, monkeypatch):
    """A Wan2.2-style A14B folder (high_noise_model/, low_noise_model/): every DiT call goes to the expert its time
    asks for (the test checks each call against the boundary), and a causal T2V student prefills the image frame."""
    import model as wan
    import sample
    f = i2v_files
    monkeypatch.setitem(wan.CONFIGS, "i2v-A14B", dataclasses.replace(CONFIGS["i2v-tiny"], clip=False))
    calls, loaded = [], {}
    original_forward, original_load = wan.WanModel.forward, sample.load_two_experts

    def spy(self, x, t, context, **kw):
        calls.append((self, float(t.reshape(len(t), -1).amax())))
        return original_forward(self, x, t, context, **kw)

    def load(*args, **kwargs):
        loaded["net"] = original_load(*args, **kwargs)
        return loaded["net"]
    monkeypatch.setattr(wan.WanModel, "forward", spy)
    monkeypatch.setattr(sample, "load_two_experts", load)
    main(tiny(f, tmp_path / "a14b", model="i2v-A14B", dit_path=f / "a14b", image=f / "image.png", num_frames=5,
              mode="teacher", steps=6, offload=True))
    net = loaded["net"]
    assert {self is net.high for self, _ in calls} == {True, False}
    assert all((self is net.high) == (t >= 900) for self, t in calls)
    assert all(self in (net.high, net.low) for self, _ in calls)
    assert_first_frame_is(tmp_path / "a14b", *conditioning(f))
    with pytest.raises(FileNotFoundError, match="high_noise_model"):
        main(tiny(f, tmp_path / "x", model="i2v-A14B", dit_path=f, image=f / "image.png", num_frames=5))


def test_causal_image_to_video_prefills_the_image_frame(i2v_files, tmp_path):
    """--causal --image with a T2V causal student: the image's latent frame is the first chunk, streamed after it."""
    f = i2v_files
    main(tiny(f, tmp_path / "c", causal=True, image=f / "image.png", num_frames=9,
              streaming=Streaming(first_chunk_t=1, chunk_t=1, steps_per_chunk=(2,))))
    (z,) = [s["latent"] for s in shard_samples(tmp_path / "c" / "shards")]
    main(tiny(f, tmp_path / "d", causal=True, image=f / "image.png", num_frames=9, seed=1,
              streaming=Streaming(first_chunk_t=1, chunk_t=1, steps_per_chunk=(2,))))
    (z_other,) = [s["latent"] for s in shard_samples(tmp_path / "d" / "shards")]
    assert z.shape == (16, 3, 4, 4) and torch.equal(z[:, :1], z_other[:, :1])   # the image frame, whatever the seed
    assert not torch.allclose(z[:, 1:], z_other[:, 1:])
    assert_first_frame_is(tmp_path / "c", *conditioning(f, frames=9))


@pytest.mark.parametrize("change, message", [
    (dict(image="nowhere.png", model="i2v-tiny", clip_path="clip.safetensors", clip_cfg=CLIP), "nowhere.png.*--image"),
    (dict(image="t5.safetensors", model="i2v-tiny", clip_path="clip.safetensors", clip_cfg=CLIP),
     "cannot be read as an image"),
    (dict(image="image.png"), "--image needs an image-to-video model"),
    (dict(model="i2v-tiny"), "image-to-video model: give --image"),
    (dict(model="ti2v-5B"), "Wan2.2 VAE"),
    (dict(dit_path_low="x.pth"), "--dit-path-low is the low-noise expert"),
])
def test_image_to_video_user_errors(i2v_files, tmp_path, change, message):
    f = i2v_files
    kw = {k: (f / v if k in ("image", "clip_path") else v) for k, v in change.items()}
    if kw.get("model") == "i2v-tiny":
        kw["dit_path"] = f / "i2v.safetensors"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(tiny(f, tmp_path, **kw))


def test_prompts_file_encoding(files, tmp_path):
    """A byte-order mark is not part of the first prompt; a file that is not UTF-8 is named with its line."""
    (tmp_path / "bom.txt").write_bytes("\ufeffa cat runs\n".encode("utf-8"))
    main(tiny(files, tmp_path / "a", prompts_file=tmp_path / "bom.txt", steps=1, videos=False))
    assert [s["prompt"] for s in shard_samples(tmp_path / "a" / "shards")] == ["a cat runs"]
    (tmp_path / "latin1.txt").write_bytes("a dog\ncaf\xe9 cat\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: line 2 is not UTF-8"):
        main(tiny(files, tmp_path / "b", prompts_file=tmp_path / "latin1.txt"))


def test_toy_mode_refuses_the_video_flags_it_cannot_use(tmp_path):
    save_checkpoint(randomise(WanModel(TOY_DIT), 5), tmp_path / "toy.safetensors")
    for change, flag in ((dict(num_frames=17), "--num-frames"), (dict(resolution="720p"), "--resolution")):
        with pytest.raises(ValueError, match=f"--toy samples the clips of the checkpoint's toy world .*drop {flag}"):
            main(Config(dit_path=tmp_path / "toy.safetensors", toy=True, device="cpu", **change))


def test_a_truncated_checkpoint_is_named_before_the_text_encoder_runs(files, tmp_path, monkeypatch):
    good = tiny(files, tmp_path).dit_path
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:100])
    monkeypatch.setattr(sample, "encode_prompts_and_free", lambda *a, **k: pytest.fail("the encoder ran first"))
    with pytest.raises(ValueError, match="cannot read .*cut.safetensors as a .safetensors checkpoint"):
        main(tiny(files, tmp_path, dit_path=tmp_path / "cut.safetensors"))


def test_a_legacy_format_pth_is_read(tmp_path):
    from checkpoint import read_state_dict
    sd = {"w": torch.arange(6.0).view(2, 3)}
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "old.pth")["w"], sd["w"])


def test_a_diffusers_pipeline_folder_samples_like_the_official_files(files, tmp_path, capsys):
    """The same tiny nets written in the diffusers layout (transformer/, vae/, text_encoder/, tokenizer/, with
    diffusers/transformers key names) sample the same video from `--dit-path PIPELINE` alone."""
    from checkpoint import read_state_dict, rename
    from model import DIFFUSERS_NAMES, save_diffusers
    from text_encoder import TRANSFORMERS_NAMES
    from vae import diffusers_names
    root = tmp_path / "Wan-Diffusers"
    save_diffusers(read_state_dict(files / "dit.safetensors"), CONFIGS["t2v-tiny"], root / "transformer")
    (root / "vae").mkdir(parents=True)
    save_file(rename(read_state_dict(files / "vae.safetensors"), diffusers_names(VAE)),
              str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "text_encoder").mkdir()
    save_file(rename(read_state_dict(files / "t5.safetensors"), TRANSFORMERS_NAMES),
              str(root / "text_encoder" / "model.safetensors"))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_bytes((files / "google" / "umt5-xxl" / "tokenizer.json").read_bytes())
    (root / "model_index.json").write_text("{}")
    main(tiny(files, tmp_path / "official", seed=5))
    cfg = tiny(files, tmp_path / "diffusers", seed=5, dit_path=root)
    main(dataclasses.replace(cfg, model=None, vae_path=Config.vae_path, t5_path=Config.t5_path))
    assert "a diffusers pipeline): its transformer/, vae/, text_encoder/, tokenizer/" in capsys.readouterr().out
    a, b = (shard_samples(tmp_path / d / "shards")[0] for d in ("official", "diffusers"))
    assert torch.equal(a["embed"], b["embed"])
    # (the same weights at other file offsets: CPU kernels may round the last bit differently)
    assert ((a["latent"] - b["latent"]).norm() / a["latent"].norm()).item() < 1e-6
    assert all((x.float() - y.float()).abs().max() <= 1 for x, y in zip(mp4s(tmp_path / "official"),
                                                                        mp4s(tmp_path / "diffusers")))


def _sample_on_two_ranks(rank, tmp, files):
    from pathlib import Path
    import parallel
    calls, shard_tokens = [], parallel.shard_tokens
    model_module = __import__("model")
    model_module.shard_tokens = lambda *a, **kw: calls.append(1) or shard_tokens(*a, **kw)
    tmp = Path(tmp)
    main(tiny(files, tmp / "cp2", num_samples=2, seed=3))
    main(tiny(files, tmp / "cp2_teacher", num_samples=1, seed=3, mode="teacher", steps=3, solver="euler"))
    main(tiny(files, tmp / "cp2_causal", num_samples=1, seed=3, causal=True))
    (tmp / f"calls{rank}").write_text(str(len(calls)))


def test_torchrun_sampling_splits_each_clip_over_the_processes(files, tmp_path):
    """Under torchrun every process runs the DiT on its share of each clip's tokens (Ulysses context parallelism):
    rCM, teacher and causal streaming sampling give the same latents as one process; rank 0 alone writes them."""
    from test_parallel import spawn
    for name, kw in (("cp2", {}), ("cp2_teacher", dict(mode="teacher", steps=3, solver="euler")),
                     ("cp2_causal", dict(causal=True))):
        main(tiny(files, tmp_path / ("one" + name[3:]), num_samples=2 if name == "cp2" else 1, seed=3, **kw))
    spawn(_sample_on_two_ranks, tmp_path, files, backend="gloo")
    assert all(int((tmp_path / f"calls{r}").read_text()) > 0 for r in (0, 1))  # both ranks split tokens
    for name in ("cp2", "cp2_teacher", "cp2_causal"):
        one, two = (shard_samples(tmp_path / d / "shards") for d in ("one" + name[3:], name))
        assert len(one) == len(two) > 0
        assert all(torch.allclose(a["latent"], b["latent"], atol=1e-5) for a, b in zip(one, two))
        assert len(list((tmp_path / name).glob("*.mp4"))) == len(one)


def test_the_vae_decodes_on_the_cpu_when_the_gpu_is_short(files, capsys):
    """The VAE decodes on the sampling device, or on the CPU (said in one line) when the GPU's free memory beside the
    DiT is below the decode's measured need at that size (more for fp32 and for several frames per call) + 1 GiB."""
    from sample import decoder_device
    from vae import load_vae
    vae = load_vae(files / "vae.safetensors", cfg=VAE)
    assert decoder_device("cpu", vae, 832, 480) == "cpu"
    assert decoder_device("cuda:0", vae, 832, 480, free_bytes=9 * 2**30) == "cuda:0"
    assert capsys.readouterr().out == ""
    assert decoder_device("cuda:0", vae, 1280, 720, free_bytes=9 * 2**30) == "cpu"
    assert "the VAE decodes on the CPU: cuda:0 has 9.0 GiB free beside the DiT, a 1280x720 decode needs 16.9 GiB" \
        in capsys.readouterr().out
    vae.to(torch.bfloat16)
    assert decoder_device("cuda:0", vae, 1280, 720, free_bytes=12 * 2**30) == "cuda:0"
    vae.frames_per_call = 4
    assert decoder_device("cuda:0", vae, 1280, 720, free_bytes=12 * 2**30) == "cpu"


def test_umt5_moves_to_the_cpu_when_the_gpu_is_short(capsys):
    """The text encoder runs on the sampling device, or on the CPU (said in one line) when the GPU's free memory is
    below its bf16 weights (11.4 GB for umT5-XXL) plus 1 GiB."""
    from sample import encoder_device
    from text_encoder import UMT5Config
    assert encoder_device("cpu", UMT5Config()) == "cpu"
    assert encoder_device("cuda:0", UMT5Config(), free_bytes=40 * 2**30) == "cuda:0"
    assert capsys.readouterr().out == ""
    assert encoder_device("cuda:0", UMT5Config(), free_bytes=10 * 2**30) == "cpu"
    assert "umT5 runs on the CPU: cuda:0 has 10.0 GiB free, the encoder needs 11.6 GiB" in capsys.readouterr().out
    assert encoder_device("cuda", T5, free_bytes=2**31) == "cuda"  # a tiny encoder fits
