"""One call's transcript: a model step's transcript outputs -> the text that is final.

``greedy`` detokenizes the step's transcript tokens as they come (a CTC head's greedy characters,
or a frame head's tokens): the lowest latency, letter by letter. ``lexicon`` (CTC heads) runs the
prefix beam search of ``model/ctc_decoder.py`` over the step's character log-probabilities
with the shipped English lexicon: whole words, spelled as English spells them, out when they are
certain. ``auto`` picks ``lexicon`` for a CTC head, else ``greedy``.

Both run on the model thread right after the step (the beam search is Python: ~0.1-1 ms a call
while someone speaks, nothing in silence), never on the event loop.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.ctc_decoder import BeamSettings, CtcBeamDecoder, english_lexicon
from pipecat_michi.model.tokenizer import StreamingDetokenizer, Tokenizer

TranscriptDecoderName = Literal["auto", "greedy", "lexicon"]


class TranscriptDecoder(Protocol):
    def push(self, tokens: list[int], logprobs: np.ndarray | None) -> str:
        """One frame's transcript tokens and (CTC) log-probabilities ``[S, C]`` -> final text."""
        ...

    def finish(self) -> str:
        """Whatever is pending becomes final (the model takes the floor; the user is done)."""
        ...

    def reset(self) -> None: ...


class GreedyTranscript:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._detokenizer = StreamingDetokenizer(tokenizer)

    def push(self, tokens: list[int], logprobs: np.ndarray | None) -> str:
        return self._detokenizer.push_many(tokens)

    def finish(self) -> str:
        return ""  # every character is out as soon as it is decoded

    def reset(self) -> None:
        self._detokenizer.reset()


class LexiconTranscript:
    def __init__(self, alphabet: str, settings: BeamSettings | None = None) -> None:
        self._decoder = CtcBeamDecoder(alphabet, english_lexicon(), settings)

    def push(self, tokens: list[int], logprobs: np.ndarray | None) -> str:
        if logprobs is None:
            raise ValueError("the lexicon transcript decoder needs a CTC head's log-probabilities")
        return self._decoder.push(logprobs)

    def finish(self) -> str:
        return self._decoder.finish()

    def reset(self) -> None:
        self._decoder.reset()


class CallTranscript:
    """One call's transcript: its decoder, plus the rule that the model taking the floor makes
    the user's pending words final in that very step, so they close the user's turn instead of
    trailing into the bot's (the service's ``TurnTracker`` ends the user turn on that step)."""

    def __init__(self, decoder: TranscriptDecoder) -> None:
        self.decoder = decoder
        self._was_speaking = False

    def push(self, tokens: list[int], logprobs: np.ndarray | None, speaking: bool) -> str:
        text = self.decoder.push(tokens, logprobs)
        if speaking and not self._was_speaking:
            text += self.decoder.finish()
        self._was_speaking = speaking
        return text

    def reset(self) -> None:
        self.decoder.reset()
        self._was_speaking = False


def resolve_transcript_decoder(name: TranscriptDecoderName, model_config: MichiConfig) -> str:
    ctc = model_config.listening.transcript == "ctc"
    if name == "lexicon" and not ctc:
        raise ValueError("transcript_decoder 'lexicon' needs a CTC listening head (listening.transcript='ctc')")
    if name == "auto":
        return "lexicon" if ctc else "greedy"
    return name


def make_call_transcript(name: TranscriptDecoderName, model_config: MichiConfig, tokenizer: Tokenizer) -> CallTranscript:
    if resolve_transcript_decoder(name, model_config) == "lexicon":
        return CallTranscript(LexiconTranscript(model_config.listening.ctc_alphabet))
    return CallTranscript(GreedyTranscript(tokenizer))
