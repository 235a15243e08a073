"""One client of TorchServe's management API (REST): a model's description and what follows from it."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import requests

Headers = Mapping[str, str] | Callable[[], Mapping[str, str]]

# What a failed call can raise: the request, reading the token (key file), or the reply's JSON.
CALL_ERRORS = (requests.RequestException, OSError, KeyError, ValueError, IndexError)


class ManagementClient:
    """``base_url``: the management listener, e.g. http://127.0.0.1:8081. ``headers``: a mapping,
    or a function giving one per call (a token that exists only once the server has started)."""

    def __init__(self, base_url: str, headers: Headers | None = None, timeout: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self.headers = headers or {}
        self.timeout = timeout

    def _headers(self) -> Mapping[str, str]:
        return self.headers() if callable(self.headers) else self.headers

    def model(self, name: str) -> dict:
        """``GET models/{name}``'s first element (the default version): workers, jobQueueStatus, ...
        An answer other than 200 raises requests.HTTPError."""
        response = requests.get(f"{self.base_url}/models/{name}", headers=self._headers(), timeout=self.timeout)
        if response.status_code != 200:
            raise requests.HTTPError(f"GET models/{name}: HTTP {response.status_code}", response=response)
        return response.json()[0]

    def served_precision(self, name: str) -> str:
        """The precision the model's worker chose (our handlers' describe, ``GET models/{name}?customized=true``)."""
        response = requests.get(f"{self.base_url}/models/{name}", params={"customized": "true"}, headers=self._headers(),
                                timeout=self.timeout)
        if response.status_code != 200:
            raise requests.HTTPError(f"GET models/{name}?customized=true: HTTP {response.status_code}", response=response)
        described = response.json()[0]["customizedMetadata"]
        return (json.loads(described) if isinstance(described, str) else described)["serving"]["precision"]

    def status(self, name: str) -> str:
        """READY (a worker is READY), LOADING (none yet), UNREACHABLE, or ``HTTP nnn``."""
        try:
            workers = self.model(name).get("workers", [])
        except requests.HTTPError as error:
            return f"HTTP {error.response.status_code}"
        except CALL_ERRORS:
            return "UNREACHABLE"
        return "READY" if any(worker.get("status") == "READY" for worker in workers) else "LOADING"

    def pending_requests(self, name: str) -> int:
        """Requests queued for the model, not yet handed to a worker."""
        return int(self.model(name).get("jobQueueStatus", {}).get("pendingRequests", 0))
