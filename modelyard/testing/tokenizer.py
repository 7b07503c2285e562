"""A real byte-level BPE tokenizer for random-weight checkpoints, built offline with `tokenizers`.

Trained on generated text (pseudo-words from a fixed syllable set, so no corpus ships), then padded
with further merges of existing tokens until the vocabulary has exactly the size the config asks for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SYLLABLES = (
    "ka ri to na mi su be lo de va ne pi ru so ta ma le ko hi fu ga ze po chi ya wa "
    "an en in on un ar er or ir st th sh ch qu pl tr br gr cl fl sp"
).split()
_WORDS = (
    "the a an of in on with and is are red blue green yellow black white small large cat dog "
    "car tree house sky road man woman child table cup bird flower window door light dark "
    "image picture photo scene shows there left right top bottom near next behind front "
    "circle square triangle line shape color background object describe caption"
).split()

_FAMILIES = {
    # leading specials get the first ids, trailing ones the last (as in the upstream vocabularies)
    "llama": dict(
        leading=["<unk>", "<s>", "</s>"],
        trailing=["<image>", "<pad>"],
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        pad="<pad>",
        add_bos=True,
    ),
    "qwen2": dict(
        leading=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        trailing=["<image>"],
        bos=None,
        eos="<|im_end|>",
        unk=None,
        pad="<|endoftext|>",
        add_bos=False,
    ),
}


def _corpus(rng: random.Random, n_lines: int) -> list[str]:
    words = list(_WORDS) + ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    lines = []
    for _ in range(n_lines):
        ws = [rng.choice(words) for _ in range(rng.randint(4, 16))]
        s = " ".join(ws).capitalize() + rng.choice([".", ".", "!", "?", ","])
        if rng.random() < 0.1:
            s += f" {rng.randint(0, 9999)}"
        lines.append(s)
    return lines


def build_tokenizer(path: Path, family: str, vocab_size: int, seed: int = 0, chat_template: str | None = None) -> dict:
    """Write tokenizer files into `path`; return the special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fam = _FAMILIES[family]
    rng = random.Random(seed)
    n_base = vocab_size - len(fam["trailing"])
    train_target = min(n_base, 6000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=train_target,
        special_tokens=fam["leading"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(rng, 4000), trainer=trainer)

    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Pad to the exact size with merges of existing tokens (lowest priority), so every id decodes.
    tokens = [t for t in vocab if t not in fam["leading"]]
    while len(vocab) < n_base:
        a, b = rng.choice(tokens), rng.choice(tokens)
        if a + b in vocab or len(a + b) > 24:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        tokens.append(a + b)
    if len(vocab) > n_base:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(fam["leading"] + fam["trailing"])
    if fam["add_bos"]:
        bos_id = vocab[fam["bos"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam['bos']} $A", pair=f"{fam['bos']} $A {fam['bos']} $B", special_tokens=[(fam["bos"], bos_id)]
        )
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)

    kw = dict(
        tokenizer_object=tok,
        eos_token=fam["eos"],
        pad_token=fam["pad"],
        extra_special_tokens={"image_token": "<image>"},
    )
    if fam["bos"]:
        kw["bos_token"] = fam["bos"]
    if fam["unk"]:
        kw["unk_token"] = fam["unk"]
    hf = PreTrainedTokenizerFast(**kw)
    hf.add_bos_token = fam["add_bos"]
    hf.model_max_length = 1 << 20
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(str(path))
    if chat_template:
        (path / "chat_template.jinja").write_text(chat_template)

    ids = tok.get_vocab()
    eos_ids = [ids[fam["eos"]]] + ([ids["<|endoftext|>"]] if family == "qwen2" else [])
    return {
        "bos_token_id": ids[fam["bos"]] if fam["bos"] else None,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": ids[fam["pad"]],
        "image_token_id": ids["<image>"],
    }
