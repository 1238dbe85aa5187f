"""The Wan2.1 causal 3D VAE, exact to the released `Wan2.1_VAE.pth`.

Video [B, 3, 1+4k, H, W] in [-1, 1]  <->  latents [B, 16, 1+k, H/8, W/8].

Every temporal convolution is causal: frame t sees frames t-2..t only. So a clip can be processed
as a stream of chunks, frames [0], [1:5], [5:9], ... to encode and one latent frame at a time to
decode, each temporal layer keeping the last input frames of the previous chunk in a `cache` (a
dict keyed by the layer). The result equals a causal pass over the whole clip, but activations
live for one chunk only, so 81 frames at 720p need bounded memory.

The first frame is special: the encoder does not downsample it in time and the decoder does not
upsample it, so frame 0 alone becomes latent frame 0 and each later latent frame holds 4 frames.
"""
from dataclasses import dataclass
from pathlib import Path

from einops import rearrange
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from checkpoint import load_strict

# Per-channel statistics of the encoder mean μ; the latents the DiT sees are (μ - mean) / std.
LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@dataclass(frozen=True)
class VAEConfig:
    """Defaults are the released Wan2.1 VAE. attn_scales: resolutions (1, 1/2, ...) that get an
    attention block after each residual block (none in the release; the middle always has one)."""
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)


# ----------------------------------------------------------------------------- layers

# The channel norm and SiLU before each causal convolution are memory-bound passes over the biggest tensors of the
# VAE; as separate torch ops (norm, divide, scale, SiLU, then the time padding's concatenation) they were most of the
# elementwise kernels that took about half of a bf16 decode's GPU time. On CUDA one Triton kernel reads x twice (sum of squares, then scale) and writes the result
# once, straight into the convolution's time-padded input buffer, in either memory layout (`WanVAE.channels_last`).

