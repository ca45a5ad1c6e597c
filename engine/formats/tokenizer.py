"""A tokenizer built from a GGUF file's own metadata, the way llama.cpp builds its vocab.

A GGUF carries no tokenizer.json: it carries the vocabulary (`tokenizer.ggml.tokens`, `.token_type`,
`.scores`), the BPE merges, the special token ids, a few flags, and the name of a pre-tokenizer
(`tokenizer.ggml.pre`) whose regexes live in llama.cpp's `src/llama-vocab.cpp`. We rebuild that
tokenizer on Hugging Face's Rust `tokenizers` library:

    gpt2 (byte-level BPE):  Split(regex, isolated) for each of llama.cpp's regexes for the pre name
                            -> ByteLevel(add_prefix_space=False, use_regex=False) -> BPE(merges)
    llama (SentencePiece):  " " -> "\u2581" (plus a prefix "\u2581" when add_space_prefix)
                            -> BPE whose merges are ranked by the merged piece's score, byte fallback

and match control / user-defined / unknown tokens whole in the text as llama.cpp does (its
`tokenizer_st_partition`). Decoding is ours, llama.cpp's `token_to_piece`: each token maps to bytes,
the bytes of a sequence are joined and decoded as UTF-8.

Choices where llama.cpp, Hugging Face and this module could differ are named where they are made;
the short list:

- Special tokens are found with `tokenizers`' added-token matcher (leftmost-longest). llama.cpp
  splits on the longest special token first. They differ only for special tokens that overlap each
  other in the text, which real vocabularies do not produce.
- `decode` does not apply llama.cpp's `clean_spaces` pass (" ," -> ","): the stream decoder has to
  agree with `decode`, and llama.cpp's own token-by-token output (`token_to_piece`) does not apply it
  either.
- With `add_space_prefix` the first decoded token loses one leading space (llama.cpp's detokenize,
  and Hugging Face's `Strip` decoder). When `skip_special` drops a leading BOS we still strip, as
  Hugging Face does (llama.cpp keeps the space in that one case), so `decode(encode(t)) == t`.
  For a gpt2 vocabulary llama.cpp reads add_space_prefix but never prepends a space when encoding
  (only its detokenize strips one); we do the same, where transformers' GGUF loader would prepend.
"""

from __future__ import annotations

import codecs
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from .chat_template import ChatTemplateError, compile_chat_template

__all__ = [
    "PRE_TOKENIZER_REGEXES",
    "StreamDecoder",
    "Tokenizer",
    "pre_name_for_hf_tokenizer",
]

# llama.cpp's llama_token_type, as written in tokenizer.ggml.token_type
TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# --------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes: llama.cpp's llm_tokenizer_bpe constructor, one list per LLAMA_VOCAB_PRE_TYPE,
# and the `tokenizer.ggml.pre` names llama_vocab::impl::load maps to each. The regexes are applied
# in order, each one splitting every piece the previous ones left ("isolated": matches and the text
# between them both become pieces) -- exactly a tokenizers Sequence of Split(..., "isolated").
# llama.cpp rewrites Hugging Face's `(?i:'s|...)` as `(?:'[sS]|...)`; both mean the same to Oniguruma.
# --------------------------------------------------------------------------------------------------

_CONTRACTIONS_I = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS_I
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS_I
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS_I
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    _CONTRACTIONS_I
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS_I + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS_I + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_FAMILIES: dict[str, tuple[tuple[str, ...], list[str]]] = {
    # family: (pre names, first one canonical; regexes)
    "default": (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]),
    "gpt2": (
        ("gpt-2", "olmo", "mpt", "jais", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
         "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "trillion", "granite-docling", "exaone4"),
        [_GPT2],
    ),
    "llama3": (
        ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "falcon-h1", "pixtral",
         "midm-2.0", "lfm2", "jina-v5-nano", "chatglm-bpe", "glm4"),
        [_LLAMA3],
    ),
    "smollm": (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        [r"\p{N}", _GPT2],
    ),
    "qwen2": (
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
        [_QWEN2],
    ),
    "qwen35": (("qwen35",), [_QWEN35]),
    "falcon": (("falcon",), [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]),
    "tekken": (("tekken",), [_TEKKEN]),
    "gpt4o": (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), [_GPT4O]),
    "seed-coder": (("seed-coder",), [_SEED_CODER]),
    "grok-2": (("grok-2",), [_QWEN2]),
    "bailingmoe": (("bailingmoe", "bailingmoe2", "llada-moe"), [_BAILINGMOE]),
}

