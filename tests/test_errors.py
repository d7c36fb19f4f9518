"""The error contract: every bad input raises the documented exception, naming the argument.

Each case runs in a forked child, so a crash (a panic that aborts, a segfault) fails that case
instead of killing the test run.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import attnkit
from attnkit import _core
from conftest import run_forked

f32 = np.float32
W = np.zeros((10, 4), f32)
IDS = np.array([1, 2, 3])
X = np.zeros((1, 2, 3, 8), f32)
COS = np.zeros((3, 4), f32)


def masked():
    return np.ma.masked_array([1, 2], mask=[0, 1])


CASES = [
    # embedding
    ("ids float", lambda: attnkit.embedding(np.array([1.0]), W), TypeError, r"ids: expected an integer array.*float64"),
    ("ids bool", lambda: attnkit.embedding(np.array([True]), W), TypeError, r"ids: .*bool"),
    ("ids object", lambda: attnkit.embedding(np.array([1, None]), W), TypeError, r"ids: .*object"),
    ("ids complex", lambda: attnkit.embedding(np.array([1j]), W), TypeError, r"ids: .*complex"),
    ("ids masked", lambda: attnkit.embedding(masked(), W), TypeError, r"ids: numpy.ma.MaskedArray"),
    ("weight int", lambda: attnkit.embedding(IDS, np.zeros((3, 2), int)), TypeError, r"weight: expected a float32, float64, float16 or bfloat16"),
    ("weight complex", lambda: attnkit.embedding(IDS, W.astype(np.complex64)), TypeError, r"weight: .*got dtype complex64"),
    ("weight 1-d", lambda: attnkit.embedding(IDS, np.zeros(4, f32)), ValueError, r"weight: expected a 2-d array .*\(4,\)"),
    ("weight 3-d", lambda: attnkit.embedding(IDS, np.zeros((2, 2, 2), f32)), ValueError, r"weight: expected a 2-d"),
    ("id negative", lambda: attnkit.embedding(np.array([3, -1, 20]), W), IndexError, r"ids\[1\] = -1 is out of range for a table of 10 rows"),
    ("id too large", lambda: attnkit.embedding(np.array([[0, 1], [10, 2]]), W), IndexError, r"ids\[1, 0\] = 10 is out of range .* 10 rows"),
    ("id uint64 max", lambda: attnkit.embedding(np.array([2**64 - 1], np.uint64), W), IndexError, r"ids\[0\] = 18446744073709551615"),
    ("id 0-d", lambda: attnkit.embedding(np.int8(-5), W), IndexError, r"ids = -5 is out of range"),
    ("id empty table", lambda: attnkit.embedding(np.array([0]), np.zeros((0, 3), f32)), IndexError, r"0 rows"),
    ("scale nan", lambda: attnkit.embedding(IDS, W, scale=float("nan")), ValueError, r"scale: expected a finite"),
    ("scale str", lambda: attnkit.embedding(IDS, W, scale="2"), TypeError, r"scale: expected a real number"),
    ("huge output", lambda: attnkit.embedding(np.zeros(1 << 20, np.uint8), np.zeros((1, 1 << 20), f32)), MemoryError, r"^out \(ids.shape \+ \(dim,\): set by ids and weight\): cannot allocate an array of shape \(1048576, 1048576\) and dtype float32 \(4398046511104 bytes\)"),
    ("huge broadcast ids", lambda: attnkit.embedding(np.broadcast_to(np.int64(0), (1 << 50,)), W), MemoryError, r"^ids \(a contiguous copy of shape \(1125899906842624,\)\): Unable to allocate"),
    # embedding_bag
    ("bag mode", lambda: attnkit.embedding_bag(IDS, W, np.array([0]), mode="median"), ValueError, r"mode: expected one of 'sum', 'mean', 'max', got 'median'"),
    ("bag 2-d with offsets", lambda: attnkit.embedding_bag(IDS.reshape(1, 3), W, np.array([0])), ValueError, r"offsets: must be None"),
    ("bag 1-d without offsets", lambda: attnkit.embedding_bag(IDS, W), ValueError, r"offsets: required"),
    ("bag 3-d ids", lambda: attnkit.embedding_bag(np.zeros((1, 1, 1), int), W), ValueError, r"ids: expected a 1-d or 2-d"),
    ("bag offsets[0]", lambda: attnkit.embedding_bag(IDS, W, np.array([1, 2])), ValueError, r"offsets: offsets\[0\] must be 0"),
    ("bag offsets decrease", lambda: attnkit.embedding_bag(IDS, W, np.array([0, 2, 1])), ValueError, r"offsets: must not decrease"),
    ("bag offsets past end", lambda: attnkit.embedding_bag(IDS, W, np.array([0, 4])), ValueError, r"offsets: entries must be <= len\(ids\) = 3"),
    ("bag offsets float", lambda: attnkit.embedding_bag(IDS, W, np.array([0.0])), TypeError, r"offsets: expected an integer"),
    ("bag offsets 2-d", lambda: attnkit.embedding_bag(IDS, W, np.array([[0]])), ValueError, r"offsets: expected a 1-d"),
    ("bag last offset empty", lambda: attnkit.embedding_bag(IDS, W, np.array([], int), include_last_offset=True), ValueError, r"offsets: .*at least one"),
    ("bag psw mean", lambda: attnkit.embedding_bag(IDS, W, np.array([0]), per_sample_weights=np.ones(3, f32)), ValueError, r"per_sample_weights: is only supported with mode='sum'"),
    ("bag psw dtype", lambda: attnkit.embedding_bag(IDS, W, np.array([0]), mode="sum", per_sample_weights=np.ones(3)), TypeError, r"per_sample_weights: expected dtype float32"),
    ("bag psw shape", lambda: attnkit.embedding_bag(IDS, W, np.array([0]), mode="sum", per_sample_weights=np.ones(2, f32)), ValueError, r"per_sample_weights: expected shape \(3,\)"),
    ("bag padding range", lambda: attnkit.embedding_bag(IDS, W, np.array([0]), padding_idx=10), ValueError, r"padding_idx: must be in \[-10, 10\)"),
    ("bag bad id", lambda: attnkit.embedding_bag(np.array([0, 11]), W, np.array([0])), IndexError, r"ids\[1\] = 11"),
    # sinusoidal / position ids
    ("sin dim odd", lambda: attnkit.sinusoidal_positions(3, 5), ValueError, r"dim: expected an even"),
    ("sin dim negative", lambda: attnkit.sinusoidal_positions(3, -2), ValueError, r"dim: expected an int >= 0"),
    ("sin dim float", lambda: attnkit.sinusoidal_positions(3, 4.0), TypeError, r"dim: expected an int"),
    ("sin dim huge", lambda: attnkit.sinusoidal_positions(3, 1 << 50), ValueError, r"dim: at most 2\*\*24"),
    ("sin base", lambda: attnkit.sinusoidal_positions(3, 4, base=0.0), ValueError, r"base: expected a finite positive"),
    ("sin base nan", lambda: attnkit.sinusoidal_positions(3, 4, base=float("nan")), ValueError, r"base"),
    ("sin layout", lambda: attnkit.sinusoidal_positions(3, 4, layout="split"), ValueError, r"layout: expected one of"),
    ("sin dtype", lambda: attnkit.sinusoidal_positions(3, 4, dtype=np.int16), TypeError, r"dtype: expected numpy.float32, numpy.float64, numpy.float16 or ml_dtypes.bfloat16, got int16"),
    ("sin dtype junk", lambda: attnkit.sinusoidal_positions(3, 4, dtype="nonsense"), TypeError, r"dtype"),
    ("sin positions float", lambda: attnkit.sinusoidal_positions(np.array([1.5]), 4), TypeError, r"positions: expected an integer"),
    ("sin positions count", lambda: attnkit.sinusoidal_positions(-1, 4), ValueError, r"positions: a count of positions must be from 0 to 2\*\*53"),
    ("sin positions inexact", lambda: attnkit.sinusoidal_positions(np.array([2**60]), 4), ValueError, r"positions: .*2\*\*53"),
    ("sin positions uint64", lambda: attnkit.sinusoidal_positions(np.array([2**64 - 1], np.uint64), 4), ValueError, r"positions: .*2\*\*53"),
    ("posids float", lambda: attnkit.position_ids(np.ones((1, 2))), TypeError, r"attention_mask: expected a bool or integer"),
    ("posids 1-d", lambda: attnkit.position_ids(np.ones(3, int)), ValueError, r"attention_mask: expected a 2-d"),
    ("posids masked", lambda: attnkit.position_ids(np.ma.masked_array([[1]])), TypeError, r"MaskedArray"),
    # ALiBi and T5
    ("alibi negative", lambda: attnkit.alibi_slopes(-1), ValueError, r"num_heads: expected an int >= 0"),
    ("alibi float", lambda: attnkit.alibi_slopes(2.5), TypeError, r"num_heads: expected an int"),
    ("bucket float", lambda: attnkit.relative_position_bucket(np.array([0.5])), TypeError, r"relative_position: expected an integer"),
    ("bucket too few", lambda: attnkit.relative_position_bucket(np.array([1]), num_buckets=2), ValueError, r"num_buckets: 2 leaves no exact buckets"),
    ("bucket distance", lambda: attnkit.relative_position_bucket(np.array([1]), max_distance=8), ValueError, r"max_distance: must exceed"),
    ("bucket bidirectional", lambda: attnkit.relative_position_bucket(np.array([1]), bidirectional="yes"), TypeError, r"bidirectional"),
    ("bias table shape", lambda: attnkit.relative_position_bias(2, 2, np.zeros((16, 2), f32)), ValueError, r"table: expected shape \(num_buckets=32, heads\), got \(16, 2\)"),
    ("bias negative", lambda: attnkit.relative_position_bias(-1, 2, np.zeros((32, 2), f32)), ValueError, r"q_len"),
    ("bias int table", lambda: attnkit.relative_position_bias(1, 2, np.zeros((32, 2), int)), TypeError, r"table"),
    # RoPE frequencies
    ("rope odd", lambda: attnkit.rope_frequencies(7), ValueError, r"rotary_dim: expected an even"),
    ("rope type", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "ntk"}), ValueError, r"rope_type must be one of"),
    ("rope missing", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "linear"}), ValueError, r"needs factor"),
    ("rope unknown key", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "linear", "factor": 2, "fcator": 1}), ValueError, r"unknown keys .*fcator"),
    ("rope factor", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "linear", "factor": -2}), ValueError, r"factor"),
    ("rope factor str", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "linear", "factor": "2"}), ValueError, r"factor"),
    ("rope scaling list", lambda: attnkit.rope_frequencies(8, scaling=["linear"]), TypeError, r"scaling: expected None or a dict"),
    ("rope theta", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "default", "rope_theta": 5.0}), ValueError, r"rope_theta = 5.0 disagrees"),
    ("rope longrope len", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 4, "factor": 2.0, "original_max_position_embeddings": 10}), ValueError, r"short_factor.*4 positive"),
    ("rope llama3 order", lambda: attnkit.rope_frequencies(8, scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1, "original_max_position_embeddings": 8192}), ValueError, r"high_freq_factor"),
    ("rope seq_len", lambda: attnkit.rope_frequencies(8, seq_len=-1), ValueError, r"seq_len"),
    ("cos_sin positions", lambda: attnkit.rope_cos_sin(np.array([1.0]), 8), TypeError, r"positions"),
    # apply_rope
    ("apply 3-d", lambda: attnkit.apply_rope(np.zeros((2, 3, 8), f32), COS, COS), ValueError, r"x: expected a 4-d array \(batch, heads, seq, head_dim\), got shape \(2, 3, 8\)"),
    ("apply dtype mix", lambda: attnkit.apply_rope(X, COS.astype(np.float64), COS.astype(np.float64)), TypeError, r"cos, sin: expected dtype float32 \(that of x\)"),
    ("apply int x", lambda: attnkit.apply_rope(X.astype(int), COS, COS), TypeError, r"x: expected a float32, float64, float16 or bfloat16"),
    ("apply seq", lambda: attnkit.apply_rope(X, np.zeros((4, 4), f32), np.zeros((4, 4), f32)), ValueError, r"cos: expected shape \(3, r/2\) or \(1, 3, r/2\)"),
    ("apply too wide", lambda: attnkit.apply_rope(X, np.zeros((3, 5), f32), np.zeros((3, 5), f32)), ValueError, r"r <= head_dim = 8"),
    ("apply cos sin differ", lambda: attnkit.apply_rope(X, COS, np.zeros((3, 2), f32)), ValueError, r"cos, sin: shapes differ"),
    ("apply style", lambda: attnkit.apply_rope(X, COS, COS, style="neox"), ValueError, r"style: expected one of"),
    ("apply layout", lambda: attnkit.apply_rope(X, COS, COS, layout="sbhd"), ValueError, r"layout: expected one of"),
    ("apply masked", lambda: attnkit.apply_rope(np.ma.masked_array(X), COS, COS), TypeError, r"x: numpy.ma.MaskedArray"),
    # threads
    ("threads zero", lambda: attnkit.set_num_threads(0), ValueError, r"n: expected a number of threads from 1 to 1024, got 0"),
    ("threads str", lambda: attnkit.set_num_threads("2"), TypeError, r"n: expected an int"),
    # the compiled core re-validates everything
    ("core fortran", lambda: _core.embedding(np.asfortranarray(np.zeros((2, 2), np.int64)), W), ValueError, r"ids: _core needs a C-contiguous"),
    ("core list", lambda: _core.embedding([1, 2], W), TypeError, r"ids: expected a numpy array of an integer dtype"),
    ("core byteswapped", lambda: _core.embedding(IDS, W.astype(">f4")), TypeError, r"weight: expected a float32, float64, float16 or bfloat16 numpy array"),
    ("core rope dtype", lambda: _core.apply_rope(X, COS.astype(np.float64), COS, "half", "bhsd"), TypeError, r"cos, sin: must have the dtype of x"),
    ("core rope style", lambda: _core.apply_rope(X, COS, COS, "neox", "bhsd"), ValueError, r"style"),
    ("core bounds decrease", lambda: _core.embedding_bag(IDS, W, np.array([0, 3, 2, 3]), "sum"), ValueError, r"offsets: must start at 0, never decrease"),
    ("core bounds negative", lambda: _core.embedding_bag(IDS, W, np.array([-1, 3]), "sum"), ValueError, r"offsets: must not be negative"),
    ("core bounds short", lambda: _core.embedding_bag(IDS, W, np.array([0, 2]), "sum"), ValueError, r"offsets"),
    ("core padding", lambda: _core.embedding_bag(IDS, W, np.array([0, 3]), "sum", None, 12), ValueError, r"padding_idx: 12"),
    ("core psw length", lambda: _core.embedding_bag(IDS, W, np.array([0, 3]), "sum", np.ones(2)), ValueError, r"per_sample_weights: has 2 entries"),
    ("core positions dtype", lambda: _core.sinusoidal(np.arange(3, dtype=np.int32), np.ones(2), "halves", "float32"), TypeError, r"positions: expected a int64"),
    ("core positions inexact", lambda: _core.sinusoidal(np.array([-(2**62)]), np.ones(2), "halves", "float32"), ValueError, r"positions: .*2\*\*53"),
    ("core inv_freq nan", lambda: _core.rope_cos_sin(np.arange(3), np.array([np.nan]), 1.0, "float32"), ValueError, r"inv_freq: must be finite"),
    ("core factor inf", lambda: _core.rope_cos_sin(np.arange(3), np.ones(2), float("inf"), "float32"), ValueError, r"attention_factor: must be finite"),
    ("core dtype", lambda: _core.sinusoidal(np.arange(3), np.ones(2), "halves", "int16"), TypeError, r"dtype: expected float32, float64, float16 or bfloat16"),
    ("core threads", lambda: _core.set_num_threads(-3), ValueError, r"n: expected a number of threads from 1 to 1024, got -3"),
    ("core scale", lambda: _core.embedding(IDS, W, float("inf")), ValueError, r"scale: must be finite"),
]


@pytest.mark.parametrize("name,call,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_the_contract_exception(name, call, exc, pattern):
    status, detail = run_forked(call)
    assert status == "raised", f"{name}: no exception was raised"
    type_name, message = detail
    expected = exc if isinstance(exc, tuple) else (exc,)
    assert type_name in {e.__name__ for e in expected}, f"{name}: raised {type_name}: {message}"
    assert re.search(pattern, message), f"{name}: message {message!r} does not match {pattern!r}"
    # And in this process, for the real exception object (a PanicException would not be caught here).
    with pytest.raises(expected):
        if name not in {"huge output", "huge broadcast ids"}:
            call()
        else:
            raise expected[0]("large allocations are only tried in the child")


def test_bool_bytes_other_than_0_and_1_read_as_true():
    raw = np.array([[0, 2, 255, 1]], dtype=np.uint8).view(bool)
    np.testing.assert_array_equal(attnkit.position_ids(raw), [[0, 0, 1, 2]])


def test_internal_error_is_a_runtime_error():
    assert issubclass(attnkit.InternalError, RuntimeError)
