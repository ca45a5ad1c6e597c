"""Metadata values, the tensor set and the tokenizer are checked at load (issue 16, items 4, 5, 7):
poisoned or malformed files are refused with an error naming the file, the key or tensor, and
what was expected, instead of running with NaN logits, failing mid-generation or raising a raw
KeyError / ZeroDivisionError / TypeError."""
import math

import numpy as np
import pytest

from tests.tiny_gguf import (HEAD_DIM, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, N_VOCAB, tiny_llama_metadata,
                             tiny_llama_tensors, write_gguf)
from weightstream.engine import Engine
from weightstream.engine.errors import ConfigError, GGUFError, WeightstreamError
from weightstream.engine.formats.chat_template import ChatTemplateError
from weightstream.engine.formats.tokenizer import Tokenizer
from weightstream.engine.model.config import ModelConfig

N_EXPERT, N_EXPERT_USED = 4, 2
SOURCE = "poisoned.gguf"


def config_meta(**changes):
    """tiny_llama_metadata with llama.* keys changed (None: removed), plus the architecture."""
    meta = {"general.architecture": "llama", **tiny_llama_metadata()}
    for key, value in changes.items():
        full = key if key.startswith(("general.", "tokenizer.")) else f"llama.{key}"
        if value is None:
            meta.pop(full, None)
        else:
            meta[full] = value
    return meta


