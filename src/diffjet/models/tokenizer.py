"""The exact OpenAI CLIP tokenizer, built offline.

Every Stable Diffusion text encoder (CLIP ViT-L, OpenCLIP ViT-H and bigG) uses OpenAI's CLIP BPE.
Its merges ship in the `openai-clip` package as `clip/bpe_simple_vocab_16e6.txt.gz`; we read that
file through package metadata and never import `clip`, whose `__init__` pulls in torchvision.
The vocabulary is rebuilt the way OpenAI's `simple_tokenizer.py` builds it, so token ids equal the
published `tokenizer/vocab.json` of the Stable Diffusion repositories.
"""

import functools
import gzip
import importlib.metadata
import math

import transformers

from diffjet.errors import DiffjetError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408

# OpenAI keeps the first 49152 - 256 - 2 merges: 256 byte tokens, their 256 end-of-word twins,
# the merges and 2 special tokens make the 49408 ids of the text encoders' embedding table.
_NUM_MERGES = 49152 - 256 - 2
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, in OpenAI's order.

    The order matters: it fixes ids 0-255 (and 256-511 for the `</w>` forms).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


@functools.cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The merges CLIP uses, in rank order, read from the openai-clip package."""
    try:
        distribution = importlib.metadata.distribution("openai-clip")
    except importlib.metadata.PackageNotFoundError:
        raise DiffjetError(
            "the CLIP tokenizer needs the 'openai-clip' package: pip install openai-clip"
        ) from None
    bpe_files = [f for f in distribution.files or () if f.name == _BPE_FILE]
    if not bpe_files:
        raise DiffjetError(f"the 'openai-clip' package has no {_BPE_FILE}; reinstall it")
    with gzip.open(distribution.locate_file(bpe_files[0])) as bpe:
        lines = bpe.read().decode("utf-8").split("\n")
    # Line 0 is the file's version header.
    return tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])


@functools.cache
def clip_vocab() -> dict[str, int]:
    """Token -> id, exactly as OpenAI's `SimpleTokenizer` numbers them."""
    byte_tokens = list(_byte_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += [left + right for left, right in clip_merges()]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def clip_tokenizer(pad_token: str = EOS_TOKEN) -> transformers.CLIPTokenizer:
    """The OpenAI CLIP tokenizer (vocab 49408, max length 77) with the given pad token.

    SD 1.5 and SDXL's first tokenizer pad with `<|endoftext|>`; the OpenCLIP encoders of SD 2.1
    and SDXL's `tokenizer_2` pad with `!` (id 0), which changes their prompt embeddings.
    """
    return transformers.CLIPTokenizer(
        vocab=dict(clip_vocab()),
        merges=list(clip_merges()),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


# -- T5 ------------------------------------------------------------------------------------------------
# T5's real tokenizer is a SentencePiece model (`spiece.model`) that no package here ships, so the T5
# tokenizer of the DiT presets is a stand-in: a SentencePiece-style Unigram tokenizer with T5's layout of
# ids (0 <pad>, 1 </s>, 2 <unk>, 32000 pieces in all, then the 100 <extra_id_*> sentinels: 32100 ids within
# the encoder's 32128-row embedding) and T5's pre-tokenizing, post-processing and padding, whose pieces are
# CLIP's BPE tokens (a word-final token becomes a "▁"-prefixed piece). A prompt gets ids of the same kind and
# about the same count as with the real one, but not the same ids: tokenizer ≠ architecture, and with random
# weights the ids carry no meaning anyway.
T5_PIECES = 32000
T5_EXTRA_IDS = 100
_T5_SPECIAL = ("<pad>", "</s>", "<unk>")


@functools.cache
def t5_pieces() -> tuple[tuple[str, float], ...]:
    """The stand-in T5 vocabulary as (piece, score) pairs, in id order; scores favour earlier (commoner) merges."""
    pieces: dict[str, float] = {token: 0.0 for token in _T5_SPECIAL}
    for token, rank in clip_vocab().items():
        if len(pieces) == T5_PIECES:
            break
        if token in (BOS_TOKEN, EOS_TOKEN):
            continue
        piece = "▁" + token.removesuffix("</w>") if token.endswith("</w>") else token
        pieces.setdefault(piece, -math.log(rank + 2))
    return tuple(pieces.items())


def t5_tokenizer(model_max_length: int) -> transformers.T5Tokenizer:
    """The stand-in T5 tokenizer described above (ids within T5's vocabulary; not T5's own ids)."""
    return transformers.T5Tokenizer(vocab=list(t5_pieces()), extra_ids=T5_EXTRA_IDS,
                                    model_max_length=model_max_length)
