"""A test model that takes its time: the body is how many tenths of a second to spend in the
forward, the answer says how long it slept. Lets a test have requests in flight when it stops a
server. Used by tests/test_container.py."""

import time

import torch

from handlers.torchserve_wire import TorchServeHandler
from handlers.model_handler import ModelHandler
from handlers.errors import BadInput


class SlowHandler(ModelHandler):
    def load(self, model_dir, serialized_file, settings, device):
        return torch.nn.Identity()

    def decode(self, payload):
        try:
            return int(payload.body.decode())
        except ValueError:
            raise BadInput("send a whole number of tenths of a second") from None

    def collate(self, items):
        return torch.tensor(items)

    def forward(self, model, batch):
        time.sleep(float(batch.max()) / 10)
        return model(batch)

    def encode(self, output, item):
        return {"slept_tenths": int(output)}


handle = TorchServeHandler(SlowHandler)
