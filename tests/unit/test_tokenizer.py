"""pdserve Tokenizer against transformers.AutoTokenizer, and the incremental detokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram

from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import GIL_HELD_ENCODE_CHARS, IncrementalDetokenizer, Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill and decode run on separate nodes; the KV cache moves between them.",
    "def add(a, b):\n    return a + b\n",
    "Café au lait, naïve résumé, 東京 and 北京 are cities. 🎉🚀",
    "Speculative decoding proposes draft tokens and verifies them in one step.",
]
TEXTS = [
    "hello world",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] hi [/INST] ok</s> and more",
    "multi-byte: héllo wörld 東京 🎉 ñ",
    "  leading spaces and trailing  ",
    "def f(x):\n\treturn x ** 2  # square\n",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, 東京?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Write code."},
]
# Llama-2 style: bos/eos variables, raise_exception on a bad role order.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_unigram_tokenizer(out_dir: Path) -> Path:
    """A sentencepiece-style tokenizer (Unigram + Metaspace, byte fallback, <s> prepended), trained
    on SENTENCES and saved with a tokenizer_config.json: a different family from the demo's BPE."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = HFTokenizer(Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(SENTENCES, trainer)
    # Byte-fallback pieces, as sentencepiece models carry: characters outside the vocabulary become
    # UTF-8 bytes, so one character spans several tokens.
    data = json.loads(tok.to_str())
    data["model"]["vocab"] += [[f"<0x{b:02X}>", -20.0] for b in range(256)]
    data["model"]["byte_fallback"] = True
    tok = HFTokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA2_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    return out_dir


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_unigram_tokenizer(tmp_path_factory.mktemp("unigram_tok"))


@pytest.fixture(scope="module", params=["demo_bpe", "unigram"])
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    return default_model_dir() if request.param == "demo_bpe" else request.getfixturevalue("unigram_dir")


@pytest.fixture(scope="module")
def both(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return Tokenizer.from_dir(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)


def test_encode_decode_match_transformers(both) -> None:
    ours, hf = both
    for text in TEXTS:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == hf.encode(text, add_special_tokens=add_special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_short_and_long_texts_encode_alike(both) -> None:
    """Texts up to GIL_HELD_ENCODE_CHARS take the GIL-holding path, longer ones encode_batch: a text on
    either side of the limit encodes as transformers does."""
    ours, hf = both
    sentence = " ".join(SENTENCES) + " "
    for length in (GIL_HELD_ENCODE_CHARS, GIL_HELD_ENCODE_CHARS + 1):
        text = (sentence * (length // len(sentence) + 1))[:length]
        for add_special in (True, False):
            assert ours.encode(text, add_special_tokens=add_special) == hf.encode(
                text, add_special_tokens=add_special)


def test_special_tokens_in_text_are_single_ids(both) -> None:
    ours, hf = both
    special = hf.eos_token
    ids = ours.encode(f"a{special}b", add_special_tokens=False)
    assert ours.token_to_id(special) in ids
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_vocab_size_and_eos_ids(both) -> None:
    ours, hf = both
    assert ours.vocab_size == len(hf)
    assert ours.eos_token_ids[0] == hf.eos_token_id


def test_eos_ids_merge_generation_config(unigram_dir: Path) -> None:
    tok = Tokenizer.from_dir(unigram_dir)
    eos = tok.token_to_id("</s>")
    assert tok.eos_token_ids == tuple(dict.fromkeys([eos, 2, 1]))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(both, add_generation_prompt: bool) -> None:
    ours, hf = both
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_raise_exception(unigram_dir: Path) -> None:
    tok = Tokenizer.from_dir(unigram_dir)
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chat_template_is_sandboxed(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text((default_model_dir() / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": "{{ messages.__class__.__mro__ }}"})
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES)


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids or [])
    deltas = [detok.add(i) for i in ids]
    return deltas + [detok.flush()]


MULTIBYTE_TEXT = st.text(alphabet=st.sampled_from(list("ab xyz.\n\té東京🎉ñ한ß") + ["🚀", "ü"]), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=MULTIBYTE_TEXT)
def test_incremental_detokenizer_equals_full_decode(both, text: str) -> None:
    tok = both[0]
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # split characters are held back, never emitted broken


def test_multibyte_character_is_split_across_tokens(unigram_dir: Path) -> None:
    # The hypothesis test only proves the hold-back if characters really span several tokens.
    tok = Tokenizer.from_dir(unigram_dir)
    ids = tok.encode("한", add_special_tokens=False)
    assert len(ids) >= 3
    deltas = stream(tok, ids)
    assert deltas[:2] == ["", ""] and "".join(deltas) == tok.decode(ids)


def test_a_window_never_starts_inside_a_character(unigram_dir: Path) -> None:
    # Found by the hypothesis test: ß is two byte tokens, and a window of 5 context tokens started at
    # the second byte of one; the byte-fallback decoder then rendered the whole run as U+FFFD, held
    # it back as incomplete, and the stream ended in a replacement character instead of a tab.
    tok = Tokenizer.from_dir(unigram_dir)
    text = "ßßß\t\t"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 5 + 1 and tok.decode(ids[2:8]).startswith("\ufffd")  # the trap is there
    deltas = stream(tok, ids)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    # The same when the characters are the prompt's tail, the context the stream starts from.
    for split in range(1, len(ids)):
        if tok.decode(ids[:split]).endswith("\ufffd"):
            continue  # the prompt ends inside a character: its text is not a prefix of the whole
        continued = "".join(stream(tok, ids[split:], ids[:split]))
        assert continued == text[len(tok.decode(ids[:split])):], split


def test_incremental_detokenizer_keeps_leading_space_after_prompt(unigram_dir: Path) -> None:
    tok = Tokenizer.from_dir(unigram_dir)
    prompt = tok.encode("The quick brown")
    ids = tok.encode("The quick brown fox jumps")[len(prompt) :]
    assert "".join(stream(tok, ids, prompt)) == " fox jumps"
