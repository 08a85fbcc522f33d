"""Exact word timings from flite (the speaking head's inner monologue needs text on its sound)."""

import shutil

import numpy as np
import pytest

from pipecat_michi.train.fluent import FluentCorpusConfig, framed_utterance, generate_fluent_corpus
from pipecat_michi.train.flite_timing import flite_speech_with_spans, parse_segments, word_spans
from pipecat_michi.train.judge import fluent_speech
from pipecat_michi.train.manifest import read_manifest

needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="apt-get install flite (.ci/run does)")

# What `flite -voice slt -psdur -t "Yes, we are open."` prints (phone:end time in seconds).
PRINTED = "pau:0.222 y:0.281 eh:0.390 s:0.523 pau:0.700 w:0.745 iy:0.850 aa:0.940 r:1.030 ow:1.150 p:1.230 ax:1.300 n:1.380 pau:1.560"


def test_a_word_spans_its_own_phones_and_pauses_lie_between_words() -> None:
    segments = parse_segments(PRINTED)
    assert segments[0] == ("pau", 0.222) and len(segments) == 14
    spans = word_spans(segments, [3, 2, 2, 4])  # yes / we / are / open
    assert spans == [(0.222, 0.523), (0.700, 0.850), (0.850, 1.030), (1.030, 1.380)]
    # A word without phones (a lone dash) sits, empty, where the next one starts.
    assert word_spans(segments, [3, 0, 2, 2, 4])[1] == (0.700, 0.700)
    # Counts that do not add up (a word said differently in context): no exact timings.
    assert word_spans(segments, [3, 2, 2, 3]) is None
    with pytest.raises(ValueError):
        parse_segments("pau:0.2 nonsense")


def test_exact_spans_become_sample_timings_through_the_trim_and_the_lead() -> None:
    rate = 16_000
    # 0.25 s of silence (trimmed), a 0.5 s and a 0.25 s "word" with 0.25 s silence between.
    audio = np.zeros(int(1.5 * rate), np.float32)
    audio[4000:12000] = 0.5
    audio[16000:20000] = 0.5
    wav, timings = framed_utterance("one two", audio, rate, rate, lead_ms=100, tail_ms=100,
                                    spans_s=[(0.25, 0.75), (1.0, 1.25)])
    lead = 1600
    assert [(t.start_sample, t.end_sample) for t in timings] == [(lead, lead + 8000), (lead + 12000, lead + 16000)]
    assert np.all(wav[timings[1].start_sample:timings[1].end_sample] != 0)
    # An empty span (a lone dash, where the next word starts) takes one sample, and the next word
    # starts after it: words never overlap (a corpus line with " - a " once failed validation).
    _, dashed = framed_utterance("one - two", audio, rate, rate, lead_ms=100, tail_ms=100,
                                 spans_s=[(0.25, 0.75), (1.0, 1.0), (1.0, 1.25)])
    assert [(t.start_sample, t.end_sample) for t in dashed] == [
        (lead, lead + 8000), (lead + 12000, lead + 12001), (lead + 12001, lead + 16000)]
    # Without spans (or with the wrong number): the letter-proportional split of the voiced span.
    _, approximate = framed_utterance("one two", audio, rate, rate, lead_ms=100, tail_ms=100)
    assert approximate[0].end_sample == approximate[1].start_sample == lead + 8000


@needs_flite
def test_flites_spans_put_each_word_on_its_sound() -> None:
    audio, rate, spans = flite_speech_with_spans("Yes, we are open on sunday.", "slt", 160)
    assert spans is not None and len(spans) == 6
    assert np.array_equal(audio, fluent_speech("Yes, we are open on sunday.", "slt", 160)[0])  # the judge's audio
    assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))  # ordered, no overlap
    assert spans[-1][1] <= len(audio) / rate <= spans[-1][1] + 0.5  # the last word ends near the end

    def rms(start_s: float, end_s: float) -> float:
        return float(np.sqrt(np.mean(audio[int(start_s * rate):int(end_s * rate)] ** 2)))

    words = [rms(*span) for span in spans]
    # The comma's pause between "yes" and "we" is silence beside the words on either side.
    assert rms(spans[0][1] + 0.02, spans[1][0] - 0.02) < 0.1 * min(words)


@needs_flite
def test_a_flite_corpus_stores_exact_timings_and_an_espeak_one_approximate(tmp_path) -> None:
    config = FluentCorpusConfig(out_dir=tmp_path / "slt", utterances=2, voices="slt", workers=1, speeds_wpm=(160,))
    for entry in read_manifest(generate_fluent_corpus(config)):
        audio, rate, spans = flite_speech_with_spans(entry.text, "slt", 160)
        _, expected = framed_utterance(entry.text, audio, rate, entry.sample_rate_hz, config.lead_ms, config.tail_ms,
                                       spans)
        assert entry.words == expected
        _, approximate = framed_utterance(entry.text, audio, rate, entry.sample_rate_hz, config.lead_ms, config.tail_ms)
        assert entry.words != approximate
