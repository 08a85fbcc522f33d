"""A CTC listening head's characters reach the call's transcript through the engine unchanged."""

import numpy as np
import torch

from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.model.checkpoint import save_checkpoint
from pipecat_michi.model.config import CTC_ALPHABET, ListeningHeadConfig, MichiConfig
from pipecat_michi.model.michi import MichiModel

FRAME = 1920


async def test_a_ctc_head_streams_its_characters_through_the_engine(tmp_path) -> None:
    torch.manual_seed(0)
    # The tiny preset's byte tokenizer: a character's token id is its byte.
    listening = ListeningHeadConfig(kind="whisper", n_fft=400, hop_samples=160, n_mels=16, d_model=32, num_layers=1,
                                    num_heads=4, ffn_size=64, context_frames=8, transcript="ctc",
                                    ctc_token_ids=tuple(ord(c) for c in CTC_ALPHABET))
    model = MichiModel(MichiConfig.preset("tiny").model_copy(update={"listening": listening})).eval()
    checkpoint = save_checkpoint(model, tmp_path / "ctc")
    audio = (np.random.default_rng(3).standard_normal((10, FRAME)) * 3000).astype(np.int16)

    expected, state = [], model.listening.init_state(1)
    with torch.no_grad():
        for frame in audio:
            heard, state = model.listening.step(torch.from_numpy(frame.astype(np.float32) / 32768.0)[None], state)
            expected += [chr(i) for i in heard.transcript_tokens[0].tolist() if i != model.config.tokens.pad_id]

    config = EngineConfig(checkpoint=checkpoint, device="cpu", fill_after_ms=5000.0, transcript_decoder="greedy")
    async with DuplexEngine(config) as engine:
        session = await engine.open_session(SessionSettingsUpdate(seed=1))
        heard = []
        for index, frame in enumerate(audio):
            session.push_audio(frame, index)
            heard.append((await session.receive(timeout=10)).transcript)
        await session.close()
    assert "".join(heard) == "".join(expected) and len(expected) > 5  # a random head says plenty
    assert set("".join(heard)) <= set(CTC_ALPHABET)


async def test_the_lexicon_decoder_turns_the_steps_log_probabilities_into_final_words(tmp_path) -> None:
    from pipecat_michi.model.ctc_decoder import CtcBeamDecoder, english_lexicon

    torch.manual_seed(0)
    listening = ListeningHeadConfig(kind="whisper", n_mels=80, n_fft=400, hop_samples=160, d_model=32, num_layers=1,
                                    num_heads=4, ffn_size=64, context_frames=8, transcript="ctc",
                                    ctc_token_ids=tuple(ord(c) for c in CTC_ALPHABET))
    model = MichiModel(MichiConfig.preset("tiny").model_copy(update={"listening": listening})).eval()
    checkpoint = save_checkpoint(model, tmp_path / "ctc")
    audio = (np.random.default_rng(4).standard_normal((12, FRAME)) * 3000).astype(np.int16)

    # The reference: the same decoder fed the head's own log-probabilities, frame by frame, and
    # told to finish where the model takes the floor (as the engine does).
    reference, state, speaking = CtcBeamDecoder(CTC_ALPHABET, english_lexicon()), model.listening.init_state(1), False
    expected = []
    with torch.no_grad():
        for frame in audio:
            heard, state = model.listening.step(torch.from_numpy(frame.astype(np.float32) / 32768.0)[None], state)
            assert heard.transcript_logprobs.shape == (1, 4, len(CTC_ALPHABET) + 1)
            text = reference.push(heard.transcript_logprobs[0].numpy())
            now = bool(torch.sigmoid(heard.speak_logit[0]) > model.config.speak_threshold)
            expected.append(text + (reference.finish() if now and not speaking else ""))
            speaking = now

    async with DuplexEngine(EngineConfig(checkpoint=checkpoint, device="cpu", fill_after_ms=5000.0)) as engine:
        session = await engine.open_session(SessionSettingsUpdate(seed=1))
        heard_texts = []
        for index, frame in enumerate(audio):
            session.push_audio(frame, index)
            heard_texts.append((await session.receive(timeout=10)).transcript)
        await session.reset()  # a fresh stream: nothing pending survives into the next call
        session.push_audio(np.zeros(FRAME, np.int16), 0)
        after_reset = (await session.receive(timeout=10)).transcript
        await session.close()
    assert heard_texts == expected
    assert "".join(heard_texts).strip()  # a random head says plenty
    assert after_reset == ""


async def test_the_lexicon_decoder_refuses_a_head_without_ctc(tmp_path) -> None:
    import pytest

    config = EngineConfig(preset="tiny", device="cpu", transcript_decoder="lexicon")
    with pytest.raises(ValueError, match="needs a CTC listening head"):
        async with DuplexEngine(config):
            pass
