"""The four training stages: which modules learn, which examples they see, and their losses.

Components are pretrained separately and trained together last, as MichiAI's authors describe:
  codec      causal autoencoder + HiFi-GAN decoder on speech (multi-resolution STFT + mel L1,
             latents held near unit RMS; with ``adversarial``, HiFi-GAN's discriminator losses);
  listening  streaming transcript tokens + speak/hold labels from word timings;
  speaking   backbone + flow head: its objective (MeanFlow in the presets) on the bot's frozen
             codec latents, the inner monologue's text loss, and text-only LM batches so the
             backbone keeps its text;
  joint      all of it on two-channel dialogues (user -> listening head, bot -> targets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.codec import multi_resolution_stft_loss, reconstruct_with_spectrum
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.monologue import history_over_frames
from pipecat_michi.train.adversarial import Adversary
from pipecat_michi.train.augment import Augmenter
from pipecat_michi.train.distill import Teacher
from pipecat_michi.train.data import Batch, Example, ExampleBuilder
from pipecat_michi.train.features import log_mel
from pipecat_michi.train.lora import adapters_disabled
from pipecat_michi.train.manifest import ManifestEntry

StageName = Literal["codec", "listening", "speaking", "joint"]
Losses = dict[str, torch.Tensor]
Pairs = list[tuple[ManifestEntry, ManifestEntry]]


@dataclass(frozen=True)
class LossWeights:
    mel: float = 1.0
    latent_rms: float = 1.0
    text_lm: float = 0.5
    # Transcript targets move this many frames later than the word's first frame, so a causal
    # head hears some of a word before it must name it: the transcript's latency (x 80 ms).
    transcript_lag_frames: int = 0
    # Whisper head: token t learns the offline Whisper encoder's token t - distill_lag_tokens.
    distill: float = 0.0
    distill_lag_tokens: int = 2
    # Codec: frames at the start of each crop that only warm the streaming state.
    codec_context_frames: int = 0
    # Spectral codec: L1 on the decoder's log-magnitudes before its inverse STFT (0: off).
    codec_magnitude: float = 0.0
    # Speaking: the previous latents the backbone reads get Gaussian noise, its std drawn per
    # frame uniformly in [0, this] (0: off).
    latent_input_noise: float = 0.0
    # Text batches: learn the adapters-off backbone's next-token distribution (KL) instead of the
    # text's own tokens. Cross-entropy on a corpus teaches the corpus (every question came to be
    # answered with a corpus sentence); the frozen weights' predictions keep what they knew.
    text_distill: bool = False
    # Speaking/joint: MSE of a linear readout of the backbone's state to the next latent (0: off).
    latent_readout: float = 0.0


def codec_examples(builder: ExampleBuilder, singles: list[ManifestEntry], pairs: Pairs) -> list[Example]:
    # Every channel with speech, each as a "user" view whose user_wav is that speech.
    return [builder.as_user(e) for e in singles] + [builder.as_user(e) for pair in pairs for e in pair]


def listening_examples(builder: ExampleBuilder, singles: list[ManifestEntry], pairs: Pairs) -> list[Example]:
    return [builder.as_user(e) for e in singles] + [builder.dialogue(u, b) for u, b in pairs]


def speaking_examples(builder: ExampleBuilder, singles: list[ManifestEntry], pairs: Pairs) -> list[Example]:
    return [builder.as_bot(e) for e in singles] + [builder.dialogue(u, b) for u, b in pairs]


def joint_examples(builder: ExampleBuilder, singles: list[ManifestEntry], pairs: Pairs) -> list[Example]:
    if not pairs:
        raise ValueError("the joint stage trains on two-channel dialogues; the manifest has none")
    return [builder.dialogue(u, b) for u, b in pairs]


def codec_losses(
    model: MichiModel,
    batch: Batch,
    text: torch.Tensor | None,
    g: torch.Generator,
    w: LossWeights,
    adversary: Adversary | None = None,
    step: int = 0,
) -> Losses:
    recon, wav, latents, spectra = reconstruct_with_spectrum(model.codec, batch.user_wav, w.codec_context_frames)
    rate = model.config.sample_rate_hz
    losses = {
        "stft": multi_resolution_stft_loss(recon, wav),
        "mel_l1": F.l1_loss(log_mel(recon, rate), log_mel(wav, rate)),
        # The flow head carries unit-variance noise to these latents: keep their scale near 1.
        "latent_rms": (latents.square().mean().sqrt() - 1.0).square(),
    }
    losses["total"] = losses["stft"] + w.mel * losses["mel_l1"] + w.latent_rms * losses["latent_rms"]
    if spectra is not None and w.codec_magnitude > 0:
        # The spectral decoder's magnitudes against the ones that rebuild the input exactly: a
        # direct signal, where the waveform's STFT blurs them with the phases' interference.
        predicted, true = spectra
        losses["magnitude"] = F.l1_loss(predicted.float(), true)
        losses["total"] = losses["total"] + w.codec_magnitude * losses["magnitude"]
    if adversary is not None:
        losses.update(adversary.codec_losses(wav, recon, step))
        if "adversarial" in losses:
            losses["total"] = losses["total"] + losses["adversarial"]
    return losses


def _delay(tokens: torch.Tensor, frames: int, pad_id: int) -> torch.Tensor:
    if frames == 0:
        return tokens
    return torch.cat([torch.full_like(tokens[:, :frames], pad_id), tokens[:, :-frames]], dim=1)


def _listening_terms(
    model: MichiModel, batch: Batch, w: LossWeights, heard: torch.Tensor | None = None,
    teacher: Teacher | None = None, g: torch.Generator | None = None,
) -> tuple[torch.Tensor, Losses]:
    """Transcript (delayed targets) and speak/hold losses on ``heard`` (default: the user's
    audio), plus distillation toward ``teacher`` on the clean audio when given."""
    heard = batch.user_wav if heard is None else heard
    losses: Losses = {}
    if teacher is not None:
        # Random absolute start: positions past Whisper's 30 s must be trained too.
        offset = int(torch.randint(teacher.max_position_offset + 1, (1,), generator=g))
        tokens = model.listening.encode(heard, position_offset=offset)
        losses["distill"] = teacher.loss(tokens, batch.user_wav, w.distill_lag_tokens)
        embeds, transcript_logits, speak_logits = model.listening.heads(tokens)
    else:
        embeds, transcript_logits, speak_logits = model.listening(heard)
    valid = batch.valid
    if model.config.listening.transcript == "ctc":
        losses["transcript"] = _ctc_loss(transcript_logits, batch, model.listening.tokens_per_frame)
    else:
        targets = _delay(batch.user_text, w.transcript_lag_frames, model.config.tokens.pad_id)
        losses["transcript"] = F.cross_entropy(transcript_logits[valid].float(), targets[valid])
    losses["speak"] = F.binary_cross_entropy_with_logits(speak_logits[valid].float(), batch.speak[valid])
    return embeds, losses


def _ctc_loss(logits: torch.Tensor, batch: Batch, tokens_per_frame: int) -> torch.Tensor:
    """CTC of the per-token character logits ``[B, T, C]`` against each row's whole transcript
    (rows whose crop cut the utterance are left out; the mean is per target character)."""
    rows = batch.ctc_whole & (batch.user_chars_len > 0)
    if not bool(rows.any()):
        return logits.sum() * 0.0  # keeps the graph (and DDP-style hooks) whole
    log_probs = logits[rows].float().log_softmax(dim=-1).transpose(0, 1)  # [T, B', C]
    input_lengths = batch.valid[rows].sum(dim=1) * tokens_per_frame
    return F.ctc_loss(
        log_probs, batch.user_chars[rows], input_lengths, batch.user_chars_len[rows],
        blank=0, reduction="sum", zero_infinity=True,
    ) / batch.user_chars_len[rows].sum()


def listening_losses(
    model: MichiModel, batch: Batch, text: torch.Tensor | None, g: torch.Generator, w: LossWeights,
    augmenter: Augmenter | None = None, teacher: Teacher | None = None,
) -> Losses:
    heard = None if augmenter is None else augmenter(batch.user_wav, g)
    _, losses = _listening_terms(model, batch, w, heard, teacher, g)
    losses["total"] = losses["transcript"] + losses["speak"] + w.distill * losses.get("distill", 0.0)
    return losses


def _shift_right(x: torch.Tensor, fill: float) -> torch.Tensor:
    """Frame t's input is frame t-1's output (teacher forcing, as the duplex step feeds back)."""
    return torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], dim=1)


def _speaking_terms(
    model: MichiModel, batch: Batch, listen_embeds: torch.Tensor, text: torch.Tensor | None, g: torch.Generator,
    input_noise: float = 0.0, distill: bool = False, readout: nn.Module | None = None,
) -> Losses:
    with torch.no_grad():  # the codec is frozen: its encoder defines the latent space
        latents = model.codec.encode(batch.bot_wav)
    # What the model hears of itself is what it played: silence (zeros) while holding.
    played = latents * batch.speak[..., None]
    if input_noise > 0:
        # In a call the backbone reads its own samples, not the true latents: noisy inputs in
        # training keep it from trusting them blindly and drifting once its samples err (CAM,
        # Pasini et al. 2024; CALM). Silence stays exact: holding, the model plays zeros.
        rows, frames, dim = played.shape
        level = input_noise * torch.rand(rows, frames, 1, generator=g)
        noise = level * torch.randn(rows, frames, dim, generator=g)
        played = played + noise.to(played.device, played.dtype) * batch.speak[..., None]
    prev_text = _shift_right(batch.bot_text, model.config.tokens.pad_id)
    embeds = listen_embeds + model.latent_in(_shift_right(played, 0.0)) + model.backbone.embed_tokens(prev_text)
    hidden = model.backbone(embeds)
    history = ages = None
    if model.monologue is not None:  # what each frame's step holds of the monologue so far
        flow = model.config.flow
        history, ages = history_over_frames(prev_text, flow.monologue_tokens, flow.monologue_max_age,
                                            model.config.tokens.pad_id)
    condition = model.flow_condition(hidden, history, ages)
    valid = batch.valid
    speaking = valid & (batch.speak > 0)
    losses = {
        "monologue": F.cross_entropy(model.backbone.logits(hidden[valid]).float(), batch.bot_text[valid]),
        "flow": model.flow.loss(condition[speaking], latents[speaking], generator=g),
    }
    if readout is not None:
        # The conditional mean of the next latent, read linearly from the condition: a direct
        # signal that it must carry what is said (the flow loss's target carries unit noise).
        losses["readout"] = F.mse_loss(readout(condition[speaking]).float(), latents[speaking].float())
    if text is not None:
        losses["text_lm"] = _text_loss(model, text, distill)
    return losses


def _text_loss(model: MichiModel, text: torch.Tensor, distill: bool) -> torch.Tensor:
    """Next-token loss of the backbone on text-only rows ``[B, L]``: cross-entropy on the text, or
    with ``distill`` the KL from the backbone without its adapters (the pretrained weights)."""
    inputs = model.backbone.embed_tokens(text[:, :-1])
    log_probs = model.backbone.logits(model.backbone(inputs)).float().log_softmax(dim=-1)
    if not distill:
        return F.nll_loss(log_probs.flatten(0, 1), text[:, 1:].flatten())
    with torch.no_grad(), adapters_disabled(model.backbone):
        teacher = model.backbone.logits(model.backbone(inputs.detach())).float().log_softmax(dim=-1)
    return F.kl_div(log_probs, teacher, log_target=True, reduction="none").sum(dim=-1).mean()


def _speaking_total(losses: Losses, w: LossWeights) -> torch.Tensor:
    return (losses["monologue"] + losses["flow"] + w.text_lm * losses.get("text_lm", 0.0)
            + w.latent_readout * losses.get("readout", 0.0))


def speaking_losses(
    model: MichiModel, batch: Batch, text: torch.Tensor | None, g: torch.Generator, w: LossWeights,
    readout: nn.Module | None = None,
) -> Losses:
    with torch.no_grad():  # the listening head is pretrained and frozen here
        listen_embeds = model.listening(batch.user_wav)[0]
    losses = _speaking_terms(model, batch, listen_embeds, text, g, w.latent_input_noise, w.text_distill, readout)
    losses["total"] = _speaking_total(losses, w)
    return losses


def joint_losses(
    model: MichiModel, batch: Batch, text: torch.Tensor | None, g: torch.Generator, w: LossWeights,
    readout: nn.Module | None = None,
) -> Losses:
    listen_embeds, losses = _listening_terms(model, batch, w)
    losses.update(_speaking_terms(model, batch, listen_embeds, text, g, w.latent_input_noise, w.text_distill, readout))
    losses["total"] = losses["transcript"] + losses["speak"] + _speaking_total(losses, w)
    return losses


@dataclass(frozen=True)
class Stage:
    trainable: tuple[str, ...]  # MichiModel attributes whose parameters learn
    examples: Callable[..., list[Example]]
    losses: Callable[..., Losses]
    uses_text_lm: bool


STAGES: dict[str, Stage] = {
    "codec": Stage(("codec",), codec_examples, codec_losses, uses_text_lm=False),
    "listening": Stage(("listening",), listening_examples, listening_losses, uses_text_lm=False),
    # listening.to_backbone, the listening head's projection into the backbone's input, is trained
    # only where the backbone reads it: the listening stage's losses never reach it.
    # monologue: the flow head's monologue context, when the model has one.
    "speaking": Stage(("backbone", "latent_in", "flow", "monologue", "listening.to_backbone"), speaking_examples,
                      speaking_losses, uses_text_lm=True),
    "joint": Stage(("backbone", "latent_in", "flow", "monologue", "listening"), joint_examples, joint_losses,
                   uses_text_lm=True),
}


def set_trainable(model: MichiModel, stage: Stage) -> list[nn.Parameter]:
    """Freeze everything but the stage's modules; return the parameters that learn."""
    model.requires_grad_(False)
    for name in stage.trainable:
        if getattr(model, name, True) is None:  # an optional part this model does not have
            continue
        module = model.get_submodule(name)
        if name == "backbone" and model.config.lora is not None:
            # An adapted backbone learns through its adapters alone; its weights stay frozen.
            for param_name, param in module.named_parameters():
                param.requires_grad_(".lora_" in param_name)
        else:
            module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
