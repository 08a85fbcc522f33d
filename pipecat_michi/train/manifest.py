"""The training manifest: JSONL, one line per (audio file, channel) with its transcript.

A two-channel dialogue is two lines that share ``dialogue`` and ``audio``: the user's channel
(``role="user"``) and the bot's (``role="bot"``). docs/training.md documents the format.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class WordTiming(BaseModel):
    """One spoken word and where it lies in the audio, in samples at the file's rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    word: str
    start_sample: int = Field(ge=0)
    end_sample: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> WordTiming:
        if self.end_sample <= self.start_sample:
            raise ValueError(f"word {self.word!r} ends before it starts")
        return self


class ManifestEntry(BaseModel):
    """One speaker's channel of one audio file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    audio: str  # path, relative to the manifest's folder or absolute
    sample_rate_hz: int = Field(gt=0)
    channel: int = Field(default=0, ge=0)
    text: str
    words: list[WordTiming] | None = None
    speaker: str | None = None
    role: Literal["user", "bot"] | None = None
    dialogue: str | None = None

    @model_validator(mode="after")
    def _words_in_order(self) -> ManifestEntry:
        words = self.words or []
        for earlier, later in zip(words, words[1:]):
            if later.start_sample < earlier.end_sample:
                raise ValueError(f"entry {self.id}: word {later.word!r} overlaps the one before")
        if self.dialogue is not None and self.role is None:
            raise ValueError(f"entry {self.id}: a dialogue channel needs a role (user or bot)")
        return self


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Parse a JSONL manifest; audio paths are resolved against its folder."""
    path = Path(path)
    entries = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = ManifestEntry.model_validate_json(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_number}: not a valid manifest entry: {exc}") from exc
        entries.append(entry.model_copy(update={"audio": str((path.parent / entry.audio).resolve())}))
    return entries


def write_manifest(path: str | Path, entries: Iterable[ManifestEntry]) -> Path:
    path = Path(path)
    path.write_text("".join(entry.model_dump_json(exclude_none=True) + "\n" for entry in entries))
    return path
