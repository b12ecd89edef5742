"""``experiments/smollm2/collect.py``: the results table regenerated from run folders.

Synthetic run folders on a synthetic dataset: every metric of the table must equal
:func:`llmrec.metrics.evaluate_predictions` over the intended rows (the whole test split for
the main table, the runs' subsample for seeds and the learning curve), the row digests must
be :func:`llmrec.metrics.rows_digest`'s, and rows that differ between runs must stop it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec.data import load_run_data, make_synthetic, write_data
from llmrec.metrics import evaluate_predictions, rows_digest

ROOT = Path(__file__).resolve().parents[2]


def _collect_module():
    spec = importlib.util.spec_from_file_location(
        "smollm2_collect", ROOT / "experiments" / "smollm2" / "collect.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pred(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Scores that carry some signal (label plus noise), so AUCs differ between runs."""
    rng = np.random.default_rng(seed)
    score = rows["label"].to_numpy() * 0.3 + rng.normal(size=len(rows))
    return pd.DataFrame({"uid": rows["uid"], "iid": rows["iid"], "label": rows["label"],
                         "score": score})  # fmt: skip


def _run(folder: Path, metrics: dict, full=None, sub=None, scoring=None) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if full is not None:
        full.to_csv(folder / "test_predictions.csv", index=False)
    if sub is not None:
        sub.to_csv(folder / "subsample_predictions.csv", index=False)
    if scoring is not None:
        (folder / "eval_test_all.json").write_text(json.dumps({"scoring": scoring}))