#: `tokenizer.ggml.pre` value -> the regexes llama.cpp splits text with, in order.
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    name: list(regexes) for names, regexes in _FAMILIES.values() for name in names
}

# Flags llama_vocab::impl::load sets per pre name (everything else: no ignore_merges, no BOS).
_IGNORE_MERGES = frozenset(
    {"llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano", "tekken"}
)
_ADD_BOS = _IGNORE_MERGES  # the same names turn add_bos on (before the GGUF flag overrides it)
_NO_BOS = frozenset({"glm4", "chatglm-bpe"})

# --------------------------------------------------------------------------------------------------
# llama.cpp finds these tokens by their text (llama_vocab::impl::load, "auto-detect special tokens").
# --------------------------------------------------------------------------------------------------

_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
_ALWAYS_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})  # gpt-oss

# GGUF key suffix (after "tokenizer.ggml.") for each special id; llama.cpp's LLM_KV_TOKENIZER_*_ID.
_SPECIAL_ID_KEYS = (
    ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"), ("eom", "eom_token_id"),
    ("unk", "unknown_token_id"), ("sep", "seperator_token_id"), ("pad", "padding_token_id"),
    ("mask", "mask_token_id"), ("fim_pre", "fim_pre_token_id"), ("fim_suf", "fim_suf_token_id"),
    ("fim_mid", "fim_mid_token_id"), ("fim_pad", "fim_pad_token_id"), ("fim_rep", "fim_rep_token_id"),
    ("fim_sep", "fim_sep_token_id"),
    # deprecated spellings
    ("fim_pre", "prefix_token_id"), ("fim_suf", "suffix_token_id"), ("fim_mid", "middle_token_id"),
)

