"""A vision-language model as judge for the two judged metrics, through an OpenAI-compatible chat-completions server
with image input (``vllm serve Qwen/Qwen2.5-VL-7B-Instruct``; the A²BFR paper judges with Qwen3-VL).

* SC (semantic consistency): the judge scores 0-100 how well an image matches a text description (``SC_PROMPT``).
* AA (attribute accuracy): the judge answers yes/no whether the face shows an attribute (``AA_PROMPT``). The
  question always names the attribute's *positive* phrase (``phrase_for(attribute).positive``), whatever the edit's
  direction: "add" expects "yes", "remove" expects "no". One question per attribute keeps add and remove measured
  by the same words, works for the attributes whose absence has no phrase (hair colours, Bald), and lets both
  directions share a cached answer for the same image. A judgement's value is 1.0 when the attribute is in the
  target state, else 0.0; its mean over images is the accuracy.

Prompts are fixed module constants with a version string; a new wording must get a new version. Requests are
deterministic (temperature 0, a seed per attempt: ``seed + attempt``, so a retried malformed answer is not the same
sample again) and run concurrently in a thread pool. Each valid answer is cached as one small JSON file, keyed by
sha256 over (sha256 of the image's PNG bytes, prompt version and text, model id, max_tokens, temperature, seed);
a cache hit makes no request.

Failure handling: a malformed answer is re-asked at once; HTTP 429/5xx, timeouts and connection errors are retried
with the policy's backoff; after ``retry.max_retries`` retries (or a non-retryable 4xx such as 400) the item becomes
a :class:`Judgement` with ``value=None`` and the reason -- a record, not an exception. HTTP 401/403/404 raise
:class:`ServerConfigError` (a wrong key or model name fails every item alike).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from attrface_pipeline.images import check_rgb
from attrface_pipeline.stages.verbalize import RequestCache, RetryPolicy, ServerConfigError, ServerError, phrase_for
from attrface_pipeline.storage import atomic_write_json
from training.roboface.captioner import image_data_url

log = logging.getLogger(__name__)

SC_PROMPT_VERSION = "sc-v1"
SC_PROMPT = (
    "You are judging whether a face photo matches a text description.\n"
    "Description: {prompt}\n"
    "Check every attribute the description mentions (for example age, gender, hair, expression, facial hair, "
    "glasses, hat, makeup). Rate how well the photo matches the description on a scale from 0 (contradicts it) "
    "to 100 (matches every detail). Answer with a single integer from 0 to 100 and nothing else."
)

AA_PROMPT_VERSION = "aa-v1"
AA_PROMPT = "Look at the face in this photo. {question} Answer with one word: yes or no."

DIRECTIONS = ("add", "remove")


# --- answers --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Judgement:
    """One judged image: ``value`` is the SC score (0-100) or the AA hit (1.0/0.0); None when judging failed."""

    value: float | None
    raw: str  # the judge's last answer text ("" when none came back)
    attempts: int  # requests made (0 for a cache hit)
    cached: bool
    error: str = ""  # why ``value`` is None


class MalformedAnswer(ValueError):
    """The judge's text is not the answer the prompt asked for."""


def _answer_body(text: str | None) -> str:
    """The answer without reasoning: text after the last ``</think>``, and an unclosed ``<think>`` (cut off by
    max_tokens) dropped to the end."""
    body = text or ""
    if "</think>" in body:
        body = body.rsplit("</think>", 1)[1]
    return re.sub(r"<think>.*", "", body, flags=re.S).strip()


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_OUT_OF_100 = re.compile(r"\s*(?:/|out of)\s*100\b", re.I)
_WORD = re.compile(r"[a-z]+")


def parse_score(text: str | None) -> int:
    """The one integer 0-100 in an SC answer ("85", "85.", "Score: 85", "85/100", '{"score": 85}').

    Raises MalformedAnswer for no number, several different numbers, a non-integer, or a number outside 0-100."""
    body = _answer_body(text)
    if not body:
        raise MalformedAnswer("empty answer")
    numbers = {float(m) for m in _NUMBER.findall(_OUT_OF_100.sub("", body))}
    if not numbers:
        raise MalformedAnswer(f"no number in {body[:80]!r}")
    if len(numbers) > 1:
        raise MalformedAnswer(f"several numbers in {body[:80]!r}")
    value = numbers.pop()
    if value != int(value):
        raise MalformedAnswer(f"{value:g} is not an integer")
    if not 0 <= value <= 100:
        raise MalformedAnswer(f"{value:g} is outside 0-100")
    return int(value)


