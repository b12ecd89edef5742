"""Popularity and CF-dot Hit@1 / Hit@10 on A-LLMRec's ranking episodes, no LLM (issue 29).

The episodes are the ones an A-LLMRec run on ML-1M draws (20 candidates: the target and 19
items the user rated in no split): 500 validation episodes (drawn from the whole validation
split with seed + 3, as the method's early stopping sees them) and 500 test episodes (seed
+ 7, subset with seed). Each CF run's tables rank the same episodes by ``<e_u, e_i>``;
popularity (positive training rows per item) is the same for every run. A SASRec run's user
vector is its encoding of each episode's history (:mod:`llmrec.cf.user_vectors`), as
A-LLMRec reads it.

    python experiments/smollm2/episode_baselines.py RUN [RUN ...] [--data DIR] [--seed 0]

RUN is a ``llmrec train-cf`` run directory; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from llmrec.cf import load_cf_embeddings
from llmrec.cf.user_vectors import load_user_vectors
from llmrec.data import load_run_data
from llmrec.data.catalogue import seen_items, title_map
from llmrec.methods.allmrec import ALL_SPLITS, _subset
from llmrec.methods.allmrec.episodes import make_episodes
from llmrec.methods.allmrec.ranking_baselines import baseline_ranking


def episodes(data, seed: int, n: int = 500, candidates: int = 20) -> dict:
    """``split -> episodes`` as ``experiments/smollm2`` A-LLMRec runs draw them."""
    titles = title_map(data)
    catalogue = np.array(sorted(i for i in titles if 1 <= i <= data.n_items), np.int64)
    seen = seen_items(data, ALL_SPLITS)
    out = {}
    for split, draw_seed, subset_seed in (("valid", seed + 3, seed + 3), ("test", seed + 7, seed)):
        eps = make_episodes(data[split], catalogue, candidates, seen=seen, seed=draw_seed)
        out[split] = _subset(eps, n, subset_seed)
    return out


def run_label(run: Path) -> str:
    """``model objective d=dim batch B`` of a train-cf run, its selection epoch and training
    time."""
    metrics = json.loads((run / "metrics.json").read_text())
    cfg, train = metrics["config"], metrics["train"]
    objective = cfg.get("objective", "labels")
    return (f"{cfg['model']} {objective} d={cfg['dim']} batch {cfg['batch_size']} (best epoch "
            f"{train['best_epoch']} of "
            f"{train['epochs_run']}, {train['train_time_s'] / 60:.1f} min)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train-cf run directories")
    parser.add_argument("--data", default="/work/shared/data/ml-1m")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_run_data(args.data)
    eps = episodes(data, args.seed)
    rows = []
    for i, run in enumerate(args.runs):
        emb = load_cf_embeddings(run, data.n_users, data.n_items)
        users = load_user_vectors(run, emb.user, data)  # SASRec: each episode's history
        res = {s: baseline_ranking(e, data["train"], users, emb.item, (1, 10), args.seed)
               for s, e in eps.items()}  # fmt: skip
        if i == 0:
            rows.append(("popularity (training positives)", res, "popularity_"))
        rows.append((run_label(run), res, "cf_dot_"))
    n = {s: len(e) for s, e in eps.items()}
    print("| ranking | valid Hit@1 | valid Hit@10 | test Hit@1 | test Hit@10 |\n"
          "| --- | --- | --- | --- | --- |")  # fmt: skip
    print("| chance (1 / 20, 10 / 20) | 0.050 | 0.500 | 0.050 | 0.500 |")
    for name, res, prefix in rows:
        cells = [f"{res[s][f'{prefix}hit@{k}']:.3f}" for s in ("valid", "test") for k in (1, 10)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{n['valid']} validation and {n['test']} test episodes, seed {args.seed}")


if __name__ == "__main__":
    main()
