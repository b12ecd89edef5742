"""A-LLMRec stage 2: soft prompts of a frozen LLM (Kim et al., KDD 2024).

Stage 1 is :mod:`llmrec.methods.allmrec.stage1_align`; the prompts, episodes and candidate
batches :mod:`llmrec.methods.allmrec.episodes`; scoring and generation
:mod:`llmrec.methods.allmrec.generation`.

Stage 1 (:class:`Aligner`): two autoencoders, one over the CF item embedding ``e_i`` and one
over the SBERT embedding ``q_i`` of the item's title, trained with

* matching: ``MSE(enc_I(e_i), enc_T(q_i))`` (the two latents agree),
* reconstruction: ``MSE(dec_I(enc_I(e_i)), e_i)`` and ``MSE(dec_T(enc_T(q_i)), q_i)`` (no
  collapse to a constant latent),
* recommendation: BCE of ``<e_u, dec_I(enc_I(e_i))>`` against the interaction's label (the
  reconstructed item embedding still scores like the CF model).

``z_i = enc_I(e_i)`` is the joint collaborative-text item embedding; at inference no text
is needed for it.

Stage 2 (:class:`ALLMRec`): two 2-layer MLPs project the user representation ``e_u`` and
``z_i`` into the token embedding space. They are placed in the prompt as soft tokens,
the user's first, an item's right after its title::

    [U] is a user representation. This user has watched "T1"[I1], "T2"[I2] in the previous.
    Recommend one next movie for this user to watch next from the following movie title set,
    "C1"[IC1], ..., "C20"[IC20]. The recommendation is

and the frozen LLM is trained (projections only) to generate ``"<title>"`` of the next item
(cross entropy over the title's tokens). Slots are marked at tokenisation
(:class:`~llmrec.methods.allmrec.episodes.EpisodeCollator`) and filled with one
``index_put``.

Evaluation, on ranking episodes (a positive ``split`` row's item among ``candidates - 1``
random items the user never rated):

* ``hit@1_generated`` — greedy generation (repetition penalty 1.5); a hit when the
  lower-cased target title is a substring of the lower-cased generation's quoted part
  (A-LLMRec's ``eval.py`` rule, :func:`reference_hit`); ``hit@1_generated_exact`` when the
  generated title equals the target's exactly;
* ``hit@K`` / ``ndcg@K`` — the scored variant: candidates ranked by the log-likelihood of
  their title given the prompt;
* ``auc`` / ``uauc`` (+ warm/cold) on the split's rows, so the run compares with CoRA and
  CoLLM in one table: each row's item is scored by its title log-likelihood in a prompt whose
  candidate set is that user's rows of the split (in chunks of ``candidates``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from llmrec.data.batching import pad_id_of
from llmrec.data.slots import ITEM_SLOT, USER_SLOT
from llmrec.llm import decoder_body
from llmrec.methods.allmrec.episodes import IGNORE
from llmrec.methods.allmrec.stage1_align import Aligner, two_layer_mlp
from llmrec.methods.allmrec.standardize import Standardizer

__all__ = [
    "PROJECTIONS",
    "PROJECTION_SCALES",
    "ALLMRec",
    "probe_output_norm",
    "token_embedding_norm",
]


SBERT_DIM = 384


#: ``reference``: A-LLMRec's ``log_emb_proj`` / ``item_emb_proj`` (Linear -> LayerNorm ->
#: LeakyReLU (user) / GELU (item) -> Linear, Xavier-normal weights, hidden = d_model);
#: ``mlp``: this project's earlier Linear -> GELU -> Linear bottleneck
PROJECTIONS = ("reference", "mlp")


def _reference_projection(d_in: int, d_model: int, act: Callable[[], nn.Module]) -> nn.Sequential:
    """A-LLMRec's stage-2 projection: Linear -> LayerNorm -> act -> Linear, Xavier-normal."""
    net = nn.Sequential(
        nn.Linear(d_in, d_model), nn.LayerNorm(d_model), act(), nn.Linear(d_model, d_model)
    )
    nn.init.xavier_normal_(net[0].weight)
    nn.init.xavier_normal_(net[3].weight)
    return net


