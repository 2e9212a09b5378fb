"""Checkpoints are checked offline on one code path before vLLM loads them; unservable ones fail with the path named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from amalia_serve.checkpoint import CheckpointError, inspect_checkpoint


def test_demo_checkpoint_is_shaped_like_amalia(demo_checkpoints: tuple[Path, Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    info = inspect_checkpoint(str(demo_checkpoints[0]))
    config = AutoConfig.from_pretrained(info.path)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.head_dim == 128  # AMALIA's; vLLM's CPU attention refuses small heads
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert str(config.dtype).removeprefix("torch.") == "bfloat16"  # as AMALIA's checkpoints are stored
    assert info.max_position_embeddings == config.max_position_embeddings
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(info.path).chat_template


def test_checkpoint_resolves_repo_id_from_local_hf_cache_when_offline(
    demo_checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "hub" / "models--amalia-llm--AMALIA-9B-0626-SFT"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(demo_checkpoints[0], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    # huggingface_hub reads HF_HUB_CACHE once at import; a replica gets it from its env before that.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    info = inspect_checkpoint("amalia-llm/AMALIA-9B-0626-SFT")
    assert info.path == snapshot


def test_checkpoint_names_path_when_checkpoint_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        inspect_checkpoint(str(tmp_path / "nope"))


def test_checkpoint_refuses_checkpoint_without_safetensors(demo_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "pickled"
    shutil.copytree(demo_checkpoints[0], ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"{ckpt}.*safetensors"):
        inspect_checkpoint(str(ckpt))


def test_checkpoint_refuses_checkpoint_that_is_not_a_causal_lm(demo_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "encoder"
    shutil.copytree(demo_checkpoints[0], ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match=rf"{ckpt}.*not a causal language model"):
        inspect_checkpoint(str(ckpt))
