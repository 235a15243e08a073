"""int8's second guard, measured when a demo archive is built: the held-out metric of the model
through its int8 form (``int8_model``, the serving code) beside fp32, scored by the demo's own
evaluation (``Demo.evaluation``: the function its training figures came from, on the same
held-out data). Stored in the archive's metadata.json under ``int8`` and returned by describe; a
worker refuses int8 if more than ``INT8_MAX_POINTS_LOST`` points were lost
(``handlers.precision.int8_held_out``). Measured for every demo whose family's handler offers
int8 (``offers_int8``) and that has an evaluation; nothing here names a model.

Measured with this machine's quantized engine: another CPU's engine (onednn on aarch64) rounds
differently, which the worker's own check-input guard covers at start.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from graviton_serve.archive import source_digest
from graviton_serve.families import Demo, Family, resolve
from graviton_serve.progress import say
from handlers.precision_modes import int8_engine, int8_model  # the serving code's int8: its one import here
from handlers.cpu_features import CpuFeatures

# A change in these means measuring again: this check and the serving code's int8.
SOURCES = (Path(__file__).resolve(), Path(inspect.getsourcefile(int8_model)).resolve())


def held_out_int8(family: Family, demo: Demo, folder: Path) -> dict:
    """``{"int8": {"metric", "fp32", "int8", "examples", "engine"}}`` for a demo whose files are in
    ``folder`` (cached beside it: the folder is what the archive packs), or {} where int8 is not
    offered, not measurable (no evaluation) or has no engine on this machine. The figures are the
    metric in 0..1, rounded to 4 places."""
    if not family.offers_int8 or demo.evaluation is None:
        return {}
    cache = folder.with_name(f"{folder.name}.int8-{source_digest(list(SOURCES))}.json")
    if cache.exists():
        return json.loads(cache.read_text())
    engine = int8_engine(CpuFeatures.detect().is_arm)
    if engine is None:
        return {}
    say(f"{demo.name}: measuring held-out accuracy through int8 ({engine} engine) beside fp32 (once; cached)")
    evaluation = resolve(demo.evaluation)(demo, folder)
    evaluation.model.eval()
    with torch.inference_mode():
        fp32 = evaluation.score(evaluation.model)
        int8 = evaluation.score(int8_model(evaluation.model, engine))
    measured = {"int8": {"metric": evaluation.metric, "fp32": round(fp32, 4), "int8": round(int8, 4),
                         "examples": evaluation.examples, "engine": engine}}
    say(f"{demo.name}: held-out {evaluation.metric}: fp32 {fp32:.4f}, int8 {int8:.4f} on {evaluation.examples} examples")
    cache.write_text(json.dumps(measured))
    return measured
