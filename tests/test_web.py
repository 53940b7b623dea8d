import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import start_server

from sevenpoint.data import Derm7pt
from sevenpoint.predict import Predictor
from sevenpoint.schema import TASK_NAMES
from sevenpoint.web.app import create_app

ARTIFACTS = Path(os.environ.get("SEVENPOINT_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def client(tiny_run):
    return TestClient(create_app(Predictor.from_checkpoint(tiny_run["best_checkpoint"]), max_upload_mb=1.0))


@pytest.fixture(scope="module")
def case_files(synth_root):
    case = Derm7pt.load(synth_root).split_cases("test")[0]
    return case.derm.read_bytes(), (case.clinic or case.derm).read_bytes()


def test_health_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"]["variant"] == "DCIHMM"
    page = client.get("/").text
    assert "not a medical device" in page and '<option value="head neck">' in page and "cdn" not in page.lower()


def test_json_endpoint_returns_all_tasks(client, case_files):
    derm, clinic = case_files
    r = client.post("/api/predict", files={"derm": ("d.jpg", derm, "image/jpeg"), "clinic": ("c.jpg", clinic, "image/jpeg")},
                    data={"sex": "male", "location": "back", "elevation": "flat"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["tasks"]) == list(TASK_NAMES)
    for t in body["tasks"].values():
        assert sum(t["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["branches_used"] == ["derm", "clinic", "hybrid"]
    assert body["attention_overlays"]["derm.exit"].startswith("data:image/png;base64,")


def test_derm_only_and_no_metadata(client, case_files):
    r = client.post("/api/predict", files={"derm": ("d.jpg", case_files[0], "image/jpeg")})
    assert r.status_code == 200 and r.json()["branches_used"] == ["derm"]


OK = "ok"  # stands for a valid dermoscopy upload
CUT = "cut"  # stands for a valid dermoscopy JPEG cut inside its header (its first 300 bytes)


@pytest.mark.parametrize("files, data, status, message", [
    ({"derm": ("d.txt", b"hello, not an image", "text/plain")}, {}, 415, "not an image"),
    ({"derm": ("d.jpg", b"", "image/jpeg")}, {}, 400, "empty file"),
    ({}, {"sex": "male", "location": "back", "elevation": "flat"}, 422, "give a dermoscopy image"),
    (OK, {"sex": "robot", "location": "back", "elevation": "flat"}, 422, "allowed: female, male"),
    (OK, {"sex": "male"}, 422, "partial"),
    (OK, {"age": "40"}, 400, "unknown field"),
    (CUT, {}, 400, "cannot decode"),
])
def test_bad_requests_get_clear_4xx(client, case_files, files, data, status, message):
    if files in (OK, CUT):
        files = {"derm": ("d.jpg", case_files[0] if files == OK else case_files[0][:300], "image/jpeg")}
    # text fields as multipart parts (None filename), so the request is multipart even without files
    parts = {**files, **{k: (None, v) for k, v in data.items()}}
    r = client.post("/api/predict", files=parts)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_non_multipart_body_refused(client):
    r = client.post("/api/predict", json={"derm": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


def test_oversize_upload_refused(client):
    big = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    assert buf.tell() > 2**20
    r = client.post("/api/predict", files={"derm": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def test_gif_refused_with_allowed_types(client):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, "GIF")
    r = client.post("/api/predict", files={"derm": ("a.gif", buf.getvalue(), "image/gif")})
    assert r.status_code == 415 and "JPEG" in r.json()["error"]


def test_serve_without_checkpoint_says_how_to_get_one():
    proc = subprocess.run([sys.executable, "-m", "sevenpoint.cli", "serve"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "sevenpoint demo" in (proc.stderr + proc.stdout)


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_browser_upload_and_result(tiny_run, synth_root):
    """Headless Chromium: upload a synthetic case, submit, see 8 task rows and a score; screenshot saved."""
    found = _chromium()
    if found is None:
        pytest.skip("Chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server, url = start_server(tiny_run["best_checkpoint"])
    try:
        options = webdriver.ChromeOptions()
        options.binary_location = found[0]
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1300,1100"):
            options.add_argument(flag)
        try:
            driver = webdriver.Chrome(service=Service(found[1]), options=options)
        except Exception as exc:  # noqa: BLE001 - a browser that cannot start here is a skip, with the reason
            pytest.skip(f"Chromium could not start here: {exc}")
        try:
            case = Derm7pt.load(synth_root).split_cases("test")[0]
            driver.get(f"{url}/")
            assert "not a medical device" in driver.find_element(By.ID, "notice").text
            driver.find_element(By.ID, "derm").send_keys(str(case.derm))
            if case.clinic:
                driver.find_element(By.ID, "clinic").send_keys(str(case.clinic))
            Select(driver.find_element(By.ID, "sex")).select_by_value(case.raw_meta["sex"])
            Select(driver.find_element(By.ID, "location")).select_by_value(case.raw_meta["location"])
            Select(driver.find_element(By.ID, "elevation")).select_by_value(case.raw_meta["elevation"])
            driver.find_element(By.ID, "submit").click()
            WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "score")))
            rows = driver.find_elements(By.CSS_SELECTOR, "#criteria .task-row")
            assert [r.get_attribute("data-task") for r in rows] == list(TASK_NAMES)
            assert 0 <= int(driver.find_element(By.ID, "score").text) <= 10
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "web-result.png"
            driver.save_screenshot(str(shot))
            print(f"\nCI artifact: browser screenshot saved to {shot}")
            assert shot.stat().st_size > 10_000
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=20)