def parse_yes_no(text: str | None) -> bool:
    """True for an answer whose words include "yes" and not "no", False for the reverse ("Yes.", "no",
    '{"answer": "no"}'); raises MalformedAnswer for neither or both."""
    body = _answer_body(text).lower()
    if not body:
        raise MalformedAnswer("empty answer")
    found = set(_WORD.findall(body)) & {"yes", "no"}
    if found == {"yes"}:
        return True
    if found == {"no"}:
        return False
    if found:
        raise MalformedAnswer(f"both yes and no in {body[:80]!r}")
    raise MalformedAnswer(f"neither yes nor no in {body[:80]!r}")


# --- prompts --------------------------------------------------------------------------------------------------------
def sc_prompt(description: str) -> str:
    return SC_PROMPT.format(prompt=description.strip())


def attribute_question(attribute: str) -> str:
    """A yes/no question whether the face shows the attribute's positive phrase, worded for the phrase's slot."""
    phrase = phrase_for(attribute)
    if phrase.slot == "age":  # "young", "bald"
        return f"Is the person in this photo {phrase.positive}?"
    if phrase.slot in ("hair_texture", "hair_colour"):  # "wavy", "blond"
        return f"Does the person in this photo have {phrase.positive} hair?"
    if phrase.slot == "noun":  # "man"
        return f"Is the person in this photo a {phrase.positive}?"
    return f"Does this photo show a person {phrase.positive}?"  # "with bangs", "smiling", "wearing a hat", ...


def aa_prompt(attribute: str) -> str:
    return AA_PROMPT.format(question=attribute_question(attribute))


def summarize(judgements: Sequence[Judgement]) -> dict[str, Any]:
    """``mean`` over the valid values (None when there are none), ``n`` valid values, ``failures`` failed ones."""
    values = [j.value for j in judgements if j.value is not None]
    return {"mean": float(np.mean(values)) if values else None, "n": len(values),
            "failures": len(judgements) - len(values)}


# --- the judge ------------------------------------------------------------------------------------------------------
class JudgeUnavailable(ServerError):
    """The judge's server cannot be reached or serves no model."""


class _Refused(Exception):
    """A 4xx other than 401/403/404 (e.g. 400 for an image the server rejects): the same request fails again."""


