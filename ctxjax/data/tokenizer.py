"""Tokenizers: bytes (the default), a Hugging Face `tokenizer.json`, or a SentencePiece model.

All three share one small interface (`Tokenizer`). Code must round-trip exactly (newlines,
indentation, trailing spaces), so nothing here normalizes text: the byte tokenizer is the
identity on UTF-8 bytes, and `train_bpe` builds a byte-level BPE whose decoder inverts its
pre-tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

# Special-token spellings looked for in a tokenizer.json that has no tokenizer_config.json
# beside it, first match wins. `train_bpe` uses the first of each.
_BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
_EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer:
    """What the pipeline needs from a tokenizer.

    `bos_id` / `eos_id` may be None when the vocabulary has no such token; the pipeline then
    refuses `add_bos` / `add_eos` with an error naming the fix. `pad_id` is always an id the
    model can embed (padding is masked out of the loss through segment_ids == 0 anyway).
    `fingerprint` identifies the vocabulary, so a pre-tokenized corpus can refuse a
    different tokenizer.
    """

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as int32, without BOS/EOS."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258: no training, no unknowns."""

    def __init__(self):
        self.name = "byte"
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259
        self.fingerprint = "byte"

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        # Special ids are dropped; a cut through a multi-byte character decodes to U+FFFD.
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _file_fingerprint(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (e.g. from tools/train_tokenizer.py)."""

    def __init__(self, path: str, *, bos_token: str = "", eos_token: str = "", pad_token: str = ""):
        import tokenizers

        self.name = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = _file_fingerprint(path)
        # tokenizer_config.json (saved beside tokenizer.json by transformers) names the specials.
        hf_config = {}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                hf_config = json.load(f)
        # transformers keeps this flag in tokenizer_config.json, not in tokenizer.json
        self.split_special_tokens = bool(hf_config.get("split_special_tokens", False))
        self._tok.encode_special_tokens = self.split_special_tokens

        def find(override, key, names):
            choices = [override] if override else []
            named = hf_config.get(key)
            if isinstance(named, dict):  # {"content": "<s>", ...}
                named = named.get("content")
            if named:
                choices.append(named)
            choices += [] if override else list(names)
            for token in choices:
                token_id = self._tok.token_to_id(token)
                if token_id is not None:
                    return token_id
            if override:
                raise ValueError(f"{key}={override!r} is not in the vocabulary of {path}; "
                                 "set data.bos_token / eos_token / pad_token to a token it has.")
            return None

        self.bos_id = find(bos_token, "bos_token", _BOS_NAMES)
        self.eos_id = find(eos_token, "eos_token", _EOS_NAMES)
        pad_id = find(pad_token, "pad_token", _PAD_NAMES)
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

    # Pickled by path (Grain worker processes get a copy of the pipeline).
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}

    def __setstate__(self, state):
        import tokenizers

        self.__dict__.update(state)
        self._tok = tokenizers.Tokenizer.from_file(self.name)
        self._tok.encode_special_tokens = self.split_special_tokens

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts):
        # Runs on all cores inside the Rust library.
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model. Round trips are exact only for models trained without
    normalization and with byte fallback (see `sentencepiece_trainer_args`)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.name = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.fingerprint = _file_fingerprint(path)
        as_id = lambda i: None if i < 0 else int(i)
        self.bos_id, self.eos_id = as_id(self._sp.bos_id()), as_id(self._sp.eos_id())
        pad_id = as_id(self._sp.pad_id())
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state):
        import sentencepiece as spm

        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor(model_file=self.name)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


# Options for `sentencepiece.SentencePieceTrainer.train` that make code round-trip exactly:
# no NFKC, no whitespace folding, no dummy prefix, and byte fallback for newlines and tabs.
sentencepiece_trainer_args = dict(
    model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    split_by_whitespace=False, pad_id=3,
)


def make_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer named by `data_cfg.tokenizer`: 'byte', a tokenizer.json, or a .model."""
    spec = str(data_cfg.tokenizer)
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file. Use 'byte', a path to a "
                                "tokenizer.json (tools/train_tokenizer.py makes one) or a SentencePiece .model.")
    if spec.endswith(".json"):
        return HFTokenizer(spec, bos_token=data_cfg.get("bos_token", ""),
                           eos_token=data_cfg.get("eos_token", ""), pad_token=data_cfg.get("pad_token", ""))
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"data.tokenizer={spec!r}: expected 'byte', a *.json (Hugging Face tokenizers) "
                     "or a *.model (SentencePiece) file.")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises if the model cannot embed every id the tokenizer can emit."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"The tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model_vocab_size}: ids >= {model_vocab_size} would index past the "
            f"embedding. Set model.vocab_size >= {tokenizer.vocab_size} or use a smaller tokenizer.")


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str, *, num_texts: int | None = None,
              show_progress: bool = True) -> HFTokenizer:
    """Trains a byte-level BPE on `texts` and saves it as a tokenizer.json at `out_path`.

    Byte level: every string encodes (no unknown token) and decodes back exactly.
    Specials: <|bos|>, <|eos|>, <|pad|> (ids 0, 1, 2).
    """
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [_BOS_NAMES[0], _EOS_NAMES[0], _PAD_NAMES[0]]
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
                         f"{len(alphabet) + len(specials)} (256 bytes + 3 specials).")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=show_progress)
    tok.train_from_iterator(texts, trainer, length=num_texts)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out_path)
    return HFTokenizer(out_path)
