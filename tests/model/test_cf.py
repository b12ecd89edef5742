"""CF models (MF, LightGCN, SASRec): BCE training with early stopping, embedding export."""

import numpy as np
import pytest
import torch
from tolerance import assert_close_to_oracle

from llmrec.cf import (
    CFConfig,
    CFEmbeddingError,
    build_cf_model,
    load_cf_embeddings,
    predict_cf,
    save_cf_embeddings,
    train_cf,
)
from llmrec.cf.models import pad_histories
from llmrec.data import make_synthetic
from llmrec.metrics import auc


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_users=150, n_items=80, per_user=30, dim=4, seed=1)


@pytest.mark.parametrize(
    "kind, kwargs, min_auc",
    [
        ("mf", {"dim": 16}, 0.75),
        ("lightgcn", {"dim": 16, "n_layers": 2}, 0.7),
        ("sasrec", {"dim": 16, "n_layers": 1, "max_len": 10, "dropout": 0.1}, 0.6),
    ],
)
def test_cf_models_learn_and_export(data, kind, kwargs, min_auc):
    torch.manual_seed(0)
    model = build_cf_model(kind, data.n_users, data.n_items, **kwargs)
    epochs = 15 if kind == "sasrec" else 40
    cfg = CFConfig(
        epochs=epochs, batch_size=256, lr=1e-2, weight_decay=1e-5, patience=5, his_len=10
    )
    res = train_cf(model, data, cfg, progress=False)
    assert res.best_valid_auc == max(h["valid_auc"] for h in res.history)
    assert res.epochs_run <= cfg.epochs
    # the best weights are restored: valid AUC equals the best one recorded
    valid = data["valid"]
    assert auc(valid["label"], predict_cf(model, valid)) == pytest.approx(res.best_valid_auc)
    test_auc = auc(data["test"]["label"], predict_cf(model, data["test"]))
    assert test_auc > min_auc, f"{kind} test AUC {test_auc:.3f}"
    user, item = model.export(data)
    assert user.shape == (data.n_users + 1, 16) and item.shape == (data.n_items + 1, 16)
    if kind in ("mf", "lightgcn"):  # the exported tables reproduce the model's scores
        df = data["test"]
        uid, iid = (
            torch.as_tensor(df["uid"].to_numpy(copy=True)),
            torch.as_tensor(df["iid"].to_numpy(copy=True)),
        )
        dot = (user[uid] * item[iid]).sum(-1)
        dot64 = (user[uid].double() * item[iid].double()).sum(-1)
        got = torch.as_tensor(np.asarray(predict_cf(model, df)))
        assert_close_to_oracle(got, dot, dot64, f"{kind} scores from the exported tables")


def test_early_stopping_stops(data):
    torch.manual_seed(0)
    model = build_cf_model("mf", data.n_users, data.n_items, dim=16)
    # a huge learning rate overfits quickly: validation AUC stops improving
    res = train_cf(model, data, CFConfig(epochs=200, lr=0.3, patience=2), progress=False)
    assert res.epochs_run < 200
    assert res.epochs_run == res.best_epoch + 2


def test_pad_histories_left_pads_and_truncates():
    out = pad_histories([[0, 3, 4, 5], [0], [0, 7]], max_len=2)
    assert out.tolist() == [[4, 5], [0, 0], [0, 7]]


def test_embedding_file_roundtrip_and_mismatch(tmp_path):
    user, item = torch.randn(11, 4), torch.randn(21, 4)
    path = save_cf_embeddings(tmp_path / "embeddings.safetensors", user, item, "mf")
    emb = load_cf_embeddings(tmp_path, n_users=10, n_items=20)
    assert torch.equal(emb.user, user) and torch.equal(emb.item, item)
    assert emb.meta["model"] == "mf" and emb.dim == 4
    with pytest.raises(CFEmbeddingError, match=r"item_emb has 21 rows but the data has 30 items"):
        load_cf_embeddings(path, n_users=10, n_items=30)
    with pytest.raises(CFEmbeddingError, match="no CF embedding file"):
        load_cf_embeddings(tmp_path / "nothing")


def test_resumed_training_time_sums_the_segments(data, tmp_path, monkeypatch):
    """A clock that ticks 100 s per reading: one epoch, then a resume to three. The result's
    time is the first segment's (100 s to its state file) plus the second's, not the
    second's alone."""
    from types import SimpleNamespace

    from llmrec.cf import cf_training as cf_train

    ticks = iter(range(0, 10_000, 100))
    monkeypatch.setattr(cf_train, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    state = tmp_path / "state.safetensors"

    def run(epochs, resume):
        model = build_cf_model("mf", data.n_users, data.n_items, dim=4)
        cfg = CFConfig(epochs=epochs, patience=10, batch_size=512)
        return train_cf(model, data, cfg, progress=False, state_path=state, resume=resume)

    first = run(1, False)  # reads: start 0, state 100, end 200
    assert first.wall_time_s == 200
    again = run(3, True)  # reads: start 300, states 400 and 500, end 600; 100 carried over
    assert len(again.history) == 3 and again.wall_time_s == 100 + 300
