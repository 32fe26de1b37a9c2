"""Prompt verbalization: a source caption per face and one target caption per attribute flip.

Three backends behind one interface (``Verbalizer.verbalize_many``):

* ``TemplateVerbalizer`` -- deterministic sentences from a phrase table (the offline default, and every other
  backend's fallback);
* ``VllmVerbalizer`` -- an OpenAI-compatible server (``vllm serve Qwen/Qwen3-8B``) asked for JSON matching a
  per-request schema, with a bounded thread pool, timeouts, retries with backoff and a request cache;
* ``TransformersVerbalizer`` -- a local causal LM with the same messages and validation, for small models.

An LLM answer is accepted only if it parses, matches the schema and names exactly the requested flips; otherwise
it is retried, then replaced by the template's captions and counted (``VerbalizeResult.fallback_reason``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attrface_pipeline.attributes import ADD, CELEBA_ATTRIBUTES, NEGATIVE, POSITIVE, REMOVE, UNKNOWN
from attrface_pipeline.stages.attributes import attribute_state
from attrface_pipeline.storage import atomic_write_json

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 300


# --- data ---------------------------------------------------------------------------------------------------------
class TargetPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attribute: str
    direction: Literal["add", "remove"]
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class PromptSet(BaseModel):
    """What every backend returns for one face (and the JSON schema the LLM must follow)."""

    model_config = ConfigDict(extra="forbid")
    source_prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    targets: list[TargetPrompt]

    def target(self, attribute: str) -> TargetPrompt:
        return next(t for t in self.targets if t.attribute == attribute)


@dataclass(frozen=True)
class VerbalizeRequest:
    """One face: the known states that describe it (``{name: positive|negative}``) and the flips wanted."""

    key: str
    states: Mapping[str, str]
    flips: tuple[tuple[str, str], ...]  # (attribute, add|remove)


@dataclass
class VerbalizeResult:
    key: str
    prompts: PromptSet
    backend: str  # the backend that produced the prompts (the template when a fallback happened)
    model_id: str
    latency_s: float
    attempts: int = 1
    cached: bool = False
    fallback_reason: str | None = None  # "error: ..." or "invalid: ..." when the LLM's answer was not used


# --- the phrase table (one source of truth for the template captions) -----------------------------------------------
@dataclass(frozen=True)
class Phrase:
    slot: str
    positive: str
    negative: str  # "" = the absence goes unsaid (hair colours)


# Slots fix the sentence shape: "A close-up portrait photo of a {age} {noun} with {texture} {colour} hair, {bangs},
# {face}, ... and {worn}." An attribute outside the table gets a plain "with/without ..." clause (phrase_for).
PHRASES: dict[str, Phrase] = {
    "Young": Phrase("age", "young", "older"),
    "Bald": Phrase("age", "bald", ""),
    "Wavy_Hair": Phrase("hair_texture", "wavy", "straight"),
    "Blond_Hair": Phrase("hair_colour", "blond", ""),
    "Black_Hair": Phrase("hair_colour", "black", ""),
    "Gray_Hair": Phrase("hair_colour", "gray", ""),
    "Brown_Hair": Phrase("hair_colour", "brown", ""),
    "Bangs": Phrase("bangs", "with bangs", "without bangs"),
    "Smiling": Phrase("face", "smiling", "with a neutral expression"),
    "Mouth_Slightly_Open": Phrase("face", "with the mouth slightly open", "with the mouth closed"),
    "Bushy_Eyebrows": Phrase("face", "with bushy eyebrows", "with thin eyebrows"),
    "Eyeglasses": Phrase("worn", "wearing eyeglasses", "without eyeglasses"),
    "Wearing_Hat": Phrase("worn", "wearing a hat", "without a hat"),
    "Heavy_Makeup": Phrase("worn", "wearing heavy makeup", "without makeup"),
    "Wearing_Lipstick": Phrase("worn", "wearing lipstick", "without lipstick"),
    "Mustache": Phrase("face", "with a mustache", "without a mustache"),
    "No_Beard": Phrase("face", "clean-shaven", "with a beard"),
    "Male": Phrase("noun", "man", "woman"),
}
# Context attributes are described when known but never flipped unless made controllable.
CONTEXT_ATTRIBUTES = ("Male",)


def phrase_for(name: str) -> Phrase:
    """The table's phrase, or a plain "with/without <name>" for a configured attribute the table lacks."""
    if name in PHRASES:
        return PHRASES[name]
    words = name.replace("_", " ").lower()
    return Phrase("face", f"with {words}", f"without {words}")


