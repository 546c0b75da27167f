"""`diffjet serve`'s queue and lifecycle on the tiny preset (CPU): batching, queue full, disconnects, timeouts,
warm-up and readiness, a failed start, graceful shutdown, the API key, and the command's argument checks.

Servers here wait up to 10 s for a batch to fill, so every batch that runs is full, and what it holds is
decided by the test, not by timing."""

import socket
import threading
import time

import numpy as np
import pytest

from tests.serving import DEADLINE_S, alone, pixels, running, settings_for
from tests.test_cli import no_work  # noqa: F401 - a fixture

pytest.importorskip("fastapi", reason="diffjet[serve] is not installed")

import diffjet  # noqa: E402
from diffjet import cli  # noqa: E402
from diffjet.serve.batcher import Batcher, BatchKey, Item, Job, QueueFull  # noqa: E402
from diffjet.serve.worker import PipelineWorker  # noqa: E402

OPENAI = "/v1/images/generations"
WINDOW = dict(max_batch=4, max_wait_ms=10_000)


def post_in_threads(client, bodies, headers=None):
    answers = [None] * len(bodies)

    def send(i):
        answers[i] = client.post(OPENAI, bodies[i], headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, answers


def join(threads):
    for t in threads:
        t.join(DEADLINE_S)


# -- batching -----------------------------------------------------------------------------------------
def test_images_of_separate_requests_batched_together_each_equal_their_seed_alone(served_pipe, tiny_path):
    import torch

    with running(settings_for(tiny_path, **WINDOW), served_pipe) as client:
        jobs = [("a red cube", 1), ("a blue ball", 2), ("a green cone", 3), ("a red cube", 4)]
        threads, answers = post_in_threads(client, [{"prompt": p, "seed": s} for p, s in jobs])
        join(threads)
        assert [a.status for a in answers] == [200] * 4
        assert [a.json["data"][0]["batch_images"] for a in answers] == [4] * 4  # one call for all four
        # Held to float precision against the pipeline called alone: the batch changes only matmul rounding.
        for (prompt, seed), answer in zip(jobs, answers):
            single = served_pipe(prompt=prompt, num_inference_steps=2, width=64, height=64,
                                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
            assert np.abs(pixels(answer.json["data"][0]["b64_json"]) - np.round(single * 255)).max() <= 1
        m = client.metrics()
        assert m["diffjet_batch_images_count"] == 1 and m["diffjet_batch_images_sum"] == 4


def test_the_worker_batches_equal_settings_only_and_images_match_alone_to_float_precision(served_pipe, tiny_path):
    """At the worker: four queued images, two settings; two calls; each image within 1e-5 of itself alone."""
    from diffjet.serve.metrics import Metrics

    settings = settings_for(tiny_path, max_batch=4, max_wait_ms=0)
    batcher = Batcher(4, 0.0, 16)
    worker = PipelineWorker(settings, batcher, Metrics(4), load=lambda s: served_pipe)
    keys = [BatchKey(64, 64, 2, 7.5, "default"), BatchKey(64, 64, 2, 7.5, "euler-a")]
    jobs = []
    for i, key in enumerate([keys[0], keys[1], keys[0], keys[1]]):
        job = Job(1)
        jobs.append((job, key, f"prompt {i}", 50 + i))
    batcher.submit([Item(key, prompt, "", seed, job, 0) for job, key, prompt, seed in jobs])
    worker.start()
    results = [job.future.result(DEADLINE_S)[0] for job, *_ in jobs]
    worker.stop(DEADLINE_S)
    assert [r.batch_images for r in results] == [2, 2, 2, 2]
    for (job, key, prompt, seed), result in zip(jobs, results):
        worker_alone = Batcher(1, 0.0, 1)
        single = PipelineWorker(settings, worker_alone, Metrics(1), load=lambda s: served_pipe)
        one = Job(1)
        worker_alone.submit([Item(key, prompt, "", seed, one, 0)])
        single.start()
        reference = one.future.result(DEADLINE_S)[0]
        single.stop(DEADLINE_S)
        error = np.linalg.norm(result.pixels - reference.pixels) / np.linalg.norm(reference.pixels)
        assert reference.batch_images == 1 and error <= 1e-5, (key.scheduler, error)


def test_warm_up_calls_every_served_size_at_every_batch_size_before_ready(served_pipe, tiny_path, monkeypatch):
    calls = []
    real_call = PipelineWorker._call

    def spy(self, key, prompts, negative, seeds):
        calls.append((key.width, key.height, len(prompts), self.ready.is_set()))
        return real_call(self, key, prompts, negative, seeds)

    monkeypatch.setattr(PipelineWorker, "_call", spy)
    settings = settings_for(tiny_path, sizes=((64, 64), (32, 64)), max_batch=3, warm_up=True)
    with running(settings, served_pipe) as client:
        assert client.app.state.service.worker.ready.wait(DEADLINE_S)
        assert client.get("/healthz").status == 200
    assert calls == [(64, 64, b, False) for b in (1, 2, 3)] + [(32, 64, b, False) for b in (1, 2, 3)]


def test_a_batch_size_that_was_not_warmed_runs_padded_to_one_that_was(served_pipe, tiny_path, monkeypatch):
    from diffjet.serve.metrics import Metrics

    sizes_called = []
    real_call = PipelineWorker._call

    def spy(self, key, prompts, negative, seeds):
        sizes_called.append(len(prompts))
        return real_call(self, key, prompts, negative, seeds)

    monkeypatch.setattr(PipelineWorker, "_call", spy)
    settings = settings_for(tiny_path, max_batch=4, batch_sizes=(4,))
    assert settings.warm_batches == [1, 4]
    batcher = Batcher(4, 0.0, 16)
    job = Job(3)
    batcher.submit([Item(K1, "padded", "", 20 + i, job, i) for i in range(3)])
    worker = PipelineWorker(settings, batcher, Metrics(4), load=lambda s: served_pipe).start()
    images = job.future.result(DEADLINE_S)
    worker.stop(DEADLINE_S)
    assert sizes_called == [4] and [i.batch_images for i in images] == [3, 3, 3]
    for i, image in enumerate(images):
        assert np.abs(np.round(image.pixels * 255) - alone(served_pipe, "padded", 20 + i)).max() <= 1


# -- the queue: full, disconnects, timeouts ---------------------------------------------------------------
def test_a_full_queue_answers_429_with_retry_after_and_a_client_that_leaves_is_dropped(served_pipe, tiny_path):
    with running(settings_for(tiny_path, queue=4, **WINDOW), served_pipe) as client:
        first = client.send_raw(OPENAI, {"prompt": "a", "seed": 1})
        client.wait_for(lambda m: m["diffjet_queue_images"] == 1, "one image queued")
        second = client.send_raw(OPENAI, {"prompt": "b", "n": 3, "steps": 3})
        client.wait_for(lambda m: m["diffjet_queue_images"] == 4, "four images queued")
        full = client.post(OPENAI, {"prompt": "c"})
        assert full.status == 429 and int(full.headers["retry-after"]) >= 1
        assert "queue is full" in full.json["error"]["message"]
        first.close()
        second.close()
        m = client.wait_for(lambda m: m['diffjet_dropped_images_total{reason="disconnect"}'] == 4, "4 dropped")
        assert m["diffjet_queue_images"] == 0
        # The dropped images never ran: the next full batch is the only pipeline call.
        threads, answers = post_in_threads(client, [{"prompt": "d", "seed": s} for s in range(4)])
        join(threads)
        assert [a.status for a in answers] == [200] * 4
        m = client.metrics()
        assert m["diffjet_batch_images_count"] == 1 and m["diffjet_images_total"] == 4


def test_a_request_that_waits_past_the_timeout_gets_504_and_is_dropped(served_pipe, tiny_path):
    with running(settings_for(tiny_path, timeout_s=0.3, **WINDOW), served_pipe) as client:
        answer = client.post(OPENAI, {"prompt": "slow", "n": 2})
        assert answer.status == 504 and "--timeout" in answer.json["error"]["message"]
        m = client.metrics()
        assert m['diffjet_dropped_images_total{reason="timeout"}'] == 2 and m["diffjet_queue_images"] == 0
        assert m["diffjet_batch_images_count"] == 0


# -- lifecycle ------------------------------------------------------------------------------------------
def test_health_is_503_until_warm_and_requests_made_meanwhile_are_served_after(served_pipe, tiny_path):
    release = threading.Event()

    def slow_load(settings):
        assert release.wait(DEADLINE_S)
        return served_pipe

    try:
        with running(settings_for(tiny_path, max_wait_ms=0), None, load=slow_load) as client:
            warming = client.get("/healthz")
            assert warming.status == 503 and warming.json["status"] == "warming"
            threads, answers = post_in_threads(client, [{"prompt": "early", "seed": 5}])
            client.wait_for(lambda m: m["diffjet_queue_images"] == 1, "the early request queued")
            release.set()
            join(threads)
            assert answers[0].status == 200 and client.get("/healthz").status == 200
            assert np.abs(pixels(answers[0].json["data"][0]["b64_json"]) - alone(served_pipe, "early", 5)).max() <= 1
    finally:
        release.set()


def test_a_pipeline_that_fails_to_load_shows_in_health_and_stops_the_server(tiny_path):
    failures, release = [], threading.Event()

    def broken(settings):
        assert release.wait(DEADLINE_S)
        raise RuntimeError("CUDA out of memory")

    with running(settings_for(tiny_path), None, load=broken, on_failure=failures.append) as client:
        threads, queued = post_in_threads(client, [{"prompt": "queued while loading"}])
        client.wait_for(lambda m: m["diffjet_queue_images"] == 1, "a request queued while loading")
        release.set()
        join(threads)
        assert queued[0].status == 503 and "CUDA out of memory" in queued[0].json["error"]["message"]
        client.app.state.service.worker._thread.join(DEADLINE_S)
        health = client.get("/healthz")
        assert health.status == 503 and health.json == {"status": "failed", "error": "CUDA out of memory"}
        answer = client.post(OPENAI, {"prompt": "x"})
        assert answer.status == 503 and "failed to load" in answer.json["error"]["message"]
    assert [str(f) for f in failures] == ["CUDA out of memory"]


def test_shutdown_answers_every_accepted_request_then_refuses_connections(served_pipe, tiny_path):
    with running(settings_for(tiny_path, **WINDOW), served_pipe) as client:
        threads, answers = post_in_threads(client, [{"prompt": "last", "seed": s} for s in (7, 8)])
        client.wait_for(lambda m: m["diffjet_queue_images"] == 2, "two accepted requests")
        stop = time.monotonic()
        client.server.should_exit = True  # what uvicorn does on SIGTERM
        join(threads)
        assert [a.status for a in answers] == [200, 200]
        # Shutting down, the batch leaves at once instead of waiting out its 10 s window.
        assert time.monotonic() - stop < 5
        assert [a.json["data"][0]["batch_images"] for a in answers] == [2, 2]
        for seed, answer in zip((7, 8), answers):
            assert np.abs(pixels(answer.json["data"][0]["b64_json"]) - alone(served_pipe, "last", seed)).max() <= 1
    with pytest.raises(OSError):
        socket.create_connection((client.host, int(client.port)), timeout=2).close()


# -- the API key ----------------------------------------------------------------------------------------
def test_with_an_api_key_every_route_but_health_needs_the_bearer_token(served_pipe, tiny_path):
    key = "k" * 20 + "-secret"
    with running(settings_for(tiny_path, api_key=key, max_wait_ms=0), served_pipe) as client:
        for path in ("/v1/models", "/metrics"):
            answer = client.get(path)
            assert answer.status == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert client.post(OPENAI, {"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status == 401
        assert client.post(OPENAI, {"prompt": "x"}, headers={"Authorization": key}).status == 401
        assert client.get("/healthz").status == 200 and client.get("/").status == 200
        ok = client.post(OPENAI, {"prompt": "x"}, headers={"Authorization": f"Bearer {key}"})
        assert ok.status == 200
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status == 200


# -- the command's argument checks ------------------------------------------------------------------------
@pytest.fixture
def no_model(no_work, monkeypatch):
    """`no_work` (loading or resolving a model, recorded and refused), and starting a server too."""
    import diffjet.serve.server

    def run(*args, **kwargs):
        no_work.append("run")
        raise diffjet.errors.DiffjetError("the server started before the arguments were checked")

    monkeypatch.setattr(diffjet.serve.server, "run", run)
    return no_work


SERVE = ["serve", "--model", "tiny", "--device", "cpu"]


@pytest.mark.parametrize("extra, message", [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--batch-sizes", "2,9"], "--batch-sizes must be from 1 to --max-batch"),
    (["--batch-sizes", "2,x"], "--batch-sizes: '2,x' is not"),
    (["--queue", "0"], "--queue must be at least 1"),
    (["--resolutions", "65x64"], "multiple of 8"),
    (["--resolutions", "4096x4096"], "above the cap"),
    (["--steps", "200"], "above --max-steps"),
    (["--max-wait-ms", "nan"], "--max-wait-ms"),
    (["--timeout", "0"], "--timeout"),
    (["--port", "70000"], "--port"),
    (["--host", "0.0.0.0"], "--api-key-file"),
    (["--api-key-file", "/nonexistent/key"], "cannot read"),
    (["--lora-dir", "/nonexistent/loras"], "--lora-dir"),
    (["--min-replicas", "1", "--ray"], "go together"),
    (["--compiler", "eager", "--precompile", "aoti"], "--compiler eager compiles nothing"),
])
def test_bad_serve_arguments_are_one_line_before_any_model_loads(capsys, no_model, extra, message):
    code = cli.main([*SERVE, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and no_model == []


def test_serve_precompile_reaches_the_config_the_served_pipeline_is_compiled_with(monkeypatch):
    # The flag says what the server compiles and keeps for shapes the cache does not have (it loads entries
    # of either kind): a server that dropped it would keep saved functions where packages were asked for.
    import diffjet.serve.server
    from diffjet.serve.worker import load_served_pipeline

    served, configs = [], []
    monkeypatch.setattr(diffjet.serve.server, "run", lambda settings, *args, **kwargs: served.append(settings))
    compile_ = diffjet.compile
    monkeypatch.setattr(diffjet, "compile", lambda pipe, config: configs.append(config) or compile_(pipe, config))
    assert cli.main([*SERVE, "--precompile", "aoti"]) == 0
    load_served_pipeline(served[0])
    assert served[0].precompile == "aoti" and configs[0].precompile == "aoti"


def test_a_short_api_key_and_a_port_in_use_are_refused_before_any_model_loads(capsys, no_model, tmp_path):
    short = tmp_path / "key"
    short.write_text("abc\n")
    assert cli.main([*SERVE, "--api-key-file", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main([*SERVE, "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err and no_model == []


# -- the batcher alone -----------------------------------------------------------------------------------
def items(key, n, job=None):
    job = job or Job(n)
    return [Item(key, "p", "", i, job, i) for i in range(n)]


K1, K2 = BatchKey(64, 64, 2, 7.5, "default"), BatchKey(64, 64, 3, 7.5, "default")
LORA = BatchKey(64, 64, 2, 7.5, "default", loras=(("style", 1.0),))


def test_a_batch_holds_one_key_oldest_first_at_most_max_batch():
    batcher = Batcher(max_batch=3, max_wait_s=0.0, capacity=16)
    batcher.submit(items(K1, 2))
    batcher.submit(items(K2, 1))
    batcher.submit(items(K1, 2))
    assert [(i.key, i.seed) for i in batcher.next_batch()] == [(K1, 0), (K1, 1), (K1, 0)]
    assert [i.key for i in batcher.next_batch()] == [K2]
    assert [i.key for i in batcher.next_batch()] == [K1]


def test_a_full_batch_leaves_without_waiting_for_its_window():
    batcher = Batcher(max_batch=2, max_wait_s=60.0, capacity=16)
    batcher.submit(items(K1, 2))
    start = time.monotonic()
    assert len(batcher.next_batch()) == 2 and time.monotonic() - start < 1


def test_the_merged_lora_set_goes_first_while_the_oldest_image_is_within_its_patience():
    batcher = Batcher(max_batch=4, max_wait_s=0.0, capacity=16)
    batcher.submit(items(K1, 1))
    batcher.submit(items(LORA, 1))
    assert [i.key for i in batcher.next_batch(merged_loras=LORA.loras)] == [LORA]
    assert [i.key for i in batcher.next_batch(merged_loras=LORA.loras)] == [K1]


def test_the_queue_takes_a_request_whole_or_not_at_all_and_cancel_frees_it():
    batcher = Batcher(max_batch=4, max_wait_s=0.0, capacity=4)
    job = Job(3)
    batcher.submit(items(K1, 3, job))
    with pytest.raises(QueueFull) as full:
        batcher.submit(items(K1, 2))
    assert full.value.retry_after >= 1 and batcher.waiting == 3
    assert batcher.cancel(job) == 3 and batcher.waiting == 0 and job.cancelled
    batcher.submit(items(K1, 4))
    assert batcher.waiting == 4


def test_a_closed_batcher_hands_out_what_is_queued_then_none():
    batcher = Batcher(max_batch=4, max_wait_s=60.0, capacity=8)
    batcher.submit(items(K1, 1))
    batcher.close()
    assert len(batcher.next_batch()) == 1 and batcher.next_batch() is None
    with pytest.raises(RuntimeError):
        batcher.submit(items(K1, 1))
