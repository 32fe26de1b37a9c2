import difflib
import json
import re

import pytest

from attrface_pipeline.attributes import DEFAULT_CONTROLLABLE
from attrface_pipeline.models.vllm_server import free_port
from attrface_pipeline.stages.verbalize import (PHRASES, InvalidAnswer, RequestCache, RetryPolicy,
                                                TemplateVerbalizer, TransformersVerbalizer, VerbalizeRequest,
                                                VllmVerbalizer, build_requests, choose_flips, flip_state, flippable,
                                                parse_answer, phrase_for, render_caption, response_schema,
                                                template_prompts)

BASE = {"Male": "negative", "Young": "positive", "Black_Hair": "positive", "Smiling": "positive",
        "Eyeglasses": "negative", "Wearing_Hat": "negative", "Bushy_Eyebrows": "negative"}
JOINERS = {"with", "and", "hair", "a", "an"}


def _changed_words(a: str, b: str) -> set[str]:
    wa, wb = re.findall(r"[\w-]+", a.lower()), re.findall(r"[\w-]+", b.lower())
    out = set()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=wa, b=wb).get_opcodes():
        if tag != "equal":
            out |= set(wa[i1:i2]) | set(wb[j1:j2])
    return out


@pytest.mark.parametrize("attribute", DEFAULT_CONTROLLABLE)
@pytest.mark.parametrize("state", ["positive", "negative"])
def test_template_every_attribute_and_direction(attribute, state):
    """Each controllable attribute in each state yields a sentence, and its flip differs only in that phrase."""
    states = {"Male": "positive", attribute: state}
    request = VerbalizeRequest("k", states, tuple(flippable(states, [attribute])))
    assert request.flips == ((attribute, "remove" if state == "positive" else "add"),)
    prompts = template_prompts(request)
    src, tar = prompts.source_prompt, prompts.targets[0].prompt
    assert src.startswith("A close-up portrait photo of ") and src.endswith(".") and src != tar
    phrase = phrase_for(attribute)
    allowed = set(re.findall(r"[\w-]+", f"{phrase.positive} {phrase.negative}".lower())) | JOINERS
    assert _changed_words(src, tar) <= allowed, (src, tar)
    said = phrase.positive if state == "positive" else phrase.negative
    if said:
        assert said in src


def test_prompt_pairs_differ_only_in_the_flipped_phrase_with_many_attributes():
    request = VerbalizeRequest("k", BASE, tuple(flippable(BASE, DEFAULT_CONTROLLABLE)))
    prompts = template_prompts(request)
    assert "Blond_Hair" not in dict(request.flips)  # black hair is present: adding blond would contradict it
    for target in prompts.targets:
        phrase = PHRASES[target.attribute]
        allowed = set(re.findall(r"[\w-]+", f"{phrase.positive} {phrase.negative}".lower())) | JOINERS
        changed = _changed_words(prompts.source_prompt, target.prompt)
        assert changed and changed <= allowed, (target.attribute, prompts.source_prompt, target.prompt)
        # and rendering the flipped states is exactly what the target says
        assert target.prompt == render_caption(flip_state(BASE, target.attribute))


def test_unknown_states_are_never_said_or_flipped():
    states = {"Smiling": "unknown", "Eyeglasses": "positive"}
    assert flippable(states, ["Smiling", "Eyeglasses"]) == [("Eyeglasses", "remove")]
    assert "smil" not in render_caption({k: v for k, v in states.items() if v != "unknown"})
    assert render_caption({}) == "A close-up portrait photo of a person."


def test_choose_flips_samples_k_balanced_and_reproducible():
    options = [(a, "add") for a in DEFAULT_CONTROLLABLE]
    counts: dict[str, int] = {}
    picks = [choose_flips(options, "sample", 2, 0, f"face{i}", counts) for i in range(24)]
    assert all(len(p) == 2 for p in picks)
    assert set(counts.values()) == {4}  # 48 picks spread evenly over 12 attributes
    again: dict[str, int] = {}
    assert picks == [choose_flips(options, "sample", 2, 0, f"face{i}", again) for i in range(24)]
    assert len(choose_flips(options, "all", 2, 0, "x")) == 12


