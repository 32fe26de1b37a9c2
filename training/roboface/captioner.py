"""Face captions for RoboFace's explicit guidance, behind one interface: ``caption(images) -> list[str]``.

Backends:

* :class:`VLMCaptioner` -- an OpenAI-compatible server with image input (``vllm serve llava-hf/llava-1.5-13b-hf``,
  or a Qwen-VL), one chat completion per image: the paper's prompt plus the image as a base64 data URL. It talks to
  the server through the verbalizer's own client (:class:`attrface_pipeline.stages.verbalize.VllmVerbalizer`:
  httpx client, auth header, model preflight, status-code handling) and retries with its :class:`RetryPolicy`.
* :class:`TransformersCaptioner` -- a local image-text-to-text model (LLaVA-1.5 ``llava-hf/*``, Qwen-VL) loaded
  with ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained``; greedy, batched, left padding.
* :class:`NoCaptioner` -- the empty caption (stage II then relies on the implicit tokens alone).

Images are HWC uint8 RGB arrays (the house convention). A caption that cannot be had after retries becomes a
:class:`CaptionResult` with ``error`` set and empty text -- a record, not a crash -- and is never cached.

:class:`CachedCaptioner` wraps any backend with a :class:`CaptionCache`: one JSON file per caption under a folder,
keyed by sha256 of (image digest, backend, model, prompt, generation settings), written atomically, so the captions
of a training set are computed once and a re-run (or another process) reads them back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import httpx
import numpy as np

from training.roboface.config import CAPTION_PROMPT, CaptionConfig

log = logging.getLogger(__name__)


@dataclass
class CaptionResult:
    text: str
    backend: str
    model_id: str
    attempts: int = 1
    cached: bool = False
    error: str | None = None  # why ``text`` is empty: the last error after all retries


class Captioner(Protocol):
    name: str
    model_id: str
    prompt: str

    def caption(self, images: Sequence[np.ndarray]) -> list[str]: ...

    def caption_results(self, images: Sequence[np.ndarray]) -> list[CaptionResult]: ...


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"captioners take HWC uint8 RGB arrays, got {image.dtype} {image.shape}")


def image_digest(image: np.ndarray) -> str:
    """sha256 of an RGB array's shape and pixels: the same pixels give the same key whatever file held them."""
    _check_rgb(image)
    h = hashlib.sha256(f"{image.shape[0]}x{image.shape[1]}:".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


_THINK = re.compile(r"<think>.*?</think>", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def clean_caption(text: str | None) -> str:
    """A model's answer as a caption: reasoning blocks dropped, control characters and runs of spaces collapsed."""
    return " ".join(_CONTROL.sub(" ", _THINK.sub("", text or "")).split())


# --- none -----------------------------------------------------------------------------------------------------------
class NoCaptioner:
    name = "none"
    model_id = "none"
    prompt = ""

    def caption_results(self, images: Sequence[np.ndarray]) -> list[CaptionResult]:
        return [CaptionResult("", self.name, self.model_id, attempts=0) for _ in images]

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        return ["" for _ in images]


# --- OpenAI-compatible VLM server -----------------------------------------------------------------------------------
def image_data_url(image: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> str:
    """``data:image/png;base64,...`` of an RGB array, the form OpenAI-compatible servers take as image input."""
    _check_rgb(image)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image_format == "png":
        ok, buf = cv2.imencode(".png", bgr)
    elif image_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    else:
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as {image_format}")
    return f"data:image/{image_format};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


def caption_messages(image: np.ndarray, prompt: str = CAPTION_PROMPT, image_format: str = "png") -> list[dict]:
    """One user turn, image first then the prompt (LLaVA-1.5's training layout), in the chat-completions format."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(image, image_format)}},
        {"type": "text", "text": prompt},
    ]}]


class VLMCaptioner:
    """Chat completions with an image part against an OpenAI-compatible server (module docstring)."""

    name = "vlm"

    def __init__(self, base_url: str, model: str | None = None, *, prompt: str = CAPTION_PROMPT,
                 api_key: str = "EMPTY", concurrency: int = 8, timeout_s: float = 120.0, retry=None,
                 temperature: float = 0.0, max_tokens: int = 160, seed: int = 0, image_format: str = "png"):
        from attrface_pipeline.stages.verbalize import RetryPolicy, VllmVerbalizer

        # The verbalizer's client without its JSON schema: the same httpx client, headers, preflight and handling
        # of 429/5xx (retry), 401/403/404 (config error, raised) and other 4xx (refused, not retried).
        self._client = VllmVerbalizer(base_url, model, api_key=api_key, concurrency=concurrency, timeout_s=timeout_s,
                                      structured_output=False, retry=retry or RetryPolicy(),
                                      temperature=temperature, max_tokens=max_tokens, seed=seed)
        self.prompt = prompt
        self.image_format = image_format
        self.concurrency = concurrency
        self._resolved = False

    @property
    def model_id(self) -> str:
        return self._client.model_id

    @property
    def retry(self):
        return self._client.retry

    def preflight(self) -> str | None:
        """Resolve the served model name (see VllmVerbalizer.preflight); None when the server is unreachable."""
        model = self._client.preflight()
        self._resolved = model is not None
        return model

    def caption_one(self, image: np.ndarray) -> CaptionResult:
        from attrface_pipeline.stages.verbalize import InvalidAnswer, ServerError

        messages = caption_messages(image, self.prompt, self.image_format)
        reason, attempts = "", 0
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                self.retry.sleep(self.retry.delay(attempt))
            attempts += 1
            try:
                # request=None: only the structured-output path reads it, and that is off for captions
                text = clean_caption(self._client._complete(None, messages, self._client.seed + attempt))
                if not text:
                    raise InvalidAnswer("empty caption")
                return CaptionResult(text, self.name, self.model_id, attempts)
            except InvalidAnswer as err:
                reason = f"invalid: {err}"
                if str(err).startswith("request refused"):
                    break
            except (httpx.HTTPError, ServerError, OSError) as err:
                reason = f"error: {type(err).__name__}: {err}"
        log.warning("caption: %s after %d attempt(s)", reason, attempts)
        return CaptionResult("", self.name, self.model_id, attempts, error=reason[:500])

    def caption_results(self, images: Sequence[np.ndarray]) -> list[CaptionResult]:
        if not self._resolved:
            self.preflight()  # a server that does not serve the configured model is a config error, not a retry
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="caption") as pool:
            return list(pool.map(self.caption_one, images))

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        return [r.text for r in self.caption_results(images)]

    def close(self) -> None:
        self._client.close()


# --- local transformers model ---------------------------------------------------------------------------------------
class TransformersCaptioner:
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from a local folder; greedy unless temperature > 0."""

    name = "transformers"

    def __init__(self, model_path: str | Path, model_id: str | None = None, *, prompt: str = CAPTION_PROMPT,
                 device: str = "cpu", dtype: Any = None, batch_size: int = 8, max_tokens: int = 160,
                 temperature: float = 0.0, seed: int = 0):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._torch = torch
        self.model_id = model_id or str(model_path)
        self.prompt = prompt
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation continues on the right
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self._text = self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def caption_results(self, images: Sequence[np.ndarray]) -> list[CaptionResult]:
        from PIL import Image

        torch = self._torch
        out: list[CaptionResult] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            for image in chunk:
                _check_rgb(image)
            inputs = self.processor(images=[Image.fromarray(im) for im in chunk], text=[self._text] * len(chunk),
                                    return_tensors="pt", padding=True).to(self.model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            torch.manual_seed(self.seed)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=self.temperature > 0,
                                          temperature=self.temperature or None,
                                          pad_token_id=self.processor.tokenizer.pad_token_id)
            texts = self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [CaptionResult(clean_caption(t), self.name, self.model_id) for t in texts]
        return out

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        return [r.text for r in self.caption_results(images)]


# --- cache ----------------------------------------------------------------------------------------------------------
class CaptionCache:
    """One JSON file per caption under ``root`` (``<root>/<key[:2]>/<key>.json``), atomic writes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(digest: str, *, backend: str, model_id: str, prompt: str, settings: dict | None = None) -> str:
        payload = {"image": digest, "backend": backend, "model": model_id, "prompt": prompt,
                   "settings": settings or {}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            record = json.loads(self.path(key).read_text())
        except (FileNotFoundError, ValueError):
            return None
        text = record.get("caption") if isinstance(record, dict) else None
        return text if isinstance(text, str) else None

    def put(self, key: str, text: str, meta: dict) -> None:
        from attrface_pipeline.storage import atomic_write_json

        atomic_write_json(self.path(key), {"caption": text, **meta})


class CachedCaptioner:
    """Any captioner, asked only for images whose caption is not in the cache yet."""

    def __init__(self, inner: Captioner, cache: CaptionCache, settings: dict | None = None):
        self.inner = inner
        self.cache = cache
        self.settings = settings or {}
        self.name = inner.name
        self.prompt = inner.prompt
        self.hits = self.misses = 0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def _key(self, image: np.ndarray) -> str:
        return CaptionCache.key(image_digest(image), backend=self.inner.name, model_id=self.inner.model_id,
                                prompt=self.inner.prompt, settings=self.settings)

    def caption_results(self, images: Sequence[np.ndarray]) -> list[CaptionResult]:
        if isinstance(self.inner, VLMCaptioner) and not self.inner._resolved:
            self.inner.preflight()  # the served model's name is part of the key
        keys = [self._key(im) for im in images]
        results: list[CaptionResult | None] = []
        for key in keys:
            text = self.cache.get(key)
            results.append(None if text is None else CaptionResult(text, self.name, self.model_id, 0, cached=True))
        todo = [i for i, r in enumerate(results) if r is None]
        self.hits += len(images) - len(todo)
        self.misses += len(todo)
        if todo:
            t0 = time.perf_counter()
            fresh = self.inner.caption_results([images[i] for i in todo])
            for i, res in zip(todo, fresh):
                results[i] = res
                if res.error is None:
                    self.cache.put(keys[i], res.text, {"backend": res.backend, "model": res.model_id,
                                                       "seconds": round((time.perf_counter() - t0) / len(todo), 4)})
        return results  # type: ignore[return-value]

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        return [r.text for r in self.caption_results(images)]


def build_captioner(cfg: CaptionConfig, store=None) -> Captioner:
    """The configured backend (cached under ``cfg.cache_dir`` when set); ``store`` resolves the transformers model."""
    import os

    if cfg.backend == "none":
        return NoCaptioner()
    settings = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": cfg.seed}
    captioner: Captioner
    if cfg.backend == "vlm":
        from attrface_pipeline.stages.verbalize import RetryPolicy

        v = cfg.vlm
        captioner = VLMCaptioner(v.base_url, v.model, prompt=cfg.prompt, api_key=os.environ.get(v.api_key_env, "EMPTY"),
                                 concurrency=v.concurrency, timeout_s=v.timeout_s,
                                 retry=RetryPolicy(v.max_retries, v.backoff_s), temperature=cfg.temperature,
                                 max_tokens=cfg.max_tokens, seed=cfg.seed, image_format=v.image_format)
        settings["image_format"] = v.image_format
    else:
        from attrface_pipeline.models.device import resolve_device, resolve_dtype

        t = cfg.transformers
        if store is None:
            raise ValueError("the transformers caption backend needs a ModelStore for caption.transformers.model")
        device = resolve_device(t.device)
        captioner = TransformersCaptioner(store.resolve(t.model), t.model, prompt=cfg.prompt, device=str(device),
                                          dtype=resolve_dtype(t.dtype, device), batch_size=t.batch_size,
                                          max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
    if cfg.cache_dir:
        return CachedCaptioner(captioner, CaptionCache(cfg.cache_dir), settings)
    return captioner
