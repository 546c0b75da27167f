"""`diffjet serve` as a process: SIGTERM, Ray Serve with two replicas, the load test script (tiny preset, CPU).

Each starts Python processes of its own (and Ray a cluster of them), so they run with -m slow."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serving import DEADLINE_S, Client, alone, pixels

pytest.importorskip("fastapi", reason="diffjet[serve] is not installed")
pytestmark = pytest.mark.slow

OPENAI = "/v1/images/generations"
REPO = Path(__file__).resolve().parent.parent


class Process:
    """`diffjet serve ...` in a subprocess; `url` once it printed ready."""

    def __init__(self, *args, start_timeout=180):
        self.process = subprocess.Popen([sys.executable, "-m", "diffjet.cli", "serve", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines, self.url = [], None
        ready = threading.Event()

        def read():
            for line in self.process.stdout:
                self.lines.append(line)
                if line.startswith("diffjet serve: http://"):
                    self.url = line.split()[2]
                if "diffjet serve: ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(start_timeout):
            self.process.kill()
            raise AssertionError(f"not ready: {self.lines} {self.process.stderr.read()}")

    def stop(self, timeout=120):
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, self.process.stderr.read()


def test_sigterm_answers_the_accepted_requests_then_exits_zero(tiny_path, served_pipe):
    server = Process("--model", str(tiny_path), "--port", "0", "--steps", "2", "--max-batch", "4",
                     "--max-wait-ms", "10000", "--device", "cpu")
    client = Client(server.url, None, None)
    answers = {}

    def send(seed):
        answers[seed] = client.post(OPENAI, {"prompt": "bye", "seed": seed})

    threads = [threading.Thread(target=send, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    client.wait_for(lambda m: m["diffjet_queue_images"] == 2, "two accepted requests")
    code, err = server.stop()
    for t in threads:
        t.join(DEADLINE_S)
    assert code == 0 and "diffjet serve: stopped" in err
    assert [answers[s].status for s in (1, 2)] == [200, 200]
    for seed in (1, 2):
        assert np.abs(pixels(answers[seed].json["data"][0]["b64_json"]) - alone(served_pipe, "bye", seed)).max() <= 1


def test_ray_serve_runs_two_replicas_behind_one_http_api(tiny_path, served_pipe):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'diffjet[ray]')")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Process("--ray", "--replicas", "2", "--model", str(tiny_path), "--port", str(port), "--steps", "2",
                     "--device", "cpu", "--max-wait-ms", "0", start_timeout=300)
    try:
        client = Client(f"http://127.0.0.1:{port}", None, None)
        assert client.get("/healthz").status == 200
        answers = {}

        def send(seed):
            answers[seed] = client.post(OPENAI, {"prompt": "replicas", "seed": seed})

        threads = [threading.Thread(target=send, args=(seed,)) for seed in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S * 4)
        assert sorted(a.status for a in answers.values()) == [200] * 12
        pids = {a.json["diffjet"]["pid"] for a in answers.values()}
        pids |= {client.get("/healthz").json["pid"] for _ in range(16)}
        assert len(pids) == 2, pids  # both replicas answered
        for seed, answer in answers.items():
            image = pixels(answer.json["data"][0]["b64_json"])
            assert np.abs(image - alone(served_pipe, "replicas", seed)).max() <= 1
        assert client.post(OPENAI, {"prompt": "x", "size": "65x64"}).status == 400  # the same checks on Ray
    finally:
        code, err = server.stop(timeout=180)
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("client", ["threads", "locust"])
def test_the_load_script_reports_rates_latencies_batches_and_flat_memory(tmp_path, client):
    import importlib.util

    # Not imported here: locust monkey-patches the whole process for gevent on import.
    if client == "locust" and importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install 'diffjet[load-test]')")
    out = tmp_path / "load.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--model", "tiny", "--steps", "2",
                          "--device", "cpu", "--clients", "1,4", "--seconds", "2", "--max-batch", "4",
                          # A batching window longer than a busy 2-core machine's scheduling jitter: at the default
                          # 20 ms, four clients fell into batches of 3 and 1 there, never 4.
                          "--max-wait-ms", "200",
                          "--client", client, "--json", str(out)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["client"] == client and [r["clients"] for r in report["runs"]] == [1, 4]
    for r in report["runs"]:
        assert r["ok"] > 0 and r["failed"] == {} and r["images_per_s"] > 0
        assert 0 < r["latency_s"]["p50"] <= r["latency_s"]["p95"] <= r["latency_s"]["p99"]
        assert sum(r["batch_sizes"].values()) >= r["ok"] / 4 and r["memory_bytes"]["host_peak"] > 0
    assert report["runs"][0]["batch_sizes"].keys() == {"1"}  # one client: nothing to batch with
    assert "4" in report["runs"][1]["batch_sizes"]  # four clients: full batches
    soak = tmp_path / "soak.json"
    # Memory flatness is the server's, whichever client drives it: a full soak once (threads), a short one with
    # locust for its count-bounded driver (about 50 s less in CI's slow run).
    requests = 120 if client == "threads" else 24
    run = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--model", "tiny", "--steps", "2",
                          "--device", "cpu", "--clients", "4", "--soak", "--requests", str(requests), "--loras", "2",
                          "--resolutions", "64x64,32x64", "--max-batch", "4", "--sample-seconds", "0.1",
                          "--client", client, "--json", str(soak)], capture_output=True, text=True, timeout=300,
                         env=env)
    r = json.loads(soak.read_text())["runs"][0]
    # The script exits 1 where memory is not flat. A 24-request soak lasts about a second, too short for that
    # verdict (one sample against another), so only the threads run's flatness is held to; the exit status must
    # still be the one the report gives.
    flat = all(v["flat"] for v in r["memory_flat"].values())
    assert run.returncode == (0 if flat else 1), run.stderr[-3000:]
    assert r["requests"] == requests and r["failed"] == {}
    assert client != "threads" or r["memory_flat"]["rss"]["flat"]
