"""`diffjet serve` over HTTP on the tiny preset (CPU): both APIs, every bad input, LoRA, auth, concurrency."""

import threading

import numpy as np
import pytest

from tests.serving import alone, pixels, png_parameters, running, settings_for

pytest.importorskip("fastapi", reason="diffjet[serve] is not installed")

OPENAI = "/v1/images/generations"
A1111 = "/sdapi/v1/txt2img"


@pytest.fixture(scope="module")
def server(served_pipe, tiny_path, lora_dir):
    settings = settings_for(tiny_path, sizes=((64, 64), (32, 64)), lora_dir=lora_dir, max_batch=4,
                            max_wait_ms=20, queue=16, max_images=4, max_steps=8, max_body_bytes=4096,
                            warm_up=True, lora_base_copy="device")
    with running(settings, served_pipe) as client:
        assert client.app.state.service.worker.ready.wait(60)
        yield client


def counts(client):
    m = client.metrics()
    return m["diffjet_batch_images_count"], m["diffjet_images_total"]


def test_health_and_models_describe_what_is_served(server):
    health = server.get("/healthz")
    assert health.status == 200 and health.json["status"] == "ready" and health.json["model"] == "tiny"
    model = server.get("/v1/models").json["data"][0]
    assert model["id"] == "tiny" and model["object"] == "model"
    assert model["diffjet"]["sizes"] == ["64x64", "32x64"]
    assert model["diffjet"]["loras"] == ["ink", "style"]  # notes.txt is no LoRA
    assert "euler-a" in model["diffjet"]["schedulers"]


def test_openai_images_conform_and_each_image_equals_its_seed_alone(server, served_pipe):
    answer = server.post(OPENAI, {"prompt": "a red cube", "n": 2, "seed": 41, "size": "64x64"})
    assert answer.status == 200
    body = answer.json
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [41, 42]
    assert [d["batch_images"] for d in body["data"]] == [2, 2]  # one pipeline call for both
    for item in body["data"]:
        image = pixels(item["b64_json"])
        assert image.shape == (64, 64, 3)
        assert np.abs(image - alone(served_pipe, "a red cube", item["seed"])).max() <= 1
    params = png_parameters(body["data"][1]["b64_json"])
    assert params["seed"] == 42 and params["prompt"] == "a red cube" and params["steps"] == 2
    assert params["model"] == "tiny" and (params["width"], params["height"]) == (64, 64)
    assert body["diffjet"]["seconds"] > 0


def test_a1111_txt2img_conforms_and_matches_the_openai_image(server):
    answer = server.post(A1111, {"prompt": "a red cube", "seed": 41, "cfg_scale": 7.5, "width": 64,
                                 "height": 64, "batch_size": 2, "steps": 2})
    assert answer.status == 200
    body = answer.json
    assert len(body["images"]) == 2 and body["parameters"]["seed"] == 41
    import json

    info = json.loads(body["info"])
    assert info["all_seeds"] == [41, 42] and info["width"] == 64 and info["steps"] == 2
    openai = server.post(OPENAI, {"prompt": "a red cube", "seed": 42, "guidance_scale": 7.5}).json
    assert np.abs(pixels(body["images"][1]) - pixels(openai["data"][0]["b64_json"])).max() <= 1


def test_a1111_seed_minus_one_draws_a_seed_and_reports_it(server):
    info = server.post(A1111, {"prompt": "x", "seed": -1}).json["info"]
    import json

    seed = json.loads(info)["seed"]
    assert 0 <= seed < 2**63


def test_a_second_served_size_and_a_scheduler_per_request(server, served_pipe):
    answer = server.post(OPENAI, {"prompt": "p", "size": "32x64", "seed": 3, "scheduler": "euler"})
    assert answer.status == 200
    assert pixels(answer.json["data"][0]["b64_json"]).shape == (64, 32, 3)
    # The worker put the model's own scheduler back for the next request.
    default = server.post(OPENAI, {"prompt": "p", "seed": 3}).json["data"][0]["b64_json"]
    assert np.abs(pixels(default) - alone(served_pipe, "p", 3)).max() <= 1


