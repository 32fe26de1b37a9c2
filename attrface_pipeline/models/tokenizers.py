"""Offline tokenizers for the tiny zoo, trained on a small caption corpus with the ``tokenizers`` library.

They are built in the formats of the real ones (CLIP BPE with ``</w>``, T5 unigram, Qwen2 byte-level BPE with a
Qwen3 chat template) and saved with ``save_pretrained``, so ``AutoTokenizer.from_pretrained`` loads them exactly
as it loads the published checkpoints.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from functools import lru_cache

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

# Words the pipeline's prompts are made of; enough for short, meaningful token sequences.
CORPUS = """
a photo of a human face . a close-up portrait photo of a young woman with blond wavy hair and bangs , smiling .
a portrait of an old man with gray hair , wearing eyeglasses and a hat , mouth slightly open , bushy eyebrows .
a middle-aged person with black straight hair , not smiling , no eyeglasses , bald head , receding hairline .
high quality photograph , sharp focus , natural light , detailed skin texture , neutral expression , studio .
a man with a beard and mustache , a woman wearing lipstick and earrings , brown hair , pale skin , rosy cheeks .
describe the face : eyes , nose , mouth , eyebrows , skin tone , expression , moles , freckles , wrinkles .
the person is young , the person is old , with glasses , without glasses , with a hat , without a hat .
{ "source_prompt" : "..." , "targets" : [ { "attribute" : "Smiling" , "direction" : "add" , "prompt" : "" } ] }
json schema answer attribute direction remove add positive negative target source prompt targets true false
""".split()


def _corpus_lines() -> list[str]:
    words = [w.lower() for w in CORPUS]
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)] * 4


@lru_cache(maxsize=1)
def byte_unicode_table() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    raw = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]


def build_clip_tokenizer(vocab_size: int = 1000, model_max_length: int = 77):
    """CLIP-format BPE tokenizer: every byte char and its ``c</w>`` form, then learned merges, then specials."""
    from transformers import CLIPTokenizer

    alphabet = list(byte_unicode_table().values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(_corpus_lines(), trainer)
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for a, b in _merges_of(bpe):
        if a in vocab and b in vocab:
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 512):
    """T5-format unigram tokenizer: whole corpus words score higher than the character fallback."""
    from transformers import T5Tokenizer

    counts = Counter(w.lower() for w in CORPUS)
    total = sum(counts.values())
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for word, n in counts.most_common():
        piece = "▁" + word
        if piece not in seen:
            pieces.append((piece, math.log(n / total)))
            seen.add(piece)
    for ch in sorted(set(string.ascii_letters + string.digits + string.punctuation)):
        for piece in (ch, "▁" + ch):
            if piece not in seen:
                pieces.append((piece, -12.0))
                seen.add(piece)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# Qwen3-style chat template (ChatML), honouring enable_thinking=False like the real one.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build_qwen2_tokenizer(vocab_size: int = 1000):
    """Byte-level BPE in the Qwen2/Qwen3 format with ChatML special tokens and a chat template."""
    from transformers import Qwen2Tokenizer

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(_corpus_lines() + [line.upper() for line in _corpus_lines()], trainer)
    vocab = dict(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]))
    merges = _merges_of(bpe)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    # Qwen3 chat models stop on <|im_end|> and pad with <|endoftext|>.
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok
