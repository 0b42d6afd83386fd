"""Token-aware chunking: the splitter's properties, and the encoders' token spans it runs on."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from indexer.chunking import Chunk, Span, split_text
from models.encoder import Chunkable
from models.loading import load_encoder

# A stand-in tokenizer: every word, and every CJK character or punctuation mark, is a token.
_TOKEN = re.compile(r"[\u3000-\u9fff\uff00-\uffef]|[^\s\u3000-\u9fff\uff00-\uffef]+")


def word_spans(text: str) -> list[Span]:
    return [m.span() for m in _TOKEN.finditer(text)]


ENGLISH = " ".join(
    f"Sentence {i} says the patient took {i} mg of aspirin and felt better after rest." for i in range(40)
)
CHINESE = "".join(f"第{i}位患者服用阿司匹林后胸痛缓解，血压平稳。" for i in range(40))
NO_SENTENCES = " ".join(f"word{i}" for i in range(500))
TEXTS = [ENGLISH, CHINESE, NO_SENTENCES, ENGLISH + "\n\n" + CHINESE, "  " + ENGLISH + "  \n"]
BUDGETS = [(16, 0), (16, 4), (50, 10), (64, 63), (7, 3)]


def tokens_in(chunk: Chunk, spans: Sequence[Span]) -> list[int]:
    return [i for i, (s, e) in enumerate(spans) if chunk.start <= s and e <= chunk.end]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("max_tokens", "overlap"), BUDGETS)
def test_chunks_cover_the_text_within_budget_overlapping_by_the_overlap(
    text: str, max_tokens: int, overlap: int
) -> None:
    spans = word_spans(text)
    chunks = split_text(text, word_spans, max_tokens, overlap)
    assert len(chunks) > 1
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    covered: set[int] = set()
    previous: list[int] = []
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        tokens = tokens_in(chunk, spans)
        assert 0 < len(tokens) <= max_tokens
        assert tokens == list(range(tokens[0], tokens[-1] + 1))  # contiguous, in order
        assert len(word_spans(chunk.text)) == len(tokens)  # re-tokenized alone: the same count
        if previous:
            assert tokens[0] == previous[-1] + 1 - overlap
        covered.update(tokens)
        previous = tokens
    assert covered == set(range(len(spans)))
    # Only whitespace between chunks is in none of them.
    outside = set(range(len(text))) - {i for c in chunks for i in range(c.start, c.end)}
    assert all(text[i].isspace() for i in outside)


@pytest.mark.parametrize(("text", "ends"), [(ENGLISH, "."), (CHINESE, "。")])
def test_windows_end_at_sentence_ends(text: str, ends: str) -> None:
    chunks = split_text(text, word_spans, 40, 8)
    assert all(c.text.rstrip().endswith(ends) for c in chunks)
    # A chunk reaches the last sentence end in its window: each holds at least half its budget.
    assert all(len(word_spans(c.text)) >= 20 for c in chunks[:-1])


def test_a_line_break_is_a_sentence_end() -> None:
    text = "\n".join(f"line {i} without a stop mark but a line break" for i in range(30))
    chunks = split_text(text, word_spans, 30, 5)
    assert all(text[c.end] == "\n" for c in chunks[:-1])


def test_decimal_points_are_not_sentence_ends() -> None:
    text = " ".join(["dose 2.5 mg"] * 40)
    spans = [m.span() for m in re.finditer(r"\d|[.]|[^\s\d.]+", text)]  # '2', '.', '5' are tokens
    for chunk in split_text(text, lambda _t: spans, 10, 2):
        assert not chunk.text.endswith(("2.", "2"))  # cut at a space, not inside 2.5


def test_without_sentence_ends_windows_fill_their_budget_at_word_boundaries() -> None:
    chunks = split_text(NO_SENTENCES, word_spans, 32, 4)
    assert all(len(word_spans(c.text)) == 32 for c in chunks[:-1])


def test_a_text_within_budget_is_one_chunk_equal_to_the_text() -> None:
    for text in ["", "  ", "胸痛。", "short text. two sentences."]:
        assert split_text(text, word_spans, 8, 2) == [Chunk(index=0, text=text, start=0, end=len(text))]
    exactly = " ".join(["w"] * 8)
    assert split_text(exactly, word_spans, 8, 0) == [Chunk(0, exactly, 0, len(exactly))]


def test_the_chunks_of_a_short_text_worked_by_hand() -> None:
    # 8 tokens, 4 a window, 1 shared: each window ends at its last sentence end, and the next starts
    # on the window's last token.
    assert split_text("A b. C d. E f. G h.", word_spans, 4, 1) == [
        Chunk(0, "A b. C d.", 0, 9),
        Chunk(1, "d. E f.", 7, 14),
        Chunk(2, "f. G h.", 12, 19),
    ]
    # A sentence end in the first half of a window is passed over: the window fills its budget to a
    # space instead of leaving more than half of it empty.
    assert split_text("One two three. four five six seven eight nine ten eleven.", word_spans, 9, 0) == [
        Chunk(0, "One two three. four five six seven eight nine", 0, 45),
        Chunk(1, "ten eleven.", 46, 57),
    ]
    # One token a character: 。 ends a sentence, the full-width comma does not, so the third window,
    # with no sentence end in its second half, fills its budget (6 tokens) up to a character.
    assert split_text("胸痛三天。血压高。头晕，乏力。", word_spans, 6, 2) == [
        Chunk(0, "胸痛三天。", 0, 5),
        Chunk(1, "天。血压高。", 3, 9),
        Chunk(2, "高。头晕，乏", 7, 13),
        Chunk(3, "，乏力。", 11, 15),
    ]


def test_chinese_text_splits_between_characters_within_budget() -> None:
    text = "患者胸痛三天伴出汗" * 30  # no punctuation at all
    chunks = split_text(text, word_spans, 25, 5)
    assert "".join(c.text for c in chunks[:1]) == text[:25]
    assert all(len(c.text) <= 25 for c in chunks)
    assert [c.start for c in chunks] == list(range(0, 20 * len(chunks), 20))


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (4, 4), (4, -1)])
def test_impossible_budgets_are_refused(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        split_text(ENGLISH, word_spans, max_tokens, overlap)


# --- the encoders' side -------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gemma", "tiny_embedder", "tiny_onnx"])
def test_encoders_give_token_spans_of_the_raw_text_and_their_text_budget(
    model: str, request: pytest.FixtureRequest
) -> None:
    encoder = load_encoder(Path(request.getfixturevalue(model)), device="cpu")
    assert isinstance(encoder, Chunkable)
    text = "胸痛 three days.\n血压 ok"
    spans = encoder.token_spans(text)
    # The tiny tokenizers read one character per token, skipping whitespace; no specials, no prompt.
    assert [text[s:e] for s, e in spans] == [ch for ch in text if not ch.isspace()]
    long_text = "字" * (3 * encoder.manifest.max_tokens)
    assert len(encoder.token_spans(long_text)) == len(long_text)  # never truncated
    # A text of exactly the budget fills the encoder's input without being cut.
    budget = encoder.text_budget
    assert 0 < budget < encoder.manifest.max_tokens
    assert encoder.count_tokens(["字" * budget]) == [encoder.manifest.max_tokens]
    assert encoder.count_tokens(["字" * (budget + 1)]) == [encoder.manifest.max_tokens]


def test_the_prompt_is_taken_out_of_the_budget(tiny_bert: Path, tiny_embedder: Path) -> None:
    plain = load_encoder(tiny_bert, device="cpu")
    prompted = load_encoder(tiny_embedder, device="cpu")
    assert isinstance(plain, Chunkable) and isinstance(prompted, Chunkable)

    def prompt_tokens(encoder: Chunkable) -> int:  # one per non-space character
        return len([ch for ch in encoder.manifest.render("") if not ch.isspace()])

    assert prompt_tokens(prompted) > prompt_tokens(plain)
    assert plain.text_budget - prompted.text_budget == prompt_tokens(prompted) - prompt_tokens(plain)
    specials = 2  # <s> and </s>
    assert plain.text_budget == plain.manifest.max_tokens - prompt_tokens(plain) - specials


def test_chunks_of_a_long_text_fit_the_encoder(tiny_gemma: Path) -> None:
    encoder = load_encoder(tiny_gemma, device="cpu")
    assert isinstance(encoder, Chunkable)
    text = "患者胸痛三天。" * 100
    chunks = split_text(text, encoder.token_spans, encoder.text_budget, 8)
    assert len(chunks) > 1
    counts = encoder.count_tokens([c.text for c in chunks])
    assert all(n <= encoder.manifest.max_tokens for n in counts)
    assert all(c.text.endswith("。") for c in chunks)
