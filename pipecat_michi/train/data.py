"""Manifest entries -> per-frame training tensors, and random batches of them.

Every example is seen as a duplex model sees a call: a user channel (heard by the listening
head), a bot channel (the codec latents the speaking head must produce) and per-frame text on
both, one token per 80 ms frame, PAD where no token falls.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import soundfile as sf
import torch
import torch.nn.functional as F

from pipecat_michi.model.tokenizer import Tokenizer
from pipecat_michi.textnorm import number_words
from pipecat_michi.train.manifest import ManifestEntry, WordTiming

# The bot's inner monologue runs this many frames ahead of its speech, so the text of a word
# is an input before the frame that starts saying it (its token at frame t is fed at t + 1).
# Moshi's inner monologue leads its audio in the same way.
MONOLOGUE_LEAD_FRAMES = 2


@dataclass
class Example:
    """One call-shaped training example, ``F`` frames of ``frame_samples`` each."""

    user_wav: torch.Tensor  # [F * frame_samples]
    bot_wav: torch.Tensor  # [F * frame_samples]
    user_text: torch.Tensor  # [F] long: the user's transcript token per frame
    bot_text: torch.Tensor  # [F] long: the bot's inner monologue per frame
    speak: torch.Tensor  # [F] float: 1 where the bot holds the turn
    # The user's whole transcript as CTC symbols (1..len(alphabet)); empty when the model's
    # transcript is per frame. Only a crop that keeps the whole example keeps it (``ctc_whole``).
    user_chars: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ctc_whole: bool = True

    @property
    def num_frames(self) -> int:
        return self.speak.shape[0]


@dataclass
class Batch:
    """Examples cropped/padded to one length; ``valid`` marks frames that are not padding."""

    user_wav: torch.Tensor  # [B, F * frame_samples]
    bot_wav: torch.Tensor
    user_text: torch.Tensor  # [B, F]
    bot_text: torch.Tensor
    speak: torch.Tensor
    valid: torch.Tensor  # [B, F] bool
    # CTC transcript targets: symbols ``[B, L]`` (0-padded), their counts ``[B]`` and whether the
    # row's crop holds its whole utterance (a partial crop has no exact transcript).
    user_chars: torch.Tensor | None = None
    user_chars_len: torch.Tensor | None = None
    ctc_whole: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(**{
            name: None if getattr(self, name) is None else getattr(self, name).to(device)
            for name in self.__dataclass_fields__
        })


def frame_tokens(
    words: list[WordTiming], tokenizer: Tokenizer, num_frames: int, frame_samples: int, lead_frames: int = 0
) -> torch.Tensor:
    """Spread each word's tokens over the frames where it is spoken, PAD elsewhere.

    Tokens of a word go evenly over its frames, starting ``lead_frames`` early; a word with more
    tokens than frames (bytes of a short word) runs on into the next frames, and a later word
    starts after the earlier one's last token, so order is kept and no token is dropped unless
    the clip ends.
    """
    out = torch.full((num_frames,), tokenizer.tokens.pad_id, dtype=torch.long)
    cursor = 0
    for i, word in enumerate(words):
        ids = tokenizer.encode((" " if i else "") + word.word)
        first = word.start_sample // frame_samples - lead_frames
        span = max(math.ceil(word.end_sample / frame_samples) - lead_frames - first, len(ids))
        for j, token in enumerate(ids):
            frame = max(first + (j * span) // len(ids), cursor)
            if frame >= num_frames:
                return out
            out[frame] = token
            cursor = frame + 1
    return out


def transcript_characters(text: str, alphabet: str) -> list[int]:
    """CTC targets of a transcript: lowercase, numbers as words, characters outside ``alphabet``
    as spaces, spaces collapsed; each character as its 1-based index (0 is CTC's blank)."""
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} " if int(m.group()) < 1_000_000 else " ",
                  text.lower())
    text = " ".join("".join(c if c in alphabet else " " for c in text).split())
    return [alphabet.index(c) + 1 for c in text]


def _read_channel(entry: ManifestEntry, sample_rate_hz: int) -> torch.Tensor:
    if entry.sample_rate_hz != sample_rate_hz:
        raise ValueError(
            f"{entry.id}: audio at {entry.sample_rate_hz} Hz; the model takes {sample_rate_hz} Hz "
            "(resample the corpus, e.g. with sox)"
        )
    wav, rate = sf.read(entry.audio, dtype="float32", always_2d=True)
    if rate != entry.sample_rate_hz:
        raise ValueError(f"{entry.audio} is {rate} Hz but its manifest entry says {entry.sample_rate_hz}")
    return torch.from_numpy(wav[:, entry.channel].copy())


def _pad_to_frames(wav: torch.Tensor, frame_samples: int) -> torch.Tensor:
    return F.pad(wav, (0, -wav.shape[0] % frame_samples))


def _silence(like: torch.Tensor) -> torch.Tensor:
    """Zeros shaped as ``like`` that take no memory (one element, stride 0): the silent channel of
    a one-sided example. A corpus is held in memory whole, so a real zero channel per utterance
    doubled it (24,000 utterances: ~20 GB of a 24 GB machine). Crops and stacks read it as zeros."""
    return torch.zeros((), dtype=like.dtype).expand(like.shape)


def read_framed_audio(entry: ManifestEntry, sample_rate_hz: int, frame_samples: int) -> torch.Tensor:
    """An entry's channel as float32, zero-padded to whole frames."""
    return _pad_to_frames(_read_channel(entry, sample_rate_hz), frame_samples)


