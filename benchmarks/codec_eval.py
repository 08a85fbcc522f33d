"""Is the codec intelligible? Whisper's WER on its reconstructions of held-out sentences.

The speaking head can only say what the codec can decode, so the codec is judged first: each
held-out sentence (``judge.HELD_OUT_SENTENCES``, never in any training corpus) is synthesised in
the bot's voice, encoded to one latent per 80 ms and decoded back by the checkpoint's codec, and
an independent ASR (faster-whisper tiny.en, int8) transcribes both the original and the
reconstruction; jiwer scores them against the sentence. Mel-cepstral distance (standard scale)
is printed beside the white-noise calibration (the input plus noise at 20 dB SNR). ``--voices``
adds other voices (e.g. a held-out one) to show how far the codec generalises beyond its voice.

    .venv/bin/python benchmarks/codec_eval.py --checkpoint runs/codec-slt
    .venv/bin/python benchmarks/codec_eval.py --checkpoint runs/codec-slt --voices slt,kal16 --twilio
    .venv/bin/python benchmarks/codec_eval.py --pca-start data/slt/manifest.jsonl --oracle   # the linear bound
    .venv/bin/python benchmarks/codec_eval.py --checkpoint runs/codec-slt --latent-noise 0.1,0.2,0.3

``--latent-noise`` decodes the true latents plus Gaussian noise of each RMS (the latents have a mean
square of 1): the decoder's margin, i.e. how close the speaking head's latents must come.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.config import CodecConfig, MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.spectral import CausalISTFT, synthesis_log_magnitude, synthesis_spectrum
from pipecat_michi.train.codec_init import init_spectral_codec_from_pca
from pipecat_michi.train.features import mel_cepstral_distance, white_noise_mcd
from pipecat_michi.train.judge import OfflineWhisper, fluent_speech, held_out_sentences, twilio_path, wer
from pipecat_michi.train.manifest import read_manifest

WHISPER_RATE_HZ = 16000


@torch.no_grad()
def reconstruct(
    model: MichiModel, audio: np.ndarray, noise_rms: float = 0.0, generator: torch.Generator | None = None
) -> np.ndarray:
    """Encode and decode ``audio`` (model rate) whole, aligned with it sample for sample: padded
    to whole frames (plus the decoder's delay, which is then cut from the front), trimmed back.
    ``noise_rms``: Gaussian noise of that std added to every latent component before decoding."""
    frame = model.config.frame_samples
    delay = model.config.codec.decoder_delay_samples
    wav = torch.from_numpy(audio).to(model.device, model.dtype)[None]
    wav = torch.nn.functional.pad(wav, (0, (-(wav.shape[1] + delay)) % frame + delay))
    latents = model.codec.encode(wav)
    if noise_rms > 0:
        latents = latents + (noise_rms * torch.randn(latents.shape, generator=generator)).to(latents)
    recon = model.codec.decode(latents)[0, delay : delay + audio.size]
    return recon.float().cpu().numpy()


@torch.no_grad()
def oracle_swaps(model: MichiModel, audio: np.ndarray) -> dict[str, np.ndarray]:
    """A spectral codec's reconstruction with one half of its inverse STFT's input swapped for
    the exact one (``spectral.synthesis_log_magnitude`` and the matching phases): which half,
    magnitudes or phases, keeps the speech from being understood."""
    cfg = model.config.codec
    wav = torch.from_numpy(audio)[None].float()
    wav = torch.nn.functional.pad(wav, (0, (-wav.shape[1]) % cfg.frame_samples))
    latents = model.codec.encode(wav.to(model.device, model.dtype))
    state = model.codec.decoder.init_state(1, model.device, model.dtype)
    _, spectrum, _ = model.codec.decoder.decode_stream_with_spectrum(latents, state)
    bins = cfg.n_fft // 2 + 1
    predicted_magnitude, predicted_phase = spectrum.float().cpu().split(bins, dim=1)
    exact_magnitude = synthesis_log_magnitude(wav, cfg.n_fft, cfg.stft_hop)
    exact_phase = synthesis_spectrum(wav, cfg.n_fft, cfg.stft_hop).angle()
    istft = CausalISTFT(cfg.n_fft, cfg.stft_hop)
    delay = cfg.decoder_delay_samples
    swaps = {"exact magnitudes, codec phases": (exact_magnitude, predicted_phase),
             "codec magnitudes, exact phases": (predicted_magnitude, exact_phase),
             "codec magnitudes, Griffin-Lim phases": (predicted_magnitude, griffin_lim_phase(predicted_magnitude, cfg))}
    return {name: istft(torch.cat(halves, dim=1))[0, delay : delay + audio.size].clamp(-1, 1).numpy()
            for name, halves in swaps.items()}


def griffin_lim_phase(log_magnitude: torch.Tensor, cfg: CodecConfig, iterations: int = 32) -> torch.Tensor:
    """Phases for ``log_magnitude [1, bins, J]`` by Griffin-Lim (offline, not causal): what the
    magnitudes alone carry, whatever a decoder makes of the phases."""
    istft = CausalISTFT(cfg.n_fft, cfg.stft_hop)
    delay = cfg.decoder_delay_samples
    phase = torch.rand(log_magnitude.shape, generator=torch.Generator().manual_seed(0)) * 2 * torch.pi
    for _ in range(iterations):
        wav = istft(torch.cat([log_magnitude, phase], dim=1))
        # The overlap-add lags its frames by ``delay``: re-analyse the signal where they began.
        aligned = torch.nn.functional.pad(wav[:, delay:], (0, delay))
        phase = synthesis_spectrum(aligned, cfg.n_fft, cfg.stft_hop).angle()
    return phase


def pca_started_model(manifest: Path, clips: int) -> MichiModel:
    """michi-nano with a fresh spectral codec started at the block PCA of ``manifest``'s first
    ``clips`` clips (as ``michi-train codec --fresh-codec`` starts one), before any training."""
    torch.manual_seed(0)
    model = MichiModel(MichiConfig.preset("michi-nano")).eval()
    entries = read_manifest(manifest)[:clips]
    waves = [torch.from_numpy(soundfile.read(e.audio, dtype="float32", always_2d=True)[0][:, e.channel].copy())
             for e in entries]
    init_spectral_codec_from_pca(model.codec, waves)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a MichiAI checkpoint; default: random michi-nano codec")
    parser.add_argument("--pca-start", type=Path, metavar="MANIFEST",
                        help="instead of a checkpoint: a fresh michi-nano codec started at the block PCA of "
                             "MANIFEST's first --pca-clips clips (the linear bound; with --oracle)")
    parser.add_argument("--pca-clips", type=int, default=256)
    parser.add_argument("--voices", default="slt", help="comma-separated; the first is the bot's voice (default slt)")
    parser.add_argument("--domain", choices=("everyday", "restaurant"), default="everyday",
                        help="held-out sentences: everyday or the demo's restaurant answers (train/restaurant.py)")
    parser.add_argument("--sentences", type=int, help="only the first N held-out sentences")
    parser.add_argument("--twilio", action="store_true", help="also score both through 8 kHz mu-law")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-dir", type=Path, help="write each original/reconstruction pair as WAV")
    parser.add_argument("--verbose", action="store_true", help="print every transcript")
    parser.add_argument("--oracle", action="store_true",
                        help="spectral codec: also score it with exact magnitudes or exact phases swapped in")
    parser.add_argument("--latent-noise", default="", metavar="RMS,...",
                        help="also decode the latents plus Gaussian noise of these RMS values (e.g. 0.1,0.2,0.3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    noise_levels = [float(v) for v in args.latent_noise.split(",") if v.strip()]
    generator = torch.Generator().manual_seed(0)

    if args.pca_start is not None:
        model, source = pca_started_model(args.pca_start, args.pca_clips), f"PCA start on {args.pca_start}"
    elif args.checkpoint is None:
        model, source = MichiModel(MichiConfig.preset("michi-nano")).eval(), "random-init michi-nano codec"
    else:
        model, source = load_checkpoint(args.checkpoint).eval(), str(args.checkpoint)
    if args.oracle and not model.config.codec.spectral:
        parser.error("--oracle swaps the inverse STFT's inputs: it needs a spectral codec")
    rate = model.config.sample_rate_hz
    judge = OfflineWhisper(cpu_threads=args.threads)
    sentences = held_out_sentences(args.domain)[: args.sentences]
    print(f"codec of {source}: {sum(p.numel() for p in model.codec.parameters()) / 1e6:.2f}M parameters, "
          f"{model.config.codec.latent_dim} floats per {model.config.codec.frame_ms:.0f} ms frame; "
          f"{len(sentences)} held-out sentences; judge: faster-whisper tiny.en")
    print(f"{'voice':<10} {'path':<7} {'WER original':>13} {'WER codec':>10} {'MCD dB':>7} {'noise20 MCD':>12}")
    for voice in [v.strip() for v in args.voices.split(",") if v.strip()]:
        originals, recons, mcds, noise_mcds, seconds, spent = [], [], [], [], 0.0, 0.0
        swapped: dict[str, list[np.ndarray]] = {}
        for i, text in enumerate(sentences):
            audio, source_rate = fluent_speech(text, voice)
            audio = soxr.resample(audio, source_rate, rate).astype(np.float32)
            audio = 0.7 * audio / max(float(np.abs(audio).max()), 1e-6)
            started = time.perf_counter()
            recon = reconstruct(model, audio)
            spent, seconds = spent + time.perf_counter() - started, seconds + audio.size / rate
            mcds.append(mel_cepstral_distance(torch.from_numpy(recon), torch.from_numpy(audio), rate))
            noise_mcds.append(white_noise_mcd(torch.from_numpy(audio), rate))
            originals.append(audio)
            recons.append(recon)
            if args.oracle:
                for name, clip in oracle_swaps(model, audio).items():
                    swapped.setdefault(name, []).append(clip)
            for rms in noise_levels:
                swapped.setdefault(f"latents + noise RMS {rms:g}", []).append(
                    reconstruct(model, audio, rms, generator))
            if args.save_dir is not None:
                args.save_dir.mkdir(parents=True, exist_ok=True)
                soundfile.write(args.save_dir / f"{voice}-{i:02d}-original.wav", audio, rate)
                soundfile.write(args.save_dir / f"{voice}-{i:02d}-codec.wav", recon, rate)
        paths = [("clean", lambda a: a)] + ([("twilio", lambda a: twilio_path(a, rate))] if args.twilio else [])
        for path, through in paths:
            heard = {kind: [judge.transcribe(soxr.resample(through(a), rate, WHISPER_RATE_HZ)) for a in clips]
                     for kind, clips in (("original", originals), ("codec", recons))}
            print(f"{voice:<10} {path:<7} {100 * wer(heard['original'], list(sentences)):>12.1f}% "
                  f"{100 * wer(heard['codec'], list(sentences)):>9.1f}% {np.mean(mcds):>7.2f} {np.mean(noise_mcds):>12.2f}")
            if args.verbose:
                for text, original, codec in zip(sentences, heard["original"], heard["codec"]):
                    print(f"    said:     {text}\n    original: {original}\n    codec:    {codec}")
        for name, clips in swapped.items():
            heard = [judge.transcribe(soxr.resample(clip, rate, WHISPER_RATE_HZ)) for clip in clips]
            print(f"{voice:<10} {'' if name.startswith('latents') else 'oracle: '}{name}: WER {100 * wer(heard, list(sentences)):.1f}%")
        print(f"{voice:<10} codec encode+decode {spent / seconds:.3f}x real time (whole clips, {args.threads} threads)")


if __name__ == "__main__":
    main()
