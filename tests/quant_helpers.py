"""A small camera+lidar net with the layer kinds the quantization code must handle."""

from __future__ import annotations

import spconv.pytorch as spconv
import torch
from torch import nn

from bevfusion_ptq.sparse_cpu import sparse_convs_on


def _bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics, so folding them is actually tested."""
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
    bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
    bn.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
    bn.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return bn


class SmallFusionNet(nn.Module):
    """Dense conv branch + spconv branch + dense fuser; BN after every conv."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.camera = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(nn.BatchNorm2d(8), gen), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), _bn(nn.BatchNorm2d(8), gen), nn.ReLU(),
        )
        self.lidar = spconv.SparseSequential(
            spconv.SubMConv3d(4, 8, 3, padding=1, bias=False, indice_key="subm1"), _bn(nn.BatchNorm1d(8), gen),
            nn.ReLU(),
            spconv.SparseConv3d(8, 8, 3, stride=(1, 1, 2), padding=1, bias=False), _bn(nn.BatchNorm1d(8), gen),
            nn.ReLU(),
        )
        self.fuser = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1, bias=False), _bn(nn.BatchNorm2d(8), gen), nn.ReLU())

    def forward(self, batch: dict) -> torch.Tensor:
        cam = self.camera(batch["img"])  # [B, 8, 8, 8]
        sp = spconv.SparseConvTensor(batch["features"], batch["coords"], [16, 16, 4], batch["img"].shape[0])
        with sparse_convs_on(self.lidar, sp.features.device):  # as the model's sparse encoder does
            lidar = self.lidar(sp).dense()  # [B, 8, 16, 16, 2]
        b, c, h, w, d = lidar.shape
        lidar = lidar.permute(0, 1, 4, 2, 3).reshape(b, c * d, h, w)
        lidar = nn.functional.avg_pool2d(lidar, 2)
        return self.fuser(torch.cat([cam, lidar], dim=1))


def random_batch(seed: int, batch_size: int = 1, points: int = 200) -> dict:
    gen = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(batch_size):
        xyz = torch.randint(0, 16, (points, 2), generator=gen)
        z = torch.randint(0, 4, (points, 1), generator=gen)
        c = torch.cat([torch.full((points, 1), b), xyz, z], dim=1)
        coords.append(torch.unique(c, dim=0))
    coords = torch.cat(coords).int()
    return {
        "img": torch.rand(batch_size, 3, 16, 16, generator=gen) * 2 - 0.5,
        "features": torch.randn(coords.shape[0], 4, generator=gen),
        "coords": coords,
    }
