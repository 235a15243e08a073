"""A small model with a ReLU for the torch.compile paths of the handler core.

The body is an integer n; the answer is the model applied to [n, n, n, n]. Its weights are fixed,
so the compiled and eager answers can be compared. Used only by tests/test_compile.py.
"""

import torch

from handlers.torchserve_wire import TorchServeHandler
from handlers.model_handler import ModelHandler
from handlers.errors import BadInput
from handlers.payload import Payload


class LinearRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.linear(x))  # torch.relu: what torch's failing test backend looks for


class CompileProbe(ModelHandler):
    def load(self, model_dir, serialized_file, settings, device):
        return LinearRelu()

    def decode(self, payload):
        try:
            return torch.full((4,), float(int(payload.body.decode())))
        except ValueError:
            raise BadInput("send an integer") from None

    def collate(self, items):
        return torch.stack(items)

    def encode(self, output, item):
        return [round(float(value), 5) for value in output]

    def check_inputs(self):
        return [Payload(body=b"1"), Payload(body=b"-2")]


handle = TorchServeHandler(CompileProbe)
