"""The one mapping between image codes and token ids (pure Python: the data path imports it without torch).

An image written into the token stream is ``<boi> c_0 ... c_{N-1} <eoi>``: two break tokens (CM3leon / JAM's
modality break) around ``num_codes`` code tokens. Code ``k`` is token ``first_code_id + k``. The ids sit after the
text tokenizer's other added tokens (``data/tokenizer.py`` appends them), so existing ids never move; the CM3
sentinels ``<mask:i>`` follow the codes. These are ordinary vocabulary tokens: the model embeds and predicts them
like text (modality code TEXT for MMCA, ``docs/image_generation.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

BOI_TOKEN, EOI_TOKEN = "<boi>", "<eoi>"
NUM_CM3_SENTINELS = 4  # <mask:0> .. <mask:3>: at most this many infilling spans per sample


@dataclass(frozen=True)
class ImageCodeVocab:
    base_id: int  # id of <boi>; the tokenizer's first free id
    codebook_size: int

    def __post_init__(self):
        if self.base_id < 0 or self.codebook_size < 1:
            raise ValueError(f"need base_id >= 0 and codebook_size >= 1, got {self}")

    @property
    def boi_id(self) -> int:
        return self.base_id

    @property
    def eoi_id(self) -> int:
        return self.base_id + 1

    @property
    def break_ids(self) -> tuple[int, int]:
        return (self.boi_id, self.eoi_id)

    @property
    def first_code_id(self) -> int:
        return self.base_id + 2

    @property
    def sentinel_ids(self) -> tuple[int, ...]:
        first = self.first_code_id + self.codebook_size
        return tuple(range(first, first + NUM_CM3_SENTINELS))

    @property
    def num_tokens(self) -> int:
        """Token ids this vocabulary adds: breaks, codes, sentinels."""
        return 2 + self.codebook_size + NUM_CM3_SENTINELS

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every id this vocabulary adds, in order."""
        return tuple(range(self.base_id, self.base_id + self.num_tokens))

    def is_code(self, token_id: int) -> bool:
        return self.first_code_id <= token_id < self.first_code_id + self.codebook_size

    def code_to_token(self, codes) -> list[int]:
        out = []
        for c in codes:
            c = int(c)
            if not 0 <= c < self.codebook_size:
                raise ValueError(f"image code {c} is outside the codebook [0, {self.codebook_size})")
            out.append(self.first_code_id + c)
        return out

    def token_to_code(self, token_ids) -> list[int]:
        out = []
        for t in token_ids:
            if not self.is_code(int(t)):
                raise ValueError(f"token id {int(t)} is not an image code token "
                                 f"[{self.first_code_id}, {self.first_code_id + self.codebook_size})")
            out.append(int(t) - self.first_code_id)
        return out

    def image_tokens(self, codes) -> list[int]:
        """``<boi> codes <eoi>`` as token ids."""
        return [self.boi_id, *self.code_to_token(codes), self.eoi_id]

    def token_name(self, token_id: int) -> str:
        """Spelling for decoded text: ``<boi>``, ``<eoi>``, ``<code:k>``, ``<mask:i>``."""
        if token_id == self.boi_id:
            return BOI_TOKEN
        if token_id == self.eoi_id:
            return EOI_TOKEN
        if self.is_code(token_id):
            return f"<code:{token_id - self.first_code_id}>"
        if token_id in self.sentinel_ids:
            return f"<mask:{token_id - self.sentinel_ids[0]}>"
        raise ValueError(f"token id {token_id} is not an image-vocabulary token")