@triton.jit
def _norm_silu_kernel(x_ptr, gamma_ptr, out_ptr, C, S, x_sb, x_sc, x_ss, o_sb, o_sc, o_ss, scale, eps,
                      SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """x[b, c, s] at x_ptr + b·x_sb + c·x_sc + s·x_ss (channels first: x_ss = 1; channels last: x_sc = 1), out alike:
    out = silu?(x / max(‖x[b, :, s]‖, eps) · scale · γ_c), computed in fp32."""
    b = tl.program_id(1).to(tl.int64)
    s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    x_ptr += b * x_sb
    out_ptr += b * o_sb
    sum_sq = tl.zeros([BLOCK_S], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (s[:, None] < S) & (c[None, :] < C)
        x = tl.load(x_ptr + s[:, None] * x_ss + c[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    factor = scale / tl.maximum(tl.sqrt(sum_sq), eps)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (s[:, None] < S) & (c[None, :] < C)
        x = tl.load(x_ptr + s[:, None] * x_ss + c[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
        y = x * factor[:, None] * tl.load(gamma_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + s[:, None] * o_ss + c[None, :] * o_sc, y.to(out_ptr.dtype.element_ty), mask=mask)


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, silu: bool = True, out: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """The VAE's channel norm, x / ‖x‖_C · √C · γ, then SiLU if `silu`. x [B, C, ...] -> the same shape, written into
    `out` if given (any view whose dims past the first two merge into one, as a time slice of a buffer does).

    backend "triton" (default on CUDA) is one fused kernel computing in fp32; "torch" (default elsewhere) is the
    plain ops in x's dtype, as the official code computes them."""
    if backend == "auto":  # (under torch.compile the plain ops, which inductor fuses by itself)
        backend = "triton" if x.is_cuda and not torch.compiler.is_compiling() else "torch"
    if backend == "torch":
        y = F.normalize(x, dim=1) * gamma.shape[0] ** 0.5 * gamma.view(-1, *[1] * (x.ndim - 2))
        y = F.silu(y) if silu else y
        return y if out is None else out.copy_(y)
    B, C = x.shape[:2]
    xs = x.flatten(2)  # [B, C, S]: a view for channels-first and channels-last tensors, a copy otherwise
    if xs.stride(2) != 1 and xs.stride(1) != 1:
        xs = xs.contiguous()
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape:
        raise ValueError(f"norm_silu: out {tuple(out.shape)} cannot hold x {tuple(x.shape)}")
    outs = out.view(B, C, -1)  # (raises if out's dims past the first two do not merge: writes must reach out)
    S = xs.shape[2]
    channels_last = xs.stride(1) == 1 and C > 1
    block_c, block_s = (min(triton.next_power_of_2(C), 128), 32) if channels_last else (32, 128)
    _norm_silu_kernel[(triton.cdiv(S, block_s), B)](
        xs, gamma, outs, C, S, *xs.stride(), *outs.stride(), C ** 0.5, 1e-12, SILU=silu, BLOCK_C=block_c,
        BLOCK_S=block_s)
    return out


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a 5-D tensor whose channels are innermost (WanVAE.channels_last), else contiguous."""
    return torch.channels_last_3d if x.ndim == 5 and x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format


class CausalConv3d(nn.Conv3d):
    """A 'same'-size Conv3d that sees only the present and the past in time.

    Space is zero-padded symmetrically. In time, the k_t - 1 frames before x come from cache[self]
    (the last input frames of earlier chunks), zero-padded where the stream has fewer.
    cache=None treats x as a whole stream.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int, int]):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(c_in, c_out, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def forward(self, x: torch.Tensor, cache: dict | None = None, norm: "RMSNorm | None" = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C_out, T, H, W]. norm: an RMSNorm whose norm + SiLU (the residual blocks' and
        heads' pre-activation) is applied to x on its way into the time-padded input."""
        past = self.kernel_size[0] - 1
        if not past:
            return super().forward(x if norm is None else norm_silu(x, norm.gamma))
        prev = cache.get(self) if cache is not None else None
        n_prev = 0 if prev is None else prev.shape[2]
        b, c, t, h, w = x.shape
        # [zeros where the stream has no past | cached past | x], in x's memory layout
        padded = torch.empty(b, c, past + t, h, w, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
        padded[:, :, :past - n_prev].zero_()
        if n_prev:
            padded[:, :, past - n_prev:past] = prev
        if norm is None:
            padded[:, :, past:] = x
        else:
            norm_silu(x, norm.gamma, out=padded[:, :, past:])
        if cache is not None:  # clone: keep a few frames, not the whole chunk
            cache[self] = padded[:, :, -past:].clone()
        return self.conv(padded)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of the time-padded x [B, C, T + k_t − 1, H, W] -> [B, C_out, T, H, W]. For a channels-last
        half-precision x on CUDA with fewer than 128 output channels (the decoder's full-resolution stage: 96), one
        2-D convolution per temporal tap, over the frames folded into the batch, summed: cuDNN runs these 96-channel
        2-D convolutions on Hopper kernels, 1.33× faster than the Ampere kernel it picks for the 3-D one (results §5).
        The sum rounds twice more (within one bf16 ulp)."""
        k_t, (b, c, t, h, w) = self.kernel_size[0], x.shape
        if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and self.out_channels < 128 and k_t > 1
                and memory_format(x) == torch.channels_last_3d):
            return super().forward(x)
        t -= k_t - 1
        out = None
        for k in range(k_t):  # frames k..k+t as a batch of 2-D images: a view of the channels-last memory
            frames = x[:, :, k:k + t].transpose(1, 2).reshape(b * t, c, h, w)
            y = F.conv2d(frames, self.weight[:, :, k], self.bias if k == 0 else None, 1, self.padding[1:])
            out = y if out is None else out.add_(y)
        return out.view(b, t, -1, h, w).transpose(1, 2)


class RMSNorm(nn.Module):
    """Channel norm: L2-normalise over channels (dim 1), times √C·γ. No bias."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_silu(x, self.gamma, silu=False)


class ResidualBlock(nn.Module):
    """x + [RMSNorm, SiLU, Conv 3³, RMSNorm, SiLU, Conv 3³](x), with a 1³ conv on the skip if C changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        # Slot 5 held dropout during training; an Identity keeps the checkpoint's indices.
        self.residual = nn.Sequential(
            RMSNorm(c_in, 3), nn.SiLU(), CausalConv3d(c_in, c_out, 3),
            RMSNorm(c_out, 3), nn.SiLU(), nn.Identity(), CausalConv3d(c_out, c_out, 3))
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        return conv2(conv1(x, cache, norm=norm1), cache, norm=norm2).add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """x [B, C, T, H, W] -> same; `cache` is unused (nothing crosses frames)."""
        b, c, t, h, w = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        q, k, v = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)
        y = rearrange(F.scaled_dot_product_attention(q, k, v), "n 1 (h w) c -> n c h w", h=h)
        return x + rearrange(self.proj(y), "(b t) c h w -> b c t h w", b=b)


class Resample(nn.Module):
    """2x spatial down/up-sampling of each frame, optionally with 2x temporal down/up-sampling.

    Down: pad right/bottom by 1, 3x3 conv with stride 2; in time (downsample3d) a stride-2 conv
    over frames (2j-2, 2j-1, 2j) makes output frame j, and frame 0 passes through.
    Up: nearest 2x, 3x3 conv halving the channels; in time (upsample3d) a causal conv doubles the
    channels, which become two consecutive frames; frame 0 is not doubled.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("down"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1))

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C', T', 2H, 2W] or [B, C, T', H/2, W/2]."""
        if self.mode == "upsample3d":
            if self.time_conv in cache:  # channels (two, c) -> frames (t, two), in the input's memory layout
                y, (b, c, t, h, w) = self.time_conv(x, cache), x.shape
                x = torch.empty(b, c, 2 * t, h, w, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
                x[:, :, 0::2], x[:, :, 1::2] = y[:, :c], y[:, c:]
            else:  # frame 0 is not doubled; the time conv's stream starts after it, with no past
                cache[self.time_conv] = x[:, :, :0]
        t = x.shape[2]
        x = rearrange(self.resample(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d":
            prev = cache.get(self.time_conv)
            cache[self.time_conv] = x[:, :, -1:].clone()
            if prev is not None:  # chunks after frame 0 have an even number of frames
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


# ----------------------------------------------------------------------------- encoder, decoder

class Encoder(nn.Module):
    """Video chunk [B, 3, T, H, W] -> [B, 2·z_dim, T', H/8, W/8] (μ and log σ², before the 1³ conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks, scale = [], 1.0
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(c_in, c_out))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(c_out))
                c_in = c_out
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(c_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
                scale /= 2
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 2 * cfg.z_dim, 3))

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return self.head[2](x, cache, norm=self.head[0])


class Decoder(nn.Module):
    """Latent chunk [B, z_dim, T, h, w] -> video [B, 3, T', 8h, 8w] (T' = 1 for latent frame 0, else 4T)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks, scale = [], 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous upsampling conv halved the channels
                c_in //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(c_in, c_out))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(c_out))
                c_in = c_out
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(c_out, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, z: torch.Tensor, cache: dict) -> torch.Tensor:
        x = self.conv1(z, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        return self.head[2](x, cache, norm=self.head[0])


# ----------------------------------------------------------------------------- the VAE

class WanVAE(nn.Module):
    """Encoder, 1³ conv to (μ, log σ²), 1³ conv on z, decoder. Parameter names match Wan2.1_VAE.pth.

    Runs in the dtype of its parameters (float32 or bfloat16); inputs are cast to it and results
    come back in float32. encode/decode run without autograd (the VAE is frozen in this project).
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        self.time_factor = 2 ** sum(cfg.temporal_downsample)
        self.space_factor = 2 ** (len(cfg.dim_mult) - 1)
        self.layout = torch.contiguous_format  # of the activations
        self.frames_per_call = 1  # decode's default: latent frames per decoder call (the official code's 1)
        self._stats = {}  # device -> the latents' mean and std [1, z_dim, 1, 1, 1], fp32

    def channels_last(self, on: bool = True):
        """Store every convolution's weights, and so its activations, channels-last (NDHWC in memory), or (on=False)
        channels-first again. cuDNN's bf16 and TF32 convolutions work in that layout and otherwise transpose each
        one's input and output; the fused norm kernel reads either. The same numbers up to summation order."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                last = torch.channels_last if module.weight.ndim == 4 else torch.channels_last_3d
                module.weight.data = module.weight.data.contiguous(memory_format=last if on else torch.contiguous_format)
        self.layout = torch.channels_last_3d if on else torch.contiguous_format
        return self

    def compile_blocks(self):
        """torch.compile each residual, attention and resampling block: inductor fuses the elementwise work around the
        convolutions (there the norms run as torch ops, not the fused kernel; 0.89 s against 0.99 s for a bf16 decode
        of 81 frames at 480p on an H200). The blocks share their code, so dynamo sees one function at ~20 shapes; its
        recompile limit is raised to let it keep them all."""
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
        for module in self.modules():
            if isinstance(module, (ResidualBlock, AttentionBlock, Resample)):
                module.compile(dynamic=False)
        return self

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.z_dim != len(LATENT_MEAN):
            raise ValueError(f"latent statistics exist for z_dim={len(LATENT_MEAN)} only, not {self.cfg.z_dim}")
        if device not in self._stats:  # made once per device: each copy from the host waits for the GPU's queue
            self._stats[device] = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1, 1)
                                        for v in (LATENT_MEAN, LATENT_STD))
        return self._stats[device]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents (μ - mean)/std [B, 16, 1+k, H/8, W/8], fp32."""
        tf, sf = self.time_factor, self.space_factor
        if video.ndim != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % tf or video.shape[3] % sf or video.shape[4] % sf:
            raise ValueError(f"encode expects video [B, 3, 1+{tf}k, H, W] with H, W multiples of {sf}; "
                             f"got {tuple(video.shape)}: crop or pad the clip to such a size")
        x = video.to(self.conv1.weight.dtype).contiguous(memory_format=self.layout)
        cache = {}
        chunks = [x[:, :, :1], *x[:, :, 1:].split(tf, dim=2)]
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.conv1(h)[:, :self.cfg.z_dim].float()  # the other half, log σ², is not used
        mean, std = self._latent_stats(mu.device)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, z: torch.Tensor, cache: dict | None = None, frames_per_call: int | None = None) -> torch.Tensor:
        """Normalised latents [B, 16, 1+k, h, w] -> video [B, 3, 1+4k, 8h, 8w], fp32, NOT clamped to [-1, 1].

        Streaming: pass the same `cache` dict (start with {}) to successive calls on consecutive latent chunks of one
        clip; the first latent frame of the clip gives 1 frame, every later one 4, and the concatenated results equal
        one call on the whole clip. The decoder runs on `frames_per_call` latent frames at a time (default
        self.frames_per_call; the official code on 1; more makes bigger convolutions and more memory, the same result
        up to rounding); the clip's first latent frame always goes alone, as the temporal upsampling treats it apart."""
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"decode expects latents [B, {self.cfg.z_dim}, T, h, w]; got {tuple(z.shape)}")
        mean, std = self._latent_stats(z.device)
        x = self.conv2((z.float() * std + mean).to(self.conv2.weight.dtype).contiguous(memory_format=self.layout))
        first = 1 if not cache else 0  # an empty cache: this call starts the clip
        cache = {} if cache is None else cache
        chunks = [x[:, :, :first], *x[:, :, first:].split(frames_per_call or self.frames_per_call, dim=2)]
        return torch.cat([self.decoder(chunk, cache).float() for chunk in chunks if chunk.shape[2]], dim=2)


# ----------------------------------------------------------------------------- image-to-video conditioning

def i2v_size(height: int, width: int, max_area: int, stride: int = 16) -> tuple[int, int]:
    """Wan's adaptive I2V size: the image's aspect ratio at about max_area pixels, each side a multiple of `stride`
    (the VAE's 8 times the DiT's patch of 2). Returns (height, width)."""
    aspect = height / width
    return (int((max_area * aspect) ** 0.5 // stride * stride), int((max_area / aspect) ** 0.5 // stride * stride))


@torch.no_grad()
def image_condition(vae: WanVAE, image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The I2V conditioning y [1, 4 + z_dim, T, H/8, W/8] of an image [3, H, W] in [-1, 1] at the video's size, as
    Wan's pipelines build it: a 4-channel mask that is 1 on latent frame 0, then the latents of the video whose first
    frame is the image and whose other num_frames − 1 frames are zero."""
    _, H, W = image.shape
    video = torch.cat([image[:, None], image.new_zeros(3, num_frames - 1, H, W)], dim=1)[None]
    latents = vae.encode(video)
    mask = torch.zeros_like(latents[:, :4])
    mask[:, :, 0] = 1
    return torch.cat([mask, latents], dim=1)


# ----------------------------------------------------------------------------- checkpoint

def diffusers_names(cfg: VAEConfig) -> list[tuple[str, str]]:
    """The (official, diffusers AutoencoderKLWan) names of the VAE's modules, for checkpoint.rename. The official
    decoder numbers its residual blocks and upsamplers in one list; diffusers groups them per resolution."""
    resnet = [("residual.0", "norm1"), ("residual.2", "conv1"), ("residual.3", "norm2"), ("residual.6", "conv2"),
              ("shortcut", "conv_shortcut")]
    table = [("conv1", "quant_conv"), ("conv2", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        table += [(f"{side}.conv1", f"{side}.conv_in"), (f"{side}.head.0", f"{side}.norm_out"),
                  (f"{side}.head.2", f"{side}.conv_out"), (f"{side}.middle.1", f"{side}.mid_block.attentions.0")]
        table += [(f"{side}.middle.{i}.{a}", f"{side}.mid_block.resnets.{i // 2}.{b}")
                  for i in (0, 2) for a, b in resnet]
    table += [(f"encoder.downsamples.#.{a}", f"encoder.down_blocks.#.{b}") for a, b in resnet]
    table += [("encoder.downsamples", "encoder.down_blocks")]
    i = 0
    for level in range(len(cfg.dim_mult)):
        for k in range(cfg.num_res_blocks + 1):
            table += [(f"decoder.upsamples.{i}.{a}", f"decoder.up_blocks.{level}.resnets.{k}.{b}") for a, b in resnet]
            i += 1
        if level < len(cfg.dim_mult) - 1:
            table.append((f"decoder.upsamples.{i}", f"decoder.up_blocks.{level}.upsamplers.0"))
            i += 1
    return table


def load_vae(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             cfg: VAEConfig = VAEConfig()) -> WanVAE:
    """Build WanVAE on the meta device and assign the weights of `path` strictly: Wan2.1_VAE.pth (or .safetensors),
    a diffusers `vae/` folder, or a diffusers pipeline folder (its vae/).

    dtype: float32 (as released) or bfloat16. Returns the model in eval mode, requires_grad off, channels-last on
    CUDA (faster there; WanVAE.channels_last).
    """
    path = Path(path)
    if (path / "model_index.json").exists():
        path = path / "vae"
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint not found: {path} (expected Wan2.1_VAE.pth from the Wan2.1 release, "
                                f"or a diffusers vae/ folder)")
    vae = load_strict(lambda: WanVAE(cfg), path, f"{path} does not fit WanVAE({cfg}); is it Wan2.1_VAE.pth, and does "
                      "the config match?", dtype=dtype, device=device, other_names=diffusers_names(cfg))
    return vae.channels_last() if torch.device(device).type == "cuda" else vae
