"""Incremental detokenization with stop strings (`dzjax.serving.detokenize.TextStream`), with the
trained fixture's byte-level BPE tokenizer."""

import pytest
from transformers import AutoTokenizer

from conftest import fixture_dir
from dzjax.serving.detokenize import TextStream

TEXT = "Return the café's naïve résumé ✓ — then stop. After the stop, more text follows."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(fixture_dir("trained") / "base", local_files_only=True)


def feed(tokenizer, text, stop=()):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    stream = TextStream(tokenizer, out, stop)
    pieces = []
    for t in ids:
        out.append(t)
        piece, stopped = stream.push()
        pieces.append(piece)
        if stopped:
            return pieces, True, stream
    return pieces + [stream.rest()], False, stream


def test_pieces_add_up_to_the_whole_decode_and_never_split_a_character(tokenizer):
    pieces, stopped, stream = feed(tokenizer, TEXT)
    assert not stopped and "".join(pieces) == TEXT == stream.text
    assert len([p for p in pieces if p]) > 5
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["stop.", " then", "✓", "é's"])
def test_a_stop_string_ends_the_text_before_it_and_is_never_reported(tokenizer, stop):
    pieces, stopped, stream = feed(tokenizer, TEXT, (stop, "never in the text"))
    assert stopped
    assert "".join(pieces) == stream.text == TEXT[:TEXT.find(stop)]


def test_a_possible_start_of_a_stop_string_is_held_back_then_released(tokenizer):
    stop = "stop!"  # "stop" occurs, "stop!" never does
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    stream = TextStream(tokenizer, out, (stop,))
    reported, held = "", []
    for t in ids:
        out.append(t)
        piece, stopped = stream.push()
        reported += piece
        assert not stopped and stream.text.startswith(reported)
        tail = stream.text[len(reported):]
        assert stop.startswith(tail) and len(tail) < len(stop)  # only a possible start is held
        held.append(tail)
    assert "sto" in held or "stop" in held
    assert reported + stream.rest() == TEXT
