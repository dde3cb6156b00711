"""Shared fixtures: a tiny random-init llama (mechanics only, never evidence of quality)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from allocator.model.corpus import Corpus
    from allocator.model.loading import LoadedModel

WORDS = (
    "the a of and to in is was for on as with by at from his her their it this that which "
    "river city king war music science water stone light north south early later small great"
).split()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 2,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>", pad_token="<unk>")


def random_text(paragraphs: int = 40, words: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(paragraphs))


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """The tiny llama as bitalloc loads a model (one per test module: tests may swap its weights)."""
    from allocator.model.loading import LoadedModel

    return LoadedModel("tiny-llama", tiny_llama(), tiny_tokenizer(), add_bos=False)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """Random-word calibration and evaluation texts that never overlap."""
    from allocator.model.corpus import Corpus

    return Corpus("random", random_text(seed=3), random_text(seed=4))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny llama + word-level tokenizer, loadable as an HF model directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(random_text())
    return path


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
