"""CoRA's collaborative weights generator: CF embeddings -> one low-rank ``A_b`` per sample.

Given a user embedding ``e_u`` and an item embedding ``e_i`` (both ``(B, d_cf)``), a generator
returns ``A`` of shape ``(B, hidden_size, rank)`` whose flattened ``hidden_size * rank`` vector
has unit L2 norm per sample. ``A_b`` is shared by every CoRA-patched projection of the LLM
(see :func:`llmrec_kernels.hf.cora_weights`).

Two generators:

* :class:`QFormerGenerator` (the paper's): ``k`` learnable queries pass through LayerNorm and
  dropout, then ``N`` blocks of [self-attention over the queries, cross-attention to the
  single token ``[e_u, e_i]``, FFN] (BERT post-norm blocks, width ``2 d_cf``, FFN 3072 wide,
  dropout 0.1, weights drawn from N(0, 0.02): the defaults of the ``BertConfig`` that
  VanillaCreamer/CoRA ``minigpt4/models/ppeft/weight_generator.py`` builds its Q-Former
  from, whose ``BertEmbeddings`` normalise the query embeddings); the query outputs go through
  ``Linear(2 d_cf -> hidden_size * rank)`` and are mean-pooled. Because that projection is
  affine, the mean is taken *before* it (mathematically identical, ``k`` times cheaper on the
  largest layer). With one key token the cross-attention weights are all 1, so it reduces to
  an affine map of ``[e_u, e_i]``; the architecture is kept for fidelity and configurability.
* :class:`MLPGenerator`: ``[e_u, e_i] -> Linear -> GELU -> Linear(-> hidden_size * rank)``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GENERATORS", "MLPGenerator", "QFormerGenerator", "build_generator"]


def _check_sizes(cf_dim: int, hidden_size: int, rank: int) -> None:
    for name, value in (("cf_dim", cf_dim), ("hidden_size", hidden_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_cf_inputs(user_emb: torch.Tensor, item_emb: torch.Tensor, cf_dim: int) -> None:
    for name, t in (("user_emb", user_emb), ("item_emb", item_emb)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if t.dim() != 2 or t.shape[1] != cf_dim:
            raise ValueError(f"{name} must be (B, cf_dim) = (B, {cf_dim}), got {tuple(t.shape)}")
    if user_emb.shape[0] != item_emb.shape[0]:
        raise ValueError(
            f"user_emb and item_emb must have the same batch size, got {user_emb.shape[0]} "
            f"and {item_emb.shape[0]}"
        )


class _Base(nn.Module):
    cf_dim: int
    hidden_size: int
    rank: int

    def _finish(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, hidden*rank) -> L2-normalised over the whole vector -> (B, hidden, rank)."""
        flat = F.normalize(flat, p=2.0, dim=-1, eps=1e-12)
        return flat.view(flat.shape[0], self.hidden_size, self.rank)


class _QFormerBlock(nn.Module):
    """Self-attention over the queries, cross-attention to the CF token, FFN (post-norm)."""

    def __init__(self, width: int, num_heads: int, ffn_dim: int, dropout: float, eps: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.cross_attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, width),
        )
        self.norm3 = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.dropout(self.self_attn(q, q, q, need_weights=False)[0]))
        q = self.norm2(q + self.dropout(self.cross_attn(q, kv, kv, need_weights=False)[0]))
        return self.norm3(q + self.dropout(self.ffn(q)))


