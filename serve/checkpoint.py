"""Check a checkpoint the way a sovereign cluster needs it: local files only, safetensors only, no remote code.

A checkpoint is either a directory (a PVC mount) or a repository id found in the local Hugging Face cache
(`HF_HOME`); nothing is ever downloaded. The demo checkpoints and a real AMALIA checkpoint take exactly this path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served; the message names the path and what is wrong."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path  # the local directory the engine loads
    max_position_embeddings: int | None  # the checkpoint's own context limit, when its config states one


def resolve_checkpoint(model_path: str) -> Path:
    """Return the local directory holding `model_path`: the directory itself, or a snapshot in the HF cache."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint path {model_path!r} is a file, expected a directory")
    if model_path.count("/") == 1 and not model_path.startswith(("/", ".")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(model_path, local_files_only=True))
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"checkpoint {model_path!r} is not a directory and is not in the local Hugging Face cache "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); nothing is downloaded"
            ) from None
    raise CheckpointError(f"checkpoint directory {model_path!r} does not exist")


def inspect_checkpoint(model_path: str) -> CheckpointInfo:
    """Check that `model_path` holds a servable causal LM; raises CheckpointError naming the path and the problem.

    vLLM would fail on most of these too, but from inside its engine process and with a stack trace; this says it
    first, in one line, before any engine process starts.
    """
    # Set before transformers/huggingface_hub read it, so no code path can reach a hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = resolve_checkpoint(model_path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json: not a transformers checkpoint")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {path} has no *.safetensors weights (only safetensors are loaded)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable config.json: {exc}") from None
    # The architecture the checkpoint was saved as must be the causal-LM class of its model type: a BERT
    # encoder's model type has a causal-LM head class too, but its weights are not a generator.
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if causal_class is None or causal_class not in (config.architectures or []):
        raise CheckpointError(
            f"checkpoint {path} is a {config.model_type!r} model with architectures "
            f"{config.architectures}, not a causal language model"
        )
    context = getattr(config, "max_position_embeddings", None)
    logger.info("checkpoint %s: %s, context %s tokens", path, causal_class, context)
    return CheckpointInfo(path=path, max_position_embeddings=int(context) if context else None)
