"""Check a KServe resource against the KServe SDK's own models (the classes generated from
KServe's OpenAPI spec): every field must exist on its type, with the right kind of value, and
required fields must be present. Runs in a separate environment that has only the SDK
(``python -m graviton_serve.kserve_schema FILE`` there prints one problem per line, exit 1 if any).
Standard library + the SDK + PyYAML only: the SDK's pins do not fit this project's environment."""

from __future__ import annotations

import re
import sys


def _model_class(name: str):
    import kserve
    import kubernetes.client

    for module in (kserve, kubernetes.client):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def check(value, type_name: str, path: str) -> list[str]:
    # KServe's classes spell containers list[X] / dict(str, X); the kubernetes client's List[X] / Dict[str, X].
    if type_name in ("object", "Any", "ResourceQuantity", "IntOrString"):
        return []
    listed = re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)
    if listed:
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, item in enumerate(value) for p in check(item, listed.group(1), f"{path}[{i}]")]
    mapped = re.fullmatch(r"dict\(\w+, (.+)\)|Dict\[\w+, (.+)\]", type_name)
    if mapped:
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        item_type = mapped.group(1) or mapped.group(2)
        return [p for key, item in value.items() for p in check(item, item_type, f"{path}.{key}")]
    primitives = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}
    if type_name in primitives:
        ok = isinstance(value, primitives[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    cls = _model_class(type_name)
    by_json_name = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in by_json_name:
            problems.append(f"{path}.{key}: no such field on {type_name}")
            continue
        problems += check(item, cls.openapi_types[by_json_name[key]], f"{path}.{key}")
    return problems


def main(argv: list[str]) -> int:
    import yaml

    problems = []
    for path in argv:
        for document in yaml.safe_load_all(open(path)):
            if document:
                kind, version = document.get("kind"), str(document.get("apiVersion", "")).rpartition("/")[2]
                problems += check(document, f"{version.capitalize()}{kind}", f"{path}:{kind}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
