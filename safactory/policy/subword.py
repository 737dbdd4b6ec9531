"""A byte-level BPE tokenizer for tiny models, trained on the run's own environment texts.

The character tokenizer spends one position per character, so a maze or ops episode
of 500-700 characters costs 500-700 positions in every forward pass. A subword
vocabulary learned from the texts the model will see (a few hundred expert episodes
per environment) shortens those episodes about three-fold; digits stay one token
each, so numbers are copied digit by digit as with characters. Byte-level, so any
text encodes (nothing maps to an unknown token) and `decode(encode(x)) == x`.

Ids 0..3 are the same special tokens as the character tokenizer's. Saved as
`subword_tokenizer.json` next to the model weights.

Optional digit places (`train_subword(..., digit_places=True)`): every ASCII digit is
encoded as one of 100 extra tokens that carry the digit and its place in its run of
digits (1st..10th, then again from the 1st), so "636" is `6@0 3@1 6@2`. Copying a number
then asks a head to look up "the digit at place k" instead of matching neighbours, which
a tiny model learns far sooner than copying plain digits (where "636" easily becomes
"663"). Decoding drops the places. The places ride on the code points U+100000..U+100063
(private use), so text that itself holds those code points does not round-trip.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from safactory.policy.tokenizer import SPECIALS, CharTokenizer

FILENAME = "subword_tokenizer.json"
PLACES = 10  # digit places told apart; the 11th digit of a run reuses the 1st place
_PLACE_BASE = 0x100000  # code point of digit 0 at place 0; digit d at place k is BASE + 10 * k + d
_DIGIT_RUN = re.compile(r"[0-9]+")
_PLACE_CHARS = [chr(_PLACE_BASE + i) for i in range(10 * PLACES)]
_UNPLACE = {_PLACE_BASE + i: str(i % 10) for i in range(10 * PLACES)}


def _placed(run: re.Match[str]) -> str:
    return "".join(_PLACE_CHARS[10 * (k % PLACES) + int(d)] for k, d in enumerate(run.group()))


class SubwordTokenizer:
    """Wraps a trained `tokenizers.Tokenizer` behind the character tokenizer's interface."""

    def __init__(self, inner: Tokenizer) -> None:
        ids = [inner.token_to_id(s) for s in SPECIALS]
        if ids != list(range(len(SPECIALS))):
            raise ValueError(f"a subword tokenizer must hold {SPECIALS} as ids 0..{len(SPECIALS) - 1}, got {ids}")
        self.inner = inner
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(SPECIALS))
        self.digit_places = inner.token_to_id(_PLACE_CHARS[0]) is not None

    def __len__(self) -> int:
        return self.inner.get_vocab_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def get_vocab(self) -> dict[str, int]:
        return self.inner.get_vocab()

    def encode(self, text: str) -> list[int]:
        if self.digit_places:
            text = _DIGIT_RUN.sub(_placed, text)
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        text = self.inner.decode(list(ids), skip_special_tokens=skip_special)
        return text.translate(_UNPLACE) if self.digit_places else text

    def save(self, directory: str | Path) -> None:
        (Path(directory) / FILENAME).write_text(self.inner.to_str())

    @classmethod
    def load(cls, directory: str | Path) -> SubwordTokenizer:
        return cls(Tokenizer.from_str((Path(directory) / FILENAME).read_text()))


TinyTokenizer = CharTokenizer | SubwordTokenizer
"""The tokenizers of the tiny models (plain-text tool protocol)."""


def train_subword(texts: Iterable[str], vocab_size: int = 1024, digit_places: bool = False) -> SubwordTokenizer:
    """Learn a byte-level BPE of at most `vocab_size` ids from `texts` (deterministic for the same texts);
    `digit_places` adds the 100 place-digit tokens on top (see the module docstring)."""
    if vocab_size < len(SPECIALS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIALS) + 256} (specials + the 256 bytes)")
    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer)
    if digit_places:
        inner.add_tokens([AddedToken(c, normalized=False) for c in _PLACE_CHARS])
    return SubwordTokenizer(inner)