class ExampleBuilder:
    """Reads manifest entries into ``Example``s for a model's frame size and tokenizer."""

    def __init__(
        self, tokenizer: Tokenizer, frame_samples: int, sample_rate_hz: int, ctc_alphabet: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.frame_samples = frame_samples
        self.sample_rate_hz = sample_rate_hz
        self.ctc_alphabet = ctc_alphabet  # set when the listening head transcribes by CTC

    def _chars(self, entry: ManifestEntry) -> torch.Tensor:
        if self.ctc_alphabet is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.tensor(transcript_characters(entry.text, self.ctc_alphabet), dtype=torch.long)

    def _text(self, entry: ManifestEntry, frames: int, lead: int) -> torch.Tensor:
        if entry.words is None:
            raise ValueError(f"{entry.id}: per-frame text targets need word timings ('words')")
        return frame_tokens(entry.words, self.tokenizer, frames, self.frame_samples, lead)

    def _turn_end_frame(self, entry: ManifestEntry) -> int:
        last = entry.words[-1].end_sample if entry.words else 0
        return math.ceil(last / self.frame_samples)

    def as_user(self, entry: ManifestEntry) -> Example:
        """A mono utterance heard from the user; the bot should speak once it has ended."""
        wav = _pad_to_frames(_read_channel(entry, self.sample_rate_hz), self.frame_samples)
        frames = wav.shape[0] // self.frame_samples
        speak = (torch.arange(frames) >= self._turn_end_frame(entry)).float()
        pad = torch.full((frames,), self.tokenizer.tokens.pad_id)
        return Example(wav, _silence(wav), self._text(entry, frames, 0), pad, speak, self._chars(entry))

    def as_bot(self, entry: ManifestEntry) -> Example:
        """A mono utterance spoken by the bot over a silent user channel (TTS-like)."""
        wav = _pad_to_frames(_read_channel(entry, self.sample_rate_hz), self.frame_samples)
        frames = wav.shape[0] // self.frame_samples
        pad = torch.full((frames,), self.tokenizer.tokens.pad_id)
        text = self._text(entry, frames, MONOLOGUE_LEAD_FRAMES)
        return Example(_silence(wav), wav, pad, text, torch.ones(frames))

    def dialogue(self, user: ManifestEntry, bot: ManifestEntry) -> Example:
        """A two-channel dialogue: the bot holds the turn from the end of the user's words."""
        user_wav = _pad_to_frames(_read_channel(user, self.sample_rate_hz), self.frame_samples)
        bot_wav = _pad_to_frames(_read_channel(bot, self.sample_rate_hz), self.frame_samples)
        frames = user_wav.shape[0] // self.frame_samples
        speak = (torch.arange(frames) >= self._turn_end_frame(user)).float()
        return Example(
            user_wav, bot_wav, self._text(user, frames, 0), self._text(bot, frames, MONOLOGUE_LEAD_FRAMES), speak,
            self._chars(user),
        )


def split_entries(entries: list[ManifestEntry]) -> tuple[list[ManifestEntry], list[tuple[ManifestEntry, ManifestEntry]]]:
    """Mono utterances, and dialogues as (user, bot) pairs."""
    singles = [e for e in entries if e.dialogue is None]
    by_dialogue: dict[str, dict[str, ManifestEntry]] = defaultdict(dict)
    for entry in entries:
        if entry.dialogue is not None:
            by_dialogue[entry.dialogue][entry.role] = entry
    pairs = []
    for name, roles in sorted(by_dialogue.items()):
        if set(roles) != {"user", "bot"}:
            raise ValueError(f"dialogue {name} needs one user and one bot channel, has {sorted(roles)}")
        pairs.append((roles["user"], roles["bot"]))
    return singles, pairs


def sample_batch(
    examples: list[Example], batch_size: int, max_frames: int, frame_samples: int, generator: torch.Generator
) -> Batch:
    """``batch_size`` random examples, each a random crop of at most ``max_frames`` frames,
    padded to the longest (``valid`` False on padding)."""
    picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
    crops = []
    for index in picks:
        example = examples[index]
        extra = example.num_frames - max_frames
        start = int(torch.randint(extra + 1, (), generator=generator)) if extra > 0 else 0
        crops.append(_crop(example, start, min(example.num_frames, max_frames), frame_samples))
    frames = max(c.num_frames for c in crops)

    # Padding values never reach a loss: every loss is masked by ``valid``.
    def stack(field: str, per_frame: int) -> torch.Tensor:
        rows = [getattr(c, field) for c in crops]
        return torch.stack([F.pad(r, (0, frames * per_frame - r.shape[0])) for r in rows])

    valid = torch.stack([torch.arange(frames) < c.num_frames for c in crops])
    longest = max(c.user_chars.shape[0] for c in crops)
    return Batch(
        user_wav=stack("user_wav", frame_samples),
        bot_wav=stack("bot_wav", frame_samples),
        user_text=stack("user_text", 1),
        bot_text=stack("bot_text", 1),
        speak=stack("speak", 1),
        valid=valid,
        user_chars=torch.stack([F.pad(c.user_chars, (0, longest - c.user_chars.shape[0])) for c in crops]),
        user_chars_len=torch.tensor([c.user_chars.shape[0] for c in crops]),
        ctc_whole=torch.tensor([c.ctc_whole for c in crops]),
    )


def _crop(example: Example, start: int, frames: int, frame_samples: int) -> Example:
    audio = slice(start * frame_samples, (start + frames) * frame_samples)
    text = slice(start, start + frames)
    return Example(
        example.user_wav[audio], example.bot_wav[audio], example.user_text[text], example.bot_text[text],
        example.speak[text], example.user_chars, example.ctc_whole and frames == example.num_frames,
    )
