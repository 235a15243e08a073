"""The ``handler:`` section of a model's model-config.yaml: its schema, parsers and validation.

Each model family declares the keys it accepts (``ModelHandler.settings``); every model also
accepts ``CORE_SETTINGS``. Settings are validated once, when the worker starts, and every error
names its key (``handler.top_k``), so a typo fails the model's load, not a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


SECTION = "handler"  # the model-config.yaml section that belongs to our handlers
# handler.precision: "auto" times fp32 and every reduced precision that can pay here (handlers.precision)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class Setting:
    """One key a model accepts under ``handler:``: its default and the parser that validates it
    (raising ValueError or TypeError with the reason)."""

    default: Any
    parse: Callable[[Any], Any]


def positive_int(maximum: int) -> Callable[[Any], int]:
    """A parser for whole numbers in 1..maximum (bools and floats are refused)."""

    def parse(raw: Any) -> int:
        if isinstance(raw, (bool, float)):
            raise ValueError(f"expected an integer from 1 to {maximum}")
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"expected an integer from 1 to {maximum}") from None
        if not 1 <= value <= maximum:
            raise ValueError(f"expected an integer from 1 to {maximum}, got {value}")
        return value

    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    """A parser for values that take one of a few names."""

    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)

    return parse


def parse_cores(value: Any) -> int:
    """``handler.cores``: "shared" (0) or how many cores each worker claims for itself (handlers.tuning)."""
    if value in ("shared", 0, "0"):
        return 0
    if isinstance(value, bool) or not str(value).isdigit():
        raise ValueError(f"expected 'shared' or a whole number of cores, got {value!r}")
    return int(value)


def compile_backend(value: Any) -> str:
    """``handler.compile``: "off", or a torch.compile backend by name (e.g. "inductor")."""
    if value in (False, None, "off"):
        return "off"
    import torch._dynamo  # only when asked: it is slow to import

    backends = torch._dynamo.list_backends(exclude_tags=())
    if value not in backends:
        raise ValueError(f"expected 'off' or a torch.compile backend ({', '.join(torch._dynamo.list_backends())}), got {value!r}")
    return str(value)


# Keys every model accepts under ``handler:``, beside its family's own.
CORE_SETTINGS = {
    "precision": Setting("auto", one_of(*PRECISIONS)),
    "cores": Setting("shared", parse_cores),
    "compile": Setting("off", compile_backend),
    # Compiling must end well inside TorchServe's startup timeout (default 120 s), or eager it is.
    "compile_timeout_s": Setting(90, positive_int(3600)),
}


def read_settings(model_yaml_config: dict | None, accepted: dict[str, Setting]) -> dict:
    """The ``handler:`` section of model-config.yaml, validated; every error names its key."""
    section = (model_yaml_config or {}).get(SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"model-config.yaml: '{SECTION}' must be a mapping")
    unknown = sorted(set(section) - set(accepted))
    if unknown:
        raise ValueError(
            f"model-config.yaml: unknown key '{SECTION}.{unknown[0]}'; "
            f"accepted keys: {', '.join(sorted(accepted)) or 'none'}"
        )
    values = {}
    for key, setting in accepted.items():
        raw = section.get(key, setting.default)
        try:
            values[key] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"model-config.yaml: '{SECTION}.{key}' is invalid: {exc}") from None
    return values
