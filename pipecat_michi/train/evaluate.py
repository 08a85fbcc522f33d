"""Quality measures of a (partly) trained model: codec reconstruction and forced-TTS WER.

Forced TTS: the bot's inner monologue is injected frame by frame (as the text channel it was
trained on), the model speaks it over a silent user channel, and the listening head
transcribes the model's own speech; the word error rate against the injected text says whether
speaking and listening agree.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.codec import align_reconstruction, multi_resolution_stft_loss
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.tokenizer import Tokenizer, load_tokenizer
from pipecat_michi.textnorm import word_error_rate  # noqa: F401 (re-exported)
from pipecat_michi.train.features import mel_cepstral_distance, white_noise_mcd


@torch.no_grad()
def codec_quality(model: MichiModel, wav: torch.Tensor) -> dict[str, float]:
    """Reconstruct ``wav [B, F * frame_samples]``; STFT loss and mel-cepstral distance (dB), with
    the MCD of the input plus white noise at 20 dB SNR as a calibration point."""
    recon, wav = align_reconstruction(
        model.codec.decode(model.codec.encode(wav)), wav, model.config.codec.decoder_delay_samples
    )
    return {
        "stft_loss": float(multi_resolution_stft_loss(recon, wav)),
        "mcd_db": mel_cepstral_distance(recon, wav, model.config.sample_rate_hz),
        "noise20_mcd_db": white_noise_mcd(wav, model.config.sample_rate_hz),
    }


class _SilentCallSpeaker:
    """The duplex step over a silent caller, one frame at a time, as forced and paced speech share
    it: each step reads the previous text token and the model's own previous latent, samples the
    next latent in one flow step and keeps it; ``audio`` decodes what was said."""

    def __init__(self, model: MichiModel, max_frames: int, generator: torch.Generator) -> None:
        self.model, self.generator = model, generator
        self.cache = model.new_cache(1, capacity=max(max_frames, 16))
        silence = torch.zeros(1, max_frames * model.config.frame_samples, device=model.device, dtype=model.dtype)
        self.listen_embeds = model.listening(silence)[0]
        self.latent = torch.zeros(1, model.config.codec.latent_dim, device=model.device, dtype=model.dtype)
        self.latents: list[torch.Tensor] = []

    def step(self, t: int, prev_text: torch.Tensor) -> torch.Tensor:
        """Frame ``t`` after ``prev_text [1]``: its latent is kept; returns the backbone's hidden state."""
        model = self.model
        embeds = self.listen_embeds[:, t] + model.latent_in(self.latent) + model.backbone.embed_tokens(prev_text)
        hidden = model.backbone.forward_cached(embeds[:, None], self.cache, slice(0, 1))[:, 0]
        noise = torch.randn(1, model.config.codec.latent_dim, generator=self.generator)
        self.latent = model.flow.sample(hidden, noise.to(model.device, model.dtype))
        self.latents.append(self.latent)
        return hidden

    def audio(self) -> torch.Tensor:
        return self.model.codec.decode(torch.stack(self.latents, dim=1))[0]


def load_speaking_checkpoint(path: Path, flow_noise_scale: float | None = None) -> tuple[MichiModel, Tokenizer]:
    """A checkpoint for judging its speech, and its tokenizer; ``flow_noise_scale`` replaces the
    flow head's sampling temperature (its starting noise's scale)."""
    model = load_checkpoint(path).eval()
    if flow_noise_scale is not None:
        model.flow.config = model.flow.config.model_copy(update={"noise_scale": flow_noise_scale})
    return model, load_tokenizer(model.config, path)


@torch.no_grad()
def forced_speech(model: MichiModel, frame_text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Speak ``frame_text [F]`` (one inner-monologue token per frame) -> ``wav [F * frame_samples]``.

    The duplex step with its text channel forced and speaking always on; the user is silent.
    """
    speaker = _SilentCallSpeaker(model, frame_text.shape[0], generator)
    prev_text = torch.tensor([model.config.tokens.pad_id], device=model.device)
    for t in range(frame_text.shape[0]):
        speaker.step(t, prev_text)
        prev_text = frame_text[t: t + 1].to(model.device)
    return speaker.audio()


@torch.no_grad()
def paced_speech(
    model: MichiModel, tokens: list[int], generator: torch.Generator, max_frames: int, tail_frames: int = 12
) -> tuple[torch.Tensor, int]:
    """Speak ``tokens`` in the model's own time -> ``(wav [F * frame_samples], tokens said)``.

    Forced TTS, but the model paces it: whenever its text head predicts a token (not PAD), the
    next of ``tokens`` goes into the inner monologue in its place; while it predicts PAD, PAD
    does. It runs ``tail_frames`` past the step that asked for the last token, or ``max_frames``.
    """
    pad = torch.tensor([model.config.tokens.pad_id], device=model.device)
    speaker = _SilentCallSpeaker(model, max_frames, generator)
    prev_text, said, tail_left = pad, 0, None
    for t in range(max_frames):
        if tail_left is not None:  # the last token is in: speak ``tail_frames`` more frames
            if tail_left == 0:
                break
            tail_left -= 1
        hidden = speaker.step(t, prev_text)
        wants_a_token = int(model.backbone.logits(hidden).argmax(dim=-1)) != int(pad)
        if wants_a_token and said < len(tokens):
            prev_text = torch.tensor([tokens[said]], device=model.device)
            said += 1
            if said == len(tokens):
                tail_left = tail_frames
        else:
            prev_text = pad
    return speaker.audio(), said


@torch.no_grad()
def transcribe(model: MichiModel, tokenizer: Tokenizer, wav: torch.Tensor) -> str:
    """The listening head's streaming transcript of ``wav [F * frame_samples]``, PADs dropped."""
    logits = model.listening(wav[None].to(model.device, model.dtype))[1]
    if model.config.listening.transcript == "ctc":
        ids = model.listening.decode_transcript(logits, torch.zeros(1, dtype=torch.long, device=model.device))[0]
    else:
        ids = logits.argmax(dim=-1)
    ids = ids[0].tolist()
    specials = {tokenizer.tokens.pad_id, tokenizer.tokens.bos_id, tokenizer.tokens.eos_id}
    return tokenizer.decode([i for i in ids if i not in specials])