# Adding one of these while another is present would ask for a contradiction ("black and blond hair").
EXCLUSIVE_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"Blond_Hair", "Black_Hair", "Gray_Hair", "Brown_Hair"}),
    frozenset({"Bald", "Bangs"}),
    frozenset({"Bald", "Wavy_Hair"}),
)


def flippable(states: Mapping[str, str], controllable: Iterable[str]) -> list[tuple[str, str]]:
    """(attribute, direction) for every controllable attribute in a known state whose flip is coherent."""
    out = []
    for name in controllable:
        state = states.get(name, UNKNOWN)
        if state == UNKNOWN:
            continue
        if state == NEGATIVE:
            clash = any(name in g and any(states.get(o) == POSITIVE for o in g - {name}) for g in EXCLUSIVE_GROUPS)
            if clash:
                continue
        out.append((name, ADD if state == NEGATIVE else REMOVE))
    return out


def choose_flips(options: Sequence[tuple[str, str]], mode: str, k: int, seed: int, key: str,
                 counts: dict[str, int] | None = None) -> tuple[tuple[str, str], ...]:
    """All options, or ``k`` of them: the attributes used least so far in ``counts`` first, ties broken by a
    per-face seeded shuffle -- balanced across attributes and reproducible for the same inputs and order."""
    if mode == "all" or len(options) <= k:
        picked = list(options)
    else:
        rng = random.Random(f"{seed}:{key}")
        shuffled = list(options)
        rng.shuffle(shuffled)
        counts = counts if counts is not None else {}
        picked = sorted(shuffled, key=lambda o: counts.get(o[0], 0))[:k]
    if counts is not None:
        for name, _ in picked:
            counts[name] = counts.get(name, 0) + 1
    return tuple(sorted(picked))


def flip_state(states: Mapping[str, str], attribute: str) -> dict[str, str]:
    flipped = dict(states)
    flipped[attribute] = NEGATIVE if states[attribute] == POSITIVE else POSITIVE
    return flipped


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def render_caption(states: Mapping[str, str]) -> str:
    """One natural sentence for the known states (``{name: positive|negative}``); unknown ones are unsaid."""
    said: dict[str, list[str]] = {}
    order = list(PHRASES) + sorted(set(states) - set(PHRASES))
    for name in order:
        phrase = phrase_for(name)
        state = states.get(name, UNKNOWN)
        if state in (POSITIVE, NEGATIVE):
            text = phrase.positive if state == POSITIVE else phrase.negative
            if text:
                said.setdefault(phrase.slot, []).append(text)
    noun = said.get("noun", ["person"])[0]
    subject = " ".join(said.get("age", []) + [noun])
    hair_words = said.get("hair_texture", []) + ([" and ".join(said["hair_colour"])] if "hair_colour" in said else [])
    clauses = [f"with {' '.join(hair_words)} hair"] if hair_words else []
    clauses += said.get("bangs", []) + said.get("face", []) + said.get("worn", [])
    article = "an" if subject[0] in "aeiou" else "a"
    sentence = f"A close-up portrait photo of {article} {subject}"
    if clauses:
        sentence += " " + _join(clauses)
    return sentence + "."


def template_prompts(request: VerbalizeRequest) -> PromptSet:
    return PromptSet(
        source_prompt=render_caption(request.states),
        targets=[
            TargetPrompt(attribute=a, direction=d, prompt=render_caption(flip_state(request.states, a)))
            for a, d in request.flips
        ],
    )


# --- the LLM contract -------------------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "You write captions for close-up face photos that train an image editor. Given a face's attributes, write "
    "source_prompt: one natural, concise sentence describing the face (mention only the attributes given). Then, "
    "for each requested edit, write a target prompt that is identical to source_prompt except for the named "
    "attribute, which is added or removed as requested. Keep every other word the same. Reply with JSON only."
)


