"""Data loading and validation, the synthetic generator, prompts, batching, tiny tokenizer."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec.data import (
    CORA_TEMPLATE,
    DataValidationError,
    RecCollator,
    build_prompt,
    encode_prompts,
    format_title_list,
    load_data,
    make_examples,
    make_synthetic,
    pad_id_of,
    read_split,
    write_data,
)
from llmrec.llm import answer_token_ids


@pytest.fixture(scope="module")
def small():
    return make_synthetic(n_users=30, n_items=40, per_user=12, dim=4, seed=3)


@pytest.fixture(scope="module")
def tiny_tok(small):
    from llmrec.tiny_llm import train_tiny_tokenizer

    texts = [
        build_prompt(h, t) for h, t in zip(small["train"]["his_title"], small["train"]["title"])
    ]
    return train_tiny_tokenizer([*texts, CORA_TEMPLATE], vocab_size=400)


# -- loading --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_roundtrip(tmp_path, small, fmt):
    write_data(small, tmp_path, fmt=fmt)
    data = load_data(tmp_path)
    assert data.n_users == small.n_users and data.n_items == small.n_items
    for split in ("train", "valid", "valid_small", "test"):
        a, b = small[split], data[split]
        assert len(a) == len(b)
        assert a["uid"].tolist() == b["uid"].tolist()
        assert a["his"].tolist() == b["his"].tolist()
        assert a["his_title"].tolist() == b["his_title"].tolist()
        assert a["title"].tolist() == b["title"].tolist()
    assert data.validation_split() == "valid_small"


def test_synthetic_schema_and_split(small):
    tr, te = small["train"], small["test"]
    assert set(tr["flag"]) == {-1} and set(te["flag"]) == {1}
    assert tr["timestamp"].max() <= small["valid"]["timestamp"].min()
    assert tr["not_cold"].all()
    assert (te["not_cold"] == 0).any(), "cold items are held out of the training period"
    # warm = the user and the item both occur in train (CoLLM's ML-1M definition)
    train_users, train_items = set(tr["uid"]), set(tr["iid"])
    warm = [u in train_users and i in train_items for u, i in zip(te["uid"], te["iid"])]
    assert warm == [bool(c) for c in te["not_cold"]]
    for his, titles in zip(tr["his"], tr["his_title"]):
        assert his[0] == 0 and titles[0] == "" and len(his) == len(titles)


def test_synthetic_labels_follow_the_factors_only():
    data, f = make_synthetic(n_users=50, n_items=60, per_user=20, noise=0.0, return_factors=True)
    df = pd.concat([data[s] for s in ("train", "valid", "test")])
    dot = (f.user[df["uid"]] * f.item[df["iid"]]).sum(-1)
    assert np.array_equal(df["label"].to_numpy(), (dot > 0).astype(int))
    assert 0.3 < df["label"].mean() < 0.7


# -- validation errors ------------------------------------------------------------------------
def _write(tmp_path, small, **frames):
    write_data(small, tmp_path)
    for split, df in frames.items():
        out = df.copy()
        out.to_parquet(tmp_path / f"{split}.parquet", index=False)
    return tmp_path


def test_missing_column_names_file(tmp_path, small):
    _write(tmp_path, small, test=small["test"].drop(columns=["his_title"]))
    with pytest.raises(
        DataValidationError, match=r"test\.parquet: missing column\(s\) \['his_title'\]"
    ):
        load_data(tmp_path)


def test_id_out_of_range_names_file_and_row(tmp_path, small):
    bad = small["valid"].copy()
    bad.loc[4, "iid"] = small.n_items + 5  # beyond meta.json's n_items
    _write(tmp_path, small, valid=bad)
    with pytest.raises(
        DataValidationError, match=r"valid\.parquet: row 4: iid id \d+ is out of range"
    ):
        load_data(tmp_path)
    bad = small["train"].copy()
    bad.loc[2, "uid"] = 0
    _write(tmp_path, small, train=bad)
    with pytest.raises(DataValidationError, match=r"train\.parquet: row 2: uid id 0"):
        load_data(tmp_path)


def test_empty_split(tmp_path, small):
    _write(tmp_path, small, test=small["test"].iloc[:0])
    with pytest.raises(DataValidationError, match=r"test\.parquet: the split is empty"):
        load_data(tmp_path)


def test_missing_required_split(tmp_path, small):
    write_data(small, tmp_path)
    (tmp_path / "valid.parquet").unlink()
    with pytest.raises(DataValidationError, match=r"no valid\.parquet or valid\.csv"):
        load_data(tmp_path)


def test_malformed_history_length_mismatch(tmp_path, small):
    bad = small["train"].copy()
    row = int(np.flatnonzero(bad["his"].map(len) > 2)[0])
    bad.at[row, "his_title"] = list(bad.at[row, "his_title"])[:-1]
    _write(tmp_path, small, train=bad)
    with pytest.raises(DataValidationError, match=rf"train\.parquet: row {row}: malformed history"):
        load_data(tmp_path)


def test_malformed_history_in_csv_names_line(tmp_path, small):
    write_data(small, tmp_path, fmt="csv")
    df = pd.read_csv(tmp_path / "test.csv")
    df.loc[3, "his"] = "[0, 5, oops"
    df.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(
        DataValidationError,
        match=r"test\.csv: row 3 \(file line 5\): column 'his' is not a JSON list",
    ):
        load_data(tmp_path)


def test_history_item_out_of_range_and_bad_label(tmp_path, small):
    bad = small["train"].copy()
    row = int(np.flatnonzero(bad["his"].map(len) > 1)[0])
    his = list(bad.at[row, "his"])
    his[-1] = 10_000
    bad.at[row, "his"] = his
    _write(tmp_path, small, train=bad)
    with pytest.raises(
        DataValidationError, match=rf"row {row}: item id 10000 in 'his' is out of range"
    ):
        load_data(tmp_path)
    bad = small["train"].copy()
    bad.loc[7, "label"] = 3
    _write(tmp_path, small, train=bad)
    with pytest.raises(DataValidationError, match=r"row 7: label value 3 is out of range"):
        load_data(tmp_path)


def test_read_split_rejects_unknown_type(tmp_path):
    p = tmp_path / "train.json"
    p.write_text("{}")
    with pytest.raises(DataValidationError, match="unsupported file type"):
        read_split(p)


# -- prompts ---------------------------------------------------------------------------------
def test_prompt_template_quotes_and_limits_history():
    titles = [""] + [f"Movie {k} (19{k:02d})" for k in range(12)]
    text = build_prompt(titles, "Target (2000)")
    listed = re.findall(r'"(Movie \d+ \(\d+\))"', text)
    assert listed == [f"Movie {k} (19{k:02d})" for k in range(2, 12)], "the 10 most recent"
    assert text.startswith("#Question: A user has given high ratings to the following movies: ")
    # a literal backslash + n, as in the reference prompt files (tests/test_presets.py)
    assert 'the movie titled "Target (2000)"? Answer with "Yes" or "No". \\n#Answer:' in text
    assert format_title_list(["A", "B"]) == '"A", "B"'
    collm = build_prompt(titles, "Target (2000)", template="collm", max_his=2)
    assert "<UserID>" in collm and "<TargetItemID>" in collm and collm.count('"Movie') == 2


def test_prompt_rejects_unknown_template():
    with pytest.raises(ValueError, match="template"):
        build_prompt([], "x", template="nope")


# -- tokenisation and batching -----------------------------------------------------------------
def test_tiny_tokenizer_yes_no_single_tokens(tiny_tok):
    yes, no = answer_token_ids(tiny_tok)
    assert yes != no
    assert tiny_tok("Yes", add_special_tokens=False)["input_ids"] == [yes]
    assert tiny_tok("No", add_special_tokens=False)["input_ids"] == [no]
    ids = tiny_tok('Answer with "Yes" or "No".')["input_ids"]
    assert yes in ids and no in ids and ids[0] == tiny_tok.bos_token_id


def test_collator_left_pads_and_looks_up_cf(small, tiny_tok):
    ex = make_examples(small["test"], tiny_tok)
    user = torch.randn(small.n_users + 1, 6)
    item = torch.randn(small.n_items + 1, 6)
    coll = RecCollator(ex, pad_id_of(tiny_tok), user, item)
    idx = [0, 1, 2, 3]
    b = coll(idx)
    lengths = [len(ex.input_ids[i]) for i in idx]
    T = max(lengths)
    assert b["input_ids"].shape == (4, T) and b["attention_mask"].shape == (4, T)
    for row, n in enumerate(lengths):
        assert b["attention_mask"][row, : T - n].sum() == 0
        assert b["attention_mask"][row, T - n :].all()
        assert b["input_ids"][row, T - n :].tolist() == ex.input_ids[idx[row]]
        assert (b["input_ids"][row, : T - n] == pad_id_of(tiny_tok)).all()
    assert b["attention_mask"][:, -1].all(), "every prompt ends at the last position"
    uid = torch.as_tensor(small["test"]["uid"].to_numpy()[idx])
    assert torch.equal(b["user_emb"], user[uid])
    assert b["labels"].dtype == torch.float32 and b["input_ids"].dtype == torch.long


def test_encode_truncates_from_the_left_keeping_bos(tiny_tok):
    text = build_prompt([f"Title {k}" for k in range(10)], "Last")
    full = tiny_tok(text)["input_ids"]
    (short,) = encode_prompts(tiny_tok, [text], max_length=20)
    assert len(short) == 20 and short[0] == tiny_tok.bos_token_id
    assert short[1:] == full[-19:]


def test_write_data_meta(tmp_path, small):
    write_data(small, tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text()) == {
        "n_users": small.n_users,
        "n_items": small.n_items,
    }
