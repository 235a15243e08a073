"""MNIST digits: a small CNN, and the conversion of any image into MNIST's format.

MNIST's own recipe: the digit's bounding box scaled to fit 20x20, placed in a 28x28 field so
that its centre of mass is at the centre; white digit on black. Any size and mode is accepted,
and a dark digit on a light background is inverted first. Training applies the same function,
so served and trained inputs match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from handlers.image_classification import ImageClassifier
from handlers.images import to_gray
from handlers.torchserve_wire import TorchServeHandler

SIDE = 28
BOX = 20
MAX_BOX_SIDE = 512  # the ink's box is box-filtered to at most this before the float steps
MEAN, STD = 0.1307, 0.3081  # MNIST's pixel statistics, as the network was trained with
WEIGHTS_FILE = "mnist.pt"  # the state dict's file: the demo's archive holds it under this name


class MnistNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
            nn.Dropout(0.3), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def to_mnist_format(pixels: np.ndarray) -> np.ndarray:
    """A 2-D uint8 grayscale array (any size) -> 28x28 float32 in 0..1, MNIST style.

    Memory stays near the uint8 image's size (a 4096x4096 photo held ~650 MiB more when this
    worked in float32 on the whole image): the ink's box is found on the uint8 pixels, and a box
    over MAX_BOX_SIDE is box-filtered down before it becomes float (it ends up 20 pixels anyway)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inverted = border.mean() > 127.5  # a dark digit on a light background
    ink = pixels < 230 if inverted else pixels > 25  # a level over 0.1 of full scale, after inverting
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return np.zeros((SIDE, SIDE), np.float32)
    box = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    factor = -(-max(box.shape) // MAX_BOX_SIDE)
    if factor > 1:
        box = np.asarray(Image.fromarray(np.ascontiguousarray(box)).reduce(factor))
    image = box.astype(np.float32) / 255.0
    if inverted:
        image = 1.0 - image
    digit = torch.from_numpy(np.ascontiguousarray(image))
    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    digit = F.interpolate(digit[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    digit = digit.clamp(0, 1).numpy()
    field = np.zeros((SIDE, SIDE), np.float32)
    total = digit.sum()
    rows, cols = np.indices(digit.shape)
    centre_y = (rows * digit).sum() / total if total > 0 else digit.shape[0] / 2
    centre_x = (cols * digit).sum() / total if total > 0 else digit.shape[1] / 2
    y0 = int(np.clip(round(SIDE / 2 - centre_y), 0, SIDE - digit.shape[0]))
    x0 = int(np.clip(round(SIDE / 2 - centre_x), 0, SIDE - digit.shape[1]))
    field[y0:y0 + digit.shape[0], x0:x0 + digit.shape[1]] = digit
    return field


def normalize(field: np.ndarray) -> torch.Tensor:
    """28x28 in 0..1 -> the network's input tensor [1, 28, 28]."""
    return ((torch.from_numpy(field) - MEAN) / STD).unsqueeze(0)


class MnistHandler(ImageClassifier):
    categories = [str(digit) for digit in range(10)]
    decode_short_side = MAX_BOX_SIDE  # a big JPEG is decoded at 1/2..1/8 scale: the digit ends up 20 px
    offers_int8 = True  # its classifier is two Linear layers; auto times whether that pays

    def load_network(self, model_dir: Path, serialized_file: str | None, settings: dict) -> nn.Module:
        model = MnistNet()
        model.load_state_dict(torch.load(model_dir / (serialized_file or WEIGHTS_FILE), weights_only=True))
        return model

    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        # No resize bound needed: the digit's bounding box is scaled down to fit 20x20.
        # A transparent canvas reads as MNIST's background whatever the stroke's colour: laid over
        # the colour that contrasts with the stroke, then (dark on light) inverted by to_mnist_format.
        return normalize(to_mnist_format(np.asarray(to_gray(image, background=None))))


handle = TorchServeHandler(MnistHandler)