def tiny_moe_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """tiny_llama_tensors with every FFN made Mixtral-style routed experts (llama.cpp's names)."""
    rng = np.random.default_rng(seed)
    t = {k: v for k, v in tiny_llama_tensors(seed).items() if ".ffn_gate." not in k and ".ffn_up." not in k
         and ".ffn_down." not in k}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t[p + "ffn_gate_inp.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_EMBD)).astype(np.float32)
        t[p + "ffn_gate_exps.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_FF, N_EMBD)).astype(np.float32)
        t[p + "ffn_up_exps.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_FF, N_EMBD)).astype(np.float32)
        t[p + "ffn_down_exps.weight"] = rng.normal(0, 0.2, (N_EXPERT, N_EMBD, N_FF)).astype(np.float32)
    return t


def moe_meta(**changes):
    return {**loadable_metadata(), "llama.expert_count": N_EXPERT, "llama.expert_used_count": N_EXPERT_USED,
            **changes}


def loadable_metadata(**changes):
    """tiny_llama_metadata with one merge (a GGUF cannot hold the empty merges array, which the
    BPE tokenizer needs present) and changes."""
    return {**tiny_llama_metadata(), "tokenizer.ggml.merges": ["<t1> <t2>"], **changes}


def write(tmp_path, tensors=None, metadata=None, name="model.gguf"):
    return write_gguf(tmp_path / name, tiny_llama_tensors() if tensors is None else tensors,
                      loadable_metadata() if metadata is None else metadata)


def load_error(path, error=WeightstreamError, match=None):
    """The error Engine.load raises for path: one of ours (a ValueError too), naming the file."""
    with pytest.raises(error, match=match) as info:
        Engine.load(path)
    assert str(path) in str(info.value)
    return str(info.value)


# ---- 1. config values ------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("attention.layer_norm_rms_epsilon", math.nan, r"layer_norm_rms_epsilon: expected a finite number > 0"),
    ("attention.layer_norm_rms_epsilon", math.inf, r"layer_norm_rms_epsilon: expected a finite number > 0"),
    ("attention.layer_norm_rms_epsilon", 0.0, r"layer_norm_rms_epsilon: expected a finite number > 0, found 0.0"),
    ("rope.freq_base", 0.0, r"rope.freq_base: expected a finite number > 0, found 0.0"),
    ("rope.freq_base", math.nan, r"rope.freq_base: expected a finite number > 0, found nan"),
    ("attention.head_count", 0, r"attention.head_count: expected an integer >= 1, found 0"),
    ("attention.head_count_kv", 0, r"head_count_kv: expected an integer >= 1, found 0"),
    ("attention.head_count_kv", 3, r"head_count_kv: expected a divisor of head_count 4, found 3"),
    ("attention.key_length", 0, r"key_length: expected an integer >= 1, found 0"),
    ("attention.value_length", HEAD_DIM * 2, r"value_length: expected key_length 16"),
    ("rope.dimension_count", HEAD_DIM * 2, r"rope.dimension_count: expected an even count <= the head size 16, found 32"),
    ("rope.dimension_count", 15, r"rope.dimension_count: expected an even count <= the head size 16, found 15"),
    ("block_count", 0, r"block_count: expected an integer in 1..512, found 0"),
    ("block_count", 2**40, r"block_count: expected an integer in 1..512, found 1099511627776"),
    ("block_count", [2, 2], r"block_count: expected an integer in 1..512, found \[2, 2\]"),
    ("block_count", "2", r"block_count: expected an integer in 1..512, found '2'"),
    ("block_count", 2.0, r"block_count: expected an integer in 1..512, found 2.0"),
    ("block_count", True, r"block_count: expected an integer in 1..512, found True"),
    ("context_length", 0, r"context_length: expected an integer >= 1, found 0"),
    ("embedding_length", None, r"missing metadata key llama.embedding_length"),
    ("attention.layer_norm_rms_epsilon", None, r"missing metadata key llama.attention.layer_norm_rms_epsilon"),
    ("embedding_length", 66, r"embedding_length: expected a multiple of head_count 4 \(no attention.key_length"),
    ("expert_count", 4, r"expert_used_count: expected an integer in 1..4 \(expert_count\), found 0"),
    ("expert_used_count", 2, r"expert_used_count: expected 0 or absent \(expert_count is 0"),
    ("rope.scaling.type", 7, r"rope.scaling.type: expected a string, found 7"),
    ("vocab_size", N_VOCAB + 44, r"vocab_size: expected the tokenizer's token count 256"),
    ("general.architecture", ["llama"], r"unsupported architecture \['llama'\]"),
])
def test_bad_config_values_are_refused_by_key(key, value, match):
    """Each used to divide by zero, raise TypeError, or load and produce NaN logits."""
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig.from_metadata(config_meta(**{key: value}), source=SOURCE)
    assert str(info.value).startswith(SOURCE + ": ")


@pytest.mark.parametrize("changes,match", [
    (dict(expert_used_count=5), r"expert_used_count: expected an integer in 1..4 \(expert_count\), found 5"),
    (dict(expert_used_count=0), r"expert_used_count: expected an integer in 1..4"),
    (dict(expert_count=-1), r"expert_count: expected an integer in 0..512, found -1"),
    (dict(expert_count=2**40), r"expert_count: expected an integer in 0..512, found 1099511627776"),
    (dict(**{"rope.scaling.type": "linear", "rope.scaling.factor": -2.0}), r"rope.scaling.factor: expected a finite"),
    (dict(expert_weights_norm=1), r"expert_weights_norm: expected a bool, found 1"),
    (dict(feed_forward_length=[N_FF, N_FF, N_FF]), r"feed_forward_length: expected one count >= 0 per block \(2\)"),
])
def test_bad_moe_and_rope_values_are_refused_by_key(changes, match):
    meta = config_meta(**{"expert_count": N_EXPERT, "expert_used_count": N_EXPERT_USED, **changes})
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_metadata(meta, source=SOURCE)


def hybrid_meta(**changes):
    """A qwen35 (Gated DeltaNet hybrid) config's metadata: tiny_llama's sizes plus the ssm.* keys."""
    meta = {k.replace("llama.", "qwen35."): v for k, v in config_meta().items()}
    meta.update({"general.architecture": "qwen35", "qwen35.ssm.conv_kernel": 4, "qwen35.ssm.group_count": 2,
                 "qwen35.ssm.time_step_rank": 4, "qwen35.ssm.state_size": 16, "qwen35.ssm.inner_size": 64})
    meta.update({f"qwen35.{k}": v for k, v in changes.items()})
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize("changes,match", [
    (dict(**{"attention.recurrent_layers": [1, 0]}), r"recurrent_layers: expected one bool per layer \(2\)"),
    (dict(**{"attention.recurrent_layers": "yes"}), r"recurrent_layers: expected one bool per layer"),
    (dict(full_attention_interval=0), r"full_attention_interval: expected an integer >= 1, found 0"),
    (dict(**{"ssm.inner_size": 66}), r"ssm.inner_size: expected a multiple of ssm.time_step_rank 4"),
    (dict(**{"ssm.time_step_rank": 3, "ssm.inner_size": 63}), r"ssm.time_step_rank: expected a multiple of "
                                                               r"ssm.group_count 2"),
    (dict(**{"ssm.conv_kernel": None}), r"missing metadata key qwen35.ssm.conv_kernel"),
    (dict(**{"ssm.state_size": 0}), r"ssm.state_size: expected an integer >= 1, found 0"),
])
def test_bad_hybrid_values_are_refused_by_key(changes, match):
    assert ModelConfig.from_metadata(hybrid_meta()).linear.v_head_dim == 16
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_metadata(hybrid_meta(**changes), source=SOURCE)


def test_good_config_values_still_load():
    cfg = ModelConfig.from_metadata(config_meta(**{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}))
    assert (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_rot, cfg.n_vocab) == (N_HEAD, N_HEAD_KV, HEAD_DIM,
                                                                                HEAD_DIM, N_VOCAB)
    assert cfg.rope_freq_scale == 0.25
    # a factor of 0 is llama.cpp's "not set": no scaling
    assert ModelConfig.from_metadata(config_meta(**{"rope.scaling.type": "linear",
                                                    "rope.scaling.factor": 0.0})).rope_freq_scale == 1.0


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.layer_norm_rms_epsilon", math.nan, "layer_norm_rms_epsilon: expected a finite number > 0"),
    ("llama.attention.head_count", 0, "head_count: expected an integer >= 1, found 0"),
    ("llama.block_count", "2", "block_count: expected an integer in 1..512"),
])
def test_engine_load_names_the_file_and_key_of_a_bad_value(tmp_path, key, value, match):
    path = write(tmp_path, metadata={**loadable_metadata(), key: value})
    load_error(path, ConfigError, match)


