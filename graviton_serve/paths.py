"""Where things live in a checkout. Run state stays under one git-ignored folder, ``.run/``."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HANDLERS_DIR = ROOT / "handlers"
MODEL_STORE = ROOT / "model_store"
CONFIG_FILE = ROOT / "config.properties"
RUN_DIR = Path(os.environ.get("GS_RUN_DIR", ROOT / ".run"))
CACHE_DIR = Path(os.environ.get("GS_CACHE_DIR", ROOT / ".cache"))
