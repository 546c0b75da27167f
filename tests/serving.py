"""What the serve tests share: a server in this process on a free loopback port, and a plain HTTP client."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffjet.serve import server as serve_server
from diffjet.serve.settings import ServeSettings

#: How long a test waits for a server to start or a state to show in /metrics before failing.
DEADLINE_S = 30.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


class Client:
    def __init__(self, url: str, app, server):
        self.url, self.app, self.server = url, app, server
        self.host, self.port = url.removeprefix("http://").split(":")

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None) -> Answer:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
                return Answer(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, dict(error.headers), error.read())

    def get(self, path: str, **kw) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw) -> Answer:
        return self.request("POST", path, body, **kw)

    def metrics(self) -> dict[str, float]:
        """Every diffjet sample of /metrics, as `name{label="v",...}` -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        samples = {}
        for family in text_string_to_metric_families(self.get("/metrics").body.decode()):
            for s in family.samples:
                if s.name.startswith("diffjet_"):
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                    samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def wait_for(self, condition, what: str) -> dict[str, float]:
        """Poll /metrics until `condition(metrics)` holds (bounded by DEADLINE_S)."""
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            metrics = self.metrics()
            if condition(metrics):
                return metrics
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; metrics: {self.metrics()}")

    def send_raw(self, path: str, body: dict) -> socket.socket:
        """Send a POST on a socket of its own and return the socket, unread (close it to disconnect)."""
        data = json.dumps(body).encode()
        sock = socket.create_connection((self.host, int(self.port)), timeout=DEADLINE_S)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        return sock


@contextlib.contextmanager
def running(settings: ServeSettings, pipe, **build_options):
    """A server for `settings` on 127.0.0.1 (a free port), its worker given `pipe` (or what a `load` option
    makes); stopped gracefully after."""
    from diffjet.serve.app import build_app

    build_options.setdefault("load", lambda s: pipe)
    app = build_app(settings, **build_options)
    sock = serve_server.bind("127.0.0.1", 0)
    server = serve_server.make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + DEADLINE_S
    while not server.started and thread.is_alive() and time.monotonic() < end:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    try:
        yield Client(serve_server.url(sock), app, server)
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
        sock.close()


def settings_for(path, **fields) -> ServeSettings:
    """Tiny-preset settings: 64x64, 2 steps by default, no warm-up unless asked."""
    defaults = dict(model=str(path), model_name="tiny", sizes=((64, 64),), default_steps=2, warm_up=False,
                    timeout_s=DEADLINE_S)
    return ServeSettings(**{**defaults, **fields})


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def png_parameters(b64: str) -> dict:
    return json.loads(Image.open(io.BytesIO(base64.b64decode(b64))).text["parameters"])


def alone(pipe, prompt: str, seed: int, steps: int = 2, size=(64, 64), guidance: float = 7.5) -> np.ndarray:
    """The image the pipeline makes for this prompt and seed called alone, as 8-bit pixels."""
    import torch

    image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=size[0], height=size[1],
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return np.asarray((image * 255).round(), dtype=np.int16)
