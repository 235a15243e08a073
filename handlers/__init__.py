"""Handler code that runs inside TorchServe workers; copied whole into every .mar. Start reading at
handlers/lifecycle.py (one request's path) and docs/architecture.md."""
