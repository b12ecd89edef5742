"""A-LLMRec (:mod:`.stage1_align`, :mod:`.episodes`, :mod:`.stage2_prompt`,
:mod:`.generation`): stage 1 aligns CF item embeddings with title embeddings, stage 2 trains the soft-prompt projections of a frozen LLM (selected on the
validation Hit@1 of the scored candidates). Evaluation adds the ranking metrics (Hit@K,
NDCG@K, generated Hit@1) to the pointwise AUC / UAUC.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from llmrec.cf.user_vectors import UserVectors, load_user_vectors
from llmrec.config import option, parse_bool
from llmrec.data.catalogue import seen_items, title_map
from llmrec.errors import RunConfigError
from llmrec.method import Method, RunContext, Stage, register
from llmrec.methods.allmrec.episodes import (
    HIT_AT_1,
    CandidatePairs,
    Episode,
    EpisodeBatches,
    EpisodeCollator,
    hit_ndcg,
    make_episodes,
    row_episodes,
)
from llmrec.methods.allmrec.generation import generate_hits, score_episodes, score_rows
from llmrec.methods.allmrec.next_item_rows import NextItemRows
from llmrec.methods.allmrec.ranking_baselines import baseline_ranking
from llmrec.methods.allmrec.stage1_align import ALIGNERS, SBERT_DIM, AlignRows, text_table
from llmrec.methods.allmrec.stage2_prompt import PROJECTION_SCALES, PROJECTIONS, ALLMRec

ALL_SPLITS = ("train", "valid", "valid_small", "test")


@dataclass
class _Prompting:
    """What both stages and the evaluation share: titles, catalogue, seen items, collator."""

    titles: Dict[int, str]
    catalogue: np.ndarray
    seen: Dict[int, set]
    coll: EpisodeCollator
    users: UserVectors  # the CF run's user representation of a row (llmrec.cf.user_vectors)


@register
class ALLMRecMethod(Method):
    name = "allmrec"
    description = (
        "A-LLMRec: CF/SBERT-aligned item and user soft prompts, frozen LLM generates the "
        "next title (Hit@1; scored Hit@K/NDCG@K and AUC)"
    )
    single_process = True
    report_columns = (
        ("hit@1", "Hit@1", ".4f"),
        ("hit@1_generated", "Hit@1 gen", ".4f"),
        ("hit@1_generated_exact", "Hit@1 exact", ".4f"),
        ("ndcg@10", "NDCG@10", ".4f"),
        ("popularity_hit@1", "Hit@1 pop", ".4f"),
        ("cf_dot_hit@1", "Hit@1 CF", ".4f"),
    )

    # sources: ghdtjr/A-LLMRec models/a_llmrec_model.py ("model"), main.py ("main")
    @dataclass
    class Options:
        # departure: the reference fine-tunes nq-distilbert-base-v1 (768-d) in stage 1; no
        # model hub is reachable here, so a frozen offline all-MiniLM-L6-v2 (384-d) is cached
        text_encoder: str = option(
            "sbert", help="title embeddings: sbert or random", choices=("sbert", "random")
        )
        latent_dim: int = option(128, help="the aligner's latent size (model: 128)")
        aligner: str = option(
            "reference",
            help="reference (Linear+sigmoid encoders, Linear decoders) or mlp",
            choices=ALIGNERS,
        )
        ae_hidden: int = option(256, help="hidden width of the mlp aligner")
        projection: str = option(
            "reference",
            help="reference (Linear-LayerNorm-act-Linear, Xavier) or mlp",
            choices=PROJECTIONS,
        )
        # Xavier soft tokens are 5x SmolLM2's token-embedding norm (issue 29); rescaling them
        # made no measurable difference in CF-oracle A/Bs of 120-400 episodes on SmolLM2
        # (experiments/smollm2/allmrec_probe.md), so the reference's stays the default
        projection_scale: str = option(
            "xavier",
            help="soft-token scale: embeddings (the projections' outputs times a constant that "
            "starts them at the mean norm of the LLM's token embeddings) or xavier (the "
            "reference's unscaled outputs)",
            choices=PROJECTION_SCALES,
        )
        proj_hidden: Optional[int] = option(
            None, help="projection hidden width (none: d_model; an int: projection mlp)"
        )
        stage1_epochs: int = option(10, help="stage-1 epochs")
        stage1_lr: float = option(1e-4, help="stage-1 Adam lr (main: --stage1_lr)")
        stage1_batch_size: int = option(16, help="stage-1 batch (main: --batch_size1)")
        stage1_weights: Dict[str, float] = option(
            factory=dict, help="stage-1 loss weights (none given: the model's 1/1/.5/.2)"
        )
        stage1_rows: str = option(
            "labels",
            help="stage-1 rows: labels (every training row with its explicit label) or "
            "next_item (each positive row and one random unrated item per batch, the "
            "reference's next-item pairs: model pre_train_phase1 pos/neg)",
            choices=("labels", "next_item"),
        )
        user_vectors: str = option(
            "auto",
            choices=("auto", "history", "table"),
            help="the user representation: history (a sequential CF model's encoding of each "
            "row's history, as the reference's SASRec log_feats), table (the CF run's user "
            "table), auto (history for SASRec, else table); recorded resolved",
        )
        # departure (issue 29): z-scores of the CF inputs and of the stage-1 latent, so that
        # MF's small entries do not collapse every item soft token onto one (see ALLMRec)
        standardize: bool = option(
            True,
            help="z-score the CF inputs and the stage-1 latent with training statistics "
            "(false: the reference's raw inputs, whose item soft tokens collapse on MF)",
            parse=parse_bool,
        )
        train_candidates: int = option(
            20, help="candidates per training episode (model: pre_train_phase2 20)"
        )
        candidates: int = option(20, help="candidates per scored episode (model: generate 20)")
        episodes: int = option(200, help="test episodes scored")
        valid_episodes: int = option(
            500,
            help="validation episodes (from the whole validation split) that select stage "
            "2's state on Hit@1; 0: no validation, the last state",
        )
        generate: bool = option(
            True, help="also generate titles (generated Hit@1)", parse=parse_bool
        )
        max_new_tokens: int = option(40, help="tokens generated per title")
        repetition_penalty: float = option(1.5, help="generation's repetition penalty")
        ks: List[int] = option(factory=lambda: [1, 5, 10], help="K of Hit@K / NDCG@K")

    def build(self, ctx: RunContext, opts: Options) -> ALLMRec:
        model = ALLMRec(
            ctx.llm, ctx.tokenizer, ctx.cf_dim, text_dim=SBERT_DIM, latent_dim=opts.latent_dim,
            ae_hidden=opts.ae_hidden, proj_hidden=opts.proj_hidden, aligner=opts.aligner,
            projection=opts.projection, repetition_penalty=opts.repetition_penalty,
            standardize=opts.standardize, projection_scale=opts.projection_scale,
        )  # fmt: skip
        model.set_tables(ctx.item_table)
        train = ctx.data["train"]
        items = torch.as_tensor(train["iid"].to_numpy(np.int64, copy=True))
        users = self._resolve_users(ctx, opts)
        if users.from_history:  # one vector per training row: the statistics over rows
            per_row = users.of_rows(train)  # as a table with row 0 padding: rows 1..N
            padded = torch.cat([per_row.new_zeros((1, per_row.shape[1])), per_row])
            model.fit_input_statistics(padded, torch.arange(1, len(padded)), items)
        else:
            uids = torch.as_tensor(train["uid"].to_numpy(np.int64, copy=True))
            model.fit_input_statistics(users.table, uids, items)
        return model

    def _prompting(self, ctx: RunContext) -> _Prompting:
        if getattr(self, "_shared", None) is None:
            titles = title_map(ctx.data)
            n = ctx.data.n_items
            catalogue = np.array(sorted(i for i in titles if 1 <= i <= n), np.int64)
            # from_pretrained may pass UserVectors as its user_table (a SASRec-fed adapter)
            users = ctx.user_table
            if not isinstance(users, UserVectors):
                users = load_user_vectors(ctx.cf_path, ctx.user_table, ctx.data)
            coll = EpisodeCollator(
                ctx.tokenizer, titles, users, max_his=ctx.cfg.max_his,
                max_length=max(ctx.cfg.max_length, 1024),
            )  # fmt: skip
            seen = seen_items(ctx.data, ALL_SPLITS)
            self._shared = _Prompting(titles, catalogue, seen, coll, users)
        return self._shared

    def _resolve_users(self, ctx: RunContext, opts: Options) -> UserVectors:
        """The user representation ``opts.user_vectors`` asks for, made the one every batch
        uses; ``opts.user_vectors`` is set to the resolved ``history`` or ``table``."""
        p = self._prompting(ctx)
        users = p.users
        if opts.user_vectors == "history" and not users.from_history:
            raise RunConfigError(
                "--allmrec-user-vectors history needs a sequential CF run (train-cf --model "
                "sasrec) as --cf; this one has a user table only"
                + ("" if ctx.cf_path else " (from_pretrained: pass user_table=UserVectors)")
            )
        if opts.user_vectors == "table" and users.from_history:
            users = UserVectors(users.table)
        p.users = p.coll.users = users
        opts.user_vectors = "history" if users.from_history else "table"
        if users.from_history:
            ctx.log("A-LLMRec: the user representation is the CF model's encoding of each "
                    "row's history (SASRec, as the reference)")  # fmt: skip
        return users

    def check_prompt_lengths(self, ctx: RunContext, opts: Options) -> None:
        """Step 4 of the length rule before anything trains or scores: a prompt with no
        history, the data's longest titles as its candidates and the longest as its target
        must fit (else one line naming --max-length)."""
        coll = self._prompting(ctx).coll
        n = max(opts.candidates, opts.train_candidates)
        by_length = sorted(coll.titles, key=lambda item: (-len(coll.target_ids(item)), item))
        longest = by_length[:n]
        if longest:
            coll.encode(Episode(0, [], longest, longest[0]), "target")

    def stages(self, ctx: RunContext, model: ALLMRec, opts: Options) -> List[Stage]:
        p, tcfg = self._prompting(ctx), ctx.cfg.train
        text = text_table(p.titles, ctx.data.n_items, opts.text_encoder, ctx.log, ctx.device)
        rows = {k: ctx.data["train"][k].to_numpy() for k in ("uid", "iid", "label", "his")}
        # stage 1 is plain Adam at a constant rate over every training interaction
        align_cfg = dataclasses.replace(
            tcfg, epochs=opts.stage1_epochs, batch_size=opts.stage1_batch_size,
            lr=opts.stage1_lr, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0,
            grad_clip=0.0, max_steps=None, eval_every=0, save_every=0,
        )  # fmt: skip
        if opts.stage1_rows == "labels":
            align_rows = AlignRows(rows, p.users, ctx.item_table, text)
        elif opts.stage1_rows == "next_item":
            pos = rows["label"] == 1
            align_rows = NextItemRows(
                rows["uid"][pos], rows["iid"][pos], p.users,
                {"item_emb": ctx.item_table, "text_emb": text}, p.catalogue, p.seen,
                seed=tcfg.seed, his=rows["his"][pos],
            )  # fmt: skip
        else:
            raise ValueError(
                f"stage1_rows must be 'labels' or 'next_item', got {opts.stage1_rows!r}"
            )
        align = Stage(
            "align",
            align_rows,
            None,
            align_cfg,
            subdir="stage1",
            enter=lambda: model.set_stage("align", opts.stage1_weights),
            info={
                "epochs": opts.stage1_epochs,
                "text_encoder": opts.text_encoder,
                "rows": opts.stage1_rows,
            },
        )
        seed = tcfg.seed
        train_eps = make_episodes(
            ctx.rows("train"), p.catalogue, opts.train_candidates, seen=p.seen, seed=seed
        )
        # the validation episodes come from the whole validation split (its row subsample is
        # too small for 500 positives), a fixed random subset
        valid_eps = _subset(
            make_episodes(ctx.data[ctx.valid_split], p.catalogue, opts.candidates, seen=p.seen,
                          seed=seed + 3),
            opts.valid_episodes, seed + 3,
        )  # fmt: skip
        train_items = torch.as_tensor(ctx.data["train"]["iid"].to_numpy(np.int64, copy=True))

        def enter_prompt() -> None:
            model.set_stage("prompt")
            model.fit_latent_statistics(train_items)  # stage 1 is final here

        prompt = Stage(
            "prompt",
            EpisodeBatches(p.coll, train_eps),
            CandidatePairs(p.coll, valid_eps) if valid_eps else None,
            tcfg,
            metric=HIT_AT_1,
            enter=enter_prompt,
            info={"episodes": len(train_eps), "valid_episodes": len(valid_eps),
                  "selected_on": "valid hit@1" if valid_eps else "last state"},
        )  # fmt: skip
        return [align, prompt]

    scores_by_user = True  # a row is ranked among its user's rows (row_episodes)

    def score_frame(self, ctx: RunContext, model: ALLMRec, opts: Options, df, predict,
                    desc: str = "test"):  # fmt: skip
        """Each row's title log-likelihood among its user's rows of ``df``, in chunks of
        ``candidates`` (:func:`row_episodes`: each user's chunks drawn from that user's own
        seed, so a frame of whole users scores as it does inside a larger one)."""
        p, cfg = self._prompting(ctx), ctx.cfg
        model.set_stage("prompt")
        df = df.reset_index(drop=True)  # row_episodes returns positions through the index
        row_eps, rows = row_episodes(df, opts.candidates, seed=cfg.train.seed)
        scores = np.empty(len(df))
        scores[rows] = score_rows(model, p.coll, row_eps, cfg.train.eval_batch_size, ctx.device,
                                  cfg.train.progress, desc="rows")  # fmt: skip
        return scores

    def extra_metrics(self, ctx: RunContext, model: ALLMRec, opts: Options, df, predict):
        """The ranking metrics of ``episodes`` episodes drawn from ``df``'s positives, with the
        popularity and CF-dot baselines on the same episodes and the generated Hit@1."""
        p, cfg = self._prompting(ctx), ctx.cfg
        model.set_stage("prompt")
        bs, dev, progress = cfg.train.eval_batch_size, ctx.device, cfg.train.progress
        seed = cfg.train.seed
        eps = make_episodes(df, p.catalogue, opts.candidates, seen=p.seen, seed=seed + 7)
        eps = _subset(eps, opts.episodes, seed)
        sc = score_episodes(model, p.coll, eps, bs, dev, progress, desc="episodes")
        tpos = np.array([ep.candidates.index(ep.target) for ep in eps])
        block = dict(hit_ndcg(sc, tpos, opts.ks))
        # the same episodes ranked by training popularity and by the CF dot product
        block.update(
            baseline_ranking(eps, ctx.data["train"], p.users, ctx.item_table, opts.ks, seed)
        )
        block.update({"episodes": len(eps), "candidates": opts.candidates})
        if opts.generate and eps:
            block.update(generate_hits(model, p.coll, eps, bs, dev, opts.max_new_tokens, progress))
        ctx.log(
            f"A-LLMRec {len(eps)} episodes: hit@1 {block.get('hit@1', float('nan')):.4f} "
            f"(popularity {block.get('popularity_hit@1', float('nan')):.4f}, CF dot "
            f"{block.get('cf_dot_hit@1', float('nan')):.4f})"
        )
        return block


def _subset(episodes: List, n: int, seed: int) -> List:
    """``n`` episodes drawn at random (seeded), in their order; all when there are fewer."""
    if len(episodes) <= n:
        return list(episodes)
    rng = np.random.default_rng(seed)
    return [episodes[j] for j in sorted(rng.choice(len(episodes), n, replace=False))]
