"""Tokenizer: fixed hash (same ids in every process), Unicode handling, empty text, the n-gram definition."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa

from graph_engine.tokenizer import _fnv1a_fmix, tokenize, tokenize_batch, tokenize_reference

UNICODE_TEXTS = [
    "Hello, World! hello world",
    "Straße STRASSE strasse",
    "ＡＢＣ ﬁsh café cafe\u0301",  # full width, ligature, precomposed vs combining acute
    "हिन्दी भाषा",  # Devanagari with vowel signs (combining marks inside words)
    "日本語のテキスト 123 ٣٤٥",
    "emoji 🎉🎉 party_time 2024",
    "İstanbul ΣΊΣΥΦΟΣ",
    "a\x00b tab\tnew\nline",
    "   ...!!!   ",
    "",
    None,
]


def test_golden_ids_fixed_hash():
    # FNV-1a-32 + murmur fmix32 of the documented token strings: hard-coded so a change of hash,
    # prefix or order is caught (the feature store's ids must stay stable across releases).
    assert tokenize("hello").tolist() == [
        2353435906,
        2591783036,
        1744850294,
        2049297334,
        1656029125,
        262964451,
    ]
    assert tokenize("hello")[0] == _fnv1a_fmix(b"1\x1fhello")
    assert tokenize("a b", max_tokens=3).tolist() == [
        _fnv1a_fmix(b"1\x1fa"),
        _fnv1a_fmix(b"1\x1fb"),
        _fnv1a_fmix(b"2\x1fa\x1fb"),
    ]


def test_same_ids_in_another_process():
    code = (
        "import json, sys; from graph_engine.tokenizer import tokenize_batch; "
        "texts = json.loads(sys.stdin.read()); off, ids = tokenize_batch(texts, max_tokens=48); "
        "print(json.dumps([off.tolist(), ids.tolist()]))"
    )
    texts = [t for t in UNICODE_TEXTS]
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    off_other, ids_other = json.loads(result.stdout.strip().splitlines()[-1])
    off, ids = tokenize_batch(texts, max_tokens=48)
    assert off.tolist() == off_other
    assert ids.tolist() == ids_other
    assert len(ids) > 50


def test_vectorised_matches_reference_on_unicode():
    off, ids = tokenize_batch(UNICODE_TEXTS, max_tokens=40)
    assert ids.dtype == np.uint32 and off.dtype == np.int64
    for i, text in enumerate(UNICODE_TEXTS):
        np.testing.assert_array_equal(
            ids[off[i] : off[i + 1]], tokenize_reference(text, max_tokens=40), err_msg=repr(text)
        )


def test_case_folding_and_nfkc_equivalences():
    assert np.array_equal(tokenize("Straße"), tokenize("STRASSE"))
    assert np.array_equal(tokenize("ＨＥＬＬＯ"), tokenize("hello"))
    assert np.array_equal(tokenize("ﬁsh"), tokenize("fish"))
    assert np.array_equal(tokenize("cafe\u0301"), tokenize("café"))  # NFKC composes the accent
    assert not np.array_equal(tokenize("cafe"), tokenize("café"))


def test_words_are_unicode_safe():
    # The Devanagari word keeps its vowel signs: one word, so exactly one unigram (Python's \w would split it).
    ids = tokenize("हिन्दी", max_tokens=64)
    assert ids[0] == _fnv1a_fmix("1\x1fहिन्दी".encode())
    wrapped = "<हिन्दी>"
    expected_tri = [_fnv1a_fmix(("3\x1f" + wrapped[j : j + 3]).encode()) for j in range(len(wrapped) - 2)]
    assert len(expected_tri) == 6  # 6 code points -> 6 trigrams of the wrapped word
    assert ids[1:].tolist() == expected_tri  # one word: no bigram; code-point trigrams, never byte fragments
    # CJK without spaces is one word; punctuation separates.
    assert tokenize("日本,語")[0] == _fnv1a_fmix("1\x1f日本".encode())


def test_empty_and_missing_text():
    off, ids = tokenize_batch(["", None, "   ", "!!", "x"], max_tokens=8)
    assert off.tolist()[:5] == [0, 0, 0, 0, 0]
    assert off[-1] == len(ids) == 2  # "x": its unigram and the trigram "<x>"; nothing from the empties
    assert tokenize(None).size == 0
    off, ids = tokenize_batch([], max_tokens=8)
    assert off.tolist() == [0] and ids.size == 0
    off, ids = tokenize_batch(pa.array([None, "a"], pa.string()), max_tokens=8)
    assert off.tolist()[:2] == [0, 0] and off[-1] > 0


def test_order_dedup_and_cap():
    ids = tokenize("a a a", max_tokens=64)
    # unigram "a" once, bigram "a a" once, trigram "<a>" once
    assert ids.tolist() == [_fnv1a_fmix(b"1\x1fa"), _fnv1a_fmix(b"2\x1fa\x1fa"), _fnv1a_fmix(b"3\x1f<a>")]
    long_text = " ".join(f"w{i}" for i in range(100))
    ids = tokenize(long_text, max_tokens=16)
    assert ids.size == 16
    assert ids.tolist() == [_fnv1a_fmix(f"1\x1fw{i}".encode()) for i in range(16)]  # unigrams first
    off, _ = tokenize_batch([long_text, "b"], max_tokens=16)
    assert off.tolist() == [0, 16, 18]


def test_fields_are_joined_by_a_space():
    off, ids = tokenize_batch(["Red shoes", None, "Board"], ["for running", "desc", None], max_tokens=32)
    np.testing.assert_array_equal(ids[off[0] : off[1]], tokenize("Red shoes for running", max_tokens=32))
    np.testing.assert_array_equal(ids[off[1] : off[2]], tokenize("desc", max_tokens=32))
    np.testing.assert_array_equal(ids[off[2] : off[3]], tokenize("board", max_tokens=32))


def _reference_csr(*fields, max_tokens):
    n = len(fields[0])
    per_entity = [tokenize_reference(*[f[i] for f in fields], max_tokens=max_tokens) for i in range(n)]
    offsets = np.concatenate(([0], np.cumsum([len(t) for t in per_entity]))).astype(np.int64)
    return offsets, (np.concatenate(per_entity) if per_entity else np.zeros(0, np.uint32))


def test_arrow_input_nulls_non_ascii_and_chunks_match_the_reference():
    # Mixed ASCII-only and non-ASCII stretches so kernel chunks take both normalisation paths; the Arrow
    # columns have several chunks (and a sliced one with a non-zero offset) that do not line up with
    # each other nor with the kernel's chunk_rows.
    titles = (["Plain ASCII title", None, "UPPER lower", ""] * 5) + UNICODE_TEXTS + ["ＡＢＣ Straße", None, "x"]
    descs = [
        None if i % 3 == 0 else f"Desc {i} café ΣΊΣΥΦΟΣ" if i % 4 == 0 else f"desc {i}" for i in range(len(titles))
    ]
    cut = 7
    title_col = pa.chunked_array([pa.array(titles[:cut], pa.large_string()), pa.array(titles[cut:], pa.large_string())])
    padded = pa.array(["padding", *descs], pa.string()).slice(1)  # offset 1 into its buffers
    desc_col = pa.chunked_array([padded.slice(0, 11), padded.slice(11, 2), padded.slice(13)])
    want_off, want_ids = _reference_csr(titles, descs, max_tokens=24)
    for chunk_rows in (1, 5, 64):
        off, ids = tokenize_batch(title_col, desc_col, max_tokens=24, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(off, want_off, err_msg=f"chunk_rows={chunk_rows}")
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"chunk_rows={chunk_rows}")


def test_dictionary_and_python_inputs_match_the_reference():
    texts = ["Red SHOES", None, "Straße", "red shoes", "", "日本語"]
    want_off, want_ids = _reference_csr(texts, max_tokens=16)
    dictionary = pa.array(texts, pa.string()).dictionary_encode()
    for values in (dictionary, texts, ["Red SHOES", None, "Straße", "red shoes", "", "日本語"]):
        off, ids = tokenize_batch(values, max_tokens=16, chunk_rows=4)
        np.testing.assert_array_equal(off, want_off)
        np.testing.assert_array_equal(ids, want_ids)
    # Non-text items are tokenized as their str(); a lone surrogate does not fail the batch.
    off, ids = tokenize_batch([12, "a\ud800b"], max_tokens=8)
    np.testing.assert_array_equal(ids[off[0] : off[1]], tokenize_reference("12", max_tokens=8))
    np.testing.assert_array_equal(ids[off[1] : off[2]], tokenize_reference("a\ud800b", max_tokens=8))