#: ``embeddings``: the projections' outputs times a constant that starts the soft tokens at
#: the mean norm of the LLM's token embeddings; ``xavier``: A-LLMRec's plain
#: Xavier-normal init, whose soft tokens have norm ~0.65 sqrt(d_model) whatever the LLM
#: (15.8 on SmolLM2, whose token embeddings have norm 3.2)
PROJECTION_SCALES = ("embeddings", "xavier")


def token_embedding_norm(llm: nn.Module) -> float:
    """Mean Euclidean norm of the rows of ``llm``'s input embedding matrix (fp32, computed in
    chunks so a large vocabulary never needs an fp32 copy of the whole matrix)."""
    weight = llm.get_input_embeddings().weight.detach()
    total = 0.0
    for start in range(0, weight.shape[0], 8192):
        total += float(weight[start : start + 8192].float().norm(dim=-1).sum())
    return total / weight.shape[0]


@torch.no_grad()
def probe_output_norm(net: nn.Module, d_in: int, samples: int = 512) -> float:
    """Mean norm of ``net``'s outputs for standard-normal inputs ``(samples, d_in)`` (what the
    z-scored CF inputs and latent are). The probe draws from its own seeded generator, so
    the global random stream is untouched."""
    param = next(net.parameters())
    probe = torch.randn(samples, d_in, generator=torch.Generator().manual_seed(0))
    return float(net(probe.to(device=param.device, dtype=param.dtype)).float().norm(dim=-1).mean())


def _projection(kind: str, d_in: int, hidden: Optional[int], d_model: int, act) -> nn.Module:
    if kind == "reference":
        if hidden is not None and hidden != d_model:
            raise ValueError(
                f"the reference projection's hidden size is d_model ({d_model}); got "
                f"proj_hidden {hidden} (use projection 'mlp' for a bottleneck)"
            )
        return _reference_projection(d_in, d_model, act)
    if kind == "mlp":
        return two_layer_mlp(d_in, 256 if hidden is None else hidden, d_model)
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")