_SPM_SPACE = "\u2581"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (llama.cpp's unicode_byte_to_utf8_map)."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json -> llama.cpp pre name
# --------------------------------------------------------------------------------------------------

def _canonical_regex(pattern: str) -> str:
    """Spell a split regex the way llama.cpp's table does, so the two can be compared as strings."""
    pattern = pattern.replace(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)", _CONTRACTIONS_I)
    if pattern == _GPT2 + r"|\s+":  # tokenizers' own ByteLevel regex ends in a redundant |\s+
        pattern = _GPT2
    return pattern


def _hf_pre_tokenizer_regexes(node: Mapping[str, Any] | None) -> list[str]:
    """The isolated-split regexes a tokenizer.json pre_tokenizer applies, in order."""
    if node is None:
        raise ValueError("the tokenizer.json has no pre_tokenizer, so no llama.cpp pre name fits it")
    kind = node.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for child in node.get("pretokenizers", []):
            out.extend(_hf_pre_tokenizer_regexes(child))
        return out
    if kind == "Split":
        pattern = node.get("pattern", {})
        if node.get("invert", False) or str(node.get("behavior", "")).lower() != "isolated":
            raise ValueError(
                f"Split pre-tokenizer with behavior={node.get('behavior')!r}, invert={node.get('invert')!r}: "
                "llama.cpp only splits with isolated, non-inverted regexes"
            )
        if "Regex" in pattern:
            return [_canonical_regex(pattern["Regex"])]
        raise ValueError(f"Split pre-tokenizer on a plain string {pattern!r} has no llama.cpp pre name")
    if kind == "Digits":
        return [r"\p{N}" if node.get("individual_digits", False) else r"\p{N}+"]
    if kind == "ByteLevel":
        if node.get("add_prefix_space", False):
            raise ValueError("ByteLevel pre-tokenizer with add_prefix_space=True has no llama.cpp pre name")
        return [_GPT2] if node.get("use_regex", True) else []
    raise ValueError(f"pre-tokenizer type {kind!r} has no llama.cpp pre name")


def pre_name_for_hf_tokenizer(tokenizer_json: Mapping[str, Any], *, prefer: str | None = None) -> str:
    """The `tokenizer.ggml.pre` name whose llama.cpp regexes equal this tokenizer.json's pre-tokenizer.

    Several names share one regex list ("gpt-2" and "olmo", "llama-bpe" and "dbrx", ...); we return
    the first of the family, or `prefer` when it is one of them. Where the names of a family differ in
    llama.cpp's `ignore_merges` flag, the one that agrees with the BPE model's `ignore_merges` wins
    (Llama 3 ships ignore_merges=true: "llama-bpe"; without it: "dbrx").

    Raises ValueError naming the pattern(s) when no llama.cpp name fits.
    """
    regexes = _hf_pre_tokenizer_regexes(tokenizer_json.get("pre_tokenizer"))
    model = tokenizer_json.get("model") or {}
    ignore_merges = bool(model.get("ignore_merges", False))
    candidates = [
        name for names, family in _FAMILIES.values() if [_canonical_regex(r) for r in family] == regexes
        for name in names
    ]
    if not candidates:
        raise ValueError("no llama.cpp pre-tokenizer splits with the pattern(s): " + " ; ".join(regexes))
    if prefer is not None and prefer in candidates:
        return prefer
    agreeing = [n for n in candidates if (n in _IGNORE_MERGES) == ignore_merges]
    return (agreeing or candidates)[0]


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------

def _spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece loop.

    llama.cpp repeatedly joins the adjacent pair whose concatenation is a vocabulary piece with the
    highest score (ties: leftmost). A BPE whose merges are every split (a, b) of every piece a+b,
    ranked by the score of a+b, makes the same choices.
    """
    index = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, piece in enumerate(tokens):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            j = index.get(left)
            if j is not None and right in index:
                ranked.append((-float(scores[i]), i, j, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _meta_list(meta: Mapping[str, Any], key: str) -> list | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"GGUF metadata {key} should be an array, got {type(value).__name__}")
    return list(value)


# array keys -> (element types, in words): checked before use, with their lengths where they hold
# one entry per token
_ARRAY_KEYS = {
    "tokenizer.ggml.tokens": ((str, bytes), "strings"),
    "tokenizer.ggml.merges": ((str,), "strings"),
    "tokenizer.ggml.token_type": ((int,), "integers"),
    "tokenizer.ggml.scores": ((int, float), "finite numbers"),
}
_PER_TOKEN = ("tokenizer.ggml.token_type", "tokenizer.ggml.scores")
_FLAG_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix")


def _check_metadata(meta: Mapping[str, Any], source: str) -> None:
    """Refuse, with a ConfigError naming source and the key (expected vs found), tokenizer
    metadata of the wrong type or length: tokens that are not an array of strings (e.g. u32),
    merges that are not strings, token_type/scores not one number per token, special token ids
    that are not integers, bos/eos ids outside the vocabulary (llama.cpp only warns and falls
    back to its default there; a file naming a bos/eos it does not hold is broken, and generation
    would add or stop at the wrong token), flags that are not bools, a non-string model, pre or
    chat template."""
    def fail(key: str, expected: str, found: str):
        error = ChatTemplateError if key == "tokenizer.chat_template" else ConfigError
        raise error(f"{source}: metadata {key}: expected {expected}, found {found}")

    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            fail(key, "a string", f"{type(meta[key]).__name__} {meta[key]!r:.60}")
    tokens = meta.get("tokenizer.ggml.tokens")
    n = len(tokens) if isinstance(tokens, (list, tuple)) else None
    for key, (types, what) in _ARRAY_KEYS.items():
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)):
            fail(key, f"an array of {what}", f"{type(value).__name__} {value!r:.60}")
        for i, x in enumerate(value):
            if not isinstance(x, types) or isinstance(x, bool) or (isinstance(x, float) and not math.isfinite(x)):
                fail(key, f"an array of {what}", f"{type(x).__name__} {x!r:.40} at index {i}")
        if key in _PER_TOKEN and n is not None and len(value) != n:
            fail(key, f"{n} entries (one per token of tokenizer.ggml.tokens)", f"{len(value)} entries")
    for name, key in _SPECIAL_ID_KEYS:
        key = "tokenizer.ggml." + key
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            fail(key, "a token id (an integer)", f"{type(value).__name__} {value!r:.40}")
        if name in ("bos", "eos") and n is not None and not 0 <= value < n:
            fail(key, f"a token id in [0, {n}) (the vocabulary)", str(value))
    for key in _FLAG_KEYS:
        if meta.get(key) is not None and not isinstance(meta[key], bool):
            fail(key, "a bool", f"{type(meta[key]).__name__} {meta[key]!r:.40}")


class Tokenizer:
    """Text <-> token ids for a GGUF vocabulary, as llama.cpp tokenizes it. Build with `from_metadata`."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    unk_id: int | None
    pad_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None  # tokenizer.ggml.pre (gpt2 only)
    chat_template: str | None

    def __init__(self) -> None:  # use from_metadata
        raise TypeError("build a Tokenizer with Tokenizer.from_metadata(meta)")

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "model") -> Tokenizer:
        """Build from GGUF metadata ({key: value}, strings as str and arrays as lists). Every
        problem with it is a ConfigError naming source (the file) and the key: values of the wrong
        type or length are refused up front (_check_metadata), so that nothing fails later, at the
        first generation."""
        _check_metadata(meta, source)
        try:
            self = cls._from_checked_metadata(meta)
        except ConfigError:
            raise
        except ValueError as e:  # the checks below: say which file
            raise ConfigError(f"{source}: {e}") from e
        self.source = source
        return self

    @classmethod
    def _from_checked_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        self = object.__new__(cls)
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model: this file carries no tokenizer")
        if model not in ("gpt2", "llama"):
            raise ValueError(
                f"tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2' byte-level BPE, "
                "'llama' SentencePiece)"
            )
        tokens = _meta_list(meta, "tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens (the vocabulary)")
        n = len(tokens)
        types = _meta_list(meta, "tokenizer.ggml.token_type")
        if types is None:
            types = [TOKEN_TYPE_NORMAL] * n
        types = list(types)  # promote() below marks some as control tokens
        tokens = [
            (t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)) if len(t) else f"[EMPTY_{i}]"
            for i, t in enumerate(tokens)  # an empty token gets llama.cpp's placeholder name
        ]
        index: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if index.setdefault(t, i) != i:
                raise ValueError(f"duplicate token in vocabulary: {t!r} has ids {index[t]} and {i}")

        self.model = model
        self.vocab_size = n
        self._tokens = tokens
        self.chat_template = meta.get("tokenizer.chat_template")

        # -- flags and defaults, in llama_vocab::impl::load's order
        if model == "gpt2":
            pre = meta.get("tokenizer.ggml.pre")
            if not pre:
                warnings.warn("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer "
                              "(llama.cpp warns that generation quality will be degraded)", stacklevel=2)
                pre = "default"
            if pre not in PRE_TOKENIZER_REGEXES:
                raise ValueError(
                    f"unknown pre-tokenizer type {pre!r} (tokenizer.ggml.pre); known: "
                    f"{', '.join(sorted(PRE_TOKENIZER_REGEXES))}"
                )
            self.pre = pre
            ignore_merges = pre in _IGNORE_MERGES
            add_bos = pre in _ADD_BOS
            add_space_prefix = False
            # llama.cpp's BPE defaults (token 11) apply only when the file names no bos/eos id
            ids: dict[str, int | None] = {"bos": 11, "eos": 11, "unk": None}
            if pre in _NO_BOS:
                ids["bos"] = None
        else:
            self.pre = None
            ignore_merges = False
            add_bos = True
            add_space_prefix = True
            ids = {"bos": 1, "eos": 2, "unk": 0}
        add_eos = False
        if "tokenizer.ggml.add_space_prefix" in meta:
            add_space_prefix = bool(meta["tokenizer.ggml.add_space_prefix"])

        for name, _ in _SPECIAL_ID_KEYS:
            ids.setdefault(name, None)
        for name in list(ids):  # defaults outside the vocabulary are disabled
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
        for name, key in _SPECIAL_ID_KEYS:
            value = meta.get("tokenizer.ggml." + key)
            if value is None:
                continue
            value = int(value)
            if 0 <= value < n:
                ids[name] = value
            else:
                warnings.warn(f"tokenizer.ggml.{key} = {value} is outside the vocabulary; ignored", stacklevel=2)
        if "tokenizer.ggml.add_bos_token" in meta:
            add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in meta:
            add_eos = bool(meta["tokenizer.ggml.add_eos_token"])
        if add_bos and ids["bos"] is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
        if add_eos and ids["eos"] is None:
            raise ValueError("tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")

        # -- special tokens found by their text; a token that looks like one is made a control token
        def promote(i: int) -> None:  # llama.cpp ORs in the CONTROL attribute, which is what counts
            types[i] = TOKEN_TYPE_CONTROL

        for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()):
            if ids[name] is None:
                found = [index[t] for t in texts if t in index]
                if found:
                    ids[name] = min(found)  # llama.cpp takes whichever its hash map yields first
                    promote(ids[name])
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for t in _EOG_TEXTS:
            if t in index:
                eog.add(index[t])
                promote(index[t])
        for t in _ALWAYS_USER_DEFINED:
            if t in index:
                types[index[t]] = TOKEN_TYPE_USER_DEFINED
        eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)
        texts_in_eog = {tokens[i]: i for i in eog}
        if "<|end|>" in texts_in_eog and (
            ("<|return|>" in texts_in_eog and "<|call|>" in texts_in_eog)
            or ("<|calls|>" in texts_in_eog and "<|flush|>" in texts_in_eog)
        ):  # o200k_harmony / solar-open: <|end|> ends a message, not the generation
            eog.discard(texts_in_eog["<|end|>"])
            types[texts_in_eog["<|end|>"]] = TOKEN_TYPE_USER_DEFINED
        if "<|tool_response>" in texts_in_eog and "</s>" in texts_in_eog:  # gemma4
            eog.discard(texts_in_eog["</s>"])
            types[texts_in_eog["</s>"]] = TOKEN_TYPE_NORMAL

        self.bos_id, self.eos_id, self.eot_id = ids["bos"], ids["eos"], ids["eot"]
        self.unk_id, self.pad_id = ids["unk"], ids["pad"]
        self.special_ids = {k: v for k, v in ids.items() if v is not None}
        self.eog_ids = frozenset(eog)
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        self._types = types

        # -- the Hugging Face tokenizer
        vocab = dict(index)
        if model == "gpt2":
            raw_merges = _meta_list(meta, "tokenizer.ggml.merges")
            if raw_merges is None:
                raise ValueError("GGUF metadata has no tokenizer.ggml.merges, which a gpt2 (BPE) vocabulary needs")
            merges: list[tuple[str, str]] = []
            seen: set[tuple[str, str]] = set()
            for m in raw_merges:
                cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
                if cut < 0:
                    continue
                pair = (m[:cut], m[cut + 1:])
                # llama.cpp keeps the first rank of a repeated pair; tokenizers refuses a merge whose
                # parts or result are not tokens (llama.cpp would fall back to bytes there).
                if pair in seen or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
                    continue
                seen.add(pair)
                merges.append(pair)
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[self.pre]]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
            hf.decoder = decoders.ByteLevel()
        else:
            scores = _meta_list(meta, "tokenizer.ggml.scores")
            if scores is None:
                raise ValueError("a 'llama' (SentencePiece) vocabulary needs tokenizer.ggml.scores for every token")
            unk = tokens[ids["unk"]] if ids["unk"] is not None else None
            hf = HFTokenizer(models.BPE(
                vocab=vocab, merges=_spm_merges(tokens, scores), unk_token=unk, fuse_unk=True, byte_fallback=True,
            ))
            escape = [normalizers.Replace(" ", _SPM_SPACE)]
            # llama.cpp puts a space before every text fragment (each one starts the text or follows a
            # special token); tokenizers normalizes each fragment between added tokens separately.
            hf.normalizer = normalizers.Sequence(
                ([normalizers.Prepend(_SPM_SPACE)] if add_space_prefix else []) + escape
            )
            hf.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])

        # Control and unknown tokens are matched in text only when parse_special; user-defined ones
        # always (llama.cpp's tokenizer_st_partition; tokenizers' encode_special_tokens skips only
        # special=True ones).
        special, plain = [], []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
                special.append(AddedToken(t, special=True, normalized=False))
            elif ty == TOKEN_TYPE_USER_DEFINED:
                plain.append(AddedToken(t, special=False, normalized=False))
        if special:
            hf.add_special_tokens(special)
        if plain:
            hf.add_tokens(plain)
        self._hf = hf
        self._hf_plain = None  # the same tokenizer with encode_special_tokens=True, built on first use
        self._pieces: list[bytes | None] = [None] * n
        self._template = None
        return self

    # ---- encoding --------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`.

        add_special: prepend BOS when `add_bos` (append EOS when `add_eos`), as llama_tokenize does.
        parse_special: text spelling a control token ("<|im_start|>") becomes that token; otherwise it
        is tokenized as plain text. User-defined tokens are matched either way, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        hf = self._hf if parse_special else self._plain_hf()
        ids = hf.encode(text, add_special_tokens=False).ids if text else []
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def _plain_hf(self):
        if self._hf_plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer.from_str(self._hf.to_str())
            plain.encode_special_tokens = True
            self._hf_plain = plain
        return self._hf_plain

    # ---- decoding --------------------------------------------------------------------------------

    def _check_id(self, token_id: int) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise TypeError(f"token id must be an integer, got {token_id!r}") from None
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return i

    def chunks(self, text: str, n_ctx: int) -> tuple[list[list[int]], int]:
        """(chunks, tokens in text): the text's tokens cut into whole chunks of n_ctx, BOS put in
        each chunk's first place when the model adds BOS, as llama-perplexity and llama-imatrix cut
        their texts. The tail shorter than n_ctx is left out."""
        ids = self.encode(text, add_special=True, parse_special=False)
        chunks = [list(ids[c * n_ctx:(c + 1) * n_ctx]) for c in range(len(ids) // n_ctx)]
        if self.add_bos and self.bos_id is not None:
            for chunk in chunks:
                chunk[0] = self.bos_id
        return chunks, len(ids)

    def token_to_piece(self, token_id: int) -> bytes:
        """The bytes one token stands for (llama.cpp's token_to_piece with special=true).

        Normal tokens are un-byte-levelled (gpt2) or have "\u2581" turned back into spaces (llama);
        control, unknown and user-defined tokens are their text; byte tokens "<0xNN>" the byte;
        unused tokens nothing. A piece may be part of a multi-byte UTF-8 character.
        """
        i = self._check_id(token_id)
        piece = self._pieces[i]
        if piece is None:
            piece = self._pieces[i] = self._make_piece(i)
        return piece

    def _make_piece(self, i: int) -> bytes:
        text, ty = self._tokens[i], self._types[i]
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED):
            return text.encode("utf-8")
        if ty == TOKEN_TYPE_BYTE:
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                return bytes([int(text[3:5], 16)])
            return text.encode("utf-8")
        if ty != TOKEN_TYPE_NORMAL:  # unused / undefined: llama.cpp prints nothing
            return b""
        if self.model == "llama":
            return text.replace(_SPM_SPACE, " ").encode("utf-8")
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in text)
        except KeyError:  # not byte-level text (a mislabelled added token): its own UTF-8
            return text.encode("utf-8")

    def _iter_pieces(self, ids: Sequence[int], skip_special: bool, first: bool):
        for token_id in ids:
            i = self._check_id(token_id)
            if skip_special and self._types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
                continue
            piece = self.token_to_piece(i)
            if first and self.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]
            first = False
            yield piece

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for token ids: their pieces joined, decoded as UTF-8 (invalid bytes -> U+FFFD).

        skip_special leaves out control and unknown tokens (BOS, <|im_end|>, ...).
        """
        return b"".join(self._iter_pieces(ids, skip_special, True)).decode("utf-8", errors="replace")

    def decoder(self, skip_special: bool = False) -> StreamDecoder:
        """An incremental decoder: push token ids one at a time, get text as it becomes complete."""
        return StreamDecoder(self, skip_special)

    # ---- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> str:
        """Render `tokenizer.chat_template` as transformers' apply_chat_template(tokenize=False) does.

        A sandboxed jinja2 environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`,
        a `tojson` that does not escape HTML, and bos_token/eos_token/unk_token/pad_token set from the
        vocabulary, rendered within a time and size limit (formats/chat_template.py: ChatTemplateError). Extra keyword arguments (tools=..., documents=..., enable_thinking=...) become
        template variables.
        """
        if not self.chat_template:
            raise ValueError("this GGUF has no tokenizer.chat_template to render")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template, f"{self.source}: tokenizer.chat_template")
        variables: dict[str, Any] = {"tools": None, "documents": None}
        for name, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                               ("unk_token", self.unk_id), ("pad_token", self.pad_id)):
            if token_id is not None:
                variables[name] = self._tokens[token_id]
        variables.update(kw)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def __getstate__(self) -> dict[str, Any]:  # picklable (e.g. to ship to a worker): drop the caches
        state = dict(self.__dict__)
        state.update(_hf_plain=None, _template=None, _pieces=[None] * self.vocab_size)
        return state

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, eog_ids={sorted(self.eog_ids)}, add_bos={self.add_bos})")


class StreamDecoder:
    """Token-by-token text: push() returns only complete UTF-8 characters, holding back the bytes of a
    character split across tokens; flush() returns what is left (invalid bytes -> U+FFFD).

    The concatenation of every push() and the final flush() equals Tokenizer.decode of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        tok = self._tok
        piece = b""
        for piece in tok._iter_pieces((token_id,), self._skip, self._first):
            self._first = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
