"""Checkpoints load offline through one code path, and unservable ones fail with the path named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from amalia_serve.config import EngineConfig
from amalia_serve.model_loader import CheckpointError, load_checkpoint


def test_loader_loads_demo_checkpoint_as_causal_lm_with_chatml_template(demo_checkpoints: tuple[Path, Path]) -> None:
    loaded = load_checkpoint(str(demo_checkpoints[0]), EngineConfig())
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_key_value_heads < loaded.model.config.num_attention_heads  # GQA
    assert loaded.dtype == "float32" and loaded.device == "cpu"
    assert "<|im_start|>" in loaded.tokenizer.chat_template
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.max_model_len == loaded.model.config.max_position_embeddings


def test_loader_resolves_repo_id_from_local_hf_cache_when_offline(
    demo_checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "hub" / "models--amalia-llm--AMALIA-9B-0626-SFT"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(demo_checkpoints[0], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    # huggingface_hub reads HF_HUB_CACHE once at import; a replica gets it from its env before that.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_checkpoint("amalia-llm/AMALIA-9B-0626-SFT", EngineConfig())
    assert loaded.path == snapshot


def test_loader_names_path_when_checkpoint_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        load_checkpoint(str(tmp_path / "nope"), EngineConfig())


def test_loader_refuses_checkpoint_without_safetensors(demo_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "pickled"
    shutil.copytree(demo_checkpoints[0], ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"{ckpt}.*safetensors"):
        load_checkpoint(str(ckpt), EngineConfig())


def test_loader_refuses_checkpoint_that_is_not_a_causal_lm(demo_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "encoder"
    shutil.copytree(demo_checkpoints[0], ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match=rf"{ckpt}.*not a causal language model"):
        load_checkpoint(str(ckpt), EngineConfig())
