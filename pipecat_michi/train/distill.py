"""The distillation teacher of the Whisper listening head: the original offline Whisper encoder.

Frozen, full attention, Whisper's symmetric stem, on the clean clip (resampled to 16 kHz, Whisper's
global-max features). The streaming student (block-causal, causal stem, possibly hearing the
telephone-augmented clip) learns to produce, at token ``t``, the teacher's token ``t - lag``: the
small lag lets it hear a little after the moment it describes, which a causal model needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.config import ListeningHeadConfig
from pipecat_michi.model.whisper.encoder import WhisperEncoder, whisper_offline_encode
from pipecat_michi.model.whisper.frontend import WHISPER_SAMPLE_RATE_HZ, PolyphaseResampler, log_mel_spectrogram
from pipecat_michi.model.whisper.weights import WhisperWeightsError, load_whisper_encoder


class Teacher(nn.Module):
    """Offline Whisper encoder on ``source``'s weights (``load_whisper_encoder``), frozen."""

    def __init__(self, cfg: ListeningHeadConfig, source: str, sample_rate_hz: int,
                 max_position_offset: int = 3000) -> None:
        super().__init__()
        weights = load_whisper_encoder(source)
        if weights.dims.d_model != cfg.d_model:
            raise WhisperWeightsError(f"{source}: teacher d_model {weights.dims.d_model} != head's {cfg.d_model}")
        dims = weights.dims
        self.encoder = WhisperEncoder(dims.n_mels, dims.d_model, dims.num_layers, dims.num_heads, dims.ffn_size)
        table = self.encoder.position_table.clone()
        rows = min(table.shape[0], weights.positions.shape[0])
        table[:rows] = weights.positions[:rows]
        self.encoder.load_state_dict({**weights.state, "position_table": table})
        self.encoder.requires_grad_(False).eval()
        self.n_mels = dims.n_mels
        self.resampler = PolyphaseResampler(sample_rate_hz, WHISPER_SAMPLE_RATE_HZ)
        self.max_position_offset = max_position_offset

    @torch.no_grad()
    def tokens(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, T]`` at the model rate -> Whisper's encoder tokens ``[B, T_16k / 320, d]``."""
        audio, _ = self.resampler(wav, self.resampler.init_history(wav.shape[0], wav.device))
        return whisper_offline_encode(self.encoder, log_mel_spectrogram(audio, self.n_mels))

    def loss(self, student: torch.Tensor, clean_wav: torch.Tensor, lag_tokens: int) -> torch.Tensor:
        """MSE of student token ``t`` against teacher token ``t - lag_tokens``."""
        target = self.tokens(clean_wav).to(student.dtype)
        steps = min(student.shape[1], target.shape[1])
        if lag_tokens >= steps:
            raise ValueError(f"distillation lag {lag_tokens} tokens is longer than the crop ({steps} tokens)")
        return F.mse_loss(student[:, lag_tokens:steps].float(), target[:, : steps - lag_tokens].float())
