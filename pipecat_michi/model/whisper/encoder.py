"""Streaming Whisper encoder: the ``kind="whisper"`` listening head.

Whisper's encoder (conv stem, pre-LN transformer, 20 ms tokens) made streamable:

- **Front-end**: Whisper's exact log-mel (:mod:`.frontend`), 24 kHz resampled to 16 kHz.
- **Causal stem**: Whisper's ``conv1`` (k=3, pad 1) looks one mel frame (10 ms) ahead; here it is
  left-padded by 2 instead, i.e. Whisper's stem on audio delayed by 10 ms. ``conv2`` (k=3,
  stride 2, pad 1) needs no future inside an 80 ms frame (8 mel frames, an even count), so it
  keeps Whisper's padding. Two mel frames and one ``conv1`` output are carried between steps.
- **Block-causal attention**: the 4 tokens of an 80 ms frame see each other and the previous
  ``context_frames - 1`` frames' tokens, no more; a KV ring of ``(context_frames - 1) * 4`` keys
  per layer is the streaming state, so memory and cost are constant however long the call.
- **Positions**: Whisper's positional table is the fixed sinusoid :func:`sinusoids` stored in
  fp16 (the loaders check it). Positions inside the table (the first 30 s, 1500 tokens) use the
  stored rows, which the pretrained weights were trained with (the exact formula instead moves
  tiny.en's encoder output by up to 0.37, 1e-3 relative); later positions use the same formula,
  which is defined for any index, so a call runs past 30 s (the slowest component's period is ~21
  minutes). Whisper never saw indices past 1500, so fine-tuning draws random start offsets
  (``position_offset``) to train them. No RoPE: it would change every pretrained attention score.

Per 80 ms frame the 4 final tokens are concatenated, projected to one ``d_model`` vector and
from it to the three outputs of
:class:`~pipecat_michi.model.listening_head.ListeningHead`: the backbone embedding, transcript
logits in the backbone's vocabulary and the speak/hold logit. ``mode="whisper"`` (full attention,
Whisper's symmetric stem) reproduces the original offline encoder for parity tests and as the
distillation teacher.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.config import ListeningHeadConfig
from pipecat_michi.model.listening_head import ListenStep
from pipecat_michi.model.streaming import StreamingState, prefixed, unprefixed
from pipecat_michi.model.whisper.frontend import WHISPER_HOP, WHISPER_SAMPLE_RATE_HZ, StreamingWhisperFrontEnd

TOKEN_HOPS = 2  # conv2's stride: one encoder token per two mel frames (20 ms)
WHISPER_POSITIONS = 1500  # Whisper's positional table: 30 s of 20 ms tokens


def sinusoids(length: int, channels: int, dtype: torch.dtype, device: torch.device, start: int = 0) -> torch.Tensor:
    """Whisper's positional encoding ``[length, channels]`` for positions ``start..start+length-1``."""
    return sinusoids_at(torch.arange(start, start + length, device=device), channels).to(dtype)


def sinusoids_at(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """Whisper's sinusoid at integer ``positions [...]`` -> ``[..., channels]`` float32 (float64 inside,
    so large indices keep their phase)."""
    increment = math.log(10000.0) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float64, device=positions.device))
    scaled = positions.to(torch.float64)[..., None] * inv_timescales
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1).to(torch.float32)


class WhisperAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = num_heads, d_model // num_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (*x.shape[:2], self.heads, self.head_dim)
        return self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=None if mask is None else mask[:, None]
        )
        return self.out(out.transpose(1, 2).flatten(2))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn_size: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = WhisperAttention(d_model, num_heads)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_size)
        self.fc2 = nn.Linear(ffn_size, d_model)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


