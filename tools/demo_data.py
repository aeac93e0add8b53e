"""Build the demo model's corpus and BPE tokenizer from the Python standard library.

The recipe is fully determined by the interpreter's stdlib (recorded in the manifest):
every ``*.py`` file under the stdlib directory except ``site-packages``, sorted by path,
documents separated by ``<|endoftext|>``. A file is held out when the first byte of
sha1(relative path) is below 5 (about 2%), so the split never depends on file order.

Usage: python tools/demo_data.py --out .data --tokenizer-dir models/demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sysconfig
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 8192
HELD_OUT_THRESHOLD = 5  # first sha1 byte < 5  ->  ~2% of files

CHAT_TEMPLATE = (
    # with tools: a system turn listing them (Hermes/Qwen2.5 style), the model answers calls as
    # <tool_call>{"name": ..., "arguments": ...}</tool_call> (the router's "hermes" tool-call parser)
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>\\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": '"
    " + (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/"):
            continue
        files.append((rel, path))
    return files


def is_held_out(rel: str) -> bool:
    return hashlib.sha1(rel.encode()).digest()[0] < HELD_OUT_THRESHOLD


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_split(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where train.npy / heldout.npy go")
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    args = parser.parse_args()

    train_texts, heldout_texts, train_names, heldout_names = [], [], [], []
    for rel, path in stdlib_files():
        text = read_text(path)
        if not text:
            continue
        if is_held_out(rel):
            heldout_texts.append(text)
            heldout_names.append(rel)
        else:
            train_texts.append(text)
            train_names.append(rel)

    tokenizer = train_tokenizer(train_texts)
    write_tokenizer(tokenizer, args.tokenizer_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    train_ids = encode_split(tokenizer, train_texts)
    heldout_ids = encode_split(tokenizer, heldout_texts)
    np.save(args.out / "train.npy", train_ids)
    np.save(args.out / "heldout.npy", heldout_ids)
    manifest = {
        "python": platform.python_version(),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "train_files": len(train_names),
        "heldout_files": heldout_names,
        "train_tokens": int(train_ids.size),
        "heldout_tokens": int(heldout_ids.size),
        "train_chars": sum(map(len, train_texts)),
        "vocab_size": tokenizer.get_vocab_size(),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: v for k, v in manifest.items() if k != "heldout_files"}))


if __name__ == "__main__":
    main()
