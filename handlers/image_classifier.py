"""Image classification: one image per request in, a top-k ``{category: probability}`` dict out.

The dict is ordered highest first; it is the shape TorchServe's stock image classifier returns,
so clients written against it keep working. Model modules say how to load the network, its
categories, and how one decoded image becomes a tensor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from handlers.core import ModelHandler, Setting
from handlers.images import open_image
from handlers.payload import Payload, positive_int

MAX_TOP_K = 1000


@dataclass(frozen=True)
class ImageItem:
    tensor: torch.Tensor
    top_k: int


class ImageClassifier(ModelHandler):
    settings = {
        "top_k": Setting(5, positive_int(MAX_TOP_K)),
        # 4096 x 4096; over it a request gets 413 before any pixel is decoded.
        "max_image_pixels": Setting(16_777_216, positive_int(1_000_000_000)),
    }

    categories: list[str] = []

    def configure(self, settings: dict) -> None:
        self.default_top_k = settings["top_k"]
        self.max_pixels = settings["max_image_pixels"]

    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: Payload) -> ImageItem:
        top_k = payload.option("top_k", positive_int(MAX_TOP_K), self.default_top_k)
        image = open_image(payload.binary("image"), self.max_pixels)
        return ImageItem(self.image_to_tensor(image), top_k)

    def check_payloads(self) -> list[Payload]:
        """Deterministic images for the precision guard and compile warm-up: smooth gradients and seeded noise, 3 sizes."""
        rng = np.random.default_rng(0)
        images = []
        for side in (32, 96, 256):
            ramp = np.linspace(0, 255, side, dtype=np.float32)
            images.append(np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, np.ones(side)), 255 - ramp[None].repeat(side, 0)], -1))
            images.append(rng.integers(0, 256, (side, side, 3)))
        return [Payload(body=_png(pixels.astype(np.uint8))) for pixels in images]

    def split(self, outputs: torch.Tensor, count: int) -> list:
        # One softmax for the whole batch, in fp32 whatever precision the forward ran in.
        return list(torch.softmax(outputs.float(), dim=-1).cpu().unbind(0))

    def encode(self, probabilities: torch.Tensor, item: ImageItem) -> dict:
        k = min(item.top_k, probabilities.numel())
        top = torch.topk(probabilities, k)
        return {
            self.categories[int(index)]: round(float(p), 6)
            for p, index in zip(top.values.tolist(), top.indices.tolist())
        }


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
