"""Text tokenizers for the text channel, and a streaming detokenizer.

The model emits one text token per frame; a multi-byte character can span frames, so text is
released only once it decodes cleanly (``StreamingDetokenizer``).
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Protocol

from pipecat_michi.model.config import BYTE_TOKENS, MichiConfig, TokenConfig


# Inserted after the first character of a special token's string in injected text: the text
# reads the same to the model but can no longer become that special token.
_BREAK = "\u200b"
# The byte tokenizer's turn tag at the start of a line: ``[system] ``.
_BYTE_TURN_TAG = re.compile(r"(^|\n)(\s*)\[")


class Tokenizer(Protocol):
    tokens: TokenConfig

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; specials above. Needs no files: the tiny preset uses it."""

    tokens = BYTE_TOKENS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (SmolLM's, for the michi-530m preset)."""

    def __init__(self, path: str | Path, tokens: TokenConfig) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        file = Path(path)
        file = file / "tokenizer.json" if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {file}; put the backbone's tokenizer.json beside the checkpoint"
            )
        self._tokenizer = _HFTokenizer.from_file(str(file))
        self.tokens = tokens
        # Longest first, so a special that contains another is broken as a whole.
        self.special_strings = sorted(
            (t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special and t.content),
            key=len,
            reverse=True,
        )

    def escape_specials(self, text: str) -> str:
        """``text`` with every special-token string broken up, so that text from outside (a
        retrieved document, a caller's words) can never encode to ``<|im_start|>`` and forge a
        turn of its own."""
        for _ in range(8):  # breaking one may not create another; bounded all the same
            found = False
            for special in self.special_strings:
                if special in text:
                    found = True
                    text = text.replace(special, special[0] + _BREAK + special[1:])
            if not found:
                break
        return text

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def format_context(tokenizer: Tokenizer, role: str, text: str) -> str:
    """Frame injected text as a chat turn, so the backbone knows whose words they are.

    Subword (SmolLM) tokenizers get ChatML, SmolLM-Instruct's template; the byte tokenizer of
    the tiny preset a plain tag. ``role`` and ``text`` are escaped: what they hold never becomes
    special tokens or a turn tag of the template (issue 12: prompt injection through a document
    carrying ``<|im_end|>\n<|im_start|>system``).
    """
    role = " ".join(role.split())  # one line: a newline in a role would start the turn's text
    if isinstance(tokenizer, ByteTokenizer):
        role = role.replace("[", "(").replace("]", ")")
        text = _BYTE_TURN_TAG.sub(lambda m: f"{m.group(1)}{m.group(2)}{_BREAK}[", text)
        return f"[{role}] {text}\n"
    escape = getattr(tokenizer, "escape_specials", None)
    if escape is not None:
        role, text = escape(role), escape(text)
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


# SmolLM2's tokenizer.json, shipped with the packaged michi-nano checkpoint. SmolLM and SmolLM2
# share one 49152-token vocabulary (same ids for <|endoftext|>, <|im_start|>, <|im_end|>), so a
# random-weight preset of either shape (michi-nano, michi-530m) runs with it: a worker or a
# benchmark started with ``--preset michi-530m`` needs no checkpoint.
PRESET_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "michi-nano-listening"
PRESET_TOKENIZER_VOCAB = 49152


def load_tokenizer(config: MichiConfig, checkpoint_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer a config names: built-in bytes, or ``tokenizer.json`` in the checkpoint
    (without a checkpoint, SmolLM's for a preset of its vocabulary)."""
    if config.tokenizer == "bytes":
        return ByteTokenizer()
    if checkpoint_dir is None:
        if config.backbone.vocab_size != PRESET_TOKENIZER_VOCAB:
            raise ValueError(
                f"config {config.name!r} (vocab {config.backbone.vocab_size}) needs a checkpoint "
                "directory with tokenizer.json"
            )
        checkpoint_dir = PRESET_TOKENIZER_DIR
    return HFTokenizer(checkpoint_dir, config.tokens)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._specials = {tokenizer.tokens.pad_id, tokenizer.tokens.bos_id, tokenizer.tokens.eos_id}
        self._bytes = isinstance(tokenizer, ByteTokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often ``""``)."""
        if token_id in self._specials:
            return ""
        if self._bytes:
            return self._utf8.decode(bytes([token_id])) if token_id < 256 else ""
        # Subword tokenizers: decode the pending run and release only what is stable.
        self._pending.append(token_id)
        text = self._tokenizer.decode(self._pending)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self._emitted):]
        self._emitted = text
        if len(self._pending) > 64:  # bound the re-decode cost on long turns
            self._pending, self._emitted = [], ""
        return piece

    def push_many(self, token_ids: list[int]) -> str:
        """Add a frame's tokens in order; return the text they complete."""
        return "".join(self.push(token_id) for token_id in token_ids)

    def reset(self) -> None:
        self._utf8.reset()
        self._pending, self._emitted = [], ""
