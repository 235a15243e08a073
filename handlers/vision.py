"""torchvision ResNet and DenseNet classifiers (resnet50, densenet161, densenet121, ...).

The architecture comes from torchvision's builder by name; preprocessing and category names
come from the torchvision weights entry named in model-config.yaml (its ``transforms()`` and
``meta["categories"]``) — no hand-copied constants. The trained parameters are the archive's
state dict: downloaded weights in real use, random ones in the offline demo (labelled untrained).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn

from handlers.image_classification import ImageClassifier
from handlers.images import check_resize, to_rgb
from handlers.torchserve_wire import TorchServeHandler
from handlers.settings import Setting

FAMILIES = ("resnet", "densenet", "wide_resnet", "resnext")


def architecture_name(raw: object) -> str:
    name = str(raw)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known or not name.startswith(FAMILIES):
        raise ValueError(f"expected a torchvision ResNet or DenseNet builder name such as resnet50 or densenet161, got {name!r}")
    return name


def weights_entry(architecture: str, name: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights entry (transforms + categories); nothing is downloaded."""
    entries = torchvision.models.get_model_weights(architecture)
    try:
        return entries[name]
    except KeyError:
        raise ValueError(
            f"model-config.yaml: 'handler.weights' = {name!r} is not a weights entry of {architecture}; "
            f"expected one of {', '.join(entries.__members__)}"
        ) from None


def build_network(architecture: str, categories: int) -> nn.Module:
    return torchvision.models.get_model(architecture, weights=None, num_classes=categories)


class VisionHandler(ImageClassifier):
    settings = {
        **ImageClassifier.settings,
        "architecture": Setting("resnet50", architecture_name),
        "weights": Setting("DEFAULT", str),
    }

    def load_network(self, model_dir: Path, serialized_file: str | None, settings: dict) -> nn.Module:
        weights = weights_entry(settings["architecture"], settings["weights"])
        self.transform = weights.transforms()
        self.resize_short_side = min(self.transform.resize_size)
        self.decode_short_side = self.resize_short_side
        self.categories = list(weights.meta["categories"])
        model = build_network(settings["architecture"], len(self.categories))
        state = torch.load(model_dir / (serialized_file or "model.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        # channels-last: oneDNN's convolutions run faster on NHWC on CPU.
        return model.to(memory_format=torch.channels_last)

    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        check_resize(image.size, self.resize_short_side, self.max_pixels)
        return self.transform(to_rgb(image))

    def collate(self, items: list) -> torch.Tensor:
        return torch.stack([item.tensor for item in items]).contiguous(memory_format=torch.channels_last)


handle = TorchServeHandler(VisionHandler)
