"""Deep conv EBLVM with the additive-coupling energy (METHODS.md §2).

    f(v)    = Linear(ResNet(v)) ∈ R^{h_dim}
    E(v, h) = Σ_k ELU( Linear([f(v) + h, h]) )_k²

The ResNet is a 3×3 conv to `ch` channels, then three stages, each a down-sampling residual
block followed by `blocks_per_stage` plain ones, with channels ch → 2ch → 4ch → 8ch. A block
is ELU → conv → ELU → conv (+ mean-pool when down-sampling) with a 1×1 shortcut.

Inputs whose side is not a multiple of 8 are zero-padded symmetrically to the next one
(28×28 → 32×32), so 1×8×8, 1×28×28, 3×32×32 and 3×64×64 all work.

Shapes: v is (B, C, H, W); h is (B, h_dim) or (L, B, h_dim); energies are (B,) or (L, B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_STAGES = 3
Padding = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


def side_padding(in_shape: Sequence[int], mult: int = 2**NUM_STAGES) -> Padding:
    """The symmetric zero padding that takes the sides of (C, H, W) images to multiples of `mult`."""
    h, w = ((-side % mult) for side in in_shape[1:])
    return (h // 2, h - h // 2), (w // 2, w - w // 2)


def checked_pad(v: Tensor, in_shape: tuple[int, ...], padding: Padding, owner: str) -> Tensor:
    """v (B, *in_shape), zero-padded by `padding`; a ValueError naming `owner` for another shape."""
    if tuple(v.shape[1:]) != in_shape:
        raise ValueError(f"{owner} expects v of shape (B, {', '.join(map(str, in_shape))}), got {tuple(v.shape)}")
    (top, bottom), (left, right) = padding
    return F.pad(v, (left, right, top, bottom)) if top or bottom or left or right else v


class ResidualBlock(nn.Module):
    """ELU → conv3×3 → ELU → conv3×3 (→ 2×2 mean-pool), plus a (1×1 conv, pooled) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, *, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or downsample) else nn.Identity()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, S, S) → (B, out_ch, S', S') with S' = S/2 when down-sampling."""
        out = self.conv2(F.elu(self.conv1(F.elu(x))))
        skip = self.shortcut(x)
        if self.downsample:
            out, skip = F.avg_pool2d(out, 2), F.avg_pool2d(skip, 2)
        return out + skip


class ResNetFeatures(nn.Module):
    """f(v): (B, C, H, W) → (B, out_dim), a residual conv net followed by a linear layer."""

    def __init__(self, in_channels: int, out_dim: int, *, ch: int = 64, blocks_per_stage: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        c = ch
        for _ in range(NUM_STAGES):
            layers.append(ResidualBlock(c, 2 * c, downsample=True))
            layers += [ResidualBlock(2 * c, 2 * c, downsample=False) for _ in range(blocks_per_stage)]
            c *= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(c, out_dim)

    def forward(self, v: Tensor) -> Tensor:
        # Mean over space keeps the feature scale independent of the image size.
        return self.out(F.elu(self.body(v)).mean(dim=(2, 3)))


class ConvEBLVM(nn.Module):
    """E(v, h) = Σ_k ELU(Linear([f(v) + h, h]))_k² with f a ResNet.

    Args:
        in_shape: (C, H, W) of the data, before padding.
        h_dim: latent size (20, 50 or 100 in the reference).
        ch: base width of the ResNet (64 for MNIST, 128 for CIFAR-10 / CelebA).
        blocks_per_stage: plain blocks after each down-sampling block (1 or 2).
        coupling_dim: output width of the coupling linear layer (defaults to h_dim).
    """

    def __init__(self, in_shape: Sequence[int], h_dim: int, *, ch: int = 64, blocks_per_stage: int = 1,
                 coupling_dim: int | None = None):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"ConvEBLVM needs in_shape (C, H, W), got {tuple(in_shape)}")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.h_dim = h_dim
        self.padding = side_padding(self.in_shape)
        self.features = ResNetFeatures(self.in_shape[0], h_dim, ch=ch, blocks_per_stage=blocks_per_stage)
        self.coupling = nn.Linear(2 * h_dim, coupling_dim or h_dim)

    def visible_features(self, v: Tensor) -> Tensor:
        """f(v): (B, C, H, W) → (B, h_dim). The only part of E that sees v."""
        return self.features(checked_pad(v, self.in_shape, self.padding, "ConvEBLVM"))

    def energy_from_features(self, f: Tensor, h: Tensor) -> Tensor:
        """E given f = f(v): f (B, h_dim), h (..., B, h_dim) → (..., B)."""
        f = f.expand_as(h)
        return F.elu(self.coupling(torch.cat([f + h, h], dim=-1))).pow(2).sum(-1)

    def forward(self, v: Tensor, h: Tensor) -> Tensor:
        """Joint energy E(v, h): v (B, C, H, W), h (B, h_dim) or (L, B, h_dim) → (B,) or (L, B)."""
        return self.energy_from_features(self.visible_features(v), h)

    energy = forward