def test_build_requests_uses_known_states_and_context():
    probs = [0.5] * 40
    probs[20] = 0.9  # Male
    rows = [{"face_key": "a_00", "states": json.dumps({"Smiling": "positive", "Bald": "unknown"}),
             "probabilities": probs}]
    (req,) = build_requests(rows, ["Smiling", "Bald"], 0.6, 0.4, "all", 2, 0)
    assert req.states == {"Smiling": "positive", "Male": "positive"}
    assert req.flips == (("Smiling", "remove"),)


REQ = VerbalizeRequest("k", {"Smiling": "positive", "Eyeglasses": "negative"},
                       (("Eyeglasses", "add"), ("Smiling", "remove")))


def _answer(**change):
    data = {"source_prompt": "A smiling woman.", "targets": [
        {"attribute": "Eyeglasses", "direction": "add", "prompt": "A smiling woman wearing glasses."},
        {"attribute": "Smiling", "direction": "remove", "prompt": "A woman."}]}
    data.update(change)
    return json.dumps(data)


def test_parse_answer_accepts_valid_and_normalises_whitespace():
    text = "<think></think>\n" + _answer(source_prompt="A  smiling\n\twoman.\x10")
    assert parse_answer(text, REQ).source_prompt == "A smiling woman."


@pytest.mark.parametrize("text, why", [
    ("Sure! Here is a caption: a woman", "not JSON"),
    (_answer(targets=[]), "do not match"),
    (_answer(extra=1), "off-schema"),
    (_answer(source_prompt="   "), "off-schema"),
    (_answer(targets=[{"attribute": "Eyeglasses", "direction": "remove", "prompt": "x"},
                      {"attribute": "Smiling", "direction": "remove", "prompt": "y"}]), "do not match"),
    (_answer(source_prompt="A woman."), "repeats the source"),
    ("[1, 2]", "not an object"),
    ('{"source_prompt": "A woman.", "targets": 1}', "off-schema"),
])
def test_parse_answer_rejects(text, why):
    with pytest.raises(InvalidAnswer, match=why):
        parse_answer(text, REQ)


def test_response_schema_pins_the_requested_flips():
    schema = response_schema(REQ)
    items = schema["properties"]["targets"]["prefixItems"]
    pinned = [(i["properties"]["attribute"]["const"], i["properties"]["direction"]["const"]) for i in items]
    assert pinned == list(REQ.flips)
    assert schema["properties"]["targets"]["items"] is False


def test_unreachable_server_retries_then_falls_back(tmp_path):
    """A real connection to a closed port: every face retries with backoff, then gets the template, counted."""
    slept = []
    v = VllmVerbalizer(f"http://127.0.0.1:{free_port()}/v1", model="m", concurrency=2, timeout_s=2,
                       retry=RetryPolicy(max_retries=2, backoff_s=0.01, sleep=slept.append),
                       cache=RequestCache(tmp_path / "cache"))
    results = v.verbalize_many([REQ, VerbalizeRequest("k2", REQ.states, REQ.flips)])
    assert [r.backend for r in results] == ["template", "template"]
    assert all(r.attempts == 3 and r.fallback_reason.startswith("error: ConnectError") for r in results)
    assert len(slept) == 4 and all(0 < s <= 0.02 for s in slept)
    assert results[0].prompts == TemplateVerbalizer().verbalize(REQ)
    assert not any((tmp_path / "cache").rglob("*.json"))  # fallbacks are not cached: a re-run asks again


def test_faces_without_flips_need_no_model_call():
    v = VllmVerbalizer(f"http://127.0.0.1:{free_port()}/v1", model="m", retry=RetryPolicy(0, 0))
    (r,) = v.verbalize_many([VerbalizeRequest("k", {"Smiling": "positive"}, ())])
    assert r.attempts == 0 and r.fallback_reason is None and r.prompts.targets == []


def test_transformers_backend_runs_the_local_lm(tiny_zoo, tmp_path):
    """The tiny random Qwen3 really generates; its unconstrained text is not JSON, so the answer is retried and
    replaced by the template -- the schema enforcement path of the local backend."""
    v = TransformersVerbalizer(tiny_zoo / "qwen3", "tiny/qwen3", retry=RetryPolicy(1, 0.0),
                               cache=RequestCache(tmp_path), max_tokens=24)
    (r,) = v.verbalize_many([REQ])
    assert r.backend == "template" and r.attempts == 2 and r.fallback_reason.startswith("invalid: not JSON")
    text = v._complete(REQ, [{"role": "user", "content": "hi"}], seed=1)
    assert isinstance(text, str) and text == v._complete(REQ, [{"role": "user", "content": "hi"}], seed=1)
