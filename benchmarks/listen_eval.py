"""Does the listening head hear real words? WER judged against references, beside offline Whisper.

Test sets: held-out synthetic sentences in held-out voices (``judge.HELD_OUT_*``: never in
training), the same sentences in a held-out neural voice (``judge.HELD_OUT_NEURAL_VOICE``,
Piper's joe: a person's timbre) and the human clips of Debian's ``pocketsphinx-testdata`` (evaluation only). For each,
the model's streaming transcript (the listening head's transcript logits, offline with the
streaming mask, which the tests show equals stepping) and offline Whisper tiny.en
(faster-whisper, int8, 2 threads) are scored with jiwer on normalised text, side by side.
``--twilio`` puts every clip through 8 kHz mu-law first, as a phone caller. A CTC head is scored
with both transcript decoders the engine offers (``engine/transcript.py``): ``greedy`` (letter by
letter) and ``lexicon`` (the CTC beam search with the English lexicon, the engine's default).

    .venv/bin/python benchmarks/listen_eval.py --checkpoint runs/listening --twilio
    .venv/bin/python benchmarks/listen_eval.py            # offline Whisper only (no checkpoint)
"""

from __future__ import annotations

import argparse
import difflib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch

from pipecat_michi.engine.transcript import CallTranscript, LexiconTranscript
from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.michi import MichiModel, speaking_over_time
from pipecat_michi.model.quantize import QUANTIZE_MODES, quantize_model
from pipecat_michi.model.tokenizer import StreamingDetokenizer, Tokenizer, load_tokenizer
from pipecat_michi.train.evaluate import transcribe
from pipecat_michi.train.judge import (
    ALL_HELD_OUT_SENTENCES,
    HELD_OUT_NEURAL_VOICE,
    HELD_OUT_VOICES,
    Clip,
    OfflineWhisper,
    fluent_speech,
    human_clips,
    normalise_text,
    twilio_path,
    wer,
)
from pipecat_michi.train.neural_voices import NeuralVoiceUnavailable


TEST_SETS = ("synthetic", "neural", "human", "turns")
# The floor-taking rule's counts the turn-taking figures are printed for, beside the checkpoint's.
ONSET_FRAMES_COMPARED = (1, 2, 3, 4)


def synthetic_clips(count: int) -> list[Clip]:
    pairs = zip(ALL_HELD_OUT_SENTENCES[:count], itertools.cycle(HELD_OUT_VOICES))
    return [Clip(f"{voice}/{i}", *fluent_speech(text, voice), text) for i, (text, voice) in enumerate(pairs)]


def neural_clips(count: int) -> list[Clip]:
    """The held-out sentences in the held-out neural voice (a person's timbre, never trained on)."""
    return [Clip(f"{HELD_OUT_NEURAL_VOICE}/{i}", *fluent_speech(text, HELD_OUT_NEURAL_VOICE), text)
            for i, text in enumerate(ALL_HELD_OUT_SENTENCES[:count])]


# Callers open with a greeting and pause after it ("Hello! I would like to book a table..."):
# the turn-taking figures are printed for such turns too (the first held-out sentences, greeted).
GREETED_TURNS = 12


def greeted_clips(count: int) -> list[Clip]:
    pairs = zip(ALL_HELD_OUT_SENTENCES[:count], itertools.cycle(HELD_OUT_VOICES))
    return [Clip(f"{voice}/hello-{i}", *fluent_speech(f"Hello! {text}", voice), f"Hello! {text}")
            for i, (text, voice) in enumerate(pairs)]


def streaming_transcript(model: MichiModel, tokenizer: Tokenizer, clip: Clip) -> str:
    audio = torch.from_numpy(clip.resampled(model.config.sample_rate_hz))
    frame = model.config.frame_samples
    # Half a second of silence after the clip: the head's transcript lags the audio.
    padded = torch.nn.functional.pad(audio, (0, (-audio.numel()) % frame + 6 * frame))
    return transcribe(model, tokenizer, padded)


def lexicon_words(model: MichiModel, logits: torch.Tensor, speak_logits: torch.Tensor, frame_s: float,
                  finish: bool = True) -> list[tuple[str, float]]:
    """The engine's lexicon decoding of one clip's head outputs (``logits [1, 4F, C]``, ``speak
    [1, F]``), frame by frame: each word with the time it became final (the end of its frame)."""
    transcript = CallTranscript(LexiconTranscript(model.config.listening.ctc_alphabet))
    logprobs = torch.log_softmax(logits[0].float(), dim=-1).cpu().numpy()
    speaking = _speaking(model, speak_logits, model.config.speak_onset_frames)
    per = model.listening.tokens_per_frame
    words = []
    for index in range(speaking.shape[0]):
        text = transcript.push([], logprobs[index * per: (index + 1) * per], bool(speaking[index]))
        words += [(word, (index + 1) * frame_s) for word in text.split()]
    if finish:  # the clip is over: what is pending comes out after its last frame
        words += [(word, speaking.shape[0] * frame_s) for word in transcript.decoder.finish().split()]
    return words


