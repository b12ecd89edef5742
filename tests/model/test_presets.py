"""The paper preset and the details that decide published results (issue 14).

Each test reads the value from the code (the preset, the parser, the module) and checks it
against the seed system's published setting, written out here from the source the README's
"Paper vs this project" table cites.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmrec.cli import build_parser, train_config
from llmrec.config import TrainConfig
from llmrec.data.prompts import ANSWER_SEPARATOR, build_prompt
from llmrec.methods.cora.generator import QFormerGenerator
from llmrec.presets import PRESETS, preset_defaults
from llmrec.training_loop import lr_factor, param_groups


def _train_args(*extra):
    """The flat values ``llmrec train`` would train with: the run's and its stage's."""
    import types

    cfg = train_config(build_parser("train").parse_args(["train", "--out", "x", *extra]))
    return types.SimpleNamespace(**{**vars(cfg), **vars(cfg.train)})


def test_paper_preset_is_the_default_of_llmrec_train():
    args = _train_args()
    assert args.preset == "paper"
    # CoRA cfg: init_lr 1e-3, warmup 200 steps from 1e-5, min_lr 8e-5, 100 iters per
    # validation, 20 validations of patience (LAVIS runner), no clipping, CF d 256
    assert args.lr == 1e-3
    assert args.warmup_steps == 200 and args.warmup_ratio == 0.0
    assert args.lr * args.warmup_start_ratio == pytest.approx(1e-5)
    assert args.lr * args.min_lr_ratio == pytest.approx(8e-5)
    assert args.eval_every == 100 and args.patience == 20
    assert args.grad_clip == 0.0
    assert args.cf_dim == 256
    # CoRA's own ML-1M config (train_configs/plora_pretrain_mf_ood_movie.yaml): batch 8
    assert args.batch_size == 8
    assert _train_args("--method", "tallrec").batch_size == 16  # CoLLM's step 1


def test_collm_paper_preset_uses_batch_16_and_lr_1e3_for_both_steps():
    args = _train_args("--method", "collm")
    assert args.batch_size == 16 and args.lr == 1e-3  # CoLLM cfg
    assert args.max_steps == 200 * 50  # max_epoch x iters_per_epoch: the cosine horizon
    # step 1 (LoRA) takes the run's lr unless lora_lr is set: both steps at 1e-3
    from llmrec.methods.collm import CoLLM

    assert CoLLM.Options().lora_lr is None


def test_explicit_flags_win_over_the_preset_and_fast_keeps_the_old_defaults():
    args = _train_args("--lr", "3e-4", "--patience", "5")
    assert args.lr == 3e-4 and args.patience == 5 and args.eval_every == 100
    fast = _train_args("--preset", "fast")
    assert (fast.lr, fast.epochs, fast.patience, fast.grad_clip) == (1e-4, 3, 2, 1.0)
    assert (fast.warmup_ratio, fast.warmup_steps, fast.eval_every, fast.cf_dim) == (
        0.05,
        None,
        0,
        64,
    )
    # fast == the TrainConfig dataclass defaults (programmatic runs are unchanged)
    base = TrainConfig()
    for key in ("lr", "epochs", "patience", "grad_clip", "warmup_ratio", "batch_size"):
        assert preset_defaults("fast", "cora")[key] == getattr(base, key), key


def test_every_preset_value_names_its_source():
    for preset in PRESETS.values():
        for method in ("cora", "collm", "allmrec", "frozen"):
            for key, value in preset.values(method).items():
                assert value.source.strip(), (preset.name, method, key)


def test_train_cf_dim_follows_the_preset(capsys):
    from llmrec.cli import cf_run_config, main

    def dim(*extra):
        args = build_parser("train-cf").parse_args(["train-cf", "--out", "x", *extra])
        return cf_run_config(args).dim

    assert dim() == 256  # paper: CoLLM cfg embedding_size
    assert dim("--preset", "fast") == 64 == PRESETS["fast"].train["cf_dim"].value
    assert dim("--preset", "fast", "--dim", "32") == 32  # a flag given wins
    assert dim("--preset", "paper", "--dim", "16") == 16
    with pytest.raises(SystemExit):
        main(["train-cf", "--help"])
    assert "(preset paper: 256, fast: 64)" in " ".join(capsys.readouterr().out.split())


def test_lavis_warmup_cosine_schedule():
    # LAVIS: warm-up lr = warmup_lr + (init_lr - warmup_lr) * step / warmup_steps, then
    # cosine from init_lr to min_lr; written out independently here
    init, warm, low, steps, total = 1e-3, 1e-5, 8e-5, 200, 10_000

    def reference(step):
        if step < steps:
            return warm + (init - warm) * step / steps
        t = (step - steps) / (total - steps)
        return low + (init - low) * 0.5 * (1 + math.cos(math.pi * t))

    for step in (0, 1, 100, 199, 200, 201, 5000, 9999, 10_000):
        got = init * lr_factor(step, total, steps, low / init, warm / init)
        assert got == pytest.approx(reference(step), rel=1e-12), step
    # without a start ratio the quick schedule is unchanged: (step + 1) / warmup
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)


def test_no_weight_decay_on_one_dimensional_parameters():
    gen = QFormerGenerator(8, hidden_size=16, rank=2, num_layers=1, num_heads=2)
    params = list(gen.parameters())
    groups = param_groups(params, TrainConfig(weight_decay=1e-3))
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    assert all(p.ndim >= 2 for p in by_decay[1e-3])
    assert all(p.ndim < 2 for p in by_decay[0.0])
    assert len(by_decay[1e-3]) + len(by_decay[0.0]) == len(params)
    # biases and LayerNorm gains are among the undecayed
    ids = {id(p) for p in by_decay[0.0]}
    assert id(gen.blocks[0].norm1.weight) in ids and id(gen.proj.bias) in ids


def test_prompt_has_a_literal_backslash_n_before_answer():
    for template in ("cora", "collm"):
        text = build_prompt(["A"], "B", template)
        # the reference prompt files' bytes: space, backslash (0x5c), 'n' (0x6e), '#Answer:'
        assert text.encode().endswith(b" \x5cn#Answer:")
        assert "\n" not in text
    assert ANSWER_SEPARATOR == " \\n" and len(ANSWER_SEPARATOR) == 3


def test_qformer_has_the_reference_bert_internals():
    torch.manual_seed(0)
    gen = QFormerGenerator(256, hidden_size=32, rank=2, num_layers=8, num_heads=8)
    width = 512  # 2 x d_cf 256, heads of 64
    assert gen.blocks[0].self_attn.head_dim == 64
    assert isinstance(gen.query_norm[0], torch.nn.LayerNorm)
    assert gen.query_norm[1].p == 0.1  # BertConfig.hidden_dropout_prob
    assert gen.blocks[0].ffn[0].out_features == 3072  # BertConfig.intermediate_size
    assert gen.blocks[0].dropout.p == 0.1 and gen.blocks[0].self_attn.dropout == 0.1
    # N(0, 0.02) on block matrices (BertConfig.initializer_range); biases zero
    w = torch.cat([b.ffn[0].weight.detach().flatten() for b in gen.blocks])
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001
    assert all(float(b.ffn[0].bias.abs().max()) == 0.0 for b in gen.blocks)
    assert gen.query_norm[0].normalized_shape == (width,)
    # the earlier behaviour stays reachable
    old = QFormerGenerator(8, 16, 2, ffn_mult=4, dropout=0.0, query_norm=False, init_std=None)
    assert old.blocks[0].ffn[0].out_features == 64 and isinstance(old.query_norm, torch.nn.Identity)


def test_cora_lora_dropout_option(monkeypatch):
    import types

    import llmrec.methods.cora as cora_method
    from llmrec.methods.cora import CoRA

    assert CoRA.Options().lora_dropout == 0.05  # CoRA cfg lora_config.dropout
    seen = {}
    monkeypatch.setattr(cora_method, "CoRARecommender", lambda *a, **k: seen.update(k))
    # the build reads the LLM's shape (rank <= hidden, the training state's size)
    llm = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64, num_hidden_layers=2))
    cfg = types.SimpleNamespace(answer_score="yes-no")
    ctx = types.SimpleNamespace(llm=llm, tokenizer=None, cf_dim=8, log=print, cfg=cfg)
    CoRA().build(ctx, CoRA.Options(lora_dropout=0.1))
    assert seen["lora_dropout"] == 0.1  # passed on to the fused op, no longer a no-op


def test_allmrec_stage1_reference_losses_and_modules():
    from llmrec.methods.allmrec.stage1_align import DEFAULT_STAGE1_WEIGHTS, Aligner

    assert DEFAULT_STAGE1_WEIGHTS == {
        "rec": 1.0,
        "match": 1.0,
        "recon_item": 0.5,
        "recon_text": 0.2,
    }
    torch.manual_seed(0)
    al = Aligner(6, 10, latent_dim=128)
    assert isinstance(al.item_enc[1], torch.nn.Sigmoid) and al.item_enc[0].out_features == 128
    assert isinstance(al.item_dec, torch.nn.Linear) and isinstance(al.text_dec, torch.nn.Linear)
    u, i, t = torch.randn(5, 6), torch.randn(5, 6), torch.randn(5, 10)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    got = al.losses(u, i, t, y)
    # written out from A-LLMRec's pre_train_phase1 (sigmoid latents, Linear decoders, mean
    # dot-product logit, loss + matching + 0.5 item recon + 0.2 text recon)
    zi = torch.sigmoid(i @ al.item_enc[0].weight.T + al.item_enc[0].bias)
    zt = torch.sigmoid(t @ al.text_enc[0].weight.T + al.text_enc[0].bias)
    ih = zi @ al.item_dec.weight.T + al.item_dec.bias
    th = zt @ al.text_dec.weight.T + al.text_dec.bias
    logit = (u * ih).mean(-1)
    rec = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
    mse = torch.nn.functional.mse_loss
    want = rec + mse(zi, zt) + 0.5 * mse(ih, i) + 0.2 * mse(th, t)
    torch.testing.assert_close(got["total"], want)


def test_allmrec_reference_projection_and_options():
    from llmrec.methods.allmrec import ALLMRecMethod
    from llmrec.methods.allmrec.stage2_prompt import _reference_projection

    proj = _reference_projection(128, 64, torch.nn.GELU)
    kinds = [type(m) for m in proj]
    assert kinds == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU, torch.nn.Linear]
    assert proj[0].out_features == 64 and proj[3].in_features == 64  # hidden = d_model
    opts = ALLMRecMethod.Options()
    assert opts.train_candidates == 20 and opts.candidates == 20
    assert opts.repetition_penalty == 1.5 and opts.latent_dim == 128
    assert (opts.stage1_lr, opts.stage1_batch_size) == (1e-4, 16)


@pytest.mark.parametrize(
    "title, generated, hit",
    [
        ("Heat (1995)", '"Heat (1995)"', True),
        ("Heat (1995)", ' "heat (1995)" is what I recommend', True),  # lower-cased
        ("Heat", '"Heat (1995)"', True),  # substring of the quoted part
        ("Heat (1995)", '"item title" : "Heat (1995)"', True),
        ("Heat (1995)", "Heat (1995) without quotes", True),  # no quote: the whole text
        ("Heat (1995)", '"Casino (1995)" then Heat (1995)', False),  # outside the quotes
        ("Heat (1995)", '"Hea', False),  # one quote: the empty text between it and itself
    ],
)
def test_allmrec_hit_at_1_follows_the_reference_rule(title, generated, hit):
    from llmrec.methods.allmrec.generation import reference_hit

    assert reference_hit(title, generated) is hit


def test_not_cold_means_user_and_item_in_train_and_the_loader_warns(tmp_path):
    import warnings

    from llmrec.data import load_data, make_synthetic, write_data

    data = make_synthetic(n_users=60, n_items=40, per_user=12, seed=3)
    users, items = set(data["train"]["uid"]), set(data["train"]["iid"])
    for split in ("valid", "test"):
        df = data[split]
        warm = [int(u in users and i in items) for u, i in zip(df["uid"], df["iid"])]
        assert df["not_cold"].tolist() == warm
    assert 0 < sum(data["test"]["not_cold"]) < len(data["test"])  # both kinds occur
    path = write_data(data, tmp_path / "ok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_data(path)  # consistent flags: no warning
    from llmrec.data.schema import DataValidationError

    original = data["test"].copy()
    # Cold although user and item both occur in train: unexpected, a warning.
    test = original.copy()
    test["not_cold"] = 0
    data.splits["test"] = test
    cold = write_data(data, tmp_path / "cold")
    with pytest.warns(UserWarning, match=r"test: \d+ of \d+ rows have not_cold flags"):
        load_data(cold)
    # Warm although the user or the item never occurs in train: impossible, an error.
    test = original.copy()
    test["not_cold"] = 1
    data.splits["test"] = test
    warm = write_data(data, tmp_path / "warm")
    with pytest.raises(DataValidationError, match=r"not_cold is 1 but (user|item)"):
        load_data(warm)


def test_default_ivf_index_returns_95_percent_of_the_exact_top_k():
    np = pytest.importorskip("numpy")
    pytest.importorskip("faiss")
    from llmrec.retrieval import IVF_PROBE_SHARE, ItemIndex

    rng = np.random.default_rng(0)
    # clustered item embeddings, as CF embeddings are (ML-1M's MF-256 items: 97-98%, the
    # measurement behind IVF_PROBE_SHARE, is in docs/presets.md)
    centres = rng.standard_normal((20, 64))
    items = centres[rng.integers(0, 20, 3707)] + 0.5 * rng.standard_normal((3707, 64))
    items = items.astype(np.float32)
    queries = rng.standard_normal((200, 64)).astype(np.float32)
    exact = ItemIndex(items, "exact", use_gpu=False)
    ivf = ItemIndex(items, "ivf", use_gpu=False)
    assert ivf.nprobe == max(8, math.ceil(IVF_PROBE_SHARE * ivf.nlist))
    for k in (10, 50, 100):
        want, got = exact.search(queries, k)[1], ivf.search(queries, k)[1]
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want)])
        assert recall >= 0.95, (k, recall)


def test_adam_betas_follow_each_reference():
    # LAVIS runner (CoRA, CoLLM): AdamW betas (0.9, run_cfg beta2 default 0.999);
    # A-LLMRec train_model.py: Adam betas (0.9, 0.98) in both stages, stage 2 evaluated at
    # its epoch-5 checkpoint
    for method in ("cora", "collm", "tallrec", "frozen"):
        assert _train_args("--method", method).adam_betas == [0.9, 0.999], method
    allmrec = _train_args("--method", "allmrec")
    assert allmrec.adam_betas == [0.9, 0.98]
    assert allmrec.epochs == 5 and allmrec.lr == 1e-4 and allmrec.weight_decay == 0.0
    assert _train_args("--method", "allmrec", "--adam-betas", "0.8", "0.9").adam_betas == [
        0.8,
        0.9,
    ]
    assert TrainConfig().adam_betas == preset_defaults("fast", "cora")["adam_betas"]


@pytest.mark.parametrize("betas", [("1.0", "0.9"), ("0.9", "1.5"), ("-0.1", "0.9"), ("0.9",)])
def test_adam_betas_outside_zero_one_are_refused(betas, capsys):
    with pytest.raises(SystemExit):
        _train_args("--adam-betas", *betas)
    assert "--adam-betas" in capsys.readouterr().err


def test_trainer_optimizer_uses_the_configured_betas(tmp_path):
    from llmrec.training_loop import Trainer

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3, 2))

        def trainable_parameters(self):
            return [self.w]

    cfg = TrainConfig(adam_betas=[0.8, 0.95])
    trainer = Trainer(_Model(), None, None, cfg, tmp_path, device="cpu")
    assert {g["betas"] for g in trainer.optimizer.param_groups} == {(0.8, 0.95)}
