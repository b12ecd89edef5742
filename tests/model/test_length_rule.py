"""The length rule (``llmrec.data.lengths``) in every prompt builder, against references built
here without it: a prompt that fits is unchanged token for token; a 10,000-character title and
a 500-item history give prompts that fit ``max_length`` with the template, the target title and
every CF slot whole, the most recent history titles kept (as many as fit, found by a linear
scan here, by bisection in the code), and a ``max_length`` below the fixed template is refused.
"""

from __future__ import annotations

import functools

import pandas as pd
import pytest

from llmrec.data import make_synthetic
from llmrec.data.batching import make_examples
from llmrec.data.lengths import MAX_TITLE_TOKENS, PromptTooLong, TitleCutter
from llmrec.data.prompts import build_prompt
from llmrec.data.slots import ITEM_SLOT, USER_SLOT, encode_slotted
from llmrec.methods.allmrec.episodes import Episode, EpisodeCollator, allmrec_pieces
from llmrec.methods.collm.model import build_collm_pieces, make_collm_examples

LONG = "long " * 2000  # 10,000 characters


def long_title(item: int) -> str:
    return f"Title {item}: {LONG}"


@pytest.fixture(scope="module")
def world():
    """Synthetic rows, a copy with 10,000-character titles and 500-item histories, and a
    tiny tokenizer that learnt both."""
    from llmrec.llm import tiny_corpus
    from llmrec.tiny_llm import train_tiny_tokenizer

    data = make_synthetic(n_users=20, n_items=25, per_user=10, seed=2)
    normal = data["train"].iloc[:12].reset_index(drop=True)
    long = normal.iloc[:6].copy()
    long["title"] = [long_title(i) for i in long["iid"]]
    long["his"] = [[1 + (j + r) % 25 for j in range(500)] for r in range(len(long))]
    long["his_title"] = [[long_title(i) for i in his] for his in long["his"]]
    texts = tiny_corpus(data, "collm", 10) + [long_title(i) for i in range(1, 26)]
    return normal, long, train_tiny_tokenizer(texts, vocab_size=400)


def plain_ids(tok, text: str) -> list:
    return list(tok(text, add_special_tokens=True)["input_ids"])


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


@functools.cache
def _reference_cut(tok, title: str) -> str:
    if n_tokens(tok, title) <= MAX_TITLE_TOKENS:
        return title
    enc = tok(title, add_special_tokens=False, return_offsets_mapping=True)
    best = ""
    for start, _ in enc["offset_mapping"][1 : 2 * MAX_TITLE_TOKENS]:
        if n_tokens(tok, title[:start]) > MAX_TITLE_TOKENS:
            break
        best = title[:start]
    return best


def reference_cut(tok, title: str) -> str:
    """Step 1 by a scan from the start: the longest prefix of ``title`` ending where one of its
    tokens starts that has at most MAX_TITLE_TOKENS tokens."""
    return _reference_cut(tok, title)


def most_recent_that_fit(encode, history, max_length, size=len):
    """Steps 3 and 4 by a linear scan: the prompt of the most recent ``k`` entries for the
    largest ``k`` whose prompt and every shorter one fit."""
    best = None
    for k in range(len(history) + 1):
        ids = encode(history[len(history) - k :])
        if size(ids) > max_length:
            break
        best = (ids, k)
    assert best is not None, "nothing fits"
    return best


@pytest.mark.parametrize("template", ["cora", "collm"])
def test_a_prompt_that_fits_is_unchanged(world, template):
    normal, _, tok = world
    got = make_examples(normal, tok, template=template, max_his=10, max_length=512).input_ids
    want = [plain_ids(tok, build_prompt(h, t, template, 10))
            for h, t in zip(normal["his_title"], normal["title"])]  # fmt: skip
    assert got == want
    slotted = make_collm_examples(normal, tok, template="collm", max_his=10, max_length=512)
    assert slotted.input_ids == [
        encode_slotted(tok, build_collm_pieces(h, t, None, 10))[0]
        for h, t in zip(normal["his_title"], normal["title"])
    ]


