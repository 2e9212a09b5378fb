"""Streaming text assembly: multi-byte characters survive token splits, stop strings never leak."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from amalia_serve.detokenizer import IncrementalDetokenizer, StopStringMatcher

TEXT = "Ação, coração e informação: três canções do Porto à Nazaré, com açúcar e maçã. 😀 Olá!"


def test_detokenizer_never_emits_a_broken_character_when_bytes_split_across_tokens(
    demo_checkpoints: tuple[Path, Path],
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoints[0])
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # The byte-level tokenizer splits the emoji into bytes: token-by-token decoding would break it.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT


def test_stop_matcher_holds_back_prefix_then_releases_it_when_no_stop_follows() -> None:
    matcher = StopStringMatcher(("FIM",))
    assert matcher.feed("olá F") == ("olá ", False)
    assert matcher.feed("I") == ("", False)
    assert matcher.feed("x") == ("FIx", False)
    assert matcher.finish() == ""


def test_stop_matcher_cuts_text_at_earliest_stop_when_split_across_deltas() -> None:
    matcher = StopStringMatcher(("###", "FIM"))
    assert matcher.feed("abc F") == ("abc ", False)
    assert matcher.feed("IM ###") == ("", True)


def test_stop_matcher_flushes_held_tail_when_generation_ends_for_length() -> None:
    matcher = StopStringMatcher(("FIM",))
    assert matcher.feed("até ao F") == ("até ao ", False)
    assert matcher.finish() == "F"
