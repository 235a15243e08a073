"""Handler code that runs inside TorchServe workers; copied whole into every .mar (see handlers/core.py)."""