def llm_messages(request: VerbalizeRequest) -> list[dict[str, str]]:
    draft = template_prompts(request)
    facts = {name: ("present" if s == POSITIVE else "absent") for name, s in sorted(request.states.items())}
    user = {
        "attributes": facts,
        "edits": [{"attribute": a, "direction": d} for a, d in request.flips],
        "draft": draft.model_dump(),
        "instructions": "Rewrite the draft more naturally if you can; keep its facts and its JSON shape.",
    }
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": json.dumps(user)}]


def response_schema(request: VerbalizeRequest) -> dict[str, Any]:
    """JSON schema for this request: the targets array is fixed to the requested flips, in order."""
    text = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
    items = [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["attribute", "direction", "prompt"],
            "properties": {"attribute": {"const": a}, "direction": {"const": d}, "prompt": text},
        }
        for a, d in request.flips
    ]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["source_prompt", "targets"],
        "properties": {
            "source_prompt": text,
            "targets": {"type": "array", "prefixItems": items, "items": False,
                        "minItems": len(items), "maxItems": len(items)},
        },
    }


class InvalidAnswer(ValueError):
    """The LLM's text is not valid JSON, breaks the schema, or does not answer the request."""


_THINK = re.compile(r"<think>.*?</think>", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _clean(text: str) -> str:
    return " ".join(_CONTROL.sub(" ", text).split())


def parse_answer(text: str, request: VerbalizeRequest) -> PromptSet:
    """Validate an LLM answer against the request; whitespace and control characters in captions are normalised."""
    body = _THINK.sub("", text or "").strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(body, strict=False)
    except json.JSONDecodeError as err:
        raise InvalidAnswer(f"not JSON ({err.msg} at {err.pos})") from None
    if not isinstance(data, dict):
        raise InvalidAnswer(f"off-schema (a JSON {type(data).__name__}, not an object)")
    if isinstance(data.get("source_prompt"), str):
        data["source_prompt"] = _clean(data["source_prompt"])
    if isinstance(data.get("targets"), list):
        for t in data["targets"]:
            if isinstance(t, dict) and isinstance(t.get("prompt"), str):
                t["prompt"] = _clean(t["prompt"])
    try:
        prompts = PromptSet.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise InvalidAnswer(f"off-schema ({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
    got = sorted((t.attribute, t.direction) for t in prompts.targets)
    if got != sorted(request.flips):
        raise InvalidAnswer(f"targets {got} do not match the requested flips {sorted(request.flips)}")
    if any(t.prompt == prompts.source_prompt for t in prompts.targets):
        raise InvalidAnswer("a target prompt repeats the source prompt")
    return prompts


# --- backends ---------------------------------------------------------------------------------------------------------
class Verbalizer(Protocol):
    name: str
    model_id: str

    def verbalize_many(self, requests: Sequence[VerbalizeRequest]) -> list[VerbalizeResult]: ...


class TemplateVerbalizer:
    name = "template"
    model_id = "template-v1"

    def verbalize(self, request: VerbalizeRequest) -> PromptSet:
        return template_prompts(request)

    def verbalize_many(self, requests: Sequence[VerbalizeRequest]) -> list[VerbalizeResult]:
        out = []
        for r in requests:
            t0 = time.perf_counter()
            prompts = template_prompts(r)
            out.append(VerbalizeResult(r.key, prompts, self.name, self.model_id, time.perf_counter() - t0))
        return out


class RequestCache:
    """Validated answers on disk, keyed by a hash of everything that determines them (model, messages, params)."""

    def __init__(self, root: Path | None):
        self.root = root

    @staticmethod
    def key(payload: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> PromptSet | None:
        if self.root is None:
            return None
        try:
            return PromptSet.model_validate_json(self._path(key).read_text())
        except (FileNotFoundError, ValidationError, ValueError):
            return None

    def put(self, key: str, prompts: PromptSet) -> None:
        if self.root is not None:
            atomic_write_json(self._path(key), prompts.model_dump())


@dataclass
class RetryPolicy:
    max_retries: int = 3
    backoff_s: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter (attempt 1 -> up to backoff_s, then doubling)."""
        return random.uniform(0.5, 1.0) * self.backoff_s * 2 ** (attempt - 1)


class _LLMVerbalizer:
    """Shared loop: cache lookup, attempts with backoff, validation, template fallback."""

    name = "llm"
    model_id = ""

    def __init__(self, retry: RetryPolicy, cache: RequestCache, temperature: float, max_tokens: int, seed: int):
        self.retry = retry
        self.cache = cache
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self._fallback = TemplateVerbalizer()

    def _complete(self, request: VerbalizeRequest, messages: list[dict[str, str]], seed: int) -> str:
        raise NotImplementedError

    def _cache_payload(self, request: VerbalizeRequest, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_id, "messages": messages, "flips": request.flips,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}

    def verbalize_one(self, request: VerbalizeRequest) -> VerbalizeResult:
        t0 = time.perf_counter()
        if not request.flips:  # nothing to edit: the source caption alone needs no model call
            return VerbalizeResult(request.key, template_prompts(request), "template", self._fallback.model_id, 0.0,
                                   attempts=0)
        messages = llm_messages(request)
        key = RequestCache.key(self._cache_payload(request, messages))
        cached = self.cache.get(key)
        if cached is not None:
            return VerbalizeResult(request.key, cached, self.name, self.model_id, time.perf_counter() - t0,
                                   attempts=0, cached=True)
        reason = ""
        attempts = 0
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                self.retry.sleep(self.retry.delay(attempt))
            attempts += 1
            try:
                # A new seed per attempt: with a fixed seed, a retried invalid answer would come back identical.
                text = self._complete(request, messages, self.seed + attempt)
                prompts = parse_answer(text, request)
            except InvalidAnswer as err:
                reason = f"invalid: {err}"
                if str(err).startswith("request refused"):
                    break  # the same request would be refused again
                continue
            except (httpx.HTTPError, ServerError, OSError) as err:
                reason = f"error: {type(err).__name__}: {err}"
                continue
            self.cache.put(key, prompts)
            return VerbalizeResult(request.key, prompts, self.name, self.model_id, time.perf_counter() - t0, attempts)
        log.warning("verbalize %s: %s after %d attempt(s); using the template", request.key, reason, attempts)
        return VerbalizeResult(request.key, template_prompts(request), "template", self._fallback.model_id,
                               time.perf_counter() - t0, attempts, fallback_reason=reason[:500])


class ServerError(RuntimeError):
    """The server answered with a status worth retrying (5xx, 429) or an unusable body."""


class ServerConfigError(RuntimeError):
    """The server refuses us for a reason retries cannot fix (wrong key, unknown model): fail the run loudly."""


class VllmVerbalizer(_LLMVerbalizer):
    """Chat completions against an OpenAI-compatible server; Qwen3 thinking off; structured JSON output."""

    name = "vllm"

    def __init__(self, base_url: str, model: str | None = None, api_key: str = "EMPTY", concurrency: int = 8,
                 timeout_s: float = 60.0, structured_output: bool = True, retry: RetryPolicy | None = None,
                 cache: RequestCache | None = None, temperature: float = 0.7, max_tokens: int = 512, seed: int = 0):
        super().__init__(retry or RetryPolicy(), cache or RequestCache(None), temperature, max_tokens, seed)
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.structured_output = structured_output
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"},
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.model_id = model or ""

    def served_models(self) -> list[str]:
        r = self._client.get("/models")
        r.raise_for_status()
        return [m["id"] for m in r.json().get("data", [])]

    def preflight(self) -> str | None:
        """Resolve the model name (the first served one when none is configured); None when the server is down."""
        try:
            served = self.served_models()
        except (httpx.HTTPError, ValueError) as err:
            log.warning("vLLM server at %s not reachable (%s); every face will retry, then fall back",
                        self.base_url, err)
            return None
        if not self.model_id:
            if not served:
                raise ServerError(f"{self.base_url} serves no model")
            self.model_id = served[0]
        elif self.model_id not in served:
            raise ServerConfigError(f"{self.base_url} serves {served}, not {self.model_id!r}: set verbalize.vllm.model")
        return self.model_id

    def _complete(self, request: VerbalizeRequest, messages: list[dict[str, str]], seed: int) -> str:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
            "chat_template_kwargs": {"enable_thinking": False},
        }
        if self.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "prompt_set", "schema": response_schema(request), "strict": True},
            }
        r = self._client.post("/chat/completions", json=body)
        if r.status_code == 429 or r.status_code >= 500:
            raise ServerError(f"HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code in (401, 403, 404):
            raise ServerConfigError(f"{self.base_url} answered HTTP {r.status_code} for model {self.model_id!r}: "
                                    f"{r.text[:300]} (check verbalize.vllm.model / api_key_env)")
        if r.status_code >= 400:  # e.g. 400 for an over-long prompt: this face's request cannot succeed
            raise InvalidAnswer(f"request refused: HTTP {r.status_code}: {r.text[:200]}")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ServerError(f"unusable response body ({type(err).__name__}: {err})") from None
        if not isinstance(content, str):
            raise InvalidAnswer(f"no text in the answer (content is {type(content).__name__})")
        return content

    def verbalize_many(self, requests: Sequence[VerbalizeRequest]) -> list[VerbalizeResult]:
        self.preflight()  # resolves the model name; a server that does not serve it is a config error, not a retry
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="vllm") as pool:
            return list(pool.map(self.verbalize_one, requests))

    def close(self) -> None:
        self._client.close()


class TransformersVerbalizer(_LLMVerbalizer):
    """A local causal LM (``AutoModelForCausalLM``) with the chat template, thinking off; one request at a time."""

    name = "transformers"

    def __init__(self, model_path: str | Path, model_id: str, device: str = "cpu", retry: RetryPolicy | None = None,
                 cache: RequestCache | None = None, temperature: float = 0.7, max_tokens: int = 512, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(retry or RetryPolicy(backoff_s=0.0), cache or RequestCache(None), temperature, max_tokens,
                         seed)
        self._torch = torch
        self.model_id = model_id
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()

    def _complete(self, request: VerbalizeRequest, messages: list[dict[str, str]], seed: int) -> str:
        torch = self._torch
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=False, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(self.model.device) for k, v in ids.items()}
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                **ids, max_new_tokens=self.max_tokens, do_sample=self.temperature > 0,
                temperature=self.temperature or None, pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def verbalize_many(self, requests: Sequence[VerbalizeRequest]) -> list[VerbalizeResult]:
        return [self.verbalize_one(r) for r in requests]


# --- tables ---------------------------------------------------------------------------------------------------------
TARGET_TYPE = pa.struct([("attribute", pa.string()), ("direction", pa.string()), ("prompt", pa.string())])
PROMPT_SCHEMA = pa.schema(
    [
        ("face_key", pa.string()),
        ("image_key", pa.string()),
        ("states", pa.string()),  # JSON: the known states the captions describe
        ("source_prompt", pa.string()),
        ("targets", pa.list_(TARGET_TYPE)),
        ("backend", pa.string()),  # the backend that wrote these prompts (template after a fallback)
        ("model_id", pa.string()),
        ("latency_s", pa.float32()),
        ("attempts", pa.int32()),
        ("cached", pa.bool_()),
        ("fallback_reason", pa.string()),
    ]
)


def build_requests(attribute_rows: Sequence[dict], controllable: Sequence[str], positive_threshold: float,
                   negative_threshold: float, mode: str, k: int, seed: int,
                   counts: dict[str, int] | None = None) -> list[VerbalizeRequest]:
    """One request per classified face: its known states (controllable + context) and the chosen flips."""
    requests = []
    for row in attribute_rows:
        states = {n: s for n, s in json.loads(row["states"]).items() if s != UNKNOWN}
        for name in CONTEXT_ATTRIBUTES:
            if name not in controllable:
                s = attribute_state(row["probabilities"][CELEBA_ATTRIBUTES.index(name)], positive_threshold,
                                    negative_threshold)
                if s != UNKNOWN:
                    states[name] = s
        flips = choose_flips(flippable(states, controllable), mode, k, seed, row["face_key"], counts)
        requests.append(VerbalizeRequest(row["face_key"], states, flips))
    return requests


def result_rows(requests: Sequence[VerbalizeRequest], results: Sequence[VerbalizeResult],
                image_keys: Mapping[str, str]) -> list[dict]:
    return [
        {
            "face_key": req.key, "image_key": image_keys.get(req.key, ""), "states": json.dumps(dict(req.states)),
            "source_prompt": res.prompts.source_prompt,
            "targets": [t.model_dump() for t in res.prompts.targets],
            "backend": res.backend, "model_id": res.model_id, "latency_s": res.latency_s,
            "attempts": res.attempts, "cached": res.cached, "fallback_reason": res.fallback_reason or "",
        }
        for req, res in zip(requests, results)
    ]
