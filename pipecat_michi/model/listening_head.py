"""Listening head: a streaming Whisper-style encoder of the user's audio.

Per 80 ms frame it yields (1) an embedding added to the backbone's input, (2) logits of the
user's transcript token, and (3) a speak/hold logit, the learned "smart VAD" that decides when
the model should talk. Log-mel features as Whisper, but causal: each frame's token attends only
to the last ``context_frames`` tokens, so a call can stream forever in constant memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.backbone import Float32Buffers, RotaryEmbedding, apply_rotary, grouped_attention
from pipecat_michi.model.config import ListeningHeadConfig
from pipecat_michi.model.streaming import StreamingState


class ListenStep(NamedTuple):
    """One frame heard by a listening head (rows of the batch)."""

    embedding: torch.Tensor  # [B, H] into the backbone
    transcript_tokens: torch.Tensor  # [B, S] backbone token ids, PAD where nothing new was heard
    speak_logit: torch.Tensor  # [B]
    # [B, S, C] float32: a CTC head's log-probabilities per token (blank first, then its alphabet),
    # for a decoder smarter than the greedy ``transcript_tokens``; None for a frame head.
    transcript_logprobs: torch.Tensor | None = None


def mel_filterbank(n_fft: int, n_mels: int, sample_rate_hz: int) -> torch.Tensor:
    """Triangular mel filters ``[n_fft // 2 + 1, n_mels]``: HTK mel scale, Slaney area normalisation.

    Not Whisper's (Slaney scale): the conv head and the codec loss were trained on these, so they
    stay; the Whisper head uses ``model/whisper/frontend.py``'s exact filters."""

    def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    fft_hz = torch.linspace(0, sample_rate_hz / 2, n_fft // 2 + 1)
    mel_points = torch.linspace(
        hz_to_mel(torch.tensor(0.0)), hz_to_mel(torch.tensor(sample_rate_hz / 2)), n_mels + 2
    )
    hz_points = mel_to_hz(mel_points)
    lower, center, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    rising = (fft_hz[:, None] - lower) / (center - lower)
    falling = (upper - fft_hz[:, None]) / (upper - center)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return filters * (2.0 / (upper - lower))  # Slaney area normalisation


class StreamingLogMel(Float32Buffers):
    """Log-mel of each frame, carrying ``n_fft - hop`` samples of history between frames.

    Computed in float32 whatever the model's dtype (``log10`` of small powers and the STFT
    lose too much in bf16); the caller casts the features to the encoder's dtype.
    """

    def __init__(self, cfg: ListeningHeadConfig, frame_samples: int, sample_rate_hz: int) -> None:
        super().__init__()
        if frame_samples % cfg.hop_samples:
            raise ValueError("frame_samples must be a multiple of the listening head's hop")
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_samples
        self.history = cfg.n_fft - cfg.hop_samples
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(cfg.n_fft, cfg.n_mels, sample_rate_hz), persistent=False)

    def features(self, padded: torch.Tensor) -> torch.Tensor:
        """``padded [B, history + T]`` -> ``[B, T // hop, n_mels]`` (Whisper's scaling)."""
        spec = torch.stft(padded.float(), self.n_fft, self.hop, window=self.window,
                          center=False, return_complex=True)
        mel = spec.abs().pow(2).transpose(1, 2) @ self.filters
        return (torch.log10(mel.clamp(min=1e-10)).clamp(min=-8.0) + 4.0) / 4.0


class WindowedSelfAttention(nn.Module):
    """Causal multi-head attention over a sliding window of ``context_frames`` tokens."""

    def __init__(self, cfg: ListeningHeadConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        batch, steps, _ = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, self.head_dim).unbind(2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        if q.shape[1] == 1:
            # The streaming step (one query over the window): plain matmuls beat the CPU's fused
            # SDPA kernel here, as in the backbone's decode step.
            return self.out(grouped_attention(q, k, v, mask))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None]
        )
        batch, _, steps, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(batch, steps, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ListeningHeadConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = WindowedSelfAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_size), nn.GELU(), nn.Linear(cfg.ffn_size, cfg.d_model))


