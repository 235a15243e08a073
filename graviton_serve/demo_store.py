"""The offline demo model store: every demo model of the registry (``families.demos()``) built
from what installed packages ship, by its recipe (``graviton_serve/demos/``).

Built once and cached: each demo's files under ``<CACHE_DIR>/weights/<name>/<key>`` (the key: its
sources and its registry entry), archives in the model store (rebuilt when the handler code they
carry, the demo's sources or its model-config change). Nothing here names a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from graviton_serve import int8_check
from graviton_serve.archive import ArchiveSpec, build_archive, handler_sources, source_digest
from graviton_serve.families import Demo, Family, demos, resolve
from graviton_serve.paths import CACHE_DIR, ROOT
from graviton_serve.progress import say

STAMP_DIR = ".stamps"


def weights_key(demo: Demo) -> str:
    """What the demo's files depend on: its sources' contents and its registry entry (recipe,
    file, settings), so that a changed budget or seed makes them again. 16 hex digits."""
    entry = json.dumps(dataclasses.asdict(demo), sort_keys=True)
    sources = source_digest([ROOT / path for path in demo.sources])
    return hashlib.sha256(f"{sources}\n{entry}".encode()).hexdigest()[:16]


def _made_files(demo: Demo) -> tuple[Path, dict]:
    """The demo's files and metadata from the cache, made first when what they depend on changed."""
    folder = CACHE_DIR / "weights" / demo.name / weights_key(demo)
    metadata_file = folder / "metadata.json"  # written last: its presence means complete
    if metadata_file.exists():
        say(f"{demo.name}: weights cached in {folder}")
        return folder, json.loads(metadata_file.read_text())
    say(f"{demo.name}: making its weights (once; cached afterwards)")
    if folder.parent.exists():
        shutil.rmtree(folder.parent)  # older versions of this model
    folder.mkdir(parents=True)
    metadata = resolve(demo.recipe)(demo, folder)
    metadata_file.write_text(json.dumps(metadata, indent=2))
    return folder, metadata


def build_demo_store(store: Path, names: list[str] | None = None, force: bool = False) -> list[Path]:
    """Build each demo archive (default: every one, in registry order) into ``store`` unless an
    up-to-date one is there; returns their paths. ValueError for a name the registry lacks."""
    registry = demos()
    unknown = [name for name in names or [] if name not in registry]
    if unknown:
        raise ValueError(f"unknown demo model '{unknown[0]}'; known: {', '.join(registry)}")
    store.mkdir(parents=True, exist_ok=True)
    return [_build(store, *registry[name], force) for name in names or registry]


def _build(store: Path, family: Family, demo: Demo, force: bool) -> Path:
    archive = store / f"{demo.name}.mar"
    stamp_file = store / STAMP_DIR / f"{demo.name}.json"
    model_config = family.model_config(**demo.handler_settings)
    sources = {*handler_sources(), family.handler_path, *(ROOT / path for path in (*demo.sources, *int8_check.SOURCES))}
    stamp = {"sources": source_digest(sorted(sources)), "weights": weights_key(demo), "model_config": model_config}
    if not force and archive.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        say(f"{demo.name}: {archive.name} is up to date")
        return archive
    folder, metadata = _made_files(demo)
    metadata = {**metadata, **int8_check.held_out_int8(family, demo, folder)}
    say(f"{demo.name}: packaging {archive.name}")
    serialized_file = demo.serialized_file_name
    extras = [path for path in sorted(folder.iterdir()) if path.name not in (serialized_file, "metadata.json")]
    spec = ArchiveSpec(demo.name, family.name, folder / serialized_file, model_config, {"model": demo.name, **metadata},
                       extras, handler_file=family.handler_file)
    build_archive(spec, store)
    stamp_file.parent.mkdir(exist_ok=True)
    stamp_file.write_text(json.dumps(stamp))
    return archive
