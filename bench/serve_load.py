"""Load test of `diffjet serve`: N concurrent clients for a fixed time, or a soak of a fixed number of requests.

    python bench/serve_load.py --model sd15 --resolutions 512x512 --steps 30 --clients 1,16 --seconds 120
    python bench/serve_load.py --model sd15 --soak --requests 1000 --resolutions 512x512,768x768,512x768 --loras 2
    python bench/serve_load.py --model sd15 --ray --replicas 1,2 --clients 32 --seconds 120    # two GPUs

It starts `diffjet serve` itself (with `--ray`, on Ray Serve) on 127.0.0.1 and a free port, waits until every
served shape is warm, then for each client count: N clients, each sending its next request as soon as the
last one is answered, for `--seconds` (or, with `--soak`, until `--requests` are answered, cycling through
the sizes and through no LoRA and each of `--loras` random LoRAs). Recorded per phase, to a JSON in
bench/results/: images/s, latency p50/p95/p99 (exact, from every request), failed requests by status, the
batch-size histogram and peak memory from the server's /metrics (with --ray, one replica's). The soak also
samples the server's memory every 2 s (--sample-seconds) and checks it stays flat: the last tenth of the run against the
second tenth (after warm-up), within ±2% for the resident set and CUDA's reserved memory.

Clients: locust, headless and as a library, where installed (`pip install -e ".[serve,load-test]"`);
`--client threads` (or no locust) uses plain threads and the standard library, which needs no compiled
wheel (locust brings gevent). Loopback only: the script refuses any other --url.
"""

from __future__ import annotations

import importlib.util
import sys

if __name__ == "__main__" and "threads" not in sys.argv and importlib.util.find_spec("locust") is not None:
    import locust  # noqa: F401 - gevent's monkey-patching must come before sockets and threads are used

import argparse
import datetime as dt
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from itertools import count, cycle
from pathlib import Path

ROUTE = "/v1/images/generations"


# -- the server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`diffjet serve` in a subprocess; entering waits for `ready`, leaving sends SIGTERM and waits."""

    def __init__(self, options: list[str], start_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "diffjet.cli", "serve", "--port", str(self.port), *options]
        self.start_timeout = start_timeout
        self.lines: list[str] = []

    def __enter__(self) -> Server:
        print("starting:", " ".join(self.command), file=sys.stderr, flush=True)
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line.rstrip())
                if "diffjet serve: ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        end = time.monotonic() + self.start_timeout
        while not ready.wait(1.0):
            if self.process.poll() is not None or time.monotonic() > end:
                self.__exit__()
                raise SystemExit("the server did not get ready:\n" + "\n".join(self.lines[-20:]))
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def batch_histogram(before: dict, after: dict) -> dict[str, int]:
    """Pipeline calls by batch size during a phase, from the cumulative histogram buckets."""
    def buckets(m):
        return sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in m.items()
                      if k.startswith("diffjet_batch_images_bucket") and "+Inf" not in k)

    deltas = [(le, after_v - dict(buckets(before)).get(le, 0.0)) for le, after_v in buckets(after)]
    histogram, below = {}, 0.0
    for le, cumulative in deltas:
        if cumulative - below:
            histogram[str(int(le))] = int(cumulative - below)
        below = cumulative
    return histogram


def memory(m: dict) -> dict[str, float]:
    keys = {"rss": "process_resident_memory_bytes", "host_peak": "diffjet_memory_bytes{kind=host_peak}",
            "cuda": "diffjet_memory_bytes{kind=cuda}", "cuda_reserved": "diffjet_memory_bytes{kind=cuda_reserved}",
            "cuda_peak": "diffjet_memory_bytes{kind=cuda_peak}"}
    return {name: m[key] for name, key in keys.items() if key in m}


# -- the clients ----------------------------------------------------------------------------------------
class Plan:
    """The requests to send, in order: sizes and LoRA sets in turn, a new seed each; thread-safe."""

    def __init__(self, args: argparse.Namespace, loras: list[str], total: int | None):
        sizes = [s.strip() for s in args.resolutions.split(",")] if args.resolutions else [None]
        lora_sets = [{}] + [{name: 1.0} for name in loras]
        # Each combination for max_batch requests in a row, so that concurrent clients can share batches.
        self._combos = cycle([(size, lora) for lora in lora_sets for size in sizes for _ in range(args.max_batch)])
        self._seeds = count()
        self._lock = threading.Lock()
        self.args, self.total, self.sent, self.answered = args, total, 0, 0

    def done(self) -> bool:
        return self.total is not None and self.answered >= self.total

    def record(self, records: list, start: float, status) -> None:
        with self._lock:
            records.append((start, time.monotonic() - start, status))
            self.answered += 1

    def next(self) -> dict | None:
        with self._lock:
            if self.total is not None and self.sent >= self.total:
                return None
            self.sent += 1
            size, lora = next(self._combos)
            body = {"prompt": self.args.prompt, "seed": next(self._seeds), "n": self.args.n, "steps": self.args.steps}
            if size:
                body["size"] = size
            if lora:
                body["lora"] = lora
            return body