class VLMJudge:
    """SC and AA judgements from an OpenAI-compatible VLM server (module docstring)."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str = "EMPTY",
                 cache_dir: Path | None = None, retry: RetryPolicy | None = None, concurrency: int = 8,
                 timeout_s: float = 120.0, max_tokens: int = 16, temperature: float = 0.0, seed: int = 0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, concurrency)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self._model = model or ""
        self._resolved = False
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"},
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            transport=transport,
        )

    @property
    def model_id(self) -> str:
        """The model judging: the configured name, or the first served one after ``preflight``."""
        return self._model

    def preflight(self) -> str:
        """Check the server and resolve the model (GET /models). Raises JudgeUnavailable when the server cannot be
        reached or serves nothing, ServerConfigError when it refuses the key or does not serve the configured model."""
        try:
            r = self._client.get("/models")
        except httpx.HTTPError as err:
            raise JudgeUnavailable(f"VLM judge server at {self.base_url} not reachable "
                                   f"({type(err).__name__}: {err})") from None
        if r.status_code in (401, 403):
            raise ServerConfigError(f"VLM judge server at {self.base_url} answered HTTP {r.status_code} for GET "
                                    f"/models: {r.text[:200]} (check the API key)")
        if r.status_code != 200:
            raise JudgeUnavailable(f"VLM judge server at {self.base_url} answered HTTP {r.status_code} for GET "
                                   f"/models: {r.text[:200]}")
        try:
            served = [m["id"] for m in r.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise JudgeUnavailable(f"{self.base_url}/models returned an unusable body ({err})") from None
        if not self._model:
            if not served:
                raise JudgeUnavailable(f"VLM judge server at {self.base_url} serves no model")
            self._model = served[0]
        elif self._model not in served:
            raise ServerConfigError(f"{self.base_url} serves {served}, not {self._model!r}: set the judge model")
        self._resolved = True
        return self._model

    # public API
    def consistency(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Judgement]:
        """SC: one 0-100 score per (HWC uint8 RGB image, description) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"SC needs a non-empty description per image, got {p!r}")
        self._check_images(images)
        jobs = [self._job(im, sc_prompt(p), SC_PROMPT_VERSION, lambda t: float(parse_score(t)))
                for im, p in zip(images, prompts)]
        return self._run(jobs)

    def attribute_present(self, images: Sequence[np.ndarray], attributes: Sequence[str],
                          directions: Sequence[str]) -> list[Judgement]:
        """AA: 1.0 when the face shows the attribute in its target state (present for "add", absent for
        "remove"), else 0.0."""
        if not len(images) == len(attributes) == len(directions):
            raise ValueError(f"{len(images)} images, {len(attributes)} attributes, {len(directions)} directions")
        bad = sorted({d for d in directions if d not in DIRECTIONS})
        if bad:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {bad}")
        self._check_images(images)
        jobs = [self._job(im, aa_prompt(a), AA_PROMPT_VERSION, lambda t: 1.0 if parse_yes_no(t) else 0.0)
                for im, a in zip(images, attributes)]
        answers = self._run(jobs)  # value: 1.0 = "yes, the positive state is shown"
        return [j if j.value is None or d == "add" else replace(j, value=1.0 - j.value)
                for j, d in zip(answers, directions)]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> VLMJudge:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # internals
    @staticmethod
    def _check_images(images: Sequence[np.ndarray]) -> None:
        for im in images:
            check_rgb(im)

    def _run(self, jobs: list[Callable[[], Judgement]]) -> list[Judgement]:
        if not jobs:
            return []
        if not self._resolved:
            self.preflight()  # the model id is part of every cache key
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        try:
            futures = [pool.submit(job) for job in jobs]
            return [f.result() for f in futures]  # a ServerConfigError raised in a worker surfaces here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _job(self, image: np.ndarray, prompt: str, version: str,
             parse: Callable[[str], float]) -> Callable[[], Judgement]:
        return lambda: self._judge(image, prompt, version, parse)

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, path: Path | None) -> Judgement | None:
        if path is None:
            return None
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        value, raw = (record.get("value"), record.get("raw")) if isinstance(record, dict) else (None, None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not isinstance(raw, str):
            return None
        return Judgement(float(value), raw, attempts=0, cached=True)

    def _judge(self, image: np.ndarray, prompt: str, version: str, parse: Callable[[str], float]) -> Judgement:
        url = image_data_url(image, "png")
        png_sha = hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
        key = RequestCache.key({"image_png_sha256": png_sha, "prompt_version": version, "prompt": prompt,
                                "model": self.model_id, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "seed": self.seed})
        path = self._cache_path(key)
        hit = self._cache_get(path)
        if hit is not None:
            return hit
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": prompt},
        ]}]
        raw, reason, attempts, backoff = "", "", 0, False
        for attempt in range(self.retry.max_retries + 1):
            if backoff:  # only server trouble waits; a malformed answer is re-asked at once with a new seed
                self.retry.sleep(self.retry.delay(attempt))
            attempts += 1
            backoff = False
            try:
                raw = self._complete(messages, self.seed + attempt)
                value = parse(raw)
            except MalformedAnswer as err:
                reason = f"malformed: {err}"
                continue
            except _Refused as err:
                reason = f"refused: {err}"
                break
            except (httpx.HTTPError, ServerError, OSError) as err:
                reason = f"error: {type(err).__name__}: {err}"
                backoff = True
                continue
            if path is not None:
                atomic_write_json(path, {"value": value, "raw": raw, "model": self.model_id,
                                         "prompt_version": version, "prompt": prompt, "image_png_sha256": png_sha})
            return Judgement(value, raw, attempts, cached=False)
        log.warning("judge (%s): %s after %d attempt(s)", version, reason, attempts)
        return Judgement(None, raw, attempts, cached=False, error=reason[:500])

    def _complete(self, messages: list[dict[str, Any]], seed: int) -> str:
        body = {
            "model": self.model_id, "messages": messages, "temperature": self.temperature,
            "max_tokens": self.max_tokens, "seed": seed,
            "chat_template_kwargs": {"enable_thinking": False},  # Qwen3 templates; other templates ignore it
        }
        r = self._client.post("/chat/completions", json=body)
        if r.status_code == 429 or r.status_code >= 500:
            raise ServerError(f"HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code in (401, 403, 404):
            raise ServerConfigError(f"VLM judge server at {self.base_url} answered HTTP {r.status_code} for model "
                                    f"{self.model_id!r}: {r.text[:300]} (check the judge model and API key)")
        if r.status_code >= 400:
            raise _Refused(f"HTTP {r.status_code}: {r.text[:200]}")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ServerError(f"unusable response body ({type(err).__name__}: {err})") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise MalformedAnswer(f"no text in the answer (content is {type(content).__name__})")
        return content