def _speaking(model: MichiModel, speak_logits: torch.Tensor, onset_frames: int) -> np.ndarray:
    """The frames the model speaks in, as the engine decides (``speak_logits [1, F]``)."""
    speak_prob = torch.sigmoid(speak_logits[0].float()).cpu()
    return speaking_over_time(speak_prob, model.config.speak_threshold, onset_frames).numpy()


@torch.no_grad()
def lexicon_transcript(model: MichiModel, clip: Clip) -> str:
    audio = torch.from_numpy(clip.resampled(model.config.sample_rate_hz))
    frame = model.config.frame_samples
    padded = torch.nn.functional.pad(audio, (0, (-audio.numel()) % frame + 6 * frame))
    _, logits, speak = model.listening(padded[None].to(model.device, model.dtype))
    return " ".join(word for word, _ in lexicon_words(model, logits, speak, frame / model.config.sample_rate_hz))


def evaluate_set(name: str, clips: list[Clip], judge: OfflineWhisper, model: MichiModel | None,
                 tokenizer: Tokenizer | None, twilio: bool, verbose: bool) -> None:
    if twilio:
        clips = [Clip(c.name, twilio_path(c.audio, c.sample_rate_hz), c.sample_rate_hz, c.text) for c in clips]
    references = [c.text for c in clips]
    offline = [judge.transcribe(c.resampled(16000)) for c in clips]
    line = f"{name:28s} {len(clips):3d} clips {sum(c.audio.size / c.sample_rate_hz for c in clips):6.1f} s  " \
           f"offline Whisper tiny.en WER {100 * wer(offline, references):5.1f}%"
    streamed = lexicon = [""] * len(clips)
    if model is not None:
        streamed = [streaming_transcript(model, tokenizer, c) for c in clips]
        line += f"  streaming head WER {100 * wer(streamed, references):5.1f}%"
        if model.config.listening.transcript == "ctc":
            lexicon = [lexicon_transcript(model, c) for c in clips]
            line = line.replace("streaming head WER", "streaming head WER greedy")
            line += f", lexicon {100 * wer(lexicon, references):5.1f}%"
    print(line)
    _print_by_voice(clips, offline, lexicon if any(lexicon) else streamed)
    if verbose:
        for clip, off, st, lx in zip(clips, offline, streamed, lexicon):
            print(f"    {clip.name}: ref={clip.text!r}\n      whisper={off!r}\n      head={st!r}"
                  + (f"\n      lexicon={lx!r}" if lx else ""))


def _print_by_voice(clips: list[Clip], offline: list[str], heard: list[str]) -> None:
    """WER per voice of a synthetic set (clip names ``voice/index``): one voice can carry a figure."""
    voices = sorted({c.name.split("/")[0] for c in clips})
    if len(voices) < 2 or len(voices) == len(clips):
        return
    parts = []
    for voice in voices:
        rows = [i for i, c in enumerate(clips) if c.name.split("/")[0] == voice]
        refs = [clips[i].text for i in rows]
        head = f" head {100 * wer([heard[i] for i in rows], refs):.1f}%" if any(heard) else ""
        parts.append(f"{voice} ({len(rows)}):{head} Whisper {100 * wer([offline[i] for i in rows], refs):.1f}%")
    print("  by voice (or source): " + "; ".join(parts))


@dataclass(frozen=True)
class Turn:
    """One held-out caller turn heard by the head: was the floor taken too early, and when after
    the caller stopped; per word, how long after Whisper's word end its text came out."""

    early: bool  # with the checkpoint's speak_onset_frames
    floor_s: float | None  # None: the head never took the floor in the trailing silence
    # speak_onset_frames -> (early, floor_s) for each count the benchmark compares
    by_onset: dict[int, tuple[bool, float | None]]
    word_latencies_s: list[float]
    final_text_s: float | None  # the end of speech (exact) -> the transcript's last character out
    lexicon_word_latencies_s: list[float]  # the same two with the lexicon decoder (CTC heads)
    lexicon_final_text_s: float | None


