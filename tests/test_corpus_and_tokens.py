import pytest
import torch

from allocator.errors import BitallocError
from allocator.model.corpus import clean_wiki_text, load_corpus
from allocator.model.tokens import calibration_samples, evaluation_windows
from tests.conftest import tiny_tokenizer


@pytest.fixture(scope="module")
def enwiki():
    return load_corpus("enwiki")


def test_enwiki_split_is_substantial_disjoint_and_deterministic(enwiki) -> None:
    assert len(enwiki.calibration) > 1_000_000 and len(enwiki.evaluation) > 300_000
    calibration = set(enwiki.calibration.split("\n\n"))
    evaluation = set(enwiki.evaluation.split("\n\n"))
    long_paragraphs = {p for p in evaluation if len(p) > 200}
    assert long_paragraphs and not (long_paragraphs & calibration)
    assert load_corpus("enwiki") == enwiki
    assert "'''" not in enwiki.evaluation and "#REDIRECT" not in enwiki.evaluation


def test_clean_wiki_text_keeps_prose_and_headings_drops_debris() -> None:
    text = ("'''Albedo''' is the measure of the diffuse reflection of solar radiation.\n\n==Terrestrial albedo==\n\n 0.04 \n\n"
            "Fresh snow reflects most of the visible light that falls on its surface.")
    cleaned = clean_wiki_text(text).split("\n\n")
    assert cleaned[0].startswith("Albedo is the measure")
    assert "Terrestrial albedo" in cleaned and "0.04" not in cleaned


def test_text_file_corpus_and_errors(text_file, tmp_path) -> None:
    corpus = load_corpus(str(text_file))
    assert corpus.calibration and corpus.evaluation
    assert not set(corpus.calibration.split("\n\n")) & set(corpus.evaluation.split("\n\n"))
    with pytest.raises(BitallocError):
        load_corpus(str(tmp_path / "missing.txt"))
    one = tmp_path / "one.txt"
    one.write_text("only one paragraph")
    with pytest.raises(BitallocError):
        load_corpus(str(one))


def test_windows_and_samples(text_file) -> None:
    corpus = load_corpus(str(text_file))
    tokenizer = tiny_tokenizer()
    windows = evaluation_windows(tokenizer, corpus.evaluation, 32, 100, add_bos=True)
    assert windows.shape == (3, 32) and (windows[:, 0] == tokenizer.bos_token_id).all()
    plain = evaluation_windows(tokenizer, corpus.evaluation, 32, 100, add_bos=False)
    assert torch.equal(plain[0, :31], windows[0, 1:])  # same text, BOS only prepended
    first = calibration_samples(tokenizer, corpus.calibration, 5, 16, add_bos=False, seed=3)
    assert first.shape == (5, 16)
    assert torch.equal(first, calibration_samples(tokenizer, corpus.calibration, 5, 16, add_bos=False, seed=3))
    assert not torch.equal(first, calibration_samples(tokenizer, corpus.calibration, 5, 16, add_bos=False, seed=4))
    with pytest.raises(BitallocError):
        evaluation_windows(tokenizer, corpus.evaluation, 32, 10, add_bos=False)
    with pytest.raises(BitallocError):
        evaluation_windows(tokenizer, corpus.evaluation, 32, 10**7, add_bos=False)
