"""What a model family defines; the request lifecycle around it is ``handlers.lifecycle``.

A family subclasses ``ModelHandler`` and says only what is its own, in the order a request meets
it (the names are Hugging Face pipelines' and LitServe's):

    load(model_dir, serialized_file, settings, device) -> nn.Module    once, at worker start
    decode(payload) -> item           one request -> its inputs; raise RequestError (400/413)
    collate(items) -> batch           the decoded items -> the model's batch input (on the CPU)
    forward(model, batch) -> outputs  the model call (the core runs it under inference mode,
                                      on the device, in the chosen precision)
    postprocess(outputs, batch) -> [output per item]   still on the device; the core then
                                      moves each to the CPU and checks the count
    encode(output, item) -> JSON      one output -> the client's answer

``decode``, ``encode`` and ``load`` are abstract: a family that forgets one fails at load with
Python's "Can't instantiate abstract class ... without an implementation for abstract method
'decode'".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from handlers.payload import Payload
from handlers.settings import Setting


class ModelHandler(ABC):
    #: keys accepted under ``handler:`` in model-config.yaml, each with its default and parser
    settings: dict[str, Setting] = {}
    #: int8 (dynamic quantization of nn.Linear) pays for this family: its compute is mostly Linear layers
    offers_int8: bool = False

    @abstractmethod
    def load(self, model_dir: Path, serialized_file: str | None, settings: dict, device: torch.device) -> torch.nn.Module:
        """The model, built from the unpacked archive in ``model_dir``; ``settings`` are this
        family's validated ``handler:`` keys (and the core's). The core moves it to ``device``."""

    @abstractmethod
    def decode(self, payload: Payload) -> Any:
        """One request -> one item (its tensors and options). Raise RequestError for bad input."""

    def collate(self, items: list) -> Any:
        """Items -> the model's batch input. By default: each item's ``tensor``, stacked."""
        return torch.stack([item.tensor for item in items])

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        return model(batch)

    def postprocess(self, outputs: Any, batch: Any) -> list:
        """The model's batch output -> one output per item, in order (e.g. probabilities)."""
        return list(outputs.unbind(0))

    @abstractmethod
    def encode(self, output: Any, item: Any) -> Any:
        """One item's output (on the CPU) -> a JSON-serialisable answer."""

    def check_inputs(self) -> list[Payload]:
        """Fixed requests the core runs at start: the reduced-precision accuracy guard compares
        their answers with fp32, and a compiled model is warmed up on them (none: both are off)."""
        return []
