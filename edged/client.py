"""A small KServe V2 HTTP client (stdlib only) used by the CLI."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from edged.tensors import numpy_dtype, v2_datatype
from edged.v2 import HEADER_LENGTH


class ClientError(Exception):
    """The daemon answered with an error, or could not be reached."""


class V2Client:
    """``token`` (default ``$EDGED_TOKEN``) is sent as a bearer token; ``ca_file``
    (default ``$EDGED_CA_FILE``) verifies an https daemon with a private CA."""

    def __init__(self, url: str = "http://127.0.0.1:8080", timeout: float = 30.0,
                 token: str | None = None, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get("EDGED_TOKEN") or None
        ca_file = ca_file if ca_file is not None else os.environ.get("EDGED_CA_FILE") or None
        self.ssl_context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    def _call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.ssl_context) as resp:
                return resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                message = json.loads(payload).get("error", payload.decode(errors="replace"))
            except (ValueError, AttributeError):
                message = payload.decode(errors="replace")
            raise ClientError(f"HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(f"cannot reach edged at {self.url}: {exc}") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self._call("GET", path)[0])

    def post_json(self, path: str, data: Any) -> Any:
        raw, _ = self._call("POST", path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        return json.loads(raw) if raw else None

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: str | None = None) -> dict[str, np.ndarray]:
        """Binary-mode inference; returns outputs as numpy arrays."""
        header: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": True}}
        blobs = []
        for name, array in inputs.items():
            blob = np.ascontiguousarray(array).tobytes()
            header["inputs"].append({
                "name": name, "shape": list(array.shape), "datatype": v2_datatype(array.dtype),
                "parameters": {"binary_data_size": len(blob)},
            })
            blobs.append(blob)
        head = json.dumps(header).encode()
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        raw, headers = self._call(
            "POST", path, b"".join([head, *blobs]),
            {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"},
        )
        length = int({k.lower(): v for k, v in headers.items()}.get(HEADER_LENGTH.lower(), len(raw)))
        body = json.loads(raw[:length])
        outputs: dict[str, np.ndarray] = {}
        offset = length
        for out in body["outputs"]:
            dtype = numpy_dtype(out["datatype"])
            if "data" in out:
                outputs[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
            else:
                size = out["parameters"]["binary_data_size"]
                outputs[out["name"]] = np.frombuffer(raw[offset:offset + size], dtype=dtype).reshape(out["shape"])
                offset += size
        return outputs