class WhisperEncoder(nn.Module):
    """Whisper's encoder body; parameter names are the loaders' canonical names."""

    def __init__(self, n_mels: int, d_model: int, num_layers: int, num_heads: int, ffn_size: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.conv1 = nn.Conv1d(n_mels, d_model, 3)
        self.conv2 = nn.Conv1d(d_model, d_model, 3, stride=2)
        self.layers = nn.ModuleList(WhisperEncoderLayer(d_model, num_heads, ffn_size) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.register_buffer(
            "position_table", sinusoids(WHISPER_POSITIONS, d_model, torch.float32, torch.device("cpu"))
        )

    def stem(self, mel: torch.Tensor, mode: Literal["stream", "whisper"]) -> torch.Tensor:
        """``mel [B, T, n_mels]`` -> tokens ``[B, T // 2, d]`` (no positions), zero-padded start."""
        x = mel.to(self.conv1.weight.dtype).transpose(1, 2)
        x = F.gelu(self.conv1(F.pad(x, (2, 0) if mode == "stream" else (1, 1))))
        return F.gelu(self.conv2(F.pad(x, (1, 1)))).transpose(1, 2)[:, : mel.shape[1] // TOKEN_HOPS]

    def add_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``positions [B, N]`` absolute token indices: the stored table inside it, the formula past it."""
        table = self.position_table
        inside = positions < table.shape[0]
        stored = table[positions.clamp(max=table.shape[0] - 1)].to(torch.float32)
        return x + torch.where(inside[..., None], stored, sinusoids_at(positions, self.d_model)).to(x.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Tokens with positions ``[B, N, d]`` -> final-normed tokens; ``mask [B, N, N]`` (True = attend)."""
        for layer in self.layers:
            q, k, v = layer.attn.project(layer.attn_norm(x))
            x = x + layer.attn.attend(q, k, v, mask)
            x = x + layer.ffn(x)
        return self.final_norm(x)


class WhisperListeningHead(nn.Module):
    """Streaming Whisper encoder with ``ListeningHead``'s interface (``forward``, ``init_state``, ``step``)."""

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
        samples_16k = frame_samples * WHISPER_SAMPLE_RATE_HZ / sample_rate_hz
        if samples_16k != int(samples_16k) or int(samples_16k) % (WHISPER_HOP * TOKEN_HOPS):
            raise ValueError("a frame must be a whole number of Whisper's 20 ms tokens")
        self.config = cfg
        self.frame_samples = frame_samples
        self.tokens_per_frame = int(samples_16k) // (WHISPER_HOP * TOKEN_HOPS)
        self.ring_tokens = (cfg.context_frames - 1) * self.tokens_per_frame
        self.front_end = StreamingWhisperFrontEnd(cfg.n_mels, sample_rate_hz)
        self.encoder = WhisperEncoder(cfg.n_mels, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.ffn_size)
        # One vector per frame from its 4 tokens, so the vocabulary-sized head stays d_model wide.
        self.frame_proj = nn.Linear(self.tokens_per_frame * cfg.d_model, cfg.d_model)
        self.to_backbone = nn.Linear(cfg.d_model, backbone_hidden)
        self.ctc = cfg.transcript == "ctc"
        if self.ctc:
            # Per 20 ms token: blank (index 0) or one character of the alphabet.
            self.transcript_head = nn.Linear(cfg.d_model, len(cfg.ctc_alphabet) + 1)
            # CTC index -> backbone token id (blank -> PAD, which no consumer prints).
            self.register_buffer("ctc_token_ids", torch.tensor([pad_id, *cfg.ctc_token_ids]), persistent=False)
        else:
            self.transcript_head = nn.Linear(cfg.d_model, vocab_size)
        self.pad_id = pad_id
        self.speak_head = nn.Linear(cfg.d_model, 1)

    @property
    def _dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    def heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final tokens ``[B, 4F, d]`` -> embeddings ``[B, F, H]``, transcript logits (``[B, 4F, C]``
        per token with CTC, else ``[B, F, V]`` per frame) and speak logits ``[B, F]``."""
        pooled = F.gelu(self.frame_proj(tokens.reshape(tokens.shape[0], -1, self.tokens_per_frame * tokens.shape[-1])))
        transcript = self.transcript_head(tokens if self.ctc else pooled)
        return self.to_backbone(pooled), transcript, self.speak_head(pooled).squeeze(-1)

    def decode_transcript(
        self, transcript_logits: torch.Tensor, previous: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame's transcript logits -> backbone token ids ``[B, S]`` (PAD where nothing is
        said) and the CTC symbol to carry to the next frame.

        CTC (``S`` = 4 tokens): greedy decoding; a symbol is emitted when it is not blank and
        differs from the token before it (``previous`` carries that across frames), so "ll" needs
        a blank between its letters, as CTC training taught. Frame mode: the argmax, ``S`` = 1.
        """
        if not self.ctc:
            return transcript_logits.argmax(dim=-1)[:, None], previous
        best = transcript_logits.argmax(dim=-1)  # [B, 4]
        before = torch.cat([previous[:, None], best[:, :-1]], dim=1)
        emitted = (best != 0) & (best != before)
        ids = torch.where(emitted, self.ctc_token_ids[best], torch.full_like(best, self.pad_id))
        return ids, best[:, -1]

    def block_causal_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """``[N, N]``: token i sees token j iff j's frame is i's or one of the previous ``context_frames - 1``."""
        frame = torch.arange(num_tokens, device=device) // self.tokens_per_frame
        lag = frame[:, None] - frame[None, :]
        return (lag >= 0) & (lag < self.config.context_frames)

    def encode(self, wav: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        """Offline, same mask as streaming: ``wav [B, F * frame_samples]`` -> tokens ``[B, 4F, d]``."""
        if wav.shape[-1] % self.frame_samples:
            raise ValueError(f"audio length {wav.shape[-1]} is not a multiple of {self.frame_samples}")
        batch = wav.shape[0]
        mel, _ = self.front_end(wav, self.front_end.init_state(batch, wav.device))
        x = self.encoder.stem(mel, "stream")
        positions = torch.arange(position_offset, position_offset + x.shape[1], device=wav.device)
        x = self.encoder.add_positions(x, positions.expand(batch, -1))
        mask = self.block_causal_mask(x.shape[1], wav.device).expand(batch, -1, -1)
        return self.encoder(x, mask)

    def forward(self, wav: torch.Tensor, position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Offline: ``wav [B, F * frame_samples]`` -> embeddings ``[B, F, H]``, transcript logits
        ``[B, F, V]``, speak logits ``[B, F]``."""
        return self.heads(self.encode(wav, position_offset))

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> StreamingState:
        """Zero state = a fresh stream (silence before the call, empty attention window)."""
        device = device or self.encoder.conv1.weight.device
        dtype = dtype or self._dtype
        cfg = self.config
        head_dim = cfg.d_model // cfg.num_heads
        state: StreamingState = prefixed("front", self.front_end.init_state(batch_size, device))
        state["mel_tail"] = torch.zeros(batch_size, 2, cfg.n_mels, dtype=torch.float32, device=device)
        state["conv1_tail"] = torch.zeros(batch_size, 1, cfg.d_model, dtype=dtype, device=device)
        state["tokens_seen"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        state["ctc_previous"] = torch.zeros(batch_size, dtype=torch.long, device=device)  # blank
        for i in range(cfg.num_layers):
            for kv in ("k", "v"):
                state[f"layer{i}.{kv}"] = torch.zeros(
                    batch_size, self.ring_tokens, cfg.num_heads, head_dim, dtype=dtype, device=device
                )
        return state

    def step(
        self, frame: torch.Tensor, state: StreamingState
    ) -> tuple[ListenStep, StreamingState]:
        """One frame ``[B, frame_samples]`` -> what was heard (transcript token ids ``[B, S]`` by
        :meth:`decode_transcript`; with CTC also the log-probabilities ``[B, 4, C]``) and the new
        state (the given one is not modified)."""
        front_state = unprefixed("front", state)
        mel, front_state = self.front_end(frame, front_state)
        new_state: StreamingState = prefixed("front", front_state)
        # The causal stem on carried tails: conv1 sees 2 past mel frames, conv2 one past conv1 output.
        enc = self.encoder
        mel_in = torch.cat([state["mel_tail"], mel], dim=1)
        new_state["mel_tail"] = mel_in[:, -2:]
        conv1 = F.gelu(enc.conv1(mel_in.to(self._dtype).transpose(1, 2))).transpose(1, 2)
        conv1_in = torch.cat([state["conv1_tail"].to(conv1.dtype), conv1], dim=1)
        new_state["conv1_tail"] = conv1_in[:, -1:]
        x = F.gelu(enc.conv2(conv1_in.transpose(1, 2))).transpose(1, 2)
        seen = state["tokens_seen"]
        steps = self.tokens_per_frame
        x = enc.add_positions(x, seen[:, None] + torch.arange(steps, device=frame.device))
        new_state["tokens_seen"] = seen + steps
        # Ring slots of a young stream are still empty and masked; the current frame is whole.
        valid = torch.clamp(seen, max=self.ring_tokens)
        slot = torch.arange(self.ring_tokens + steps, device=frame.device)
        mask = (slot[None, :] >= self.ring_tokens - valid[:, None])[:, None, :].expand(-1, steps, -1)
        for i, layer in enumerate(enc.layers):
            q, k, v = layer.attn.project(layer.attn_norm(x))
            keys = torch.cat([state[f"layer{i}.k"], k], dim=1)
            values = torch.cat([state[f"layer{i}.v"], v], dim=1)
            new_state[f"layer{i}.k"] = keys[:, steps:]
            new_state[f"layer{i}.v"] = values[:, steps:]
            x = x + layer.attn.attend(q, keys, values, mask)
            x = x + layer.ffn(x)
        embedding, transcript_logits, speak_logit = self.heads(enc.final_norm(x))
        transcript, new_state["ctc_previous"] = self.decode_transcript(
            transcript_logits if self.ctc else transcript_logits[:, 0], state["ctc_previous"]
        )
        logprobs = torch.log_softmax(transcript_logits.float(), dim=-1) if self.ctc else None
        return ListenStep(embedding[:, 0], transcript, speak_logit[:, 0], logprobs), new_state

    def load_whisper(self, source: str) -> None:
        """Initialise the encoder body from Whisper weights (``load_whisper_encoder``'s ``source``)."""
        from pipecat_michi.model.whisper.weights import WhisperWeightsError, load_whisper_encoder

        weights = load_whisper_encoder(source, dtype=self._dtype)
        cfg = self.config
        wanted = (cfg.n_mels, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.ffn_size)
        got = weights.dims
        if wanted != (got.n_mels, got.d_model, got.num_layers, got.num_heads, got.ffn_size):
            raise WhisperWeightsError(f"{source}: encoder dims {got} do not match the listening head's {cfg}")
        table = sinusoids(WHISPER_POSITIONS, cfg.d_model, torch.float32, torch.device("cpu"))
        rows = min(WHISPER_POSITIONS, weights.positions.shape[0])
        table[:rows] = weights.positions[:rows].to(torch.float32)
        self.encoder.load_state_dict({**weights.state, "position_table": table.to(self.encoder.position_table.device)})


def whisper_offline_encode(encoder: WhisperEncoder, mel: torch.Tensor) -> torch.Tensor:
    """Original Whisper encoder (symmetric stem, full attention): ``mel [B, T, n_mels]`` -> ``[B, T/2, d]``."""
    x = encoder.stem(mel, "whisper")
    x = encoder.add_positions(x, torch.arange(x.shape[1], device=mel.device).expand(x.shape[0], -1))
    return encoder(x, None)
