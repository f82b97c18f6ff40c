"""The data sets `data.name` (and `eval.ood_dataset`) accept: name → its loader, one line each.

A loader takes the DataConfig and returns (train, test) float32 tensors (distributed_bism.data).
A leaf: nothing here imports the loaders; `distributed_bism.data.load_dataset` resolves them.
"""

from __future__ import annotations

DATASETS: dict[str, str] = {
    "checkerboard": "distributed_bism.data:load_synthetic_set",
    "8gaussians": "distributed_bism.data:load_synthetic_set",
    "rings": "distributed_bism.data:load_synthetic_set",
    "2spirals": "distributed_bism.data:load_synthetic_set",
    "digits": "distributed_bism.data.images:load_digits",
    "fashion_mnist": "distributed_bism.data.images:load_fashion_mnist",
    "mnist5k": "distributed_bism.data.images:load_mnist5k",
    "mnist": "distributed_bism.data.torchvision_sets:load_mnist",
    "cifar10": "distributed_bism.data.torchvision_sets:load_cifar10",
    "celeba": "distributed_bism.data.torchvision_sets:load_celeba",
}
