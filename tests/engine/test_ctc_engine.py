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
            (_, ids, _), state = model.listening.step(torch.from_numpy(frame.astype(np.float32) / 32768.0)[None], state)
            expected += [chr(i) for i in ids[0].tolist() if i != model.config.tokens.pad_id]

    async with DuplexEngine(EngineConfig(checkpoint=checkpoint, device="cpu", fill_after_ms=5000.0)) as engine:
        session = await engine.open_session(SessionSettingsUpdate(seed=1))
        heard = []
        for index, frame in enumerate(audio):
            session.push_audio(frame, index)
            heard.append((await session.receive(timeout=10)).transcript)
        await session.close()
    assert "".join(heard) == "".join(expected) and len(expected) > 5  # a random head says plenty
    assert set("".join(heard)) <= set(CTC_ALPHABET)