class QFormerGenerator(_Base):
    """Q-Former-style generator of per-sample CoRA factors ``A`` ``(B, hidden_size, rank)``.

    Args:
        cf_dim: ``d_cf``, the size of each CF embedding; the block width is ``2 * cf_dim``.
        hidden_size: the LLM's hidden size ``d``.
        rank: the CoRA rank ``r``.
        num_queries: ``k`` learnable queries (paper: 4).
        num_layers: ``N`` blocks (paper: 8).
        num_heads: attention heads (paper: 8); must divide ``2 * cf_dim``.
        ffn_dim: FFN width (reference: ``BertConfig.intermediate_size`` 3072, whatever the
            block width; 6x the width at ``d_cf`` 256).
        ffn_mult: when given, the FFN width is ``ffn_mult * 2 * cf_dim`` instead (this
            project's earlier default was 4).
        dropout: dropout on the queries' input, on attention probabilities and after every
            sub-layer (reference: BERT's 0.1).
        query_norm: LayerNorm (and dropout) on the queries before block 1 (reference: yes).
        init_std: std of the normal init of every block weight and of the queries, biases
            zero, LayerNorms 1/0 (BERT's ``initializer_range`` 0.02); None: PyTorch's
            default init (this project's earlier behaviour). The output projection keeps
            PyTorch's default (the reference's ``kaiming_uniform_``).
        layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).

    ``forward(user_emb, item_emb)``: both ``(B, cf_dim)`` float -> ``(B, hidden_size, rank)``
    in the generator's dtype, each sample's ``hidden_size * rank`` entries of unit L2 norm.
    """

    def __init__(
        self,
        cf_dim: int,
        hidden_size: int,
        rank: int,
        num_queries: int = 4,
        num_layers: int = 8,
        num_heads: int = 8,
        ffn_dim: int = 3072,
        ffn_mult: Optional[int] = None,
        dropout: float = 0.1,
        query_norm: bool = True,
        init_std: Optional[float] = 0.02,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        _check_sizes(cf_dim, hidden_size, rank)
        for name, value in (
            ("num_queries", num_queries),
            ("num_heads", num_heads),
            ("ffn_dim", ffn_dim),
            ("ffn_mult", 1 if ffn_mult is None else ffn_mult),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be an integer >= 0, got {num_layers!r}")
        width = 2 * cf_dim
        if width % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the width 2*cf_dim={width}")
        self.cf_dim, self.hidden_size, self.rank = cf_dim, hidden_size, rank
        self.num_queries = num_queries
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        ffn = ffn_dim if ffn_mult is None else ffn_mult * width
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.query_norm = (
            nn.Sequential(nn.LayerNorm(width, eps=layer_norm_eps), nn.Dropout(dropout))
            if query_norm
            else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            _QFormerBlock(width, num_heads, ffn, dropout, layer_norm_eps) for _ in range(num_layers)
        )
        if init_std is not None:
            self._bert_init(float(init_std))
        self.proj = nn.Linear(width, hidden_size * rank)

    def _bert_init(self, std: float) -> None:
        """BERT's ``_init_weights``: matrices N(0, std), biases 0, LayerNorm 1 / 0."""
        with torch.no_grad():
            self.queries.normal_(0.0, std)
            for name, p in self.blocks.named_parameters():
                if "norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif p.ndim >= 2:
                    p.normal_(0.0, std)
                else:
                    p.zero_()

    def forward(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        _check_cf_inputs(user_emb, item_emb, self.cf_dim)
        dtype = self.queries.dtype
        kv = torch.cat([user_emb, item_emb], dim=-1).to(dtype).unsqueeze(1)  # (B, 1, 2 d_cf)
        # one dropout mask per sample, as BERT's embedding dropout
        q = self.query_norm(self.queries.unsqueeze(0).expand(kv.shape[0], -1, -1))  # (B, k, 2 d_cf)
        for block in self.blocks:
            q = block(q, kv)
        # mean_k(Linear(q_k)) == Linear(mean_k(q_k)): pool first.
        return self._finish(self.proj(q.mean(dim=1)))


class MLPGenerator(_Base):
    """MLP generator: ``[e_u, e_i]`` (``2 cf_dim``) -> ``hidden`` (GELU) -> ``hidden_size * rank``.

    ``forward(user_emb, item_emb)``: ``(B, cf_dim)`` each -> ``(B, hidden_size, rank)``, each
    sample L2-normalised over all ``hidden_size * rank`` entries. ``mlp_hidden`` defaults to
    ``2 * cf_dim``.
    """

    def __init__(
        self,
        cf_dim: int,
        hidden_size: int,
        rank: int,
        mlp_hidden: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_sizes(cf_dim, hidden_size, rank)
        mlp_hidden = 2 * cf_dim if mlp_hidden is None else mlp_hidden
        if isinstance(mlp_hidden, bool) or not isinstance(mlp_hidden, int) or mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be an integer >= 1, got {mlp_hidden!r}")
        self.cf_dim, self.hidden_size, self.rank = cf_dim, hidden_size, rank
        self.net = nn.Sequential(
            nn.Linear(2 * cf_dim, mlp_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, hidden_size * rank),
        )

    def forward(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        _check_cf_inputs(user_emb, item_emb, self.cf_dim)
        x = torch.cat([user_emb, item_emb], dim=-1).to(self.net[0].weight.dtype)
        return self._finish(self.net(x))


GENERATORS = {"qformer": QFormerGenerator, "mlp": MLPGenerator}


def build_generator(
    kind: str, cf_dim: int, hidden_size: int, rank: int, **kwargs: Any
) -> nn.Module:
    """Build a generator by name: ``"qformer"`` (:class:`QFormerGenerator`) or ``"mlp"``.

    Extra keyword arguments go to the class (e.g. ``num_queries``, ``num_layers``,
    ``num_heads``, ``ffn_dim``, ``dropout``, ``query_norm``, ``init_std`` for ``"qformer"``; ``mlp_hidden`` for ``"mlp"``).
    """
    key = kind.lower() if isinstance(kind, str) else kind
    if key not in GENERATORS:
        raise ValueError(f"unknown generator kind {kind!r}; expected one of {sorted(GENERATORS)}")
    cls = GENERATORS[key]
    try:
        return cls(cf_dim, hidden_size, rank, **kwargs)
    except TypeError as exc:
        raise TypeError(f"build_generator({kind!r}, ...): {exc}") from exc
