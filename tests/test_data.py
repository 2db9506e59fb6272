"""Corpus preparation, roff conversion, split loading and deterministic token sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.data import (
    DEFAULT_CENTRES,
    DataError,
    DataSourceError,
    TokenSampler,
    load_split,
    prepare_centre,
    read_documents,
    roff_to_text,
)

ROFF = r""".\" a comment that must vanish
.TH LS 1 "2022" "GNU" "Commandes"
.de XX
secret macro body
..
.SH "VOIR AUSSI"
.PP
Afficher les \fBinformations\fP des \fIFICHIERs\fR \(em voir
\fB\-\-all\fP, l\(aqoption \(lqlongue\(rq et \e n\ (barre\~oblique).
.TP
.B \-a
inclure les entr\('ees \s-1cach\('ees\s0\f(CW.\fP
.BR ls (1),
.IR dir (1)
.IP \(bu 2
point \*(Aqun\*(Aq \" commentaire en fin de ligne
"""


def test_roff_to_text_keeps_prose_and_drops_markup() -> None:
    text = roff_to_text(ROFF)
    assert "VOIR AUSSI" in text and "Afficher les informations des FICHIERs — voir" in text
    assert "--all, l'option \"longue\" et \\ n (barre oblique)." in text
    assert "-a\ninclure les entrées cachées." in text
    assert "ls(1), dir(1)" in text
    assert "• point 'un'" in text
    for junk in ("\\f", "\\(", "\\-", "\\s", "comment", "secret", ".TH", ".PP", "LS 1"):
        assert junk not in text, junk


def test_manpages_fr_is_readable_french() -> None:
    docs = list(read_documents("manpages:fr", max_bytes=50_000))
    text = "\n".join(docs)
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 50_000 - 4 < total <= 50_000  # the last page is cut on a character boundary
    for word in (" les ", " des ", " une ", "fichier"):
        assert word in text, word
    assert "\\f" not in text and "\\-" not in text and "\n.TH" not in text


def test_manpages_fr_ls_page_is_prose() -> None:
    import gzip

    raw = gzip.decompress(Path("/usr/share/man/fr/man1/ls.1.gz").read_bytes()).decode()
    text = roff_to_text(raw)
    assert "ls - Afficher le contenu de répertoires" in text
    assert "-a, --all\ninclure les entrées débutant par « . »" in text


def test_missing_manpages_language_names_the_package() -> None:
    with pytest.raises(DataSourceError, match=r"manpages:xx.*apt-get install manpages-xx"):
        read_documents("manpages:xx")


def test_default_centres_one_language_each() -> None:
    assert [s for _, s in DEFAULT_CENTRES] == [f"manpages:{x}" for x in ("fr", "de", "es", "en")]
    assert len({c for c, _ in DEFAULT_CENTRES}) == 4


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_dataset("json") caches an Arrow copy; keep it out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _txt_corpus(root: Path, n: int = 6) -> list[str]:
    docs = [f"Document {i}: texte libre numéro {i}.\n" * (i + 1) for i in range(n)]
    (root / "sub").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (root / ("sub" if i % 2 else "") / f"d{i}.txt").write_text(doc, encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return docs


def test_prepare_from_txt_directory_and_round_trip(tmp_path: Path) -> None:
    docs = _txt_corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    manifest = prepare_centre(str(tmp_path / "corpus"), out, validation_fraction=0.3, seed=1)
    assert not (tmp_path / "prepared.tmp").exists()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == len(docs)
    assert splits["validation"]["documents"] == 2  # round(6 * 0.3)
    assert sum(s["bytes"] for s in splits.values()) == sum(len(d.encode()) for d in docs)
    assert all(len(s["sha256"]) == 64 for s in splits.values())
    assert "Document" not in json.dumps(manifest)  # hashes and counts only, never text

    import datasets

    seen = []
    for split in ("train", "validation"):
        stored = datasets.load_from_disk(str(out / split))["text"]
        stored = list(stored)
        seen += stored
        tokens = load_split(out, split, "fr-genci")
        assert tokens.dtype == np.uint8 and tokens.ndim == 1
        assert tokens.tobytes() == "\n\n".join(stored).encode("utf-8")
        assert len(tokens) == splits[split]["tokens"]
    assert sorted(seen) == sorted(docs)
    # Same seed -> same split; the fingerprints prove it without comparing text.
    again = prepare_centre(str(tmp_path / "corpus"), tmp_path / "p2", validation_fraction=0.3,
                           seed=1)
    assert again["splits"] == manifest["splits"]


def test_prepare_from_jsonl_file(tmp_path: Path) -> None:
    rows = [{"text": f"ligne {i} » é ü ñ", "id": i} for i in range(10)]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest = prepare_centre(str(src), tmp_path / "out")
    assert manifest["splits"]["validation"]["documents"] == 1  # at least one
    assert manifest["splits"]["train"]["documents"] == 9
    assert manifest["source"] == str(src)
    text = load_split(tmp_path / "out", "train", "es-bsc").tobytes().decode("utf-8")
    assert "» é ü ñ" in text


def test_jsonl_without_text_column_names_file_and_columns(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(DataSourceError, match=r"bad\.jsonl.*'body'"):
        prepare_centre(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_max_bytes_and_too_few_documents(tmp_path: Path) -> None:
    _txt_corpus(tmp_path / "c")
    docs = list(read_documents(str(tmp_path / "c"), max_bytes=40))
    assert sum(len(d.encode()) for d in docs) == 40
    with pytest.raises(DataSourceError, match="at least 2"):
        prepare_centre(str(tmp_path / "c"), tmp_path / "out", max_bytes=30)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    _txt_corpus(tmp_path / "c")
    out = tmp_path / "out"
    first = prepare_centre(str(tmp_path / "c"), out, seed=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_centre(str(tmp_path / "c"), out, seed=5)
    assert json.loads((out / "manifest.json").read_text()) == first
    second = prepare_centre(str(tmp_path / "c"), out, seed=5, validation_fraction=0.5,
                            overwrite=True)
    assert json.loads((out / "manifest.json").read_text()) == second
    assert not (tmp_path / "out.tmp").exists() and not (tmp_path / "out.old").exists()


def test_missing_path_source(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="nope"):
        read_documents(str(tmp_path / "nope"))


def test_load_split_errors_name_centre_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_split(missing, "train", "de-lrz")
    msg = str(err.value)
    assert "de-lrz" in msg and str(missing) in msg and "bridgepool data prepare" in msg
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match=r"de-lrz.*validation.*half"):
        load_split(tmp_path / "half", "validation", "de-lrz")
    _txt_corpus(tmp_path / "c")
    prepare_centre(str(tmp_path / "c"), tmp_path / "ok")
    with pytest.raises(DataError, match=r"en-bristol.*need at least 10000000"):
        load_split(tmp_path / "ok", "train", "en-bristol", min_tokens=10_000_000)


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    tokens = np.frombuffer(("Bonjour le monde. " * 300).encode(), dtype=np.uint8)
    s = TokenSampler(tokens, seq_len=32, batch_size=4, seed=7)
    x, y = s.batch(3)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    fresh = TokenSampler(tokens.copy(), seq_len=32, batch_size=4, seed=7)  # a "resumed" run
    assert all(np.array_equal(a, b) for a, b in zip(fresh.batch(3), (x, y), strict=True))
    assert not np.array_equal(s.batch(4)[0], x)
    assert not np.array_equal(TokenSampler(tokens, 32, 4, seed=8).batch(3)[0], x)
    first = s.eval_batches(3)
    assert len(first) == 3 and all(np.array_equal(a[0], b[0]) for a, b in
                                   zip(first, s.eval_batches(3), strict=True))


def test_sampler_rejects_too_short_stream() -> None:
    with pytest.raises(DataError, match="seq_len"):
        TokenSampler(np.zeros(33, dtype=np.uint8), seq_len=32, batch_size=2, seed=0)
    TokenSampler(np.zeros(34, dtype=np.uint8), seq_len=32, batch_size=2, seed=0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 3000), seq_len=st.integers(1, 64), batch=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1), step=st.integers(0, 2**40), n_eval=st.integers(0, 6))
def test_sampler_windows_stay_in_range(n: int, seq_len: int, batch: int, seed: int,
                                       step: int, n_eval: int) -> None:
    if n < seq_len + 2:
        with pytest.raises(DataError):
            TokenSampler(np.arange(n), seq_len, batch, seed)
        return
    s = TokenSampler(np.arange(n), seq_len, batch, seed)  # token value == its position
    x, y = s.batch(step)
    starts = x[:, 0]
    assert ((starts >= 0) & (starts + seq_len + 1 <= n)).all()
    assert np.array_equal(x, starts[:, None] + np.arange(seq_len))
    assert np.array_equal(y, x + 1)
    evals = s.eval_batches(n_eval)
    assert len(evals) <= n_eval and (n_eval == 0 or len(evals) >= 1)
    eval_starts = np.concatenate([ex[:, 0] for ex, _ in evals]) if evals else np.array([])
    assert (np.diff(eval_starts) >= seq_len + 1).all()  # non-overlapping, in stream order
    assert all(np.array_equal(ey, ex + 1) and ex[-1, -1] + 1 < n for ex, ey in evals)
    assert all(len(ex) == batch for ex, _ in evals) or len(evals) == 1
