"""The training loop: one stage, resumable bit for bit, with progress bar and loss curves.

Resuming restores the weights, the optimizer, the step, the loss history and the state of the
one generator that draws all of training's randomness (batches, crops, flow noise and times),
so a resumed run computes the same next loss as one that never stopped.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from pipecat_michi.model.checkpoint import (
    TOKENIZER_FILE,
    load_checkpoint_with_adapters,
    load_gguf_backbone,
    save_checkpoint,
    save_gguf_tokenizer,
)
from pipecat_michi.model.codec import Codec
from pipecat_michi.model.flow_head import FlowHead
from pipecat_michi.model.config import BackboneLoraConfig, MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.runtime import resolve_device
from pipecat_michi.model.smollm2 import smollm2_gguf_file
from pipecat_michi.model.tokenizer import Tokenizer, load_tokenizer
from pipecat_michi.train.adversarial import Adversary
from pipecat_michi.train.config import TrainConfig
from pipecat_michi.train.data import ExampleBuilder, sample_batch, split_entries
from pipecat_michi.train.manifest import read_manifest
from pipecat_michi.train.plot import plot_losses
from pipecat_michi.train.augment import Augmenter
from pipecat_michi.train.codec_init import init_spectral_codec_from_pca
from pipecat_michi.train.distill import Teacher
from pipecat_michi.train.lora import attach_lora, load_adapters
from pipecat_michi.train.stages import STAGES, LossWeights, set_trainable

TRAIN_STATE_FILE = "train_state.pt"
LOSSES_FILE = "losses.jsonl"
CURVES_FILE = "loss_curves.png"


class TextStream:
    """Plain text for the LM batches that keep the backbone's text ability: the corpus's
    sentences, end-of-text separated, read as random windows."""

    def __init__(self, texts: list[str], tokenizer: Tokenizer) -> None:
        ids: list[int] = []
        for text in texts:
            ids += tokenizer.encode(text) + [tokenizer.tokens.eos_id]
        self.ids = torch.tensor(ids, dtype=torch.long)

    def sample(self, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        ids = self.ids.repeat(-(-(length + 1) // len(self.ids)))  # a short corpus wraps around
        starts = torch.randint(len(ids) - length + 1, (batch_size,), generator=generator)
        return torch.stack([ids[s: s + length] for s in starts.tolist()])


def read_text_documents(path: Path) -> list[str]:
    """The ``text`` of each line of a JSONL file (blank lines skipped)."""
    documents = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            documents.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a JSON object with a 'text' field ({error})") from None
    if not documents:
        raise ValueError(f"{path} has no text documents")
    return documents


def build_model(config: TrainConfig) -> tuple[MichiModel, Path | None]:
    """The model to train and the folder it came from (where an ``hf`` tokenizer lies)."""
    if config.resume and (config.out_dir / TRAIN_STATE_FILE).is_file():
        return _with_adapters(config, *load_checkpoint_with_adapters(config.out_dir)), config.out_dir
    if config.init is not None:
        logger.info(f"initialising from checkpoint {config.init}")
        model = _with_adapters(config, *load_checkpoint_with_adapters(config.init))
        if config.fresh_codec:
            replace_codec(model, MichiConfig.preset(config.preset), config.seed)
        return with_monologue_context(model, config.monologue_tokens, config.seed), config.init
    torch.manual_seed(config.seed)
    preset = MichiConfig.preset(config.preset)
    if config.monologue_tokens:
        preset = preset.model_copy(update={"flow": preset.flow.model_copy(
            update={"monologue_tokens": config.monologue_tokens})})
    model = MichiModel(preset)
    whisper_source = whisper_weights_source(config, model)
    if whisper_source is not None:
        logger.info(f"initialising the Whisper listening head from {whisper_source}")
        model.listening.load_whisper(whisper_source)
    if config.backbone_gguf is None:
        return _with_adapters(config, model, {}), None
    logger.info(f"loading backbone weights from {config.backbone_gguf}")
    load_gguf_backbone(model, config.backbone_gguf)
    # Recorded so an export can ship the trained parts only and loading finds the backbone again.
    source = "smollm2" if _is_smollm2_package_file(config.backbone_gguf) else str(config.backbone_gguf)
    model.config = model.config.model_copy(update={"backbone_weights": source})
    save_gguf_tokenizer(config.backbone_gguf, config.out_dir)
    return _with_adapters(config, model, {}), config.out_dir


def _with_adapters(config: TrainConfig, model: MichiModel, adapters: dict[str, torch.Tensor]) -> MichiModel:
    """``model`` with its backbone adapters attached (peft) and loaded: the checkpoint's, or
    fresh ones when ``--lora-rank`` asks for them. Without either, the model as it is."""
    lora = model.config.lora
    if config.lora_rank is not None:
        wanted = BackboneLoraConfig(rank=config.lora_rank, alpha=config.lora_alpha)
        if lora is not None and lora != wanted:
            raise ValueError(f"the checkpoint's backbone adapters are {lora}; --lora-rank asks for {wanted}")
        lora = wanted
    if lora is None:
        return model
    attach_lora(model, lora, config.seed)
    if adapters:
        load_adapters(model, adapters)
    return model


def replace_codec(model: MichiModel, preset: MichiConfig, seed: int) -> None:
    """Swap ``model``'s codec for a freshly initialised one of ``preset``'s shape, with fresh
    latent projection and flow head (the preset's objective too): both live in the codec's
    latent space, which a new codec redefines (and may resize). The flow head's configuration
    is the preset's, not the checkpoint's: a checkpoint from before MeanFlow kept its rectified
    head, whose one-step samples are the conditional mean."""
    codec_config, flow_config = preset.codec, preset.flow
    logger.info(f"replacing the codec (and the latent projection and flow head) with fresh ones: {codec_config}")
    torch.manual_seed(seed)
    device, dtype = model.device, model.dtype
    model.config = model.config.model_copy(update={"codec": codec_config, "flow": flow_config})
    model.codec = Codec(codec_config).to(device, dtype)
    model.latent_in = torch.nn.Linear(codec_config.latent_dim, model.config.backbone.hidden_size).to(device, dtype)
    # The new input branch grows from zero, as it should into a pretrained backbone: at its default
    # initialisation it added ~4x a token embedding's norm and drowned the text it must follow.
    torch.nn.init.zeros_(model.latent_in.weight)
    torch.nn.init.zeros_(model.latent_in.bias)
    model.flow = FlowHead(flow_config, codec_config.latent_dim, model.config.backbone.hidden_size).to(device, dtype)
    model.monologue = _to(MichiModel.new_monologue_context(model.config), device, dtype)


def _to(module: torch.nn.Module | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    return None if module is None else module.to(device, dtype)


def with_monologue_context(model: MichiModel, tokens: int | None, seed: int) -> MichiModel:
    """Give the flow head a fresh monologue context of ``tokens`` (``--monologue-tokens``; its last
    layer at zero, so the model speaks as before until it learns). A model that has one keeps it;
    asking for another size is an error, not a silent replacement."""
    have = model.config.flow.monologue_tokens
    if tokens is None or tokens == have:
        return model
    if have:
        raise ValueError(f"the checkpoint's flow head has a monologue context of {have} tokens; "
                         f"--monologue-tokens asks for {tokens}")
    logger.info(f"adding a monologue context of {tokens} tokens to the flow head")
    model.config = model.config.model_copy(
        update={"flow": model.config.flow.model_copy(update={"monologue_tokens": tokens})})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.monologue = _to(MichiModel.new_monologue_context(model.config), model.device, model.dtype)
    return model


def _is_smollm2_package_file(path: Path) -> bool:
    try:
        return Path(path).resolve() == smollm2_gguf_file().resolve()
    except FileNotFoundError:
        return False


def whisper_weights_source(config: TrainConfig, model: MichiModel) -> str | None:
    """Where a Whisper listening head's weights come from: the flag, else the preset's."""
    if model.config.listening.kind != "whisper":
        return None
    return config.whisper_weights or model.config.listening.whisper_weights


class Trainer:
    """Runs ``config.steps`` optimiser steps of one stage, checkpointing into ``config.out_dir``."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        config.out_dir.mkdir(parents=True, exist_ok=True)
        self.model, model_dir = build_model(config)
        self.model.to(resolve_device(config.device))
        model_config = self.model.config
        self.tokenizer = load_tokenizer(model_config, model_dir)
        # Where the checkpoint's tokenizer.json comes from; the byte tokenizer needs no file.
        self.tokenizer_dir = model_dir if model_config.tokenizer == "hf" else None
        self.stage = STAGES[config.stage]
        entries = read_manifest(config.manifest)
        listening = model_config.listening
        builder = ExampleBuilder(
            self.tokenizer, model_config.frame_samples, model_config.sample_rate_hz,
            ctc_alphabet=listening.ctc_alphabet if listening.transcript == "ctc" else None,
        )
        self.examples = self.stage.examples(builder, *split_entries(entries))
        if not self.examples:
            raise ValueError(f"manifest {config.manifest} has no examples for the {config.stage} stage")
        use_text = self.stage.uses_text_lm and config.text_lm_weight > 0
        if config.text_distill and self.model.config.lora is None:
            raise ValueError("--text-distill learns from the backbone without its adapters: it needs --lora-rank")
        texts = [e.text for e in entries] if config.text_file is None else read_text_documents(config.text_file)
        self.text = TextStream(texts, self.tokenizer) if use_text else None
        self.weights = LossWeights(
            mel=config.mel_weight, text_lm=config.text_lm_weight, transcript_lag_frames=config.transcript_lag_frames,
            distill=config.distill_weight, distill_lag_tokens=config.distill_lag_tokens,
            codec_context_frames=config.codec_context_frames, codec_magnitude=config.codec_magnitude_weight,
            latent_input_noise=config.latent_input_noise, text_distill=config.text_distill,
            latent_readout=config.latent_readout_weight,
        )
        if self._starts_a_spectral_codec():
            init_spectral_codec_from_pca(
                self.model.codec, [e.user_wav.to(self.model.device) for e in self.examples[: config.codec_pca_clips]]
            )
        self.stage_extras: dict[str, object] = {}
        if config.stage == "listening":
            self.stage_extras["augmenter"] = Augmenter(
                model_config.sample_rate_hz, config.telephone_prob, config.noise_prob,
                room_prob=config.room_prob, colour_prob=config.colour_prob,
            )
            whisper_source = whisper_weights_source(config, self.model)
            if whisper_source is not None and config.distill_weight > 0:
                self.stage_extras["teacher"] = Teacher(
                    model_config.listening, whisper_source, model_config.sample_rate_hz
                ).to(self.model.device)
        # Speaking/joint: a linear readout of the next latent from the backbone's state, trained
        # beside the flow head and dropped after (not part of the model).
        self.readout: torch.nn.Linear | None = None
        if config.latent_readout_weight > 0 and config.stage in ("speaking", "joint"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.readout = torch.nn.Linear(model_config.backbone.hidden_size, model_config.codec.latent_dim)
            self.readout.to(self.model.device)
            self.stage_extras["readout"] = self.readout
        trainable = set_trainable(self.model, self.stage)
        if self.readout is not None:
            trainable += list(self.readout.parameters())
        if config.freeze_codec_encoder:
            self.model.codec.encoder.requires_grad_(False)
            trainable = [p for p in trainable if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self._param_groups(trainable), lr=config.lr, weight_decay=config.weight_decay
        )
        self.adversary: Adversary | None = None
        if config.adversarial:
            if config.stage != "codec":
                raise ValueError("--adversarial trains the codec's decoder: use it with the codec stage")
            self.adversary = Adversary(
                lr=config.lr, start_step=config.adversarial_start_step, weight=config.adversarial_weight,
                feature_weight=config.feature_match_weight, channels=config.discriminator_channels,
                scales=config.discriminator_scales, warmup_steps=config.discriminator_warmup_steps,
            ).to(self.model.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history: list[dict[str, float]] = []
        if config.resume and (config.out_dir / TRAIN_STATE_FILE).is_file():
            self._load_state()

    def _starts_a_spectral_codec(self) -> bool:
        """Whether this run trains a spectral codec from its random initialisation."""
        config = self.config
        resuming = config.resume and (config.out_dir / TRAIN_STATE_FILE).is_file()
        fresh = config.fresh_codec or config.init is None
        return (config.stage == "codec" and fresh and not resuming and config.codec_pca_clips > 0
                and self.model.config.codec.spectral)

    def _param_groups(self, trainable: list[torch.nn.Parameter]) -> list[dict]:
        """Pretrained parameters (the Whisper encoder body) at ``lr``, the flow head (and the
        latent readout) at ``lr * flow_lr_scale`` (its own group only when that is not 1, so earlier runs resume),
        the rest at ``lr * new_parts_lr_scale``; each group's scale survives in the optimizer state."""
        listening = self.model.listening
        pretrained_ids = set()
        if self.model.config.listening.kind == "whisper":
            pretrained_ids = {id(p) for p in listening.encoder.parameters()}
        flow_parts = list(self.model.flow.parameters()) + ([] if self.readout is None else list(self.readout.parameters()))
        if self.model.monologue is not None:  # part of the flow head's condition
            flow_parts += list(self.model.monologue.parameters())
        flow_ids = {id(p) for p in flow_parts} if self.config.flow_lr_scale != 1.0 else set()
        pretrained = [p for p in trainable if id(p) in pretrained_ids]
        flow = [p for p in trainable if id(p) in flow_ids]
        new = [p for p in trainable if id(p) not in pretrained_ids | flow_ids]
        groups = [{"params": pretrained, "lr_scale": 1.0}, {"params": flow, "lr_scale": self.config.flow_lr_scale},
                  {"params": new, "lr_scale": self.config.new_parts_lr_scale}]
        return [g for g in groups if g["params"]]

    def train(self) -> list[dict[str, float]]:
        """Train up to ``config.steps``; return the loss history (all steps, resumed ones too)."""
        self.model.train()
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True)
        while self.step < cfg.steps:
            row = self.train_step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "step"})
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save()
        bar.close()
        self.save()
        return self.history

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * self._lr_factor()
        frames = cfg.codec_context_frames + cfg.codec_frames if cfg.stage == "codec" else cfg.max_frames
        # Drawn on the CPU by the one generator (resumable), then moved to the model's device.
        device = self.model.device
        batch = sample_batch(
            self.examples, cfg.batch_size, frames, self.model.config.frame_samples, self.generator
        ).to(device)
        text = None if self.text is None else self.text.sample(cfg.text_batch_size, cfg.text_tokens, self.generator)
        text = None if text is None else text.to(device)
        extra = {"adversary": self.adversary, "step": self.step} if self.adversary is not None else {}
        extra.update(self.stage_extras)
        losses = self.stage.losses(self.model, batch, text, self.generator, self.weights, **extra)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(
            [p for group in self.optimizer.param_groups for p in group["params"]], cfg.grad_clip
        )
        self.optimizer.step()
        self.step += 1
        row = {"step": self.step, **{k: float(v.detach()) for k, v in losses.items()}}
        self.history.append(row)
        return row

    def _lr_factor(self) -> float:
        cfg = self.config
        factor = min(1.0, (self.step + 1) / max(cfg.warmup_steps, 1))
        if cfg.lr_schedule == "cosine":
            factor *= 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(self.step / cfg.steps, 1.0)))
        return factor

    def save(self) -> Path:
        """Write the checkpoint (weights + config + tokenizer), training state, losses and PNG."""
        out = save_checkpoint(self.model, self.config.out_dir)
        if self.tokenizer_dir is not None and self.tokenizer_dir.resolve() != out.resolve():
            shutil.copy(self.tokenizer_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": self.history,
                "train_config": self.config.model_dump(mode="json"),
                "adversary": self.adversary.state_dict() if self.adversary is not None else None,
                "readout": self.readout.state_dict() if self.readout is not None else None,
            },
            out / TRAIN_STATE_FILE,
        )
        (out / LOSSES_FILE).write_text("".join(json.dumps(row) + "\n" for row in self.history))
        if self.history:
            plot_losses(self.history, out / CURVES_FILE, f"{self.config.stage} ({self.model.config.name})")
        logger.info(f"{self.config.stage}: step {self.step} saved to {out}")
        return out

    def _load_state(self) -> None:
        # On the CPU: the generator state must be a CPU tensor; the optimizer moves its own state
        # to its parameters' device.
        state = torch.load(self.config.out_dir / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
        if (self.readout is None) != (state.get("readout") is None):
            trained = "without" if self.readout is not None else "with"
            raise ValueError(f"{self.config.out_dir} was trained {trained} --latent-readout-weight; resume it the same way")
        if self.readout is not None:
            self.readout.load_state_dict(state["readout"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.history = state["history"]
        if self.adversary is not None:
            if state.get("adversary") is None:
                raise ValueError(f"{self.config.out_dir} was trained without --adversarial; resume it the same way")
            self.adversary.load_state_dict(state["adversary"])
        logger.info(f"{self.config.stage}: resumed at step {self.step} from {self.config.out_dir}")