@pytest.fixture
def setup(tmp_path):
    data_dir = write_data(make_synthetic(n_users=40, n_items=30, per_user=12, seed=3),
                          tmp_path / "data")  # fmt: skip
    test = load_run_data(str(data_dir))["test"]
    sub_rows = test.sample(n=len(test) // 2, random_state=0)
    runs = tmp_path / "runs"
    machine = {"cpu": "Test CPU", "logical_cores": 2, "torch_threads": 2, "gpu": None}
    train = {"rows": 800, "steps": 100, "train_time_s": 600.0}
    cfg = {"train": {"batch_size": 8}, "llm_dtype": "fp32"}
    _run(runs / "mf", {"train": {"train_time_s": 3.0}}, full=_pred(test, 1))
    preds = {}
    for i, name in enumerate(("zeroshot", "cora")):
        preds[name] = (_pred(test, 10 + i), _pred(sub_rows, 20 + i))
        _run(runs / name, {"train": train, "config": cfg, "machine": machine}, *preds[name],
             scoring={"chunks": 4, "timed_chunks": 4, "seconds": 1234.0})  # fmt: skip
    seed_pred = _pred(sub_rows, 30)
    _run(runs / "seed1" / "cora", {"train": train, "config": cfg}, full=seed_pred)
    curve_pred = _pred(sub_rows, 40)
    _run(runs / "curve" / "cora_200", {"train": dict(train, rows=200)}, full=curve_pred)
    return {"data": str(data_dir), "runs": runs, "test": test, "sub": sub_rows,
            "preds": preds, "seed_pred": seed_pred, "curve_pred": curve_pred}  # fmt: skip


def _auc(pred, test):
    m = pred.merge(test[["uid", "iid", "label", "not_cold"]], on=["uid", "iid", "label"])
    return evaluate_predictions(m["uid"], m["label"], m["score"], m["not_cold"].to_numpy())


def test_table_metrics_are_recomputed_on_the_intended_rows(setup):
    collect = _collect_module()
    res = collect.collect(setup["runs"], setup["data"])
    test, sub = setup["test"], setup["sub"]
    assert res["test_rows"] == len(test) and res["subsample_rows"] == len(sub)
    assert res["test_rows_sha256"] == rows_digest(test["uid"], test["iid"], test["label"])
    assert res["subsample_rows_sha256"] == rows_digest(sub["uid"], sub["iid"], sub["label"])
    for name, (full, part) in setup["preds"].items():
        m, want, want_sub = res["methods"][name], _auc(full, test), _auc(part, test)
        assert m["auc"] == pytest.approx(want["auc"]) and m["uauc"] == pytest.approx(want["uauc"])
        assert m["cold_auc"] == pytest.approx(want["cold"]["auc"])
        assert m["subsample_auc"] == pytest.approx(want_sub["auc"])
        assert m["scoring_time_s"] == 1234.0 and m["machine"]["cpu"] == "Test CPU"
    # MF's whole-split predictions, cut to the subsample
    mf_sub = _auc(pd.read_csv(setup["runs"] / "mf" / "test_predictions.csv")
                  .merge(sub[["uid", "iid"]]), test)  # fmt: skip
    assert res["methods"]["mf"]["subsample_auc"] == pytest.approx(mf_sub["auc"])
    (seed,) = res["seeds"]
    assert seed["seed"] == 1 and seed["auc"] == pytest.approx(_auc(setup["seed_pred"], test)["auc"])
    assert seed["seed0_auc"] == pytest.approx(_auc(setup["preds"]["cora"][1], test)["auc"])
    by_rows = {p["train_rows"]: p for p in res["curve"]}
    assert by_rows[200]["auc"] == pytest.approx(_auc(setup["curve_pred"], test)["auc"])
    assert by_rows[800]["auc"] == pytest.approx(_auc(setup["preds"]["cora"][1], test)["auc"])
    assert by_rows[800]["llm_dtype"] == "fp32" and by_rows[200]["llm_dtype"] is None
    text = collect.markdown(res)
    assert f"digest {res['test_rows_sha256'][:12]}" in text and "20.6 min" in text
    assert "Test CPU, 2 threads" in text


def test_runs_on_other_rows_stop_the_collection(setup):
    collect = _collect_module()
    runs, sub = setup["runs"], setup["sub"]
    _pred(sub, 5).to_csv(runs / "cora" / "test_predictions.csv", index=False)  # a subsample only
    with pytest.raises(SystemExit, match="cora: its test rows differ"):
        collect.collect(runs, setup["data"])
    setup["preds"]["cora"][0].to_csv(runs / "cora" / "test_predictions.csv", index=False)
    _pred(sub.iloc[1:], 6).to_csv(runs / "seed1" / "cora" / "test_predictions.csv", index=False)
    with pytest.raises(SystemExit, match="other test rows than seed 0's subsample"):
        collect.collect(runs, setup["data"])


def test_earlier_entries_are_kept_only_for_the_same_rows(setup):
    collect = _collect_module()
    res = collect.collect(setup["runs"], setup["data"])
    earlier = {
        "commit": "abc1234", "subsample_rows_sha256": res["subsample_rows_sha256"],
        "methods": {"allmrec": {"label": "A-LLMRec", "auc": 0.5}}, "seeds": [],
        "curve": [{"llm": "SmolLM2", "train_rows": 400, "auc": 0.6}], "tiny_draws": [],
    }  # fmt: skip
    merged = collect.merge_earlier(res, earlier)
    # methods of a collection that names no whole-split rows are not mixed into the table
    assert "allmrec" not in merged["methods"]
    kept = [p for p in merged["curve"] if p["train_rows"] == 400]
    assert kept and kept[0]["collected_at_commit"] == "abc1234"
    earlier["test_rows_sha256"] = res["test_rows_sha256"]
    assert collect.merge_earlier(res, earlier)["methods"]["allmrec"]["collected_at_commit"] == (
        "abc1234")  # fmt: skip
    earlier["subsample_rows_sha256"] = "0" * 64
    with pytest.raises(SystemExit, match="subsample_rows_sha256 differs"):
        collect.merge_earlier(res, earlier)


def test_readme_table_is_replaced_between_its_markers(setup, tmp_path):
    collect = _collect_module()
    res = collect.collect(setup["runs"], setup["data"])
    begin, end = collect.README_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{begin}\n| old | table |\n{end}\n\nafter\n")
    collect.write_readme(readme, collect.markdown(res))
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n\n" + begin + "\n| method | AUC")
    assert "| old | table |" not in text and text.endswith(f"{end}\n\nafter\n")
    assert f"digest {res['test_rows_sha256'][:12]}" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one"):
        collect.write_readme(readme, "table")
    # the project's README has its markers
    assert (ROOT / "README.md").read_text().count(begin) == 1


def test_collm_train_time_counts_its_step1_run_even_unscored(setup):
    """CoLLM's step 1 is the TALLRec run's LoRA; ``run.sh collm`` trains that run without
    scoring the whole split, so its train time is read from its own ``metrics.json``."""
    collect = _collect_module()
    runs, test = setup["runs"], setup["test"]
    step1 = {"train": {"rows": 800, "steps": 100, "train_time_s": 250.0}}
    _run(runs / "tallrec", step1, sub=_pred(setup["sub"], 50))  # trained, not whole-split
    lora = {"path": str(runs / "tallrec" / "best.safetensors")}
    stages = [{"lora_from": lora}, {"name": "collm"}]
    collm = {"train": {"rows": 800, "steps": 100, "train_time_s": 600.0, "stages": stages}}
    _run(runs / "collm", collm, full=_pred(test, 60), sub=_pred(setup["sub"], 61))
    res = collect.collect(runs, setup["data"])
    assert "tallrec" not in res["methods"]  # no whole-split predictions: not in the table
    m = res["methods"]["collm"]
    assert m["step1_run"] == "tallrec" and m["train_time_s"] == 850.0
    (runs / "tallrec" / "metrics.json").unlink()  # step 1 unfinished: no honest total
    with pytest.raises(SystemExit, match=r"step 1 .* is not a finished run here"):
        collect.collect(runs, setup["data"])
