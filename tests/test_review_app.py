"""The review app in a real headless Chromium: load, accept one, reject one, reload, decisions kept."""

import os
import shutil
import socket
import threading
import time

import cv2
import httpx
import pytest

from attrface_pipeline.images import encode_image, read_rgb
from attrface_pipeline.stages.checks import QC_SCHEMA
from attrface_pipeline.stages.edits import EDIT_SCHEMA
from attrface_pipeline.stages.review import ReviewStore
from attrface_pipeline.storage import PartitionStore

pytestmark = pytest.mark.slow
ATTRS = ["Smiling", "Eyeglasses", "Bangs"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, samples):
    """One partition of three QC-passed pairs built from real photos (edit = the mirrored face)."""
    root = tmp_path_factory.mktemp("review")
    photos = [p for p in sorted((samples / "hq").iterdir()) if p.suffix in {".jpg", ".png"}][:3]
    edits, qcs = [], []
    for i, (photo, attr) in enumerate(zip(photos, ATTRS)):
        rgb = cv2.resize(read_rgb(photo), (256, 256), interpolation=cv2.INTER_AREA)
        key = f"face{i}_00_{attr}_add"
        (root / "faces" / "chunk-00000" / "aligned").mkdir(parents=True, exist_ok=True)
        (root / "faces" / "chunk-00000" / "aligned" / f"face{i}_00.png").write_bytes(encode_image(rgb, "png"))
        (root / "edits" / "chunk-00000" / "images").mkdir(parents=True, exist_ok=True)
        (root / "edits" / "chunk-00000" / "images" / f"{key}.png").write_bytes(encode_image(rgb[:, ::-1].copy(), "png"))
        edits.append({"pair_key": key, "face_key": f"face{i}_00", "image_key": f"face{i}", "attribute": attr,
                      "direction": "add", "source_prompt": f"photo {i}", "target_prompt": f"photo {i} with {attr}",
                      "source_path": f"faces/chunk-00000/aligned/face{i}_00.png", "edit_path": f"images/{key}.png",
                      "resolution": 256, "seed": i, "params": "{}", "model_id": "tiny/sd3",
                      "prompt_backend": "template", "seconds": 0.1})
        qcs.append({"pair_key": key, "face_key": f"face{i}_00", "attribute": attr, "direction": "add",
                    "p_before": 0.2, "p_after": 0.8, "max_drift": 0.1, "max_drift_attribute": "Young",
                    "identity_backend": "dlib", "identity_similarity": 0.9 - i / 10, "identity_distance": 0.3,
                    "ssim": 0.8, "landmark_displacement": 2.0, "pass_attribute": True, "pass_identity": True,
                    "pass_similarity": True, "passed": True, "reasons": "",
                    "probabilities_before": [0.5] * 40, "probabilities_after": [0.5] * 40})
    for asset, rows, schema in (("edits", edits, EDIT_SCHEMA), ("qc", qcs, QC_SCHEMA)):
        store = PartitionStore(root, asset, "chunk-00000")
        store.write_manifest(rows, schema)
        store.complete({"pairs": len(rows)}, "test")
    return root


def _serve(app) -> tuple[str, threading.Thread, object]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/", thread, server


@pytest.fixture()
def browser():
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        message = "chromedriver not installed: bash scripts/setup_browser.sh"
        if os.environ.get("ATTRFACE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def test_review_in_a_real_browser(data_root, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from attrface_pipeline.web.review_app import create_app

    db = tmp_path / "review.sqlite"
    url, _, server = _serve(create_app(data_root, db))
    wait = WebDriverWait(browser, 20)
    try:
        browser.get(url)
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "0/3 reviewed"))
        browser.find_element(By.ID, "reviewer").send_keys("ana")
        browser.find_element(By.TAG_NAME, "body").click()
        first = browser.find_element(By.ID, "key").text
        assert browser.execute_script("return document.getElementById('edit').naturalWidth") in (0, 256)
        browser.find_element(By.TAG_NAME, "body").send_keys("a")  # keyboard: accept
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "1/3 reviewed"))
        second = browser.find_element(By.ID, "key").text
        assert second != first
        browser.find_element(By.TAG_NAME, "body").send_keys("r")  # keyboard: reject
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "2/3 reviewed"))
        wait.until(lambda d: d.execute_script("return document.getElementById('src').complete"))
        browser.save_screenshot(str(tmp_path / "review.png"))

        browser.refresh()  # re-opening resumes: the decisions come back from SQLite
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "2/3 reviewed"))
        browser.find_element(By.CSS_SELECTOR, "#show option[value='all']").click()
        labels = {}
        for _ in range(3):
            labels[browser.find_element(By.ID, "key").text] = browser.find_element(By.ID, "decision").text
            browser.find_element(By.TAG_NAME, "body").send_keys("j")
        assert labels[first] == "accept (ana)" and labels[second] == "reject (ana)"
        assert sorted(labels.values())[0] == "accept (ana)" and "pending" in labels.values()

        browser.find_element(By.CSS_SELECTOR, "#attribute option[value='Bangs']").click()  # filters
        assert browser.find_element(By.ID, "key").text == "face2_00_Bangs_add"
    finally:
        server.should_exit = True
    decided = ReviewStore(db).decisions()
    assert {k: v["decision"] for k, v in decided.items()} == {first: "accept", second: "reject"}
    assert all(v["reviewer"] == "ana" and v["decided_at"] for v in decided.values())
    assert (tmp_path / "review.png").stat().st_size > 10_000


def test_token_gate_and_validation(data_root, tmp_path):
    from attrface_pipeline.web.review_app import create_app, serve

    url, _, server = _serve(create_app(data_root, tmp_path / "db.sqlite", token="s3cret"))
    try:
        assert httpx.get(url).status_code == 401
        assert httpx.get(url + "api/pairs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with httpx.Client() as client:
            assert client.get(url + "?token=s3cret").status_code == 200
            assert client.get(url + "api/pairs").status_code == 200  # the cookie carries the token
            bad = client.post(url + "api/decisions", json={"pair_key": "face0_00_Smiling_add", "decision": "x",
                                                             "reviewer": "ana"})
            assert bad.status_code == 400
            assert client.post(url + "api/decisions", json={"pair_key": "nope", "decision": "accept",
                                                             "reviewer": "ana"}).status_code == 404
    finally:
        server.should_exit = True
    with pytest.raises(ValueError, match="without --token"):
        serve(data_root, tmp_path / "db.sqlite", host="0.0.0.0")


def test_cross_site_writes_are_refused(data_root, tmp_path):
    from attrface_pipeline.web.review_app import create_app

    url, _, server = _serve(create_app(data_root, tmp_path / "db.sqlite"))
    body = '{"pair_key": "face0_00_Smiling_add", "decision": "accept", "reviewer": "x"}'
    try:
        # what a malicious page can send without a CORS preflight
        plain = httpx.post(url + "api/decisions", content=body, headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
        evil = httpx.post(url + "api/decisions", content=body,
                          headers={"Content-Type": "application/json", "Origin": "http://evil.example"})
        assert evil.status_code == 403
        rebound = httpx.get(url + "api/pairs", headers={"Host": "evil.example"})
        assert rebound.status_code == 400  # DNS rebinding: unknown Host
        not_a_list = httpx.post(url + "api/decisions", content="[1]", headers={"Content-Type": "application/json"})
        assert not_a_list.status_code == 400
    finally:
        server.should_exit = True
    assert ReviewStore(tmp_path / "db.sqlite").decisions() == {}