# ---- 2. the tensor set -----------------------------------------------------------------------------

def test_an_unused_extra_tensor_is_refused(tmp_path):
    """llama.cpp refuses it too (done_getting_tensors: wrong number of tensors)."""
    path = write(tmp_path, {**tiny_llama_tensors(), "blk.0.attn_output.bias": np.zeros(N_EMBD, np.float32)})
    load_error(path, GGUFError, r"unexpected tensor\(s\) blk.0.attn_output.bias \(1\): llama")


def test_block_count_smaller_than_the_blocks_present_is_refused(tmp_path):
    path = write(tmp_path, metadata={**loadable_metadata(), "llama.block_count": 1})
    load_error(path, GGUFError, r"block_count is 1 \(blocks 0..0\), but the file holds tensors of block 1")


def test_block_count_larger_than_the_blocks_present_is_refused(tmp_path):
    path = write(tmp_path, metadata={**loadable_metadata(), "llama.block_count": 3})
    load_error(path, GGUFError, r"tensor\(s\) blk.2.attn_norm.weight, .* not found .*block_count is 3 but "
                                r"the file's blocks end at 1")


def test_a_missing_tensor_is_named(tmp_path):
    tensors = tiny_llama_tensors()
    del tensors["blk.1.ffn_up.weight"]
    load_error(write(tmp_path, tensors), GGUFError, r"tensor\(s\) blk.1.ffn_up.weight not found \(1 missing")