def test_titles_are_cut_on_a_token_boundary(world):
    _, _, tok = world
    cut = TitleCutter(tok)
    for item in (1, 7, 25):
        title = long_title(item)
        assert cut(title) == reference_cut(tok, title)
        assert MAX_TITLE_TOKENS - 2 <= n_tokens(tok, cut(title)) <= MAX_TITLE_TOKENS
        assert title.startswith(cut(title)) and cut(title).startswith(f"Title {item}: long")
    assert cut("Toy Story (1995)") == "Toy Story (1995)"


@pytest.mark.parametrize("template", ["cora", "collm"])  # tallrec: the cora template
@pytest.mark.parametrize("max_length", [320, 640])
def test_long_titles_and_histories_fit_with_template_target_and_slots(world, template, max_length):
    _, long, tok = world
    max_his = 500
    if template == "collm":
        ex = make_collm_examples(long, tok, template="collm", max_his=max_his,
                                 max_length=max_length)  # fmt: skip

        def encode(his, target):
            return encode_slotted(tok, build_collm_pieces(his, target, None, max_his))[0]
    else:
        ex = make_examples(long, tok, template=template, max_his=max_his, max_length=max_length)

        def encode(his, target):
            return plain_ids(tok, build_prompt(his, target, template, max_his))

    kept = []
    for row, ids in enumerate(ex.input_ids):
        target = reference_cut(tok, long["title"][row])
        history = [reference_cut(tok, t) for t in long["his_title"][row]]
        want, k = most_recent_that_fit(lambda h, target=target: encode(h, target), history,
                                       max_length)  # fmt: skip
        assert ids == want  # the template whole: BOS first, the "#Answer:" tail last
        assert len(ids) <= max_length and ids[0] == tok.bos_token_id
        if template == "collm":  # both CF slots in every prompt
            assert ids.count(USER_SLOT) == 1 and ids.count(ITEM_SLOT) == 1
        kept.append(k)
    assert min(kept) > 0 and max(kept) < 500  # history was dropped, not all of it


def test_a_llmrec_prompts_keep_every_candidate_and_the_user_slot(world):
    import torch

    _, _, tok = world
    titles = {i: long_title(i) for i in range(1, 26)}
    coll = EpisodeCollator(tok, titles, torch.zeros(30, 4), max_his=500, max_length=1024)
    cut = {i: reference_cut(tok, t) for i, t in titles.items()}
    assert coll.titles == cut
    candidates = [3, 9, 14, 20, 25]
    # room for the longest candidate title (+ EOS) after the prompt
    room = max(len(tok(f' "{cut[i]}"', add_special_tokens=False)["input_ids"]) + 1
               for i in candidates)  # fmt: skip
    for his in ([1 + j % 25 for j in range(500)], [5, 6]):
        ep = Episode(0, his, candidates, 14)
        ids, items, n_prompt = coll.encode(ep, "target")
        (prompt, slot_items), k = most_recent_that_fit(
            lambda h: encode_slotted(tok, allmrec_pieces(h, candidates, cut, len(h))),
            his, 1024, size=lambda encoded: len(encoded[0]) + room,
        )  # fmt: skip
        assert ids[:n_prompt] == prompt and items == slot_items
        assert ids[n_prompt:] == coll.target_ids(14) and len(ids) <= 1024
        assert ids[:2] == [tok.bos_token_id, USER_SLOT] and ids.count(USER_SLOT) == 1
        assert items == [0, *his[len(his) - k :], *candidates]  # user, history, candidates
        assert ids.count(ITEM_SLOT) == k + len(candidates)
        assert 0 < k < 500 if len(his) == 500 else k == 2
        assert coll.encode(ep, "prompt")[0] == prompt  # the same history for scoring


def test_a_max_length_below_the_fixed_template_is_refused(world):
    normal, long, tok = world
    with pytest.raises(PromptTooLong, match=r"^--max-length 40 is too small: .* raise "
                       r"--max-length to at least \d+"):  # fmt: skip
        make_examples(normal, tok, template="cora", max_length=40)
    with pytest.raises(PromptTooLong, match="raise --max-length to at least"):
        make_collm_examples(long, tok, template="collm", max_length=100)
    frame = pd.DataFrame(long.iloc[:1])
    with pytest.raises(PromptTooLong) as refused:
        make_examples(frame, tok, max_length=100)
    needed = int(str(refused.value).rsplit(" ", 1)[1])  # the least --max-length named fits
    assert len(make_examples(frame, tok, max_length=needed).input_ids[0]) == needed