BAD = [
    (OPENAI, {"prompt": "x", "steps": "4"}, 422, "steps"),
    (OPENAI, {"prompt": "x", "n": True}, 422, "n"),
    (OPENAI, {"prompt": 5}, 422, "prompt"),
    (OPENAI, {"prompt": ""}, 422, "prompt"),
    (OPENAI, {}, 422, "prompt"),
    (OPENAI, {"prompt": "x", "step": 4}, 422, "step"),
    (OPENAI, {"prompt": "x", "size": "64 by 64"}, 422, "size"),
    (OPENAI, {"prompt": "x", "response_format": "url"}, 422, "response_format"),
    (OPENAI, {"prompt": "x", "guidance_scale": 1e400}, 422, "guidance_scale"),
    (OPENAI, {"prompt": "x", "seed": -1}, 422, "seed"),
    (OPENAI, {"prompt": "x", "scheduler": "magic"}, 422, "scheduler"),
    (OPENAI, {"prompt": "x", "lora": {"style": "strong"}}, 422, "lora.style"),
    (OPENAI, {"prompt": "x", "size": "68x64"}, 400, "size"),
    (OPENAI, {"prompt": "x", "size": "72x64"}, 400, "size"),
    (OPENAI, {"prompt": "x", "size": "8192x8192"}, 400, "size"),
    (OPENAI, {"prompt": "x", "steps": 9}, 400, "steps"),
    (OPENAI, {"prompt": "x", "n": 5}, 400, "n"),
    (OPENAI, {"prompt": "x", "lora": {"missing": 1.0}}, 404, "lora"),
    (OPENAI, {"prompt": "x", "lora": {"../style": 1.0}}, 404, "lora"),
    (OPENAI, {"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    (A1111, {"prompt": "x", "width": 60}, 400, "width"),
    (A1111, {"prompt": "x", "height": 60}, 400, "height"),
    (A1111, {"prompt": "x", "cfg_scale": "7"}, 422, "cfg_scale"),
    (A1111, {"prompt": "x", "sampler_name": "Heun"}, 422, "sampler_name"),
    (A1111, {"prompt": "x", "batch_size": 5}, 400, "batch_size"),
    (A1111, {"prompt": "x", "restore_faces": True}, 422, "restore_faces"),
]


@pytest.mark.parametrize("route, body, status, param", BAD, ids=[f"{b[2]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_request_is_a_clear_4xx_and_changes_nothing(server, route, body, status, param):
    before = counts(server)
    answer = server.post(route, body)
    assert answer.status == status, answer.body
    error = answer.json["error"]
    assert error["param"] == param and error["code"] == status
    assert param.split(".")[0] in error["message"] or status in (400, 404)
    assert counts(server) == before and server.metrics()["diffjet_queue_images"] == 0


@pytest.mark.parametrize("raw, headers, status, message", [
    (b'{"prompt": ', {}, 422, "not valid JSON"),
    (b"[1, 2]", {}, 422, "body"),
    (b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    (b'{"prompt": "' + b"x" * 5000 + b'"}', {}, 413, "4096 bytes"),
])
def test_a_body_that_is_not_a_small_json_object_is_refused(server, raw, headers, status, message):
    before = counts(server)
    answer = server.post(OPENAI, raw=raw, headers=headers)
    assert answer.status == status and message in answer.json["error"]["message"]
    assert counts(server) == before


def test_a_lora_by_name_changes_the_image_and_switching_back_restores_it(server, served_pipe):
    plain = {"prompt": "a lighthouse", "seed": 9}
    before = pixels(server.post(OPENAI, plain).json["data"][0]["b64_json"])
    styled = server.post(OPENAI, {**plain, "lora": {"style": 1.0}})
    assert styled.status == 200
    assert png_parameters(styled.json["data"][0]["b64_json"])["lora"] == {"style": 1.0}
    assert np.abs(pixels(styled.json["data"][0]["b64_json"]) - before).max() > 8
    both = server.post(OPENAI, {**plain, "lora": {"style": 0.5, "ink": 1.0}})
    assert both.status == 200
    after = pixels(server.post(OPENAI, plain).json["data"][0]["b64_json"])
    assert np.array_equal(after, before)
    assert server.metrics()["diffjet_lora_switches_total"] >= 3
    assert served_pipe._diffjet_lora.base_copy == "device"  # --lora-base-copy reached load_lora


def test_lora_base_copy_is_host_or_device(tiny_path):
    from diffjet.errors import ConfigError

    with pytest.raises(ConfigError, match="--lora-base-copy must be one of host, device, got 'gpu'"):
        settings_for(tiny_path, lora_base_copy="gpu")


def test_concurrent_clients_each_get_their_own_seed_image(server, served_pipe):
    jobs = [(f"prompt {i}", 100 + i) for i in range(8)]
    expected = {seed: alone(served_pipe, prompt, seed) for prompt, seed in jobs}
    answers, before = {}, counts(server)

    def client(prompt, seed):
        answers[seed] = server.post(OPENAI, {"prompt": prompt, "seed": seed})

    threads = [threading.Thread(target=client, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status for a in answers.values()) == [200] * 8
    for seed, answer in answers.items():
        assert np.abs(pixels(answer.json["data"][0]["b64_json"]) - expected[seed]).max() <= 1
    batches, images = counts(server)
    assert images - before[1] == 8 and 2 <= batches - before[0] <= 8  # max_batch 4: at least two calls


def test_the_page_is_one_html_file_that_posts_to_the_openai_route(server):
    page = server.get("/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    text = page.body.decode()
    assert OPENAI in text and 'id="prompt"' in text and 'id="image"' in text and "<script src" not in text


def test_metrics_count_requests_by_route_and_status(server):
    m = server.metrics()
    assert m['diffjet_requests_total{route="/v1/images/generations",status="200"}'] >= 1
    assert m['diffjet_requests_total{route="/v1/images/generations",status="422"}'] >= 1
    assert m['diffjet_memory_bytes{kind="host_peak"}'] > 0
    assert "diffjet_batch_images_bucket{le=\"4.0\"}" in m


def test_a_chunked_body_is_capped_as_it_streams(server):
    import socket

    chunk = b'{"prompt": "' + b"x" * 3000
    with socket.create_connection((server.host, int(server.port)), timeout=30) as sock:
        sock.sendall(f"POST {OPENAI} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(2):  # 6000 bytes in two chunks, no Content-Length: the cap is 4096
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status_line = sock.recv(4096).split(b"\r\n")[0]
    assert b" 413 " in status_line


def test_the_page_in_headless_chromium_generates_and_shows_the_image(server, served_pipe, tmp_path):
    import base64
    import re
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    # ?go=1 fills the form from the query and submits it, as a person pressing Generate; the virtual time
    # budget lets the page's requests finish before the DOM is printed.
    url = f"{server.url}/?prompt=a+red+cube&seed=3&steps=2&go=1"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=30000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    status = re.search(r'<p id="status"[^>]*>([^<]*)</p>', dom).group(1)
    assert "seed 3" in status and "64x64, 2 steps" in status
    src = re.search(r'<img id="image"[^>]*src="data:image/png;base64,([^"]+)"', dom).group(1)
    shown = pixels(base64.b64encode(base64.b64decode(src)).decode())
    assert np.abs(shown - alone(served_pipe, "a red cube", 3)).max() <= 1


@pytest.fixture(scope="module")
def flux_server(tiny_flux_path):
    from diffjet.serve.worker import load_served_pipeline

    settings = settings_for(tiny_flux_path, max_batch=2, warm_up=True)
    with running(settings, None, load=load_served_pipeline) as client:
        assert client.app.state.service.worker.ready.wait(120)
        yield client


@pytest.mark.parametrize("route, body, param", [
    (OPENAI, {"prompt": "x", "scheduler": "euler-a"}, "scheduler"),
    (OPENAI, {"prompt": "x", "scheduler": "dpm++"}, "scheduler"),
    (A1111, {"prompt": "x", "sampler_name": "Euler a"}, "sampler_name"),
    (OPENAI, {"prompt": "x", "negative_prompt": "blurry"}, "negative_prompt"),
], ids=["euler-a", "dpm++", "a1111-euler-a", "negative-prompt"])
def test_a_flux_server_refuses_what_flux_cannot_do_with_a_400(flux_server, route, body, param):
    answer = flux_server.post(route, body)
    assert answer.status == 400 and answer.json["error"]["param"] == param, answer.json


def test_a_flux_server_uses_fluxs_own_guidance_and_schedulers_by_default(flux_server):
    plain = {"prompt": "a lighthouse", "seed": 3}
    default = flux_server.post(OPENAI, plain)
    assert default.status == 200
    assert default.json["diffjet"]["guidance"] == 3.5  # FluxPipeline's default, not SD's 7.5
    explicit = flux_server.post(OPENAI, {**plain, "guidance_scale": 3.5, "scheduler": "euler"})
    sd_default = flux_server.post(OPENAI, {**plain, "guidance_scale": 7.5})
    same = pixels(default.json["data"][0]["b64_json"])
    assert np.array_equal(same, pixels(explicit.json["data"][0]["b64_json"]))
    assert not np.array_equal(same, pixels(sd_default.json["data"][0]["b64_json"]))
    listed = flux_server.get("/v1/models").json["data"][0]["diffjet"]
    assert listed["schedulers"] == ["default", "euler"] and listed["samplers"] == ["Euler"]
    assert listed["default_guidance"] == 3.5
