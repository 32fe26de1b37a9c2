"""The VLM judge. No image-capable VLM server runs offline, so an httpx.MockTransport plays an OpenAI-compatible
server (GET /models, POST /chat/completions) and records every request: these tests check our requests, parsing,
retries and cache against the protocol, not a real model's answers."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable

import cv2
import httpx
import numpy as np
import pytest

from attrface_pipeline.images import read_rgb
from attrface_pipeline.stages.verbalize import RetryPolicy, ServerConfigError
from training.eval.judge import (AA_PROMPT_VERSION, SC_PROMPT_VERSION, Judgement, JudgeUnavailable, MalformedAnswer,
                                 VLMJudge, aa_prompt, attribute_question, parse_score, parse_yes_no, sc_prompt,
                                 summarize)

BASE = "http://judge.test/v1"


@pytest.fixture(scope="module")
def faces(samples) -> list[np.ndarray]:
    folder = samples.parent / "aligned_hq"
    return [cv2.resize(read_rgb(folder / f"ffhq_0000{i}.png"), (64, 64), interpolation=cv2.INTER_AREA)
            for i in (0, 1, 2)]


class FakeServer:
    """An OpenAI-compatible server: ``answer(body, n)`` gives the n-th chat completion (an httpx.Response or the
    text content); every request body is recorded."""

    def __init__(self, answer: Callable[[dict, int], httpx.Response | str], served: tuple[str, ...] = ("qwen-vl",)):
        self.answer = answer
        self.served = served
        self.bodies: list[dict] = []
        self.model_lists = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/v1/models":
            self.model_lists += 1
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in self.served]})
        assert request.method == "POST" and request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        with self._lock:
            self.bodies.append(body)
            n = len(self.bodies)
        out = self.answer(body, n)
        if isinstance(out, httpx.Response):
            return out
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                                      "finish_reason": "stop"}]})


def _judge(server: FakeServer, **kwargs) -> VLMJudge:
    kwargs.setdefault("retry", RetryPolicy(max_retries=2, backoff_s=0.01, sleep=lambda s: None))
    return VLMJudge(BASE, kwargs.pop("model", "qwen-vl"), concurrency=2, transport=httpx.MockTransport(server),
                    **kwargs)


def _image_of(body: dict) -> np.ndarray:
    (message,) = body["messages"]
    image_part, text_part = message["content"]
    head, data = image_part["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64" and text_part["type"] == "text"
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _text_of(body: dict) -> str:
    return body["messages"][0]["content"][1]["text"]


# --- parsing --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, score", [
    ("85", 85), ("  85\n", 85), ("85.", 85), ("Score: 85", 85), ("85/100", 85), ("85 / 100", 85),
    ('{"score": 85}', 85), ("```json\n{\"score\": 85}\n```", 85), ("<think>It is 40 or 60.</think>\n72", 72),
    ("<think>\n</think>\n\n0", 0), ("100", 100), ("100/100", 100), ("85.0", 85), ("85 out of 100", 85),
    ("reasoning first, 40 maybe</think> 90", 90),
])
def test_parse_score_accepts(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize("text, reason", [
    ("", "empty"), ("   ", "empty"), (None, "empty"), ("<think>70</think>", "empty"), ("<think>70 is", "empty"),
    ("maybe", "no number"), ("high", "no number"), ("101", "outside"), ("250/100", "outside"), ("-5", "outside"),
    ("85 or 90", "several"), ("0-100: 85", "several"), ("85.5", "not an integer"),
])
def test_parse_score_rejects(text, reason):
    with pytest.raises(MalformedAnswer, match=reason):
        parse_score(text)


@pytest.mark.parametrize("text, answer", [
    ("Yes", True), ("yes.", True), ("  YES\n", True), ("Yes, the person is smiling.", True),
    ('{"answer": "yes"}', True), ("<think>no idea... let me look</think>Yes", True),
    ("No", False), ("no.", False), ("No, they are not.", False), ('{"answer": "No"}', False),
])
def test_parse_yes_no_accepts(text, answer):
    assert parse_yes_no(text) is answer


@pytest.mark.parametrize("text, reason", [
    ("", "empty"), (None, "empty"), ("maybe", "neither"), ("Yesno", "neither"), ("Yes or no?", "both"),
    ("Yes. No.", "both"), ("<think>yes</think>", "empty"),
])
def test_parse_yes_no_rejects(text, reason):
    with pytest.raises(MalformedAnswer, match=reason):
        parse_yes_no(text)


def test_questions_name_the_positive_phrase():
    assert attribute_question("Young") == "Is the person in this photo young?"
    assert attribute_question("Blond_Hair") == "Does the person in this photo have blond hair?"
    assert attribute_question("Male") == "Is the person in this photo a man?"
    assert attribute_question("Eyeglasses") == "Does this photo show a person wearing eyeglasses?"
    assert attribute_question("Pale_Skin") == "Does this photo show a person with pale skin?"  # not in the table
    assert "yes or no" in aa_prompt("Smiling") and "smiling" in aa_prompt("Smiling")


# --- requests -------------------------------------------------------------------------------------------------------
def test_request_carries_png_image_and_versioned_prompt(faces):
    server = FakeServer(lambda body, n: "85")
    with _judge(server, seed=7) as judge:
        out = judge.consistency(faces[:2], ["A smiling young woman.", "An old man with a beard."])
    assert [j.value for j in out] == [85.0, 85.0] and all(j.attempts == 1 and not j.cached for j in out)
    assert server.model_lists == 1 and len(server.bodies) == 2
    by_text = {_text_of(b): b for b in server.bodies}
    body = by_text[sc_prompt("A smiling young woman.")]
    assert np.array_equal(_image_of(body), faces[0])  # PNG: lossless
    assert "A smiling young woman." in _text_of(body) and "0 to 100" in _text_of(body)
    assert (body["model"], body["temperature"], body["max_tokens"], body["seed"]) == ("qwen-vl", 0.0, 16, 7)
    assert np.array_equal(_image_of(by_text[sc_prompt("An old man with a beard.")]), faces[1])
    assert SC_PROMPT_VERSION == "sc-v1" and AA_PROMPT_VERSION == "aa-v1"


def test_malformed_answers_are_retried_then_fail_with_the_reason(faces):
    server = FakeServer(lambda body, n: "maybe 70 or 80")
    judge = _judge(server)
    (j,) = judge.consistency(faces[:1], ["A woman."])
    assert j.value is None and j.attempts == 3 and not j.cached
    assert j.error.startswith("malformed: several numbers") and j.raw == "maybe 70 or 80"
    assert [b["seed"] for b in server.bodies] == [0, 1, 2]  # a new seed per attempt


def test_valid_answer_after_a_malformed_one(faces):
    server = FakeServer(lambda body, n: "I cannot tell" if n == 1 else "Score: 64.")
    (j,) = _judge(server).consistency(faces[:1], ["A woman."])
    assert (j.value, j.attempts, j.error, j.raw) == (64.0, 2, "", "Score: 64.")


def test_server_errors_retried_with_backoff(faces):
    waits: list[float] = []
    server = FakeServer(lambda body, n: httpx.Response(503, text="busy") if n < 3 else "Yes")
    judge = _judge(server, retry=RetryPolicy(max_retries=3, backoff_s=0.5, sleep=waits.append))
    (j,) = judge.attribute_present(faces[:1], ["Smiling"], ["add"])
    assert (j.value, j.attempts) == (1.0, 3) and len(waits) == 2 and all(w > 0 for w in waits)

    server = FakeServer(lambda body, n: httpx.Response(429, text="slow down"))
    (j,) = _judge(server).attribute_present(faces[:1], ["Smiling"], ["add"])
    assert j.value is None and j.attempts == 3 and "HTTP 429" in j.error


def test_timeout_becomes_a_failed_judgement(faces):
    def answer(body, n):
        raise httpx.ReadTimeout("timed out")

    (j,) = _judge(FakeServer(answer)).consistency(faces[:1], ["A woman."])
    assert j.value is None and j.attempts == 3 and "ReadTimeout" in j.error


def test_bad_request_is_not_retried(faces):
    server = FakeServer(lambda body, n: httpx.Response(400, text="image too large"))
    (j,) = _judge(server).consistency(faces[:1], ["A woman."])
    assert j.value is None and j.attempts == 1 and j.error.startswith("refused: HTTP 400")


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_model_errors_raise(faces, status):
    server = FakeServer(lambda body, n: httpx.Response(status, text="nope"))
    with pytest.raises(ServerConfigError, match=f"HTTP {status}"):
        _judge(server).consistency(faces[:2], ["A woman.", "A man."])


def test_preflight(faces):
    server = FakeServer(lambda body, n: "50", served=("Qwen/Qwen2.5-VL-7B-Instruct", "other"))
    judge = _judge(server, model=None)
    assert judge.model_id == "" and judge.preflight() == "Qwen/Qwen2.5-VL-7B-Instruct"
    judge.consistency(faces[:1], ["A woman."])
    assert server.bodies[0]["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and server.model_lists == 1
    with pytest.raises(ServerConfigError, match="not 'missing'"):
        _judge(server, model="missing").preflight()
    with pytest.raises(JudgeUnavailable, match="serves no model"):
        _judge(FakeServer(lambda body, n: "50", served=()), model=None).preflight()


def test_unreachable_server_names_the_url():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    judge = VLMJudge(BASE, transport=httpx.MockTransport(refuse))
    with pytest.raises(JudgeUnavailable, match=f"{BASE} not reachable"):
        judge.preflight()


def test_inputs_are_validated_before_any_request(faces):
    server = FakeServer(lambda body, n: "50")
    judge = _judge(server)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        judge.consistency(faces[:2], ["A woman."])
    with pytest.raises(ValueError, match="directions"):
        judge.attribute_present(faces[:1], ["Smiling"], ["flip"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        judge.consistency([faces[0].astype(np.float32)], ["A woman."])
    assert server.bodies == [] and judge.consistency([], []) == []


# --- cache ----------------------------------------------------------------------------------------------------------
def test_cache_hits_make_no_requests(faces, tmp_path):
    def answer(body, n):
        text = _text_of(body)
        return "yes" if "yes or no" in text else "40" if "woman" in text else "50"

    server = FakeServer(answer)
    prompts = ["A woman.", "A man.", "A woman."]
    first = _judge(server, cache_dir=tmp_path).consistency(faces, prompts)
    assert len(server.bodies) == 3 and [j.value for j in first] == [40.0, 50.0, 40.0]
    assert not any(j.cached for j in first)
    assert len(list(tmp_path.rglob("*.json"))) == 3

    again = _judge(server, cache_dir=tmp_path).consistency(faces, prompts)  # a new judge reads the same folder
    assert len(server.bodies) == 3
    assert [j.value for j in again] == [j.value for j in first] and all(j.cached and j.attempts == 0 for j in again)
    assert [j.raw for j in again] == [j.raw for j in first]

    _judge(server, cache_dir=tmp_path).consistency(faces[:1], ["A smiling woman."])  # other prompt: a miss
    assert len(server.bodies) == 4
    other = FakeServer(lambda body, n: "50", served=("other-vl",))
    (j,) = _judge(other, cache_dir=tmp_path, model="other-vl").consistency(faces[:1], ["A woman."])
    assert len(other.bodies) == 1 and not j.cached  # other model: a miss
    (j,) = _judge(server, cache_dir=tmp_path).attribute_present(faces[:1], ["Smiling"], ["add"])
    assert len(server.bodies) == 5 and not j.cached  # other prompt kind: a miss


def test_failed_answers_are_not_cached(faces, tmp_path):
    bad = FakeServer(lambda body, n: "maybe")
    (j,) = _judge(bad, cache_dir=tmp_path).attribute_present(faces[:1], ["Smiling"], ["add"])
    assert j.value is None and list(tmp_path.rglob("*.json")) == []
    good = FakeServer(lambda body, n: "no")
    (j,) = _judge(good, cache_dir=tmp_path).attribute_present(faces[:1], ["Smiling"], ["add"])
    assert (j.value, j.cached, len(good.bodies)) == (0.0, False, 1)


# --- AA directions --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, direction, value", [
    ("Yes.", "add", 1.0), ("No.", "add", 0.0), ("Yes.", "remove", 0.0), ("No.", "remove", 1.0),
])
def test_attribute_direction(faces, answer, direction, value):
    server = FakeServer(lambda body, n: answer)
    (j,) = _judge(server).attribute_present(faces[:1], ["Eyeglasses"], [direction])
    assert j.value == value and j.raw == answer
    assert _text_of(server.bodies[0]) == aa_prompt("Eyeglasses")  # the same question for add and remove


def test_add_and_remove_share_a_cached_answer(faces, tmp_path):
    server = FakeServer(lambda body, n: "yes")
    judge = _judge(server, cache_dir=tmp_path)
    add = judge.attribute_present(faces[:2], ["Bangs", "Bald"], ["add", "add"])
    remove = judge.attribute_present(faces[:2], ["Bangs", "Bald"], ["remove", "remove"])
    assert [j.value for j in add] == [1.0, 1.0] and [j.value for j in remove] == [0.0, 0.0]
    assert len(server.bodies) == 2 and all(j.cached for j in remove)


def test_summarize():
    js = [Judgement(80.0, "80", 1, False), Judgement(None, "maybe", 3, False, "malformed"),
          Judgement(60.0, "60", 0, True)]
    assert summarize(js) == {"mean": 70.0, "n": 2, "failures": 1}
    assert summarize([Judgement(None, "", 1, False, "x")]) == {"mean": None, "n": 0, "failures": 1}
    assert summarize([]) == {"mean": None, "n": 0, "failures": 0}
