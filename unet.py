"""The denoiser: a small U-Net for 1x28x28 images, in the style of Ho et al. 2020 (appendix B).

Resolutions go 28 -> 14 -> 7 and back: stride-2 convolutions halve, nearest-neighbour upsampling
doubles, so every size is exact and nothing is cropped. The network only maps (x_t, t[, y]) to its
prediction; what the prediction means is diffusion.py's.
"""
import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 8  # GroupNorm groups; every channel count must divide by it
HEAD_DIM = 32  # channels per attention head
# bounds against typos, checked before anything is built: past them even planning the model (its
# parameter count, on the meta device) takes minutes or overflows
MAX_RES_BLOCKS, MAX_CHANNELS = 100, 2**20


def attention_heads(channels):
    """Heads of an attention block over `channels` channels: one per HEAD_DIM, at least one."""
    return max(1, channels // HEAD_DIM)


@dataclass
class UNetConfig:
    image_size: int = 28
    in_channels: int = 1
    width: int = 64  # channels at full resolution
    channel_mults: tuple = (1, 2, 2)  # one entry per resolution level: 28, 14, 7
    num_res_blocks: int = 2  # residual blocks per level on the way down
    attn_resolutions: tuple = (7,)  # feature-map sizes that get self-attention
    dropout: float = 0.1
    # > 0: class-conditional, with label num_classes meaning "no class" (Ho & Salimans 2022)
    num_classes: int = 0
    # also output the variance fraction v per pixel (Nichol & Dhariwal 2021, 3.1)
    learned_variance: bool = False

    def __post_init__(self):
        # Checkpoints store plain lists; keep tuples so configs compare equal after a round trip.
        self.channel_mults = tuple(self.channel_mults)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if self.width <= 0 or self.width % GROUPS:
            raise ValueError(f"width must be a positive multiple of {GROUPS}, got {self.width}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be one or more positive integers, "
                             f"got {self.channel_mults}")
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"image_size {self.image_size} cannot be halved "
                             f"{len(self.channel_mults) - 1} times exactly")
        if not 1 <= self.num_res_blocks <= MAX_RES_BLOCKS:
            raise ValueError(f"num_res_blocks must be from 1 to {MAX_RES_BLOCKS}, "
                             f"got {self.num_res_blocks}")
        if self.width * max(self.channel_mults) > MAX_CHANNELS:
            raise ValueError(f"width {self.width} x channel_mults {self.channel_mults}: a level of "
                             f"more than {MAX_CHANNELS} channels")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes cannot be negative, got {self.num_classes}")
        sizes = self.resolutions()
        if set(self.attn_resolutions) - set(sizes):
            raise ValueError(f"attn_resolutions {self.attn_resolutions}: this network's feature "
                             f"maps are {', '.join(map(str, sizes))} pixels wide")
        # Attention runs at the attn_resolutions levels and in the middle, at the lowest one.
        attended = {self.width * m for m, r in zip(self.channel_mults, sizes)
                    if r in self.attn_resolutions}
        for ch in sorted(attended | {self.width * self.channel_mults[-1]}):
            if ch % attention_heads(ch):
                raise ValueError(f"width {self.width}: an attention block gets {ch} channels, "
                                 f"which its {attention_heads(ch)} heads of {HEAD_DIM} do not "
                                 f"divide; use a width whose attention channels are a multiple "
                                 f"of {HEAD_DIM} or below it (e.g. 32, 64)")

    def out_channels(self):
        """The prediction's channels, then as many for the variance if it is learned."""
        return self.in_channels * (2 if self.learned_variance else 1)

    def resolutions(self):
        """Feature-map sizes of the levels, e.g. (28, 14, 7)."""
        return tuple(self.image_size // 2**k for k in range(len(self.channel_mults)))

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Rebuild from a checkpoint's dict; unknown keys are an error, not silently dropped."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return cls(**d)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, sec. 3.5):
    [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (Ho et al. 2020)."""

    def __init__(self, cin, cout, temb_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(GROUPS, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, ch):
        super().__init__()
        self.heads = attention_heads(ch)
        self.norm = nn.GroupNorm(GROUPS, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Predicts the noise (or another target) in x_t:
    ([B, C, H, W], t [B], labels [B] or None) -> [B, C, H, W], or [B, 2C, H, W] with the variance
    fraction's channels after the prediction's when learned_variance.

    A conditional model given no labels (or label num_classes) is the unconditional model.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        temb_dim = 4 * c.width
        self.temb = nn.Sequential(nn.Linear(c.width, temb_dim), nn.SiLU(),
                                  nn.Linear(temb_dim, temb_dim))
        # One embedding per class plus the "no class" token, added to the timestep embedding.
        self.class_emb = nn.Embedding(c.num_classes + 1, temb_dim) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, c.width, 3, padding=1)

        def block(cin, cout, res):
            layers = [ResBlock(cin, cout, temb_dim, c.dropout)]
            if res in c.attn_resolutions:
                layers.append(AttnBlock(cout))
            return nn.ModuleList(layers)

        # Down path: remember each block's channels, since the up path concatenates them back.
        self.down, skips, ch, res = nn.ModuleList(), [c.width], c.width, c.image_size
        for level, mult in enumerate(c.channel_mults):
            for _ in range(c.num_res_blocks):
                self.down.append(block(ch, c.width * mult, res))
                ch = c.width * mult
                skips.append(ch)
            if level < len(c.channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, temb_dim, c.dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, temb_dim, c.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mults))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), c.width * mult, res))
                ch = c.width * mult
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch), nn.SiLU(),
                                 nn.Conv2d(ch, c.out_channels(), 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):
        return self.decode(*self.encode(x, t, y))

    def encode(self, x, t, y=None):
        """The down path and the middle: (the bottleneck [B, C', H', W'], the skips, the timestep
        and class embedding), the bottleneck being what a critic's head reads (DMD2, sec. 4.2)."""
        temb = self.temb(timestep_embedding(t, self.config.width))
        if self.class_emb is not None:
            y = torch.full_like(t, self.config.num_classes) if y is None else y
            temb = temb + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, temb)
            hs.append(h)
        return self._run(self.mid, h, temb), hs, temb

    def decode(self, h, hs, temb):
        """The up path from encode()'s outputs to the prediction."""
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, temb)
        return self.out(h)

    @staticmethod
    def _run(layers, h, temb):
        for layer in layers:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return h


@contextlib.contextmanager
def counting_evaluations(model):
    """Inside, a list whose one entry counts the images every UNet within `model` has evaluated: a
    sampler's network evaluations per image are that over the images drawn, whatever wraps the
    UNets (guidance runs two on each image, autoguidance two networks)."""
    count = [0]

    def add(module, args):
        count[0] += len(args[0])
    hooks = [m.register_forward_pre_hook(add) for m in model.modules() if isinstance(m, UNet)]
    try:
        yield count
    finally:
        for hook in hooks:
            hook.remove()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def planned_parameters(config):
    """The parameter count of a UNet of this config, built on the meta device: nothing is
    allocated, so a config too large for the machine can be refused before it is built."""
    with torch.device("meta"):
        return count_parameters(UNet(config))
