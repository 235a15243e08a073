"""A test model for the handler core: the body is an integer, the answer is that integer scaled.

Special inputs make each stage fail so the core's isolation can be observed:
"big" -> 413 at decode, "crash" -> a bug at decode, 999 -> out of memory whenever it is in the
forward's batch, 13 -> a bug at encode. Used only by tests/test_core.py.
"""

import torch

from handlers.errors import BadInput, PayloadTooLarge
from handlers.torchserve_wire import TorchServeHandler
from handlers.model_handler import ModelHandler
from handlers.settings import Setting, positive_int


class ProbeHandler(ModelHandler):
    settings = {"scale": Setting(2, positive_int(100))}

    def load(self, model_dir, serialized_file, settings, device):
        self.scale = settings["scale"]
        self.forward_batch_sizes = []
        return torch.nn.Identity()

    def decode(self, payload):
        text = payload.body.decode() if isinstance(payload.body, (bytes, bytearray)) else str(payload.body)
        if text == "big":
            raise PayloadTooLarge("over the probe's limit; send a smaller number")
        if text == "crash":
            raise KeyError("a bug in decode")
        try:
            return int(text)
        except ValueError:
            raise BadInput("send an integer") from None

    def collate(self, items):
        return torch.tensor(items, dtype=torch.float32)

    def forward(self, model, batch):
        self.forward_batch_sizes.append(len(batch))
        if (batch == 999).any():
            if batch.is_cuda:
                torch.empty(1 << 50, device=batch.device)  # a real CUDA out-of-memory (a petabyte)
            raise torch.OutOfMemoryError("simulated out of memory")
        return model(batch) * self.scale

    def encode(self, output, item):
        if item == 13:
            raise RuntimeError("a bug in encode")
        return {"value": float(output)}


handle = TorchServeHandler(ProbeHandler)


class Bf16SensitiveProbe(ProbeHandler):
    """Answers differently under bf16 (autocast, or oneDNN fast math's switches), so the accuracy
    guard must refuse bf16."""

    def check_inputs(self):
        from handlers.payload import Payload

        return [Payload(body=b"1"), Payload(body=b"2")]

    def forward(self, model, batch):
        flipped = torch.is_autocast_enabled("cpu") or torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        rows = torch.stack([batch, -batch], dim=1) if not flipped else torch.stack([-batch, batch], dim=1)
        return rows

    def postprocess(self, outputs, batch):
        return list(outputs.unbind(0))

    def encode(self, output, item):
        return {"top": int(output.argmax())}


class Bf16StableProbe(Bf16SensitiveProbe):
    """Same answer in bf16 and fp32: the guard lets bf16 through."""

    def forward(self, model, batch):
        return torch.stack([batch, -batch], dim=1)


sensitive = TorchServeHandler(Bf16SensitiveProbe)
stable = TorchServeHandler(Bf16StableProbe)


class Int8Probe(ModelHandler):
    """One Linear layer over a body of ones, its weights chosen so that int8's rounding moves the
    top-1: row 0's scale is 100/127, so its 0.6s round up to 0.787 (int8: 102.36 against row 1's
    exact 102; fp32: 101.8 against 102). The "stable" variant keeps a clear top-1.
    metadata.json decides the held-out guard."""

    offers_int8 = True
    rows = [[100.0, 0.6, 0.6, 0.6], [102.0, 0.0, 0.0, 0.0]]

    def load(self, model_dir, serialized_file, settings, device):
        layer = torch.nn.Linear(4, len(self.rows), bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(self.rows))
        return torch.nn.Sequential(layer)

    def decode(self, payload):
        return torch.ones(4)

    def collate(self, items):
        return torch.stack(items)

    def check_inputs(self):
        from handlers.payload import Payload

        return [Payload(body=b"1"), Payload(body=b"2")]

    def encode(self, output, item):
        return {"top": int(output.argmax()), "type": type(self.last_model).__name__ if hasattr(self, "last_model") else ""}

    def forward(self, model, batch):
        self.last_model = model[0]
        return model(batch)


class Int8StableProbe(Int8Probe):
    rows = [[9.0, 9.0, 9.0, 9.0], [102.0, 0.0, 0.0, 0.0]]


int8_drifts = TorchServeHandler(Int8Probe)
int8_stable = TorchServeHandler(Int8StableProbe)


class Int8FirstShapeOnlyProbe(Int8StableProbe):
    """Its int8 layer answers right only for the first batch shape it meets (as torch 2.14.1's
    aarch64 onednn int8 did under emulation): the guard's one-by-one pass must catch it. Its items
    differ in length (b"2" is two rows of ones), so one by one still meets two shapes."""

    def decode(self, payload):
        return torch.ones(int(payload.body), 4)

    def collate(self, items):
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)  # zero rows add nothing: no bias

    def postprocess(self, outputs, batch):
        return list(outputs.sum(dim=1).unbind(0))

    def forward(self, model, batch):
        outputs = super().forward(model, batch)
        if "quantized" in type(model[0]).__module__:
            first = self.__dict__.setdefault("first_int8_shape", tuple(batch.shape))
            if tuple(batch.shape) != first:
                outputs = outputs.flip(-1)
        return outputs


int8_first_shape_only = TorchServeHandler(Int8FirstShapeOnlyProbe)


class Int8ScoresProbe(Int8StableProbe):
    """Answers its scores for a body of ones times the request's number: dynamic int8 scales a
    layer's input by the tensor it is given, so a 1 beside a 1000 in one batch would lose its
    digits; an answer must not depend on its batchmates."""

    def decode(self, payload):
        return torch.full((4,), float(payload.body))

    def encode(self, output, item):
        return {"scores": [round(float(score), 6) for score in output]}


int8_scores = TorchServeHandler(Int8ScoresProbe)
