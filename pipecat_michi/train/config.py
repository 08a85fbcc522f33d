"""What one training run does, as data (every ``michi-train`` flag maps to a field here)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """One stage's run. ``out_dir`` becomes a MichiAI checkpoint directory (loadable by
    ``EngineConfig(checkpoint=...)``) plus ``train_state.pt``, ``losses.jsonl`` and
    ``loss_curves.png``.

    The model comes from, in order: ``out_dir`` when resuming, ``init`` (the previous stage's
    checkpoint), or ``preset`` with random weights (and a GGUF backbone if ``backbone_gguf``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Literal["codec", "listening", "speaking", "joint"]
    manifest: Path
    out_dir: Path
    preset: str = "tiny"
    init: Path | None = None
    backbone_gguf: Path | None = None
    # Codec stage on top of --init: replace the checkpoint's codec with a freshly initialised
    # one of --preset's codec shape (same latent size), keeping everything else it trained.
    fresh_codec: bool = Field(default=False, description="replace --init's codec with a fresh one of --preset's shape")
    resume: bool = False
    # Backbone LoRA (peft) of this rank: in the speaking and joint stages only the adapters of
    # the backbone learn, its pretrained weights stay frozen. A checkpoint with adapters keeps them.
    lora_rank: int | None = Field(default=None, ge=1)
    lora_alpha: float = Field(default=32.0, gt=0)
    # Speaking/joint: give the flow head the inner monologue's last N tokens and their ages as
    # direct context (model/monologue.py); a checkpoint that has one keeps it.
    monologue_tokens: int | None = Field(default=None, ge=1)
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=4, ge=1)
    # Longest crop per example, in 80 ms frames (the codec stage uses codec_frames instead:
    # short crops are enough to learn reconstruction and keep the HiFi-GAN decoder cheap).
    max_frames: int = Field(default=96, ge=1)
    codec_frames: int = Field(default=6, ge=1)
    # Codec stage: each crop is preceded by this many frames that only warm the codec's streaming
    # state (no gradient), so it learns to reconstruct with the long history a call has.
    codec_context_frames: int = Field(default=0, ge=0)
    # Spectral codec: weight of an L1 on the decoder's log-magnitudes against the input's exact ones.
    codec_magnitude_weight: float = Field(default=0.0, ge=0)
    # Codec stage, fresh spectral codec (--fresh-codec, or no --init): start its linear path at the
    # block PCA of this many of the manifest's clips (train/codec_init.py); 0 leaves it random.
    codec_pca_clips: int = Field(default=256, ge=0)
    # Codec stage: train the decoder only, the encoder (and so the latent space) stays as it is:
    # with a PCA-started spectral codec, Adam's first steps on the raw log-magnitudes it reads
    # threw its latents far from the PCA (RMS 1 -> ~4 within 150 steps).
    freeze_codec_encoder: bool = Field(default=False, description="codec stage: the encoder does not learn")
    lr: float = Field(default=3e-4, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    # After warmup: constant, or a cosine from lr down to 10% of it at ``steps`` (a run resumed
    # with more --steps stretches the remaining curve).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    mel_weight: float = Field(default=1.0, ge=0)
    # Speaking/joint: Gaussian noise on the previous latents the backbone reads, its std drawn per
    # frame uniformly in [0, this] (latents have mean square 1): robustness to its own samples.
    latent_input_noise: float = Field(default=0.0, ge=0)
    # Text-only LM batches mixed into the speaking/joint stages (0 turns them off).
    text_lm_weight: float = Field(default=0.5, ge=0)
    text_batch_size: int = Field(default=4, ge=1)
    text_tokens: int = Field(default=64, ge=2)
    # The LM batches' text: a JSONL file of {"text": ...} documents (e.g. ``michi-train chat-texts``,
    # SmolLM2's own chat answers), instead of the manifest's sentences.
    text_file: Path | None = None
    # The LM batches learn the pretrained backbone's predictions (KL toward the backbone with its
    # LoRA adapters off) instead of the text's tokens: keeps its text ability. Needs adapters.
    text_distill: bool = Field(default=False, description="text batches distil the adapters-off backbone")
    # Codec stage: HiFi-GAN's multi-period discriminator, least-squares GAN and feature-matching
    # losses on top of reconstruction (train/adversarial.py). Off by default: it doubles the step.
    adversarial: bool = Field(default=False, description="codec stage: add the HiFi-GAN discriminator losses")
    adversarial_start_step: int = Field(default=0, ge=0)
    adversarial_weight: float = Field(default=1.0, ge=0)
    feature_match_weight: float = Field(default=2.0, ge=0)
    discriminator_channels: int = Field(default=16, ge=1)
    # HiFi-GAN's multi-scale discriminator beside the multi-period one: this many scales (0: MPD only).
    discriminator_scales: int = Field(default=3, ge=0)
    # The discriminator trains alone for this many steps before --adversarial-start-step (unset:
    # from step 0); the codec steps alone, at full speed, before that.
    discriminator_warmup_steps: int | None = Field(default=None, ge=0)
    # auto: CUDA when present, else CPU. Training stays in float32 (no mixed precision yet).
    device: str = "auto"
    # Listening stage. Transcript targets delayed by this many 80 ms frames (the transcript's
    # latency); telephone (8 kHz mu-law) and noise augmentation probabilities.
    transcript_lag_frames: int = Field(default=3, ge=0)
    telephone_prob: float = Field(default=0.5, ge=0, le=1)
    noise_prob: float = Field(default=0.5, ge=0, le=1)
    # Room reverberation and microphone colour (train/augment.py); 0: off, the shipped recipe.
    room_prob: float = Field(default=0.0, ge=0, le=1)
    colour_prob: float = Field(default=0.0, ge=0, le=1)
    # Whisper listening head: initial weights when starting from a preset (default: the
    # preset's ``listening.whisper_weights``), and distillation toward the offline Whisper
    # encoder on those weights (0 turns it off), lagged by ``distill_lag_tokens`` 20 ms tokens.
    whisper_weights: str | None = None
    distill_weight: float = Field(default=1.0, ge=0)
    distill_lag_tokens: int = Field(default=2, ge=0)
    # Learning-rate multiplier for the parts a pretrained source did not initialise (e.g. the
    # Whisper listening head's CTC and output layers over Whisper's pretrained encoder).
    new_parts_lr_scale: float = Field(default=1.0, gt=0)
    # Learning-rate multiplier for the flow head (speaking/joint): it learns far slower than the
    # backbone's adapters at one shared rate (docs/training.md, "The speaking head on the codec").
    flow_lr_scale: float = Field(default=1.0, gt=0)
    # Speaking/joint: weight of an MSE from a linear readout of the backbone's state to the next
    # latent (a training-only layer, at the flow head's rate). The flow loss reaches the backbone
    # through a noisy target (latent - noise, noise of unit variance): a regression gives it the
    # conditional mean directly (docs/training.md).
    latent_readout_weight: float = Field(default=0.0, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    seed: int = 0
