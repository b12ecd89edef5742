"""``--llm org/model``: a Hub ID resolved from the local Hugging Face cache, offline; and the
dtype argument of ``from_pretrained``/``from_config`` on old and new transformers.

The cache is laid out here the way ``huggingface_hub`` writes it
(``models--org--name/snapshots/<commit>/`` plus ``refs/main``); nothing touches the network.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from llmrec.pretrained import hf_dtype_kwargs, resolve_llm
from llmrec.tiny_llm import LLMLoadError, build_tiny_llm, load_llm, save_llm

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_model(cache, repo_id: str, source) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = build_tiny_llm(["Yes No the movie was good"] * 20, config={"vocab_size": 300})
    path = tmp_path_factory.mktemp("tiny")
    save_llm(model, tok, path)
    return path, model


def test_hub_id_in_the_cache_resolves_to_its_snapshot_and_loads(
    hub_cache, tiny_dir, tmp_path, monkeypatch
):
    source, model = tiny_dir
    cache_model(hub_cache, "someorg/tiny-llama", source)
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    path = resolve_llm("someorg/tiny-llama")
    assert path == hub_cache / "models--someorg--tiny-llama" / "snapshots" / COMMIT
    assert resolve_llm(f"someorg/tiny-llama@{COMMIT}") == path
    loaded, _ = load_llm(path, dtype=torch.float32, device=torch.device("cpu"))
    for (name, p), q in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), name


def test_hub_id_not_cached_is_one_clear_line(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LLMLoadError) as err:
        resolve_llm("someorg/absent-model")
    msg = str(err.value)
    assert "\n" not in msg
    assert "someorg/absent-model is not in the local Hugging Face cache" in msg
    assert str(hub_cache) in msg and "huggingface-cli download someorg/absent-model" in msg


def test_a_local_directory_wins_over_a_hub_id(hub_cache, tiny_dir, tmp_path, monkeypatch):
    source, _ = tiny_dir
    monkeypatch.chdir(tmp_path)
    shutil.copytree(source, tmp_path / "someorg" / "tiny-llama")
    assert resolve_llm("someorg/tiny-llama").resolve() == tmp_path / "someorg" / "tiny-llama"


@pytest.mark.parametrize(
    "version, key", [("4.46.3", "torch_dtype"), ("4.56.0", "dtype"), ("5.25.0", "dtype")]
)
def test_dtype_argument_follows_the_transformers_version(monkeypatch, version, key):
    # By name: the module object in sys.modules, the one the function imports.
    monkeypatch.setattr("transformers.__version__", version)
    assert hf_dtype_kwargs(torch.float64) == {key: torch.float64}


def test_from_config_gets_the_dtype_on_this_transformers():
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=10,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, **hf_dtype_kwargs(torch.float64))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
