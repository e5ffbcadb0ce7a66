"""open_clip's CLIP tokenizer (``SimpleTokenizer``) as a ``tokenizers`` tokenizer.json.

mmretrieve's ``TextPreprocessor`` (and with it the onnxruntime path, without torch) runs Hugging
Face ``tokenizers``. open_clip tokenizes in Python: clean the text (ftfy, HTML unescaping,
whitespace), lower-case it, split it with the CLIP regex, byte-encode each piece and apply the
byte-pair merges of ``bpe_simple_vocab_16e6.txt.gz``, then ``<start_of_text> ... <end_of_text>``
cut to the context length (the last kept token becomes the end token) and padded with 0.

The same steps as a tokenizers pipeline, built from open_clip's own vocabulary file:

- normalizer: the ftfy fixes that change ordinary text (Latin ligatures, full-width characters,
  curly quotes), two rounds of unescaping the common HTML entities, NFC, whitespace runs to one
  space, lower case;
- pre-tokenizer: the CLIP regex (pieces kept, whitespace dropped), then bytes to unicode
  characters (``ByteLevel`` without its own regex);
- model: BPE with open_clip's merges and ``</w>`` marking the end of each piece;
- post-processor: the start and end tokens around the text. Truncating to ``max_length`` keeps
  room for them, so a long text keeps its first ``context_length - 2`` tokens and ends with the
  end token, as open_clip's does.

What ftfy does beyond these (repairing mojibake such as ``Ã©`` -> ``é``, stripping terminal
escapes and control characters) is not reproduced; such texts may tokenize differently.
This module needs only ``tokenizers`` and the vocabulary file (it does not import torch).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
# SimpleTokenizer keeps merges[1 : 49152 - 256 - 2 + 1]: 48894 merges, which with the 512 byte
# symbols and the two special tokens make the 49408-token vocabulary of every CLIP text tower.
NUM_MERGES = 49152 - 256 - 2
# The pieces open_clip's SimpleTokenizer matches in the cleaned, lower-cased text (its regex, less
# the special tokens, which tokenizers matches before normalising).
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# html.unescape of the entities captions contain; &amp; last, so one round unescapes once.
HTML_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#39;", "'"), ("&#x27;", "'"), ("&apos;", "'"),
                 ("&nbsp;", "\u00a0"), ("&amp;", "&"))


def default_vocab_file() -> Path:
    """``bpe_simple_vocab_16e6.txt.gz`` inside the installed open_clip package, found without
    importing open_clip (which imports torch)."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        from mmretrieve.errors import InputError

        raise InputError("the open_clip package is not installed; pip install open_clip_torch")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's vocabulary is written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=2)
def _vocab_and_merges(vocab_file: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """SimpleTokenizer's encoder and merges, in its order (the ids must match)."""
    lines = gzip.open(vocab_file).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(vocab)}, merges


def _ftfy_steps() -> list:
    """The fixes ftfy.fix_text (run by open_clip on every text) makes to ordinary text, as
    tokenizers normalizers: Latin ligatures and full-width characters spelled out, curly
    quotes straightened (ftfy's own tables)."""
    from tokenizers import Regex, normalizers

    try:
        from ftfy.chardata import DOUBLE_QUOTE_RE, LIGATURES, SINGLE_QUOTE_RE, WIDTH_MAP
    except ImportError:  # pragma: no cover - open_clip depends on ftfy
        return []
    steps = [normalizers.Replace(chr(code), text) for code, text in {**LIGATURES, **WIDTH_MAP}.items()]
    return steps + [normalizers.Replace(Regex(SINGLE_QUOTE_RE.pattern), "'"),
                    normalizers.Replace(Regex(DOUBLE_QUOTE_RE.pattern), '"')]


def _normalizer():
    from tokenizers import Regex, normalizers

    steps = _ftfy_steps()
    for _ in range(2):  # open_clip unescapes twice
        steps += [normalizers.Replace(entity, text) for entity, text in HTML_ENTITIES]
    steps += [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
              normalizers.Lowercase()]
    return normalizers.Sequence(steps)


def clip_tokenizer(vocab_file: str | Path | None = None):
    """A ``tokenizers.Tokenizer`` that gives the ids open_clip's SimpleTokenizer gives (before
    padding and truncation, which ``TextPreprocessor`` applies)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = _vocab_and_merges(str(vocab_file or default_vocab_file()))
    tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix="</w>",
                                     continuing_subword_prefix="", fuse_unk=False, unk_token=None))
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    tokenizer.add_special_tokens([AddedToken(START_TOKEN, normalized=False), AddedToken(END_TOKEN, normalized=False)])
    start, end = vocab[START_TOKEN], vocab[END_TOKEN]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START_TOKEN} $A {END_TOKEN}", pair=f"{START_TOKEN} $A {END_TOKEN} $B {END_TOKEN}",
        special_tokens=[(START_TOKEN, start), (END_TOKEN, end)])
    return tokenizer
