"""Captioners. No vLLM server with image input exists offline (the verbalizer's vllm tests serve a text-only tiny
Qwen3, and need the separate vLLM venv), so the VLM backend is tested through its payload and parsing functions, a
real connection failure, and httpx.MockTransport for the status handling it shares with the verbalizer -- a
transport-level check of our requests, not a real server. The transformers backend runs a tiny random LLaVA."""

import base64
import json

import cv2
import httpx
import numpy as np
import pytest

from attrface_pipeline.images import read_rgb
from attrface_pipeline.models.vllm_server import free_port
from attrface_pipeline.stages.verbalize import RetryPolicy
from training.roboface.captioner import (CachedCaptioner, CaptionCache, NoCaptioner, TransformersCaptioner,
                                         VLMCaptioner, build_captioner, caption_messages, clean_caption,
                                         image_digest)
from training.roboface.config import CAPTION_PROMPT, CaptionConfig

from .conftest import ALIGNED_HQ


@pytest.fixture(scope="module")
def faces():
    return [cv2.resize(read_rgb(ALIGNED_HQ / f"ffhq_0000{i}.png"), (64, 64), interpolation=cv2.INTER_AREA)
            for i in (2, 3)]


def _decode_data_url(url: str) -> np.ndarray:
    head, data = url.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_payload_carries_the_image_and_the_papers_prompt(faces):
    messages = caption_messages(faces[0])
    assert len(messages) == 1 and messages[0]["role"] == "user"
    image_part, text_part = messages[0]["content"]
    assert image_part["type"] == "image_url" and text_part == {"type": "text", "text": CAPTION_PROMPT}
    assert np.array_equal(_decode_data_url(image_part["image_url"]["url"]), faces[0])  # PNG: lossless
    jpeg = caption_messages(faces[0], "Describe.", image_format="jpeg")[0]["content"][0]["image_url"]["url"]
    assert jpeg.startswith("data:image/jpeg;base64,")
    assert np.abs(_decode_data_url(jpeg).astype(int) - faces[0]).mean() < 4
    with pytest.raises(ValueError, match="uint8 RGB"):
        caption_messages(faces[0].astype(np.float32))


def test_clean_caption():
    assert clean_caption("<think>hmm\nlet me see</think>\n A woman\twith  brown eyes.\x00 ") == \
        "A woman with brown eyes."
    assert clean_caption(None) == "" and clean_caption("  \n") == ""


def _mock_captioner(handler, **kwargs):
    captioner = VLMCaptioner("http://vlm.test/v1", "llava", retry=RetryPolicy(2, 0.0, sleep=lambda s: None),
                             concurrency=2, **kwargs)
    captioner._client._client = httpx.Client(base_url="http://vlm.test/v1", transport=httpx.MockTransport(handler))
    captioner._resolved = True
    return captioner


def test_vlm_requests_and_status_handling(faces):
    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        if len(seen) == 1:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"choices": [{"message": {"content": " A young woman,\n smiling. "}}]})

    captioner = _mock_captioner(handler, temperature=0.0, max_tokens=77, seed=5)
    result = captioner.caption_results(faces[:1])[0]
    assert (result.text, result.attempts, result.error, result.model_id) == ("A young woman, smiling.", 2, None,
                                                                             "llava")
    body = seen[-1]
    assert body["model"] == "llava" and body["max_tokens"] == 77 and body["temperature"] == 0.0
    assert "response_format" not in body  # captions are free text, not the verbalizer's JSON schema
    assert [s["seed"] for s in seen] == [5, 6]  # a new seed per attempt, as the verbalizer does
    assert np.array_equal(_decode_data_url(body["messages"][0]["content"][0]["image_url"]["url"]), faces[0])

    refused = _mock_captioner(lambda r: httpx.Response(400, text="too long"))
    result = refused.caption_results(faces[:1])[0]
    assert result.text == "" and result.attempts == 1 and "refused" in result.error  # not retried
    empty = _mock_captioner(lambda r: httpx.Response(200, json={"choices": [{"message": {"content": " \n"}}]}))
    result = empty.caption_results(faces[:1])[0]
    assert result.attempts == 3 and result.error == "invalid: empty caption"


def test_vlm_unreachable_server_gives_error_records_not_cached(faces, tmp_path):
    captioner = VLMCaptioner(f"http://127.0.0.1:{free_port()}/v1", "llava", timeout_s=2,
                             retry=RetryPolicy(1, 0.0, sleep=lambda s: None))
    cached = CachedCaptioner(captioner, CaptionCache(tmp_path))
    results = cached.caption_results(faces)
    assert [r.text for r in results] == ["", ""]
    assert all(r.attempts == 2 and r.error.startswith("error: ConnectError") for r in results)
    assert not list(tmp_path.rglob("*.json"))  # failures are retried next time, never cached


def test_transformers_captioner_and_cache(tiny_llava, faces, tmp_path, monkeypatch):
    captioner = TransformersCaptioner(tiny_llava, "tiny-llava", max_tokens=12, batch_size=2)
    texts = captioner.caption(faces)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert TransformersCaptioner(tiny_llava, max_tokens=12, batch_size=1).caption(faces) == texts  # batching
    cache = CaptionCache(tmp_path / "captions")
    cached = CachedCaptioner(captioner, cache, {"max_tokens": 12})
    assert cached.caption(faces) == texts and (cached.hits, cached.misses) == (0, 2)
    files = sorted((tmp_path / "captions").rglob("*.json"))
    assert len(files) == 2 and not list((tmp_path / "captions").rglob("*.tmp"))
    record = json.loads(files[0].read_text())
    assert record["backend"] == "transformers" and record["model"] == "tiny-llava"

    def refuse(images):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(captioner, "caption_results", refuse)
    again = CachedCaptioner(captioner, CaptionCache(tmp_path / "captions"), {"max_tokens": 12})
    results = again.caption_results(faces)
    assert [r.text for r in results] == texts and all(r.cached for r in results) and again.hits == 2
    digest = image_digest(faces[0])
    keys = {CaptionCache.key(digest, backend="transformers", model_id="tiny-llava", prompt=p) for p in ("a", "b")}
    assert len(keys) == 2  # the prompt is part of the key
    assert image_digest(faces[0].copy()) == digest != image_digest(faces[1])


def test_build_captioner(tiny_llava, model_store, tmp_path, monkeypatch):
    assert isinstance(build_captioner(CaptionConfig()), NoCaptioner)
    assert NoCaptioner().caption([np.zeros((4, 4, 3), np.uint8)]) == [""]
    cfg = CaptionConfig(backend="transformers", cache_dir=str(tmp_path), max_tokens=8,
                        transformers={"model": str(tiny_llava), "device": "cpu", "dtype": "float32"})
    built = build_captioner(cfg, model_store)
    assert isinstance(built, CachedCaptioner) and isinstance(built.inner, TransformersCaptioner)
    monkeypatch.setenv("ATTRFACE_VLLM_API_KEY", "secret")
    vlm = build_captioner(CaptionConfig(backend="vlm", vlm={"model": "llava", "max_retries": 1}))
    assert isinstance(vlm, VLMCaptioner) and vlm.retry.max_retries == 1
    assert vlm._client._client.headers["Authorization"] == "Bearer secret"
