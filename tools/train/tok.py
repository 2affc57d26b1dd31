"""Stage 2: a byte-level BPE tokenizer laid out as Qwen3's (NFC, the Qwen3 split
regex, ByteLevel without its own regex, ByteLevel decoder), trained on the corpus,
and the corpus encoded with it.
"""
import json
import unicodedata

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
THINK = ["<think>", "</think>"]             # added, not special, as in Qwen3

# The exact JSON of Qwen3's pipeline around the BPE model.
BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
PIPELINE = {
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": False},
        BYTELEVEL]},
    "post_processor": BYTELEVEL,
    "decoder": BYTELEVEL,
}

# Qwen3's chat format (non-thinking by default), for tokenizer_config.json.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def train(texts, vocab_size):
    """Train on texts; return a Tokenizer with vocab_size tokens in all (if the data allows)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK), min_frequency=2,
                                  special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    # Rewrite the pipeline as Qwen3 spells it, then reload: what is saved is what is used.
    j = json.loads(tok.to_str())
    j.update(PIPELINE)
    return Tokenizer.from_str(json.dumps(j))


def check(tok, texts):
    """Round-trip and special-token checks; return a dict of findings (raises on a broken tokenizer)."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL + THINK}
    assert all(i is not None for i in ids.values()), ids
    for t, i in ids.items():
        assert tok.encode(t, add_special_tokens=False).ids == [i], t
    bad = 0
    for t in texts:
        if tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) \
                != unicodedata.normalize("NFC", t):
            bad += 1
    return {"ids": ids, "roundtrip_checked": len(texts), "roundtrip_failures": bad}


def save(tok, out_dir, max_len):
    tok.save(f"{out_dir}/tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
           "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
           "clean_up_tokenization_spaces": False, "split_special_tokens": False,
           "chat_template": CHAT_TEMPLATE}
    with open(f"{out_dir}/tokenizer_config.json", "w") as f:
        json.dump(cfg, f, indent=2)


def encode_docs(tok, texts, chunk=512):
    """Encode texts; return a list of uint16 arrays (one per text)."""
    enc = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    out = []
    for i in range(0, len(texts), chunk):
        for e in enc(texts[i:i + chunk], add_special_tokens=False):
            out.append(np.asarray(e.ids, dtype=np.uint16))
    return out


def pack(docs, eot):
    """Concatenate documents, each followed by <|endoftext|>, into one uint16 stream."""
    parts = []
    for d in docs:
        parts.append(d)
        parts.append(np.asarray([eot], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
