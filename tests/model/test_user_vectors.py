"""``llmrec.cf.user_vectors``: the user representation a CF run gives one row.

MF looks its user table up; SASRec encodes the row's own history with its trained model, as
A-LLMRec's reference does, so a user without training positives (whose exported table row
is zero) still gets a representation. The reference here is the SASRec module rebuilt from
the run's own ``model.safetensors`` and run on the padded histories by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmrec.cf import SASRec, load_cf_embeddings
from llmrec.cf.cf_run import CFRunConfig, train_cf_run
from llmrec.cf.models import pad_histories
from llmrec.cf.user_vectors import UserVectors, load_user_vectors
from llmrec.data import make_synthetic
from llmrec.methods.allmrec.episodes import Episode
from llmrec.methods.allmrec.ranking_baselines import baseline_ranking


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("uservec")
    data = make_synthetic(n_users=50, n_items=30, per_user=12, seed=7)
    out = {}
    for kind, extra in (("mf", {}), ("sasrec", {"layers": 1, "his_len": 10})):
        cfg = CFRunConfig(model=kind, out=str(root / kind), dim=8, epochs=2, progress=False,
                          **extra)  # fmt: skip
        train_cf_run(cfg, data=data)
        out[kind] = root / kind
    return data, out


def _sasrec_by_hand(run, data):
    model = SASRec(data.n_users, data.n_items, dim=8, n_layers=1, max_len=10)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return model.eval()


def test_mf_rows_take_their_users_table_row(runs):
    data, out = runs
    emb = load_cf_embeddings(out["mf"], data.n_users, data.n_items)
    users = load_user_vectors(out["mf"], emb.user, data)
    assert not users.from_history
    rows = data["test"]
    assert torch.equal(users.of_rows(rows), emb.user[torch.tensor(rows["uid"].to_numpy())])


def test_sasrec_rows_are_the_encoding_of_their_own_history(runs):
    data, out = runs
    emb = load_cf_embeddings(out["sasrec"], data.n_users, data.n_items)
    users = load_user_vectors(out["sasrec"], emb.user, data)
    assert users.from_history
    rows = data["test"].iloc[:40]
    got = users.of_rows(rows)
    with torch.no_grad():
        want = _sasrec_by_hand(out["sasrec"], data).encode(pad_histories(rows["his"].tolist(), 10))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # one user, two histories: two vectors (a table gives the user one)
    uid = int(rows["uid"].iloc[0])
    pair = users([uid, uid], [[1, 2, 3], [4, 5]])
    assert not torch.allclose(pair[0], pair[1])


def test_a_user_without_training_positives_still_gets_a_vector(runs):
    data, out = runs
    emb = load_cf_embeddings(out["sasrec"], data.n_users, data.n_items)
    # the exported table's row of a user with no training rows is zero; the row's vector
    # does not read the table
    table = emb.user.clone()
    table[5] = 0
    vec = load_user_vectors(out["sasrec"], table, data)([5], [[3, 7, 9]])
    assert torch.count_nonzero(vec) > 0
    assert torch.equal(vec, load_user_vectors(out["sasrec"], emb.user, data)([5], [[3, 7, 9]]))


def test_cf_dot_baseline_ranks_with_each_episodes_history(runs):
    data, out = runs
    emb = load_cf_embeddings(out["sasrec"], data.n_users, data.n_items)
    model = _sasrec_by_hand(out["sasrec"], data)
    rng = np.random.default_rng(0)
    eps = []
    for k in range(30):
        cands = [int(c) for c in rng.choice(np.arange(1, data.n_items + 1), 6, replace=False)]
        his = [int(h) for h in rng.choice(np.arange(1, data.n_items + 1), 5)]
        eps.append(Episode(k % data.n_users + 1, his, cands, cands[k % 6]))
    users = UserVectors(emb.user, model)
    got = baseline_ranking(eps, data["train"], users, emb.item, ks=(1, 3), seed=0)
    with torch.no_grad():
        vec = model.encode(pad_histories([e.his for e in eps], 10)).double().numpy()
    items = emb.item.double().numpy()
    scores = [items[e.candidates] @ vec[j] for j, e in enumerate(eps)]
    ranks = [int((s > s[e.candidates.index(e.target)]).sum()) for s, e in zip(scores, eps)]
    assert got["cf_dot_hit@1"] == pytest.approx(np.mean(np.array(ranks) == 0))
    assert got["cf_dot_hit@3"] == pytest.approx(np.mean(np.array(ranks) < 3))


def test_user_vectors_refuses_mismatched_histories(runs):
    data, out = runs
    emb = load_cf_embeddings(out["sasrec"], data.n_users, data.n_items)
    users = load_user_vectors(out["sasrec"], emb.user, data)
    with pytest.raises(ValueError, match="2 uids but 1 histories"):
        users([1, 2], [[3]])


def test_a_sasrec_runs_model_file_is_a_recorded_input(runs):
    from llmrec.input_digests import digest_inputs

    _, out = runs
    names = {k: {p.rsplit("/", 1)[1] for p in digest_inputs(cf=v)["cf"]} for k, v in out.items()}
    assert names == {"mf": {"embeddings.safetensors"},
                     "sasrec": {"embeddings.safetensors", "model.safetensors"}}  # fmt: skip


def test_a_broken_sasrec_model_file_is_one_line_and_an_odd_run_json_is_a_table(runs, tmp_path):
    import shutil

    from llmrec.cf import CFEmbeddingError

    data, out = runs
    emb = load_cf_embeddings(out["sasrec"], data.n_users, data.n_items)
    broken = tmp_path / "sasrec"
    shutil.copytree(out["sasrec"], broken)
    raw = bytearray((broken / "model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CFEmbeddingError, match=r"model\.safetensors"):
        load_user_vectors(broken, emb.user, data)
    # a run.json that names no model (edited, or another tool's): the table, as before
    (broken / "run.json").write_text('{"kind": "cf"}')
    assert not load_user_vectors(broken, emb.user, data).from_history
