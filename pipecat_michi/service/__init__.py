"""The Pipecat service: MichiAI as one speech-to-speech processor (in place of STT -> LLM -> TTS)."""

from pipecat_michi.service.llm import (
    FRAME_INDEX_METADATA_KEY,
    MichiLLMService,
    MichiServiceParams,
    MichiSettings,
)

__all__ = ["FRAME_INDEX_METADATA_KEY", "MichiLLMService", "MichiServiceParams", "MichiSettings"]