def post(url: str, body: dict, headers: dict) -> int:
    request = urllib.request.Request(url + ROUTE, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def drive_threads(url: str, plan: Plan, clients: int, seconds: float | None, headers: dict) -> list[tuple]:
    records: list[tuple] = []
    end = time.monotonic() + seconds if seconds else float("inf")

    def client() -> None:
        while time.monotonic() < end and (body := plan.next()) is not None:
            start = time.monotonic()
            try:
                status = post(url, body, headers)
            except OSError as error:
                status = type(error).__name__
            plan.record(records, start, status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def drive_locust(url: str, plan: Plan, clients: int, seconds: float | None, headers: dict) -> list[tuple]:
    import gevent
    from locust import HttpUser, constant, task
    from locust.env import Environment
    from locust.exception import StopUser

    records = []
    end = time.monotonic() + seconds if seconds else float("inf")
    in_flight = [0]

    class ImageClient(HttpUser):
        host = url
        wait_time = constant(0)

        @task
        def generate(self) -> None:
            # As the threads' clients do: no new request after `seconds`, and the ones under way are answered
            # (quitting at `seconds` dropped them: a phase shorter than one answer recorded none).
            body = plan.next() if time.monotonic() < end else None
            if body is None:
                raise StopUser()
            in_flight[0] += 1
            start = time.monotonic()
            try:
                with self.client.post(ROUTE, json=body, headers=headers, timeout=3600, catch_response=True) as r:
                    plan.record(records, start, r.status_code or type(r.error).__name__)
                    if r.status_code == 200:
                        r.success()
            finally:
                in_flight[0] -= 1

    env = Environment(user_classes=[ImageClient])
    runner = env.create_local_runner()
    runner.start(clients, spawn_rate=clients)

    def quit_when_done() -> None:
        while not (plan.done() or time.monotonic() >= end) or in_flight[0]:
            gevent.sleep(0.05)
        runner.quit()

    gevent.spawn(quit_when_done)
    runner.greenlet.join()
    return records


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(records: list[tuple], elapsed: float, images_per_request: int) -> dict:
    ok = [latency for _, latency, status in records if status == 200]
    failed: dict[str, int] = {}
    for _, _, status in records:
        if status != 200:
            failed[str(status)] = failed.get(str(status), 0) + 1
    return {"requests": len(records), "ok": len(ok), "failed": failed, "seconds": round(elapsed, 2),
            "images_per_s": round(len(ok) * images_per_request / elapsed, 3) if elapsed else None,
            "latency_s": {f"p{q}": round(v, 4) if (v := percentile(ok, q)) is not None else None for q in (50, 95, 99)}}


# -- phases ---------------------------------------------------------------------------------------------
def phase(args, url, clients: int, loras: list[str], headers: dict, driver) -> dict:
    plan = Plan(args, loras, args.requests if args.soak else None)
    before = scrape(url)
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.wait(args.sample_seconds):
            samples.append({"t": round(time.monotonic() - start, 2), "answered": plan.answered, **memory(scrape(url))})

    start = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True) if args.soak else None
    if sampler:
        sampler.start()
    records = driver(url, plan, clients, None if args.soak else args.seconds, headers)
    elapsed = time.monotonic() - start
    stop.set()
    after = scrape(url)
    result = {"clients": clients, **summarize(records, elapsed, args.n), "batch_sizes": batch_histogram(before, after),
              "memory_bytes": memory(after)}
    if args.soak:
        result["memory_samples"] = samples
        result["memory_flat"] = flatness(samples)
    print(json.dumps({k: v for k, v in result.items() if k != "memory_samples"}), file=sys.stderr, flush=True)
    return result


def flatness(samples: list[dict]) -> dict:
    """The last tenth of the soak against its second tenth (the first is warm-up), per kind of memory."""
    tenth = max(1, len(samples) // 10)
    verdict = {}
    for kind in ("rss", "cuda_reserved"):
        values = [s[kind] for s in samples if kind in s]
        if len(values) < 3 * tenth:
            continue
        early, late = statistics.mean(values[tenth: 2 * tenth]), statistics.mean(values[-tenth:])
        change = (late - early) / early * 100
        verdict[kind] = {"early": early, "late": late, "change_pct": round(change, 3), "flat": abs(change) <= 2.0}
    return verdict


def make_loras(model: str, count_: int, folder: Path) -> list[str]:
    """`count_` random rank-16 LoRAs for the model (drawn on the CPU, saved in float16)."""
    import torch
    from safetensors.torch import save_file

    from diffjet.models import load_pipeline, random_lora

    pipe = load_pipeline(model, device="cpu", dtype=torch.float16)
    names = []
    for i in range(count_):
        state = {k: v.half() for k, v in random_lora(pipe, seed=i).items()}
        save_file(state, str(folder / f"lora{i}.safetensors"))
        names.append(f"lora{i}")
    del pipe
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolutions", help="sizes served and requested in turn (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--prompt", default="an astronaut riding a horse on mars, highly detailed")
    parser.add_argument("--clients", default="1,16", help="comma-separated concurrent client counts, one phase each")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--soak", action="store_true", help="send --requests requests instead, memory sampled")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="soak: memory sampled this often")
    parser.add_argument("--loras", type=int, default=0, help="random LoRAs served and requested in turn")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-sizes", help="passed to diffjet serve (default: every size up to --max-batch)")
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--queue", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--replicas", default="1", help="with --ray: comma-separated replica counts, a server each")
    parser.add_argument("--client", choices=("locust", "threads"), default="locust")
    parser.add_argument("--start-timeout", type=float, default=3600.0, help="seconds the server may take to warm")
    parser.add_argument("--json", help="results file (default: bench/results/serve-<model>-<date>.json)")
    args = parser.parse_args(argv)
    client_counts = [int(c) for c in args.clients.split(",")]
    driver = drive_locust if args.client == "locust" and "locust" in sys.modules else drive_threads
    out = Path(args.json or Path(__file__).parent / "results" / f"serve-{args.model}-{dt.date.today()}.json")

    with tempfile.TemporaryDirectory() as tmp:
        loras = make_loras(args.model, args.loras, Path(tmp)) if args.loras else []
        options = ["--model", args.model, "--steps", str(args.steps), "--max-batch", str(args.max_batch),
                   "--max-wait-ms", str(args.max_wait_ms), "--queue", str(args.queue), "--device", args.device,
                   "--max-images", str(max(args.n, 10)), "--max-steps", str(max(args.steps, 150))]
        options += ["--resolutions", args.resolutions] if args.resolutions else []
        options += ["--batch-sizes", args.batch_sizes] if args.batch_sizes else []
        options += ["--lora-dir", tmp] if loras else []
        runs: list[dict] = []
        environment: dict = {}
        for replicas in [int(r) for r in args.replicas.split(",")] if args.ray else [None]:
            extra = ["--ray", "--replicas", str(replicas)] if replicas else []
            with Server(options + extra, args.start_timeout) as server:
                assert ipaddress.ip_address(urllib.parse.urlparse(server.url).hostname).is_loopback
                for clients in client_counts:
                    runs.append({"replicas": replicas, **phase(args, server.url, clients, loras, {}, driver)})
                    # After each phase, so that a run stopped later (a time limit, the server's shutdown)
                    # keeps what it measured.
                    environment = environment or _environment(args.device)
                    _write(out, _report(args, argv, driver, runs, environment, incomplete=True))
    _write(out, _report(args, argv, driver, runs, environment or _environment(args.device), incomplete=False))
    failed = sum(sum(r["failed"].values()) for r in runs)
    flat = all(v["flat"] for r in runs for v in r.get("memory_flat", {}).values())
    return 0 if failed == 0 and flat else 1


def _report(args, argv, driver, runs: list[dict], environment: dict, *, incomplete: bool) -> dict:
    report = {"command": "python bench/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now().isoformat(timespec="seconds"), "model": args.model,
              "weights": "random (architecture-exact)" if args.model in _presets() else "as given",
              "client": driver.__name__.removeprefix("drive_"), "steps": args.steps, "max_batch": args.max_batch,
              "runs": runs, "environment": environment}
    if incomplete:
        report["incomplete"] = True
    base = next((r for r in runs if r["clients"] == 1 and r["replicas"] in (None, 1)), None)
    if base and base["images_per_s"]:
        report["speedup_vs_one_client"] = {f"{r['clients']} clients, {r['replicas'] or 1} replica(s)":
                                           round(r["images_per_s"] / base["images_per_s"], 3) for r in runs}
    if args.ray:
        one = {r["clients"]: r["images_per_s"] for r in runs if r["replicas"] == 1}
        report["speedup_vs_one_replica"] = {f"{r['clients']} clients, {r['replicas']} replicas":
                                            round(r["images_per_s"] / one[r["clients"]], 3)
                                            for r in runs if one.get(r["clients"])}
    return report


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}" + (" (so far)" if report.get("incomplete") else ""))


def _presets() -> set[str]:
    from diffjet.models import PRESETS

    return set(PRESETS)


def _environment(device: str) -> dict:
    try:
        from diffjet import bench

        return bench.environment("cuda" if device in ("auto", "cuda") and _has_cuda() else "cpu")
    except Exception as error:  # noqa: BLE001 - the results still count without it
        return {"error": str(error)}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