@pytest.mark.parametrize("name,shape,expected", [
    ("blk.0.attn_k.weight", (N_HEAD * HEAD_DIM, N_EMBD), [N_HEAD_KV * HEAD_DIM, N_EMBD]),
    ("blk.1.ffn_down.weight", (N_EMBD, N_FF // 2), [N_EMBD, N_FF]),
    ("output_norm.weight", (N_EMBD // 2,), [N_EMBD]),
    ("token_embd.weight", (N_VOCAB + 44, N_EMBD), [N_VOCAB, N_EMBD]),  # a vocabulary larger than the tokenizer's
    ("output.weight", (N_VOCAB - 56, N_EMBD), [N_VOCAB, N_EMBD]),  # or smaller: llama.cpp refuses both
])
def test_a_tensor_shape_against_the_metadata_is_named(tmp_path, name, shape, expected):
    tensors = {**tiny_llama_tensors(), name: np.zeros(shape, np.float32)}
    load_error(write(tmp_path, tensors), GGUFError, rf"tensor {name} has shape {list(shape)}, expected "
                                                    rf"{expected}".replace("[", r"\[").replace("]", r"\]"))


def test_without_output_weight_the_head_is_the_tied_embedding(tmp_path):
    """llama.cpp falls back to token_embd when output.weight is absent: the same logits as a file
    whose output.weight is a copy of token_embd."""
    tensors = tiny_llama_tensors()
    tied = dict(tensors)
    del tied["output.weight"]
    copied = {**tensors, "output.weight": tensors["token_embd.weight"]}
    with Engine.load(write(tmp_path, tied, name="tied.gguf")) as a, \
            Engine.load(write(tmp_path, copied, name="copied.gguf")) as b:
        np.testing.assert_array_equal(a.logits([1, 2, 3]), b.logits([1, 2, 3]))


def test_an_architecture_llama_cpp_does_not_tie_needs_its_output_weight(tmp_path):
    """olmoe (and qwen2moe): llama.cpp requires output.weight, with no fallback to token_embd."""
    meta = {k.replace("llama.", "olmoe."): v for k, v in moe_meta().items()}
    tensors = tiny_moe_tensors()
    for i in range(N_LAYER):
        tensors[f"blk.{i}.attn_q_norm.weight"] = np.ones(N_HEAD * HEAD_DIM, np.float32)
        tensors[f"blk.{i}.attn_k_norm.weight"] = np.ones(N_HEAD_KV * HEAD_DIM, np.float32)
    with Engine.load(write_gguf(tmp_path / "olmoe.gguf", tensors, meta, arch="olmoe")) as eng:
        assert eng.config.arch == "olmoe"
    del tensors["output.weight"]
    load_error(write_gguf(tmp_path / "tied.gguf", tensors, meta, arch="olmoe"), GGUFError,
               r"tensor\(s\) output.weight not found \(1 missing, needed by olmoe\)")


def test_a_renamed_output_weight_is_an_unexpected_tensor_not_a_silent_tie(tmp_path):
    tensors = tiny_llama_tensors()
    tensors["output_head.weight"] = tensors.pop("output.weight")
    load_error(write(tmp_path, tensors), GGUFError, r"unexpected tensor\(s\) output_head.weight")


def test_a_tiny_moe_loads_and_its_expert_tensors_are_checked(tmp_path):
    with Engine.load(write(tmp_path, tiny_moe_tensors(), moe_meta())) as eng:
        assert eng.config.n_expert == N_EXPERT and np.isfinite(eng.logits([1, 2])).all()
    bad = {**tiny_moe_tensors(), "blk.1.ffn_up_exps.weight": np.zeros((N_EXPERT, N_FF, N_EMBD // 2), np.float32)}
    load_error(write(tmp_path, bad, moe_meta(), "bad.gguf"), GGUFError,
               r"blk.1.ffn_up_exps.weight has shape \[4, 128, 32\], expected \[4, 128, 64\]")
    load_error(write(tmp_path, tiny_moe_tensors(), moe_meta(**{"llama.expert_used_count": 5}), "k.gguf"),
               ConfigError, r"llama.expert_used_count: expected an integer in 1..4 \(expert_count\), found 5")


def test_a_dense_ffn_in_a_model_that_must_route_is_named(tmp_path):
    meta = {k.replace("llama.", "qwen3moe."): v for k, v in loadable_metadata().items()}
    meta.update({"qwen3moe.expert_count": N_EXPERT, "qwen3moe.expert_used_count": N_EXPERT_USED})
    tensors = tiny_llama_tensors()
    for i in range(N_LAYER):
        for part in ("q", "k"):
            tensors[f"blk.{i}.attn_{part}_norm.weight"] = np.ones(HEAD_DIM, np.float32)
    path = write_gguf(tmp_path / "m.gguf", tensors, meta, arch="qwen3moe")
    load_error(path, GGUFError, r"blk.0.ffn_gate_inp.weight.* not found")


# ---- 3. the tokenizer ------------------------------------------------------------------------------

def tokenizer_error(error=ConfigError, **changes):
    meta = {**tiny_llama_metadata(), **changes}
    with pytest.raises(error) as info:
        Tokenizer.from_metadata({k: v for k, v in meta.items() if v is not None}, source=SOURCE)
    assert str(info.value).startswith(SOURCE + ": ")
    return str(info.value)


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.tokens", list(range(N_VOCAB)), "tokens: expected an array of strings, found int 0 at index 0"),
    ("tokenizer.ggml.tokens", "abc", "tokens: expected an array of strings, found str 'abc'"),
    ("tokenizer.ggml.merges", [1, 2], "merges: expected an array of strings, found int 1 at index 0"),
    ("tokenizer.ggml.token_type", [1] * (N_VOCAB - 1), "token_type: expected 256 entries .*found 255 entries"),
    ("tokenizer.ggml.token_type", ["1"] * N_VOCAB, "token_type: expected an array of integers, found str"),
    ("tokenizer.ggml.scores", [0.0] * 3, "scores: expected 256 entries .*found 3 entries"),
    ("tokenizer.ggml.scores", [math.nan] * N_VOCAB, "scores: expected an array of finite numbers, found float nan"),
    ("tokenizer.ggml.bos_token_id", N_VOCAB, r"bos_token_id: expected a token id in \[0, 256\) .*found 256"),
    ("tokenizer.ggml.eos_token_id", "2", "eos_token_id: expected a token id \\(an integer\\), found str"),
    ("tokenizer.ggml.add_bos_token", 1, "add_bos_token: expected a bool, found int 1"),
    ("tokenizer.ggml.pre", 5, "tokenizer.ggml.pre: expected a string, found int 5"),
    ("tokenizer.ggml.model", None, "no tokenizer.ggml.model"),
])
def test_bad_tokenizer_metadata_is_refused_at_load_by_key(key, value, match):
    import re

    assert re.search(match, tokenizer_error(**{key: value}))


def test_a_non_string_chat_template_is_refused_by_name():
    msg = tokenizer_error(ChatTemplateError, **{"tokenizer.chat_template": ["{{ x }}"]})
    assert "tokenizer.chat_template: expected a string" in msg


@pytest.mark.parametrize("tokens", [list(range(N_VOCAB)), "abc"])
def test_engine_load_refuses_tokens_that_are_not_strings_naming_the_file(tmp_path, tokens):
    path = write(tmp_path, metadata={**loadable_metadata(), "tokenizer.ggml.tokens": tokens})
    load_error(path, ConfigError, "metadata tokenizer.ggml.tokens: expected an array of strings")


def test_a_model_vocabulary_larger_than_the_tokenizer_is_refused_at_load(tmp_path):
    """It used to generate ids the tokenizer cannot decode, failing only mid-generation."""
    path = write(tmp_path, metadata={**loadable_metadata(), "llama.vocab_size": N_VOCAB + 44})
    load_error(path, ConfigError, r"vocab_size: expected the tokenizer's token count 256 .*found 300")


# ---- 5. API arguments at load and at evaluation ------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(n_batch=-1), "n_batch must be a positive integer, got -1"),
    (dict(n_batch=0), "n_batch must be a positive integer, got 0"),
    (dict(n_ctx=-5), "n_ctx must be a positive integer, got -5"),
    (dict(memory_budget=math.inf), "memory_budget must be a positive size .*got inf"),
    (dict(memory_budget=math.nan), "memory_budget must be a positive size .*got nan"),
    (dict(memory_budget=-1), "memory_budget must be a positive size .*got -1"),
    (dict(memory_budget="lots"), "memory_budget must be a positive size .*got 'lots'"),
    (dict(io="bogus"), "io must be one of .*got 'bogus'"),
    (dict(backend="bogus"), "unknown backend 'bogus'"),
    (dict(cache_policy="bogus"), "unknown cache policy 'bogus'"),
    (dict(prefetch="bogus"), "prefetch must be one of .*got 'bogus'"),
])
def test_bad_load_arguments_are_named(tmp_path, kwargs, match):
    path = write(tmp_path)
    with pytest.raises(ValueError, match="Engine.load: " + match):
        Engine.load(path, **kwargs)


@pytest.mark.parametrize("ids", [[1.0, 2.0], [1, N_VOCAB], [-1], np.array([0.5])])
def test_bad_token_ids_to_logits_are_named(tmp_path, ids):
    """logits() truncated floats to ints and indexed past the embedding with out-of-range ids."""
    with Engine.load(write(tmp_path)) as eng:
        with pytest.raises(ValueError, match=r"logits: token ids must be integers in \[0, 256\)"):
            eng.logits(ids)
        assert eng.logits(np.array([1, 2])).shape == (2, N_VOCAB)


# ---- every poison value in every key: only our errors -------------------------------------------

POISON = [0, -1, 1, 2**40, 1.5, math.nan, -math.inf, True, "x", "", [], [1, 2], ["a", 3], None]


@pytest.mark.filterwarnings("ignore:GGUF has no tokenizer.ggml.pre")  # removing the key is a case
def test_every_key_poisoned_gives_a_clean_error_or_a_valid_model(tmp_path):
    """Each metadata key of a tiny llama and a tiny MoE, replaced by each poison value (None:
    removed): the config, the tokenizer and the tensor-set check either accept it or raise one of
    our errors; never a ZeroDivisionError, KeyError, TypeError, IndexError or OverflowError."""
    from weightstream.engine.formats.gguf_file import GGUFFile
    from weightstream.engine.model.weights import check_tensor_set

    cases = 0
    for tensors, base in ((tiny_llama_tensors(), loadable_metadata()), (tiny_moe_tensors(), moe_meta())):
        with GGUFFile(write(tmp_path, tensors, base, f"base{cases}.gguf")) as f:
            meta = dict(f.metadata)
            for key in [k for k in meta if not k.startswith("GGUF.")] + ["llama.vocab_size", "llama.expert_count"]:
                for value in POISON:
                    cases += 1
                    poisoned = {**meta, key: value} if value is not None else {k: v for k, v in meta.items()
                                                                               if k != key}
                    try:
                        Tokenizer.from_metadata(poisoned, source=SOURCE)
                        check_tensor_set(f, ModelConfig.from_metadata(poisoned, source=SOURCE))
                    except WeightstreamError as e:
                        assert str(e).startswith(SOURCE) or str(f.path) in str(e), (key, value, e)
    hybrid = hybrid_meta(**{"attention.recurrent_layers": [True, False], "nextn_predict_layers": 0})
    for key in hybrid:  # a hybrid's ssm.* and layer keys too (the config alone: no tensors here)
        for value in POISON:
            cases += 1
            try:
                ModelConfig.from_metadata({**hybrid, key: value}, source=SOURCE)
            except ConfigError as e:
                assert str(e).startswith(SOURCE), (key, value, e)
    assert cases > 600
