"""The Pipecat service: MichiAI as one speech-to-speech processor (in place of STT -> LLM -> TTS)."""

from pipecat_michi.service.llm import FRAME_INDEX_METADATA_KEY, BotTextFilter, MichiLLMService
from pipecat_michi.service.settings import MichiServiceParams, MichiSettings
from pipecat_michi.service.turns import BotText

__all__ = [
    "FRAME_INDEX_METADATA_KEY",
    "BotText",
    "BotTextFilter",
    "MichiLLMService",
    "MichiServiceParams",
    "MichiSettings",
]