class ALLMRec(nn.Module):
    """Frozen causal LM + stage-1 :class:`Aligner` + the two stage-2 projections.

    ``set_tables(user_table, item_table)`` gives the frozen CF tables; ``embed`` fills the
    slots; ``loss`` is the cross entropy of the target title; ``sequence_logprob`` its total
    log-likelihood per row; ``generate`` greedy-decodes titles. Only the projections train
    in stage 2 (:meth:`trainable_parameters`); :meth:`trainable_state` also holds the aligner.
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: Any,
        cf_dim: int,
        text_dim: int = SBERT_DIM,
        latent_dim: int = 128,
        ae_hidden: int = 256,
        proj_hidden: Optional[int] = None,
        seed: int = 0,
        aligner: str = "reference",
        projection: str = "reference",
        repetition_penalty: float = 1.5,
        standardize: bool = True,
        projection_scale: str = "xavier",
    ):
        super().__init__()
        if cf_dim < 1:
            raise ValueError(f"A-LLMRec needs CF embeddings (cf_dim >= 1), got {cf_dim}")
        hidden = int(llm.config.hidden_size)
        self.llm = llm
        self.llm.requires_grad_(False)
        self.tokenizer = tokenizer
        device = llm.get_input_embeddings().weight.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.aligner = Aligner(cf_dim, text_dim, latent_dim, ae_hidden, aligner).to(device)
            # A-LLMRec: LeakyReLU in the user (log_emb) projection, GELU in the item one
            self.user_proj = _projection(projection, cf_dim, proj_hidden, hidden, nn.LeakyReLU)
            self.item_proj = _projection(projection, latent_dim, proj_hidden, hidden, nn.GELU)
            self.user_proj.to(device)
            self.item_proj.to(device)
        # issue 29: Xavier soft tokens are 5x the norm of SmolLM2's token embeddings (15.8
        # against 3.2), so each one dominates the residual stream at its position through
        # every layer. ``embeddings``: a constant factor on the projections' outputs starts
        # them at the LLM's own scale; the parameters keep the reference's init, and Adam
        # (invariant to a gradient's scale) moves them exactly as it would without it
        self.user_scale = self.item_scale = 1.0
        if projection_scale == "embeddings":
            target = token_embedding_norm(llm)
            self.user_scale = target / probe_output_norm(self.user_proj, cf_dim)
            self.item_scale = target / probe_output_norm(self.item_proj, latent_dim)
        elif projection_scale != "xavier":
            raise ValueError(
                f"projection_scale must be one of {PROJECTION_SCALES}, got {projection_scale!r}"
            )
        # z-scores of the CF inputs and of the frozen stage-1 latent (issue 29): raw MF entries
        # are a few hundredths, the encoder's sigmoid maps every item to ~0.5 and the item soft
        # tokens collapse (mean pairwise cosine 0.9988); buffers, saved with the state
        self.user_norm = Standardizer(cf_dim, standardize).to(device)
        self.item_norm = Standardizer(cf_dim, standardize).to(device)
        self.latent_norm = Standardizer(latent_dim, standardize).to(device)
        self.repetition_penalty = float(repetition_penalty)
        self.cf_dim, self.text_dim, self.latent_dim = cf_dim, text_dim, latent_dim
        self.register_buffer("item_table", torch.zeros(1, cf_dim, device=device), persistent=False)
        self.stage1_weights: Dict[str, float] = {}
        self.set_stage("prompt")

    def set_tables(self, item_table: torch.Tensor) -> None:
        self.item_table = item_table.detach().float().to(self.item_table.device)

    def fit_input_statistics(
        self,
        user_table: torch.Tensor,
        user_rows: Optional[torch.Tensor] = None,
        item_rows: Optional[torch.Tensor] = None,
    ) -> None:
        """Per-dimension mean / std of the CF user table ``(n_users + 1, d_cf)`` and of
        :meth:`set_tables`' item table, over ``user_rows`` / ``item_rows`` (int64 ids, e.g.
        the training split's; default all but row 0). No-op when ``standardize`` is off."""
        self.user_norm.fit(user_table.detach().float().to(self.item_table.device), user_rows)
        self.item_norm.fit(self.item_table, item_rows)

    @torch.no_grad()
    def fit_latent_statistics(self, item_rows: Optional[torch.Tensor] = None) -> None:
        """Mean / std of the frozen stage-1 latents ``z_i`` of ``item_rows`` (int64 ids; all
        items by default), the stage-2 item projection's input scale; call once stage 1 is
        final, before stage 2 trains."""
        z = self.aligner.joint(self.item_norm(self.item_table))
        self.latent_norm.fit(z, item_rows)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        state = {}
        for prefix, mod in (
            ("aligner.", self.aligner),
            ("user_proj.", self.user_proj),
            ("item_proj.", self.item_proj),
        ):
            state.update({prefix + k: v for k, v in mod.named_parameters()})
        # the standardisation statistics: evaluation must use the ones training used
        for prefix, mod in (
            ("user_norm.", self.user_norm),
            ("item_norm.", self.item_norm),
            ("latent_norm.", self.latent_norm),
        ):
            state.update({prefix + k: v for k, v in mod.named_buffers()})
        return state

    def set_stage(self, stage: str, weights: Optional[Mapping[str, float]] = None) -> None:
        """``"align"`` (stage 1: the aligner trains on interaction rows, ``weights`` of its
        losses) or ``"prompt"`` (stage 2: the projections train on episodes)."""
        if stage not in ("align", "prompt"):
            raise ValueError(f"stage must be 'align' or 'prompt', got {stage!r}")
        self.stage = stage
        if weights is not None:
            self.stage1_weights = dict(weights)
        self.aligner.requires_grad_(stage == "align")
        self.user_proj.requires_grad_(stage == "prompt")
        self.item_proj.requires_grad_(stage == "prompt")

    def trainable_parameters(self):
        """The parameters of the current stage."""
        if self.stage == "align":
            yield from self.aligner.parameters()
        else:
            yield from self.user_proj.parameters()
            yield from self.item_proj.parameters()

    # -- forward -------------------------------------------------------------------------------
    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        emb = self.llm.get_input_embeddings()(ids.clamp_min(0))
        rows, cols = (ids < 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return emb
        kind = ids[rows, cols]
        if bool(((kind != USER_SLOT) & (kind != ITEM_SLOT)).any()):
            raise ValueError("input_ids hold an unknown negative id (only -1 and -2 are slots)")
        user_in = self.user_norm(batch["user_emb"].to(self.item_table.dtype))
        user_vec = self.user_scale * self.user_proj(user_in)[rows]
        items = batch["slot_items"][rows, cols]
        with torch.no_grad():  # stage 1 is frozen in stage 2
            z = self.latent_norm(self.aligner.joint(self.item_norm(self.item_table[items])))
        item_vec = self.item_scale * self.item_proj(z)
        src = torch.where((kind == USER_SLOT)[:, None], user_vec, item_vec)
        return emb.index_put((rows, cols), src.to(emb.dtype))

    def target_logprobs(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the target tokens, ``(N,)``, and each one's row, ``(N,)``.

        The lm_head runs on the target positions only.
        """
        labels = batch["labels"]
        out = decoder_body(self.llm)(
            inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"], use_cache=False
        )
        nxt = labels[:, 1:]
        sel = nxt != IGNORE
        h = out.last_hidden_state[:, :-1][sel]
        logits = self.llm.get_output_embeddings()(h).float()
        tgt = nxt[sel]
        lp = torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1)
        rows = sel.nonzero(as_tuple=True)[0]
        return lp, rows

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Stage 1: the aligner's weighted losses on rows (``user_emb``, ``item_emb``,
        ``text_emb``, ``labels`` (B,)); stage 2: the mean negative log-likelihood of the
        target titles."""
        if self.stage == "align":
            return self.aligner.losses(
                self.user_norm(batch["user_emb"]), self.item_norm(batch["item_emb"]),
                batch["text_emb"], batch["labels"], self.stage1_weights,
            )["total"]  # fmt: skip
        lp, _ = self.target_logprobs(batch)
        return -lp.mean()

    def score(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` scores. Stage 1: ``<e_u, dec_I(enc_I(e_i))>``; stage 2: the target
        title's log-likelihood (:meth:`sequence_logprob`)."""
        if self.stage == "align":
            item_hat = self.aligner.item_dec(
                self.aligner.item_enc(self.item_norm(batch["item_emb"]))
            )
            return self.aligner.rec_logit(self.user_norm(batch["user_emb"]), item_hat)
        if "cand_ids" in batch:
            return self.candidate_logprob(batch)
        return self.sequence_logprob(batch)

    def sequence_logprob(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` total log-likelihood of each row's target title (EOS included)."""
        lp, rows = self.target_logprobs(batch)
        return torch.zeros(batch["labels"].shape[0], device=lp.device).index_add(0, rows, lp)

    @torch.no_grad()
    def candidate_logprob(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(P,)`` total log-likelihood of each pair's title (EOS included) for a
        :meth:`EpisodeCollator.candidates` batch.

        Each distinct prompt runs once, with the titles of all of its pairs packed after it
        in the same sequence: a title token sees the prompt and its own title's earlier
        tokens, never another title (a block-diagonal custom mask), and takes the position
        it would have right after the prompt. The ranking evaluation's 20 candidates per
        episode thus cost one forward of the prompt and the 20 titles, without copying
        the prompt's keys and values per pair. Every title token keeps its distance to
        every prompt token (RoPE sees what the full ``"target"`` sequence would give).
        """
        body = decoder_body(self.llm)
        prompt_mask = batch["attention_mask"].bool()
        pick, cand_ids = batch["cand_prompt"], batch["cand_ids"]
        lengths = batch["cand_mask"].sum(1).tolist()
        n_rows, n_prompt = prompt_mask.shape
        # where each title starts in its prompt's tail (titles packed in pair order)
        fill, starts = [0] * n_rows, []
        for u, n in zip(pick.tolist(), lengths):
            starts.append(fill[u])
            fill[u] += n
        dev = cand_ids.device
        p_of, j_of = batch["cand_mask"].bool().nonzero(as_tuple=True)  # (N,) pair, token
        u_of = pick[p_of]
        slot = torch.as_tensor(starts, dtype=torch.long, device=dev)[p_of] + j_of
        tail = max(fill)
        tail_ids = torch.full((n_rows, tail), pad_id_of(self.tokenizer), device=dev)
        tail_ids[u_of, slot] = cand_ids[p_of, j_of]
        tail_pair = torch.full((n_rows, tail), -1, dtype=torch.long, device=dev)
        tail_pair[u_of, slot] = p_of
        tail_step = torch.zeros((n_rows, tail), dtype=torch.long, device=dev)
        tail_step[u_of, slot] = j_of

        emb = torch.cat([self.embed(batch), self.llm.get_input_embeddings()(tail_ids)], dim=1)
        prompt_pos = torch.arange(n_prompt, device=dev).expand(n_rows, n_prompt)
        position_ids = torch.cat([prompt_pos, n_prompt + tail_step], dim=1)
        # allowed[u, q, k]: prompt keys (valid ones) for every prompt query at or after
        # them and for every title token; title keys for the same title's later tokens
        width = n_prompt + tail
        in_prompt = torch.arange(width, device=dev) < n_prompt
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        key_valid = torch.cat([prompt_mask, tail_pair >= 0], dim=1)[:, None, :]
        pair = torch.cat([torch.full_like(prompt_pos, -2), tail_pair], dim=1)
        same_title = pair[:, :, None] == pair[:, None, :]
        allowed = (
            key_valid & causal & (in_prompt[None, None, :] | (~in_prompt[:, None] & same_title))
        )
        # a padding query sees itself: no fully masked softmax row (NaN in eager attention)
        allowed |= torch.eye(width, dtype=torch.bool, device=dev)
        neg = torch.finfo(emb.dtype).min
        mask4d = torch.zeros(allowed.shape, dtype=emb.dtype, device=dev).masked_fill_(
            ~allowed, neg
        )[:, None]
        hidden = body(
            inputs_embeds=emb, attention_mask=mask4d, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # a title's first token is predicted by the prompt's last position, token j by j - 1
        col = torch.where(j_of == 0, n_prompt - 1, n_prompt + slot - 1)
        logits = self.llm.get_output_embeddings()(hidden[u_of, col]).float()
        lp = torch.log_softmax(logits, dim=-1).gather(1, cand_ids[p_of, j_of][:, None])[:, 0]
        return torch.zeros(pick.shape[0], device=lp.device).index_add(0, p_of, lp)

    @torch.no_grad()
    def generate(self, batch: Mapping[str, torch.Tensor], max_new_tokens: int = 40) -> List[str]:
        """Greedy decoding from prompt-only batches; the decoded continuations."""
        tok = self.tokenizer
        out = self.llm.generate(
            inputs_embeds=self.embed(batch),
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # A-LLMRec models/a_llmrec_model.py generate(): repetition_penalty 1.5
            repetition_penalty=self.repetition_penalty,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        return tok.batch_decode(out, skip_special_tokens=True)

    # -- persistence ---------------------------------------------------------------------------
    def save_trainable(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        meta = {
            "format": "pt",
            "method": "allmrec",
            "cf_dim": str(self.cf_dim),
            "text_dim": str(self.text_dim),
        }
        save_file(tensors, str(path), metadata=meta)

    def load_trainable(self, path, strict: bool = True) -> None:
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        own = self.trainable_state()
        bad = [k for k in set(own) & set(loaded) if tuple(own[k].shape) != tuple(loaded[k].shape)]
        missing, unexpected = set(own) - set(loaded), set(loaded) - set(own)
        if bad or (strict and (missing or unexpected)):
            raise ValueError(
                f"cannot load A-LLMRec state from {path}: shape mismatch {sorted(bad)[:3]}, "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        with torch.no_grad():
            for k, v in loaded.items():
                if k in own:
                    own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))
