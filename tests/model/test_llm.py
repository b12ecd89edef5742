"""``llmrec.llm``: the one answer-token definition on real tokenizer families (built offline),
the decoder body and the answer logit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tolerance import assert_close_to_oracle

from llmrec.llm import ANSWER_CONTEXT, answer_logit, answer_token_ids, decoder_body

transformers = pytest.importorskip("transformers")

CORPUS = [
    f'Movie {i} rated by the user. Answer with "Yes" or "No". \n{ANSWER_CONTEXT} {a}'
    for i in range(200)
    for a in ("Yes", "No")
]


def _continuation(tok, word):
    base = tok(ANSWER_CONTEXT, add_special_tokens=False)["input_ids"]
    full = tok(f"{ANSWER_CONTEXT} {word}", add_special_tokens=False)["input_ids"]
    assert full[: len(base)] == base
    return full[len(base) :]


def byte_level_bpe():
    """A GPT-2 / LLaMA-3 / Qwen2 style tokenizer: byte-level BPE, no prefix space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def sentencepiece_bpe(tmp_path):
    """A LLaMA-2 / Vicuna style tokenizer: a SentencePiece model (``▁`` marks a space)."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=120, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    model_dir = tmp_path / "llama-tokenizer"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(Path(str(prefix) + ".model").read_bytes())
    return transformers.LlamaTokenizer.from_pretrained(str(model_dir))


def test_byte_level_bpe_answer_is_the_spaced_token():
    tok = byte_level_bpe()
    yes, no = answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["ĠYes", "ĠNo"]
    # the token the model emits after "#Answer:" is " Yes", not the bare word "Yes"
    assert _continuation(tok, "Yes") == [yes]
    assert tok("Yes", add_special_tokens=False)["input_ids"][0] != yes


def test_sentencepiece_answer_is_the_word_start_piece(tmp_path):
    tok = sentencepiece_bpe(tmp_path)
    yes, no = answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["▁Yes", "▁No"]
    assert _continuation(tok, "Yes")[0] == yes


def test_added_answer_words_skip_the_shared_space_token():
    # the tiny LLM's tokenizer adds "Yes" / "No" as whole tokens: " Yes" is a lone space
    # token then "Yes"; the shared space says nothing, the next token decides
    from llmrec.tiny_llm import train_tiny_tokenizer

    tok = train_tiny_tokenizer(CORPUS, vocab_size=300)
    yes, no = answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]
    assert _continuation(tok, "Yes")[-1] == yes and _continuation(tok, "No")[-1] == no


def test_answers_without_a_distinguishing_token_are_refused():
    tok = byte_level_bpe()
    with pytest.raises(ValueError, match=r"share|no distinguishing"):
        answer_token_ids(tok, ("Yes", "Yes"))


def test_answer_logit_is_one_row_of_the_full_head():
    from llmrec.tiny_llm import build_tiny_llm

    llm, tok = build_tiny_llm(CORPUS[:50], config={"hidden_size": 32, "vocab_size": 300,
                              "num_hidden_layers": 1, "intermediate_size": 64})  # fmt: skip
    ids = tok(CORPUS[:3], return_tensors="pt", padding=True)
    yes = answer_token_ids(tok)[0]
    with torch.no_grad():
        h = decoder_body(llm)(**ids).last_hidden_state[:, -1]
        got = answer_logit(llm, h, yes)
        reference = llm(**ids).logits[:, -1, yes]  # the full head, same precision
    assert got.dtype == torch.float32 and got.shape == (3,)
    oracle = (h.double() @ llm.get_output_embeddings().weight.double().T)[:, yes]
    assert_close_to_oracle(got, reference, oracle, "answer logit")


def test_answer_difference_is_two_rows_of_the_full_head_and_ignores_a_logit_offset():
    from llmrec.llm import answer_ids
    from llmrec.tiny_llm import build_tiny_llm

    llm, tok = build_tiny_llm(CORPUS[:50], config={"hidden_size": 32, "vocab_size": 300,
                              "num_hidden_layers": 1, "intermediate_size": 64})  # fmt: skip
    ids = tok(CORPUS[:3], return_tensors="pt", padding=True)
    yes, no = answer_ids(tok, "yes-no")
    assert (yes, no) == answer_token_ids(tok) and answer_ids(tok, "yes") == (yes, None)
    head = llm.get_output_embeddings()
    with torch.no_grad():
        h = decoder_body(llm)(**ids).last_hidden_state[:, -1]
        got = answer_logit(llm, h, yes, no)
        full = llm(**ids).logits[:, -1]
        reference = full[:, yes] - full[:, no]
        plain_yes = answer_logit(llm, h, yes)
        # a shift of every logit by the same amount (a bias added to the whole head) moves the
        # Yes logit and leaves the difference as it was
        head.bias = torch.nn.Parameter(torch.full((head.weight.shape[0],), 16.5))
        shifted = answer_logit(llm, h, yes, no)
        shifted_yes = answer_logit(llm, h, yes)
    oracle = h.double() @ (head.weight[yes] - head.weight[no]).double()
    assert_close_to_oracle(got, reference, oracle, "answer difference")
    assert torch.equal(shifted, got)
    assert not torch.equal(shifted_yes, plain_yes)
    with pytest.raises(ValueError, match="answer_score"):
        answer_ids(tok, "no")
    # without a tokenizer: only a given Yes id scored alone; "yes-no" says what it lacks
    assert answer_ids(None, "yes", yes_token_id=7) == (7, None)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        answer_ids(None, "yes-no", yes_token_id=7)


def test_the_zero_shot_score_builds_no_kv_cache_and_equals_a_cached_forward():
    """A scoring pass reads one position's logits: a KV cache is memory thrown away, and each
    decoder layer's cache object is a guard of its own under ``--compile`` (30 layers, a
    recompile each, then dynamo's recompile limit left the rest eager)."""
    from llmrec.methods.frozen import FrozenLLMScorer
    from llmrec.tiny_llm import build_tiny_llm

    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 400}  # fmt: skip
    llm, tok = build_tiny_llm(CORPUS[:40], cfg, seed=0)
    scorer = FrozenLLMScorer(llm, tok)
    body = decoder_body(llm)
    seen = []
    hook = body.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True
    )
    ids = torch.randint(3, len(tok), (3, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        score = scorer.score(batch)
    hook.remove()
    assert seen == [False]
    with torch.no_grad():  # the cache changes nothing it returns
        cached = body(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=True)
        want = answer_logit(
            llm, cached.last_hidden_state[:, -1], scorer.yes_token_id, scorer.no_token_id
        )
    torch.testing.assert_close(score, want, rtol=0, atol=0)
