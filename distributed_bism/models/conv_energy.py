"""Deep conv EBLVM with the additive-coupling energy (Bao et al. 2020, as its reference code builds it).

    f(v)    = Linear(readout(ResNet(v))) ∈ R^{h_dim}
    E(v, h) = Σ_k ELU( Linear_{2·h_dim → D}([f(v) + h, h]) )_k²

The ResNet is a 3×3 conv to `ch` channels, then three stages, each a down-sampling residual
block followed by `blocks_per_stage` plain ones, with channels ch → 2ch → 4ch → 8ch.

Two block forms (`block`):
- "reference": ELU → conv3×3 in→in (no bias) → ELU → conv3×3 in→out (→ 2×2 mean-pool), plus a
  1×1 conv shortcut in every block (mean-pooled when down-sampling).
- "wide": ELU → conv3×3 in→out → ELU → conv3×3 out→out (→ pool), identity shortcut when the
  shape is kept. About 1.5× the arithmetic of "reference" per image.

Two readouts (`readout`):
- "flatten" (reference): the last (8ch, H/8, W/8) feature map, flattened, into f's Linear. It
  keeps where features are, which a conditional p(v|h) needs to rebuild an image.
- "pool": ELU, then a global mean over space: fewer parameters, independent of image size.

The coupling width D defaults to the reference's (H/8)·(W/8)·4·ch (4096 at 1×32×32, ch 64).

Inputs whose side is not a multiple of 8 are zero-padded symmetrically to the next one inside the
model (28×28 → 32×32); the reference pads the data instead (`data.pad`), so that the noise and the
loss cover the padding too.

Shapes: v is (B, C, H, W); h is (B, h_dim) or (L, B, h_dim); energies are (B,) or (L, B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_STAGES = 3
BLOCKS = ("reference", "wide")
READOUTS = ("flatten", "pool")
Padding = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


def side_padding(in_shape: Sequence[int], mult: int = 2**NUM_STAGES) -> Padding:
    """The symmetric zero padding that takes the sides of (C, H, W) images to multiples of `mult`."""
    h, w = ((-side % mult) for side in in_shape[1:])
    return (h // 2, h - h // 2), (w // 2, w - w // 2)


def padded_sides(in_shape: Sequence[int], padding: Padding) -> tuple[int, int]:
    """(H, W) after `padding`."""
    return in_shape[1] + sum(padding[0]), in_shape[2] + sum(padding[1])


def checked_pad(v: Tensor, in_shape: tuple[int, ...], padding: Padding, owner: str) -> Tensor:
    """v (B, *in_shape), zero-padded by `padding`; a ValueError naming `owner` for another shape."""
    if tuple(v.shape[1:]) != in_shape:
        raise ValueError(f"{owner} expects v of shape (B, {', '.join(map(str, in_shape))}), got {tuple(v.shape)}")
    (top, bottom), (left, right) = padding
    return F.pad(v, (left, right, top, bottom)) if top or bottom or left or right else v


class ResidualBlock(nn.Module):
    """One residual block of either form (see the module docstring): (B, in_ch, S, S) → (B, out_ch, S', S')."""

    def __init__(self, in_ch: int, out_ch: int, *, downsample: bool, form: str = "reference"):
        super().__init__()
        if form == "reference":
            self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            self.shortcut: nn.Module = nn.Conv2d(in_ch, out_ch, 1)
        elif form == "wide":
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or downsample) else nn.Identity()
        else:
            raise ValueError(f"unknown residual block form {form!r}; expected one of {BLOCKS}")
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.elu(self.conv1(F.elu(x))))
        # A 1×1 conv commutes with mean-pooling, so pooling after the shortcut equals the
        # reference's pool-then-conv.
        skip = self.shortcut(x)
        if self.downsample:
            out, skip = F.avg_pool2d(out, 2), F.avg_pool2d(skip, 2)
        return out + skip


class ResNetFeatures(nn.Module):
    """f(v): (B, C, H, W) → (B, out_dim), a residual conv net, a readout, then a linear layer.

    `in_shape` is the (C, H, W) the network sees (already padded to multiples of 8).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_dim: int,
        *,
        ch: int = 64,
        blocks_per_stage: int = 1,
        block: str = "reference",
        readout: str = "flatten",
    ):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; expected one of {READOUTS}")
        layers: list[nn.Module] = [nn.Conv2d(in_shape[0], ch, 3, padding=1)]
        c = ch
        for _ in range(NUM_STAGES):
            layers.append(ResidualBlock(c, 2 * c, downsample=True, form=block))
            layers += [ResidualBlock(2 * c, 2 * c, downsample=False, form=block) for _ in range(blocks_per_stage)]
            c *= 2
        self.body = nn.Sequential(*layers)
        self.readout = readout
        cells = (in_shape[1] // 2**NUM_STAGES) * (in_shape[2] // 2**NUM_STAGES)
        self.out = nn.Linear(c * cells if readout == "flatten" else c, out_dim)

    def forward(self, v: Tensor) -> Tensor:
        x = self.body(v)
        return self.out(x.flatten(1) if self.readout == "flatten" else F.elu(x).mean(dim=(2, 3)))


def reference_coupling_dim(sides: tuple[int, int], ch: int) -> int:
    """The reference's coupling width (H/8)·(W/8)·4·ch, for padded sides (H, W)."""
    return (sides[0] // 2**NUM_STAGES) * (sides[1] // 2**NUM_STAGES) * 4 * ch


class ConvEBLVM(nn.Module):
    """E(v, h) = Σ_k ELU(Linear([f(v) + h, h]))_k² with f a ResNet.

    Args:
        in_shape: (C, H, W) of the data, before padding.
        h_dim: latent size (20, 50 or 100 in the reference).
        ch: base width of the ResNet (64 for MNIST, 128 for CIFAR-10 / CelebA).
        blocks_per_stage: plain blocks after each down-sampling block (1 or 2).
        coupling_dim: output width D of the coupling layer; None: the reference's (H/8)(W/8)·4·ch.
        block: "reference" or "wide" residual blocks; readout: "flatten" or "pool".
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        h_dim: int,
        *,
        ch: int = 64,
        blocks_per_stage: int = 1,
        coupling_dim: int | None = None,
        block: str = "reference",
        readout: str = "flatten",
    ):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"ConvEBLVM needs in_shape (C, H, W), got {tuple(in_shape)}")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.h_dim = h_dim
        self.padding = side_padding(self.in_shape)
        sides = padded_sides(self.in_shape, self.padding)
        self.features = ResNetFeatures(
            (self.in_shape[0], *sides), h_dim, ch=ch, blocks_per_stage=blocks_per_stage, block=block, readout=readout
        )
        self.coupling = nn.Linear(2 * h_dim, coupling_dim or reference_coupling_dim(sides, ch))

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
