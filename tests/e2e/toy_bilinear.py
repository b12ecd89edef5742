"""A toy method, written as a new method module is: dropped into ``python/llmrec/methods/``
as ``toy_bilinear.py`` it trains, evaluates and compares through the ``llmrec`` CLI with no
edit anywhere else (tests/e2e/test_method_plugin.py puts it there for the test's length).

``score = scale * e_u^T W e_i``: a bilinear CF score that reads no prompt at all, trained in
two stages (a warm-up stage, then the main one) to show multi-stage training too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmrec.config import option, positive_int
from llmrec.method import Method, Stage, register

BUILT = []  # the options every build saw (read by the test)


class Bilinear(nn.Module):
    """``(B,)`` scores ``scale * e_u^T W e_i`` of a batch's ``user_emb`` / ``item_emb``
    ``(B, d_cf)`` float rows; ``W`` ``(d_cf, d_cf)`` trains."""

    def __init__(self, cf_dim: int, scale: float):
        super().__init__()
        self.w = nn.Parameter(torch.eye(cf_dim) * 0.1)
        self.scale = scale

    def score(self, batch):
        return self.scale * ((batch["user_emb"] @ self.w) * batch["item_emb"]).sum(-1)

    def loss(self, batch):
        return F.binary_cross_entropy_with_logits(self.score(batch), batch["labels"].float())

    def trainable_state(self):
        return {"w": self.w}

    def trainable_parameters(self):
        yield self.w

    def save_trainable(self, path):
        from safetensors.torch import save_file

        save_file({"w": self.w.detach().cpu().contiguous()}, str(path))

    def load_trainable(self, path):
        from safetensors.torch import load_file

        with torch.no_grad():
            self.w.copy_(load_file(str(path))["w"])


@register
class Toy(Method):
    name = "toy-bilinear"
    description = "a bilinear CF score (test plug-in)"
    report_columns = (("w_trace", "trace W", ".3f"),)

    @dataclass
    class Options:  # each field is a flag: --toy-bilinear-scale, --toy-bilinear-warm-epochs
        scale: float = option(1.0, help="the score's scale")
        warm_epochs: int = option(1, help="epochs of the warm-up stage", parse=positive_int)

    def build(self, ctx, opts):
        BUILT.append(opts)
        return Bilinear(ctx.cf_dim, opts.scale)

    def stages(self, ctx, model, opts):
        (main_stage,) = super().stages(ctx, model, opts)
        warm_cfg = dataclasses.replace(ctx.cfg.train, epochs=opts.warm_epochs)
        warm = Stage("warm", main_stage.train, main_stage.valid, warm_cfg, subdir="warm")
        return [warm, main_stage]

    def evaluate(self, ctx, model, opts, df, predict, full=True):
        block, scores = super().evaluate(ctx, model, opts, df, predict, full)
        block["w_trace"] = float(model.w.detach().trace())
        return block, scores