@torch.no_grad()
def judge_turn(model: MichiModel, tokenizer: Tokenizer, judge: OfflineWhisper, clip: Clip, twilio: bool) -> Turn:
    """``clip``'s speech (trimmed) between 0.5 s and 1.5 s of silence, as one caller turn."""
    rate, frame = model.config.sample_rate_hz, model.config.frame_samples
    speech = clip.resampled(rate)
    loud = np.flatnonzero(np.abs(speech) > 0.02 * float(np.abs(speech).max()))
    speech = speech[loud[0]: loud[-1] + 1]
    lead, tail = round(0.5 * rate), round(1.5 * rate)
    audio = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(tail + (-(lead + speech.size + tail)) % frame,
                                                                          np.float32)])
    speech_end_s = (lead + speech.size) / rate
    references = judge.word_ends(soxr.resample(audio, rate, 16000).astype(np.float32))
    heard = twilio_path(audio, rate) if twilio else audio
    _, logits, speak_logits = model.listening(torch.from_numpy(heard)[None].to(model.device, model.dtype))
    # Offline with the streaming mask equals stepping (tests/model/whisper): frame f's outputs
    # exist when frame f has been heard, at (f + 1) * 80 ms.
    frame_s = frame / rate
    ends = (np.arange(speak_logits.shape[1]) + 1) * frame_s
    by_onset = {}
    for onset in sorted({*ONSET_FRAMES_COMPARED, model.config.speak_onset_frames}):
        speaking = _speaking(model, speak_logits, onset)
        after = np.flatnonzero(speaking & (ends > speech_end_s))
        by_onset[onset] = (bool(speaking[ends <= speech_end_s].any()),
                           float(ends[after[0]] - speech_end_s) if after.size else None)
    early, floor_s = by_onset[model.config.speak_onset_frames]
    latencies, words = _word_latencies(model, tokenizer, logits, frame_s, references)
    final_text_s = words[-1][1] - speech_end_s if words else None
    lexicon_latencies, lexicon_final_s = [], None
    if model.config.listening.transcript == "ctc":
        # No finish() at the end: a word the 1.5 s of silence did not make final never came out.
        final = lexicon_words(model, logits, speak_logits, frame_s, finish=False)
        lexicon_latencies = _matched_latencies(references, final)
        lexicon_final_s = final[-1][1] - speech_end_s if final else None
    return Turn(early, floor_s, by_onset, latencies, final_text_s, lexicon_latencies, lexicon_final_s)


def _word_latencies(model: MichiModel, tokenizer: Tokenizer, logits: torch.Tensor, frame_s: float,
                    references: list[tuple[str, float]]) -> tuple[list[float], list[tuple[str, float]]]:
    """Latency of each transcript word that matches a reference word, and the transcript's
    words with the time each was complete."""
    if model.config.listening.transcript == "ctc":
        ids, _ = model.listening.decode_transcript(logits, torch.zeros(1, dtype=torch.long, device=model.device))
        per_frame = ids[0].view(-1, model.listening.tokens_per_frame).tolist()
    else:
        per_frame = [[i] for i in logits[0].argmax(dim=-1).tolist()]
    detokenizer = StreamingDetokenizer(tokenizer)
    words: list[tuple[str, float]] = []  # (word, time its last character came out)
    current, last_time = "", 0.0
    for index, frame_ids in enumerate(per_frame):
        for char in detokenizer.push_many(frame_ids):
            if char.isspace():
                if current:
                    words.append((current, last_time))
                current = ""
            else:
                current, last_time = current + char, (index + 1) * frame_s
    if current:
        words.append((current, last_time))
    return _matched_latencies(references, words), words


def _matched_latencies(references: list[tuple[str, float]], words: list[tuple[str, float]]) -> list[float]:
    """For each transcript word that matches a reference word (aligned), its time minus the
    reference word's end."""
    hypothesis = [(normalise_text(w), t) for w, t in words if normalise_text(w)]
    matcher = difflib.SequenceMatcher(a=[w for w, _ in references], b=[w for w, _ in hypothesis], autojunk=False)
    latencies = []
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            latencies.append(hypothesis[block.b + k][1] - references[block.a + k][1])
    return latencies


def turn_taking(model: MichiModel, tokenizer: Tokenizer, judge: OfflineWhisper, clips: list[Clip], twilio: bool,
                greeted: list[Clip] | None = None) -> None:
    """Print the speak/hold rates and the transcript latency over ``clips`` (one turn each), and
    the speak/hold rates of ``greeted`` turns (a greeting and its pause, then the sentence)."""
    turns = [judge_turn(model, tokenizer, judge, clip, twilio) for clip in clips]
    path = " (Twilio)" if twilio else ""
    _print_floor_takes(f"turn taking{path}", model, turns)
    if greeted:
        _print_floor_takes(f"turn taking, greeted turns{path}", model,
                           [judge_turn(model, tokenizer, judge, clip, twilio) for clip in greeted])
    _print_latency("greedy" + path, [t.final_text_s for t in turns], [x for t in turns for x in t.word_latencies_s])
    if model.config.listening.transcript == "ctc":
        _print_latency("lexicon" + path, [t.lexicon_final_text_s for t in turns],
                       [x for t in turns for x in t.lexicon_word_latencies_s])


