"""Micro-batched serving: concurrent requests share forward passes, each gets its own answer, a bad
request fails alone, and results equal one-at-a-time predictions."""

import threading
import time

import httpx
import numpy as np
import pytest
from conftest import start_server

from sevenpoint.data import Derm7pt
from sevenpoint.infer.predict import Predictor, PredictError
from sevenpoint.web.batching import MicroBatcher


def test_batcher_groups_waiting_items_and_answers_each_its_own():
    sizes = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.05)  # while one batch runs, the next requests queue up
        return [x * 10 for x in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=20)
    futures = {}

    def client(i):
        futures[i] = batcher.submit(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: f.result(timeout=10) for i, f in futures.items()} == {i: 10 * i for i in range(13)}
    assert sum(sizes) == 13 and max(sizes) <= 4 and max(sizes) > 1
    assert batcher.stats.cases == 13 and batcher.stats.batches == len(sizes) and batcher.stats.largest == max(sizes)


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    def run(items):
        if "boom" in items:
            raise RuntimeError("model exploded")
        return items

    batcher = MicroBatcher(run, max_batch=1, max_wait_ms=0)
    bad, good = batcher.submit("boom"), batcher.submit("fine")
    with pytest.raises(RuntimeError, match="model exploded"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == "fine"


def test_prepare_refuses_per_case_before_any_batch(tiny_run, synth_root):
    predictor = Predictor.from_checkpoint(tiny_run["best_checkpoint"])
    with pytest.raises(PredictError, match="give a dermoscopy image, a clinical photo, or both"):
        predictor.prepare({"meta": None})
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    batch = predictor.run([predictor.prepare({"derm": case.derm}), predictor.prepare({"clinic": case.clinic})])
    assert batch[0].branches_used == ["derm"] and batch[1].branches_used == ["clinic"]


def test_concurrent_requests_share_forward_passes_and_match_single_predictions(tiny_run, synth_root):
    cases = Derm7pt.load(synth_root).split_cases("test")[:6]
    files = [{"derm": ("d.jpg", c.derm.read_bytes(), "image/jpeg")} for c in cases]
    import io

    from PIL import Image

    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 60)).save(tiny, "PNG")  # a real image the lesion gate refuses
    files.append({"derm": ("d.png", tiny.getvalue(), "image/png")})
    proc, url = start_server(tiny_run["best_checkpoint"], "--max-batch", "4", "--batch-wait-ms", "300",
                             "--backend", "torch")
    try:
        answers = [None] * len(files)

        def client(i):
            answers[i] = httpx.post(f"{url}/api/predict", files=files[i], timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(files))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = httpx.get(f"{url}/health").json()["batching"]
        single = [httpx.post(f"{url}/api/predict", files=f, timeout=60).json() for f in files[:-1]]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert [a.status_code for a in answers] == [200] * 6 + [422]
    assert "too small" in answers[-1].json()["error"]
    assert health["largest"] > 1 and health["cases"] == 6 and health["max_batch"] == 4
    for got, alone in zip(answers[:6], single):
        got = got.json()
        assert got["diagnosis"] == alone["diagnosis"] and got["seven_point_score"] == alone["seven_point_score"]
        for task, entry in got["tasks"].items():
            np.testing.assert_allclose(list(entry["probabilities"].values()),
                                       list(alone["tasks"][task]["probabilities"].values()), atol=1e-4)


def test_close_finishes_queued_work_then_stops_the_worker():
    batcher = MicroBatcher(lambda items: [x + 1 for x in items], max_batch=2, max_wait_ms=50)
    futures = [batcher.submit(i) for i in range(5)]
    batcher.close()
    assert [f.result(timeout=1) for f in futures] == [1, 2, 3, 4, 5]
    assert not batcher._worker.is_alive()


def test_server_shutdown_stops_the_batcher(tiny_run):
    from fastapi.testclient import TestClient

    from sevenpoint.web import batching
    from sevenpoint.web.app import create_app

    before = set(batching._LIVE)
    with TestClient(create_app(Predictor.from_checkpoint(tiny_run["best_checkpoint"]))) as client:
        assert client.get("/health").status_code == 200
        (batcher,) = set(batching._LIVE) - before
        assert batcher._worker.is_alive()
    assert not batcher._worker.is_alive()
