"""A character-level tokenizer for tiny models: one id per printable ASCII character.

Ids 0..3 are the special tokens <pad>, <bos>, <eos>, <unk>. Saved as JSON next to
the model weights and reloaded from the same directory.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
FILENAME = "char_tokenizer.json"


class CharTokenizer:
    def __init__(self, chars: str | None = None) -> None:
        self.chars = chars if chars is not None else string.printable[:95] + "\n"
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("tokenizer characters must be unique")
        self._to_id = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(SPECIALS))

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str) -> list[int]:
        return [self._to_id.get(c, self.unk_id) for c in text]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        out: list[str] = []
        for i in ids:
            if i < len(SPECIALS):
                if not skip_special:
                    out.append(SPECIALS[i])
            else:
                out.append(self.chars[i - len(SPECIALS)])
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / FILENAME
        path.write_text(json.dumps({"type": "char", "specials": list(SPECIALS), "chars": self.chars}))

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        data = json.loads((Path(directory) / FILENAME).read_text())
        if data.get("type") != "char" or tuple(data.get("specials", ())) != SPECIALS:
            raise ValueError(f"{directory} does not hold a character tokenizer of this version")
        return cls(data["chars"])