def _print_floor_takes(title: str, model: MichiModel, turns: list[Turn]) -> None:
    configured = model.config.speak_onset_frames
    print(f"{title}: {_floor_line(len(turns), [(t.early, t.floor_s) for t in turns])} "
          f"(speak_threshold {model.config.speak_threshold}, speak_onset_frames {configured})")
    for onset in ONSET_FRAMES_COMPARED:
        if onset != configured:
            print(f"  with speak_onset_frames {onset}: {_floor_line(len(turns), [t.by_onset[onset] for t in turns])}")


def _floor_line(count: int, takes: list[tuple[bool, float | None]]) -> str:
    early = sum(e for e, _ in takes)
    in_time = sum(f is not None and f <= 0.4 for _, f in takes)
    floors = [f for _, f in takes if f is not None]
    p50, p90 = np.percentile(floors, [50, 90]) if floors else (float("nan"), float("nan"))
    return (f"{count} turns, spoke during the caller's sentence in {early} ({100 * early / count:.0f}%), "
            f"took the floor within 400 ms in {in_time} ({100 * in_time / count:.0f}%), "
            f"floor delay p50 {1000 * p50:.0f} ms, p90 {1000 * p90:.0f} ms")


def _print_latency(decoder: str, finals: list[float | None], latencies: list[float]) -> None:
    finals = [f for f in finals if f is not None]
    if finals:
        p50, p90 = np.percentile(finals, [50, 90])
        print(f"transcript latency, {decoder}, end of speech (exact) -> last word out, {len(finals)} turns: "
              f"p50 {1000 * p50:.0f} ms, p90 {1000 * p90:.0f} ms")
    if latencies:
        p50, p90 = np.percentile(latencies, [50, 90])
        print(f"transcript latency, {decoder}, per word, Whisper's word end (+-0.1 s) -> the word out, "
              f"{len(latencies)} matched words: p50 {1000 * p50:.0f} ms, p90 {1000 * p90:.0f} ms")
    else:
        print(f"transcript latency, {decoder}: no transcript word matched the reference")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a MichiAI checkpoint; without it only offline Whisper runs")
    parser.add_argument("--sentences", type=int, default=len(ALL_HELD_OUT_SENTENCES),
                        help="held-out sentences (the first 12 are the set stop 26 and earlier reported)")
    parser.add_argument("--twilio", action="store_true", help="8 kHz mu-law round trip before listening")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print every transcript")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                        help="judge the model as served with this weight quantization")
    parser.add_argument("--sets", default=",".join(TEST_SETS),
                        help=f"comma-separated, of {', '.join(TEST_SETS)} (turns: turn taking and latency)")
    args = parser.parse_args(argv)
    sets = tuple(name.strip() for name in args.sets.split(",") if name.strip())
    if unknown := [name for name in sets if name not in TEST_SETS]:
        parser.error(f"unknown sets {unknown}; known: {', '.join(TEST_SETS)}")
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    model = tokenizer = None
    if args.checkpoint is not None:
        model = quantize_model(load_checkpoint(args.checkpoint).eval(), args.quantize)
        tokenizer = load_tokenizer(model.config, args.checkpoint)
    judge_listening(model, tokenizer, args.twilio, args.sentences, args.threads, args.verbose, sets)


def judge_listening(model: MichiModel | None, tokenizer: Tokenizer | None, twilio: bool = False,
                    sentences: int = len(ALL_HELD_OUT_SENTENCES), threads: int = 2, verbose: bool = False,
                    sets: tuple[str, ...] = TEST_SETS) -> None:
    """Print held-out synthetic, neural and human WER of ``model``'s head beside offline Whisper
    tiny.en, and its turn taking."""
    judge = OfflineWhisper(cpu_threads=threads)
    path = " (Twilio 8 kHz mu-law)" if twilio else ""
    if "synthetic" in sets:
        evaluate_set("held-out synthetic" + path, synthetic_clips(sentences), judge, model, tokenizer, twilio, verbose)
    if "neural" in sets:
        try:
            neural = neural_clips(sentences)
        except NeuralVoiceUnavailable as exc:
            print(f"held-out neural voice: skipped ({exc})")
        else:
            evaluate_set(f"held-out neural voice{path}", neural, judge, model, tokenizer, twilio, verbose)
    if "human" in sets:
        humans = human_clips()
        if humans:
            evaluate_set("pocketsphinx human" + path, humans, judge, model, tokenizer, twilio, verbose)
        else:
            print("pocketsphinx-testdata not installed (apt-get install -y pocketsphinx-testdata): no human clips")
    if model is not None and "turns" in sets:
        turn_taking(model, tokenizer, judge, synthetic_clips(sentences), twilio,
                    greeted_clips(min(GREETED_TURNS, sentences)))


if __name__ == "__main__":
    main()