class ListeningHead(nn.Module):
    """Streaming encoder: user audio frame -> backbone embedding, transcript logits, speak logit."""

    def __init__(
        self,
        cfg: ListeningHeadConfig,
        frame_samples: int,
        sample_rate_hz: int,
        backbone_hidden: int,
        vocab_size: int,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.frame_samples = frame_samples
        self.mels_per_frame = frame_samples // cfg.hop_samples
        self.log_mel = StreamingLogMel(cfg, frame_samples, sample_rate_hz)
        self.stem = nn.Sequential(
            nn.Linear(self.mels_per_frame * cfg.n_mels, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model)
        )
        self.rotary = RotaryEmbedding(cfg.d_model // cfg.num_heads, cfg.rope_theta)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.to_backbone = nn.Linear(cfg.d_model, backbone_hidden)
        self.transcript_head = nn.Linear(cfg.d_model, vocab_size)
        self.speak_head = nn.Linear(cfg.d_model, 1)

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's compute dtype (a norm's: linears may be quantized)."""
        return self.final_norm.weight.dtype

    def _tokens(self, mel: torch.Tensor) -> torch.Tensor:
        """float32 log-mel ``[B, hops, n_mels]`` -> stem tokens ``[B, frames, d_model]``."""
        batch, hops, n_mels = mel.shape
        flat = mel.reshape(batch, hops // self.mels_per_frame, self.mels_per_frame * n_mels)
        return self.stem(flat.to(self.dtype))

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.final_norm(x)
        return self.to_backbone(x), self.transcript_head(x), self.speak_head(x).squeeze(-1)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Offline: ``wav [B, F * frame_samples]`` -> embeddings ``[B, F, H]``,
        transcript logits ``[B, F, V]``, speak logits ``[B, F]``."""
        if wav.shape[-1] % self.frame_samples:
            raise ValueError(f"audio length {wav.shape[-1]} is not a multiple of {self.frame_samples}")
        padded = F.pad(wav, (self.log_mel.history, 0))
        x = self._tokens(self.log_mel.features(padded))
        frames = x.shape[1]
        positions = torch.arange(frames, device=wav.device)
        cos, sin = self.rotary(positions.expand(wav.shape[0], frames))
        offset = positions[:, None] - positions[None, :]
        mask = ((offset >= 0) & (offset < self.config.context_frames)).expand(wav.shape[0], frames, frames)
        for layer in self.layers:
            q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)
            x = x + layer.attn.attend(q, k, v, mask)
            x = x + layer.ffn(layer.ffn_norm(x))
        return self._heads(x)

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> StreamingState:
        """Zero state = a fresh stream (silence before the call, empty attention window)."""
        device = device or self.final_norm.weight.device
        dtype = dtype or self.dtype
        window, heads = self.config.context_frames, self.config.num_heads
        head_dim = self.config.d_model // heads
        state: StreamingState = {
            # Raw audio for the float32 mel front-end, whatever the encoder's dtype.
            "mel_history": torch.zeros(batch_size, self.log_mel.history, device=device, dtype=torch.float32),
            "frames_seen": torch.zeros(batch_size, dtype=torch.long, device=device),
        }
        for i in range(len(self.layers)):
            state[f"layer{i}.k"] = torch.zeros(batch_size, window, heads, head_dim, device=device, dtype=dtype)
            state[f"layer{i}.v"] = torch.zeros(batch_size, window, heads, head_dim, device=device, dtype=dtype)
        return state

    def step(
        self, frame: torch.Tensor, state: StreamingState
    ) -> tuple[ListenStep, StreamingState]:
        """One frame ``[B, frame_samples]`` -> what was heard (transcript token ids ``[B, 1]``: the
        argmax) and the new state (the given one is not modified)."""
        padded = torch.cat([state["mel_history"], frame.float()], dim=-1)
        x = self._tokens(self.log_mel.features(padded))
        seen = state["frames_seen"]
        window = self.config.context_frames
        cos, sin = self.rotary(seen[:, None])
        # The window holds the last `window` keys, newest last; the oldest slots of a young
        # stream are still empty and masked.
        valid = torch.clamp(seen + 1, max=window)
        mask = (torch.arange(window, device=frame.device)[None, :] >= window - valid[:, None])[:, None, :]
        new_state: StreamingState = {
            "mel_history": padded[:, -self.log_mel.history:],
            "frames_seen": seen + 1,
        }
        for i, layer in enumerate(self.layers):
            q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)
            keys = torch.cat([state[f"layer{i}.k"][:, 1:], k], dim=1)
            values = torch.cat([state[f"layer{i}.v"][:, 1:], v], dim=1)
            new_state[f"layer{i}.k"], new_state[f"layer{i}.v"] = keys, values
            x = x + layer.attn.attend(q, keys, values, mask)
            x = x + layer.ffn(layer.ffn_norm(x))
        embedding, transcript_logits, speak_logit = self._heads(x)
        return ListenStep(embedding[:, 0], transcript_logits[:, 0].argmax(dim=-1)[:, None], speak_logit[:, 0]), new_state
