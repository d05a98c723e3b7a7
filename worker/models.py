"""Architecture registry and model loading.

Algorithm code never spells `model.model.layers`: it asks the registry where a family keeps its
decoder layers, embeddings, final norm and head, and which Linears of a decoder layer read the same
input (so one Gram matrix serves the whole group).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from worker.linear_compress import CompensatedLinear

# Linears that read the same input, in the order a decoder layer runs them.
_LLAMA_LIKE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class UnsupportedArchitecture(ValueError):
    """The model's family is not in the registry."""


class ModelLoadError(ValueError):
    """A model folder Squeeze refuses to load (no safetensors, missing config, ...)."""


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its parts; paths are dotted attribute names from the CausalLM.

    There is no rotary-embedding or mask entry on purpose: the sequential pipeline records each
    decoder layer's keyword arguments (position embeddings, attention mask) from base_model's own
    forward, so per-family position logic (Gemma 3's local/global rotary, sliding windows) is never
    re-implemented here.
    """

    family: str
    model_types: tuple[str, ...]
    base_model: str = "model"  # runs embeddings, masks, rotary embeddings, layers, final norm
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    linear_groups: tuple[tuple[str, ...], ...] = _LLAMA_LIKE_GROUPS
    logit_softcapping: bool = False  # Gemma 2/3: logits = cap * tanh(logits / cap)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every compressible Linear of a decoder layer, relative to the layer."""
        return tuple(name for group in self.linear_groups for name in group)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _resolve(model, self.layers)

    def module(self, model: nn.Module, part: str) -> nn.Module:
        """One of base_model / embed_tokens / final_norm / lm_head."""
        return _resolve(model, getattr(self, part))

    def logits(self, model: nn.Module, hidden_states: Tensor) -> Tensor:
        """Logits from the last decoder layer's output: final norm, head, family post-processing."""
        logits = self.module(model, "lm_head")(self.module(model, "final_norm")(hidden_states))
        cap = getattr(model.config, "final_logit_softcapping", None) if self.logit_softcapping else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(family="llama", model_types=("llama",)),
    Architecture(family="mistral", model_types=("mistral",)),
    Architecture(family="qwen2", model_types=("qwen2",)),
    Architecture(family="qwen3", model_types=("qwen3",)),
    Architecture(family="gemma", model_types=("gemma",)),
    Architecture(family="gemma2", model_types=("gemma2",), logit_softcapping=True),
    # Gemma 3 text-only checkpoints (Gemma3ForCausalLM); the multimodal "gemma3" wrapper nests the
    # language model elsewhere and is not supported.
    Architecture(family="gemma3", model_types=("gemma3_text",), logit_softcapping=True),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for_type(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not supported; supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES)
    )


def get_architecture(model: nn.Module) -> Architecture:
    """The registry entry for a loaded CausalLM; checks that its layers hold the expected Linears."""
    arch = architecture_for_type(getattr(model.config, "model_type", "<none>"))
    try:
        layers = arch.decoder_layers(model)
        for name in arch.linear_names:
            if not isinstance(_resolve(layers[0], name), (nn.Linear, CompensatedLinear)):
                raise AttributeError(f"{name} is not an nn.Linear")
    except (AttributeError, IndexError) as exc:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) does not have the "
            f"{arch.family} layout this service expects: {exc}"
        ) from exc
    return arch


def decoder_linears(model: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    """Every compressible Linear of the model by full dotted name, layer by layer."""
    layers = arch.decoder_layers(model)
    return {
        f"{arch.layers}.{i}.{name}": _resolve(layer, name)
        for i, layer in enumerate(layers)
        for name in arch.linear_names
    }


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path), trust_remote_code=False)


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a local folder: safetensors only, no remote code, CPU, eval mode.
    dtype: the compute dtype, or "auto" for the checkpoint's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    check_model_folder(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    architecture_for_type(config.model_type)  # fail before reading gigabytes of weights
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model.eval()
    get_architecture(model)
    return model, load_tokenizer(folder)


def check_model_folder(folder: Path) -> None:
    """Refuse (ModelLoadError) a folder that is not a transformers model with safetensors weights."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; not a transformers model folder")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"; it has only pickle checkpoints ({', '.join(pickles)})" if pickles else ""
        raise ModelLoadError(
            f"{folder} has no .safetensors weights{found}. Squeeze loads safetensors only, because "
            "pickle files can run arbitrary code; convert the checkpoint with save_pretrained("
            "safe_serialization=True) first"
        )


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module
