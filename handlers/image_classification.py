"""Image classification: one image per request in, a top-k ``{category: probability}`` dict out.

The dict is ordered highest first; it is the shape TorchServe's stock image classifier returns,
so clients written against it keep working. A family (mnist, vision) says how to load its
network and categories, and how one decoded image becomes a tensor (with the resize bound).

Inputs: the image as raw bytes, base64 text, or JSON ``{"image": "<base64 or data URL>"}``;
option ``top_k`` in the JSON body or as a form field.
"""

from __future__ import annotations

import io
from collections import Counter
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handlers.errors import reading_client_bytes
from handlers.images import open_image
from handlers.model_handler import ModelHandler
from handlers.payload import Payload
from handlers.settings import Setting, positive_int

MAX_TOP_K = 1000
CHECK_PHOTOS = "check_photos"  # an archive's folder of real photos for the precision guard (optional)


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
    decode_short_side: int | None = None  # the family resizes its short side to this: JPEGs may decode smaller

    def load(self, model_dir, serialized_file, settings, device):
        self.default_top_k = settings["top_k"]
        self.max_pixels = settings["max_image_pixels"]
        self.check_photos = [path.read_bytes() for path in sorted((Path(model_dir) / CHECK_PHOTOS).glob("*.jpg"))]
        network = self.load_network(model_dir, serialized_file, settings)
        self.categories = distinct_names(self.categories)
        return network

    @abstractmethod
    def load_network(self, model_dir, serialized_file: str | None, settings: dict) -> torch.nn.Module:
        """The network with its weights; sets ``categories`` if they come from the archive."""

    @abstractmethod
    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        """One decoded image -> the network's input tensor. Check the cost of any resize first
        (``handlers.images.check_resize``): memory stays bounded by ``max_image_pixels``."""

    def decode(self, payload: Payload) -> ImageItem:
        top_k = payload.option("top_k", positive_int(MAX_TOP_K), self.default_top_k)
        data = payload.binary("image")
        with reading_client_bytes("the image", parser_packages=("PIL",)):
            return ImageItem(self.image_to_tensor(open_image(data, self.max_pixels, self.decode_short_side)), top_k)

    def check_inputs(self) -> list[Payload]:
        """Deterministic images for the precision guard and compile warm-up: smooth gradients and
        seeded noise, 3 sizes; then the archive's real photos (``check_photos/*.jpg``), if it has
        some: a trained model's guard then compares answers that mean something."""
        rng = np.random.default_rng(0)
        images = []
        for side in (32, 96, 256):
            ramp = np.linspace(0, 255, side, dtype=np.float32)
            images.append(np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, np.ones(side)), 255 - ramp[None].repeat(side, 0)], -1))
            images.append(rng.integers(0, 256, (side, side, 3)))
        return [Payload(body=_png(pixels.astype(np.uint8))) for pixels in images] + \
            [Payload(body=photo) for photo in self.check_photos]

    def postprocess(self, logits: torch.Tensor, batch: torch.Tensor) -> list:
        # One softmax for the whole batch, in fp32 whatever precision the forward ran in.
        return list(torch.softmax(logits.float(), dim=-1).unbind(0))

    def encode(self, probabilities: torch.Tensor, item: ImageItem) -> dict:
        k = min(item.top_k, probabilities.numel())
        top = torch.topk(probabilities, k)
        return {
            self.categories[int(index)]: round(float(p), 6)
            for p, index in zip(top.values.tolist(), top.indices.tolist())
        }


def distinct_names(categories: list[str]) -> list[str]:
    """The category names, each made unique: a name that several classes share gets its class
    index. timm's ImageNet table names both 134 (the bird) and 517 (the machine) "crane"; they
    become ``"crane (class 134)"`` and ``"crane (class 517)"`` (torchvision's table already says
    "crane bird" and "crane"). The answer is a ``{category: probability}`` dict: a shared name would
    lose a class from the top-k. ValueError if names still collide."""
    counts = Counter(categories)
    distinct = [f"{name} (class {index})" if counts[name] > 1 else name for index, name in enumerate(categories)]
    if len(set(distinct)) != len(distinct):
        raise ValueError("the category names collide even with their class indices appended")
    return distinct


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
