"""ragcap.clip_tokenizer: the Rust tokenizer gives open_clip's SimpleTokenizer ids on every input."""

import csv
import functools
import json
import os
import random

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from tests.conftest import shared_path
from tests.helpers import make_tiny_clip

from ragcap import clip_tokenizer
from ragcap.clip_tokenizer import ClipTokenizer
from ragcap.embed import load_embedder

HARD = [
    "",
    "   ",
    "\t\n \r\n",
    "it's a dog's life; they're here, we've been, I'm sure you'll see, he'd go",
    "IT'S LOUD. A DOG'S BOWL",
    "Café naïve façade, Straße, ΟΔΟΣ ΣΟΦΙΑΣ",  # accents; capital sigma lower-cases to ς at a word's end
    "a dog \U0001F436 with a party hat \U0001F389\U0001F382 and 👍🏽",
    "fish &amp; chips &lt;3 &amp;amp; &#x27;quoted&#39; &eacute;t&eacute;",
    "cafÃ© crÃ¨me â€“ mojibake ftfy repairs",
    "ｆｕｌｌ ｗｉｄｔｈ and ﬁne ﬂower ligatures, “curly” ‘quotes’",
    "\x00null\x1b[31mred\x1b[0m and \x7f controls\x0bvertical\x1cfile-separator",
    "12 dogs, 3.5 cats, 2,000,000 birds in 1999 at 10:45pm #42 @home $5 100%",
    "中文 日本語のキャプション 한국어 العربية हिन्दी",
    "it'ſ a long s, \u0345 a combining mark, \u0558 a newer letter",
    "\u0345",  # no word at all for open_clip's regex
    "<start_of_text> a caption that spells <end_of_text> special tokens",
    "((<end_of_text>)) and x<start_of_text>y",
    "a very long caption " * 40,
    "word " * 75,  # 75 tokens + SOT + EOT = 77: fits exactly
    "word " * 76,  # one token too many
    "x" * 500,
]
CONTEXTS = [77, 16, 5, 3]


@pytest.fixture(scope="module")
def simple():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def rust(simple):
    return ClipTokenizer(simple, build_min=0)  # the Rust path for every call


def used_lengths(tokens: torch.Tensor) -> np.ndarray:
    """Position after each row's last non-pad (0) token: its length, for a row that was not cut."""
    nonzero = (tokens != 0).numpy()
    return tokens.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)


def assert_same_as_open_clip(simple, rust, captions, context):
    tokens, lengths = rust.tokenize(captions, context)
    expected = simple(captions, context_length=context)
    differ = np.flatnonzero((tokens != expected).any(dim=1).numpy())
    assert len(differ) == 0, f"{len(differ)} captions differ at context {context}, first: {captions[differ[0]]!r}"
    cut = lengths > context
    np.testing.assert_array_equal(lengths[~cut], used_lengths(expected)[~cut])
    if cut.any():  # counted in full: as open_clip tokenises them in a context that fits them all
        long = [captions[i] for i in np.flatnonzero(cut)]
        np.testing.assert_array_equal(lengths[cut], used_lengths(simple(long, context_length=int(lengths.max()) + 1)))
    return lengths


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("context", CONTEXTS)
def test_hard_cases_equal_open_clip(simple, context, parallel):
    rust = ClipTokenizer(simple, parallel=parallel, build_min=0)
    lengths = assert_same_as_open_clip(simple, rust, HARD, context)
    assert (lengths > 77).any() and (lengths == 2).any()  # long ones counted past the cut; empty ones too
    assert torch.equal(rust(HARD[3], context), simple(HARD[3], context_length=context))  # one string, as open_clip


def test_random_ascii_equals_open_clip(simple, rust):
    """ASCII text takes the Rust regex and skips ftfy: both claims checked on random strings
    weighted towards what splits words (apostrophes, digits, punctuation, entities, spaces)."""
    rng = random.Random(0)
    alphabet = "abcdeSTxyz0129 '''&;#<>!?.,-_/\\\"()\t\n\r\x0c\x7f\x00"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["it" + rng.choice(["'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'x", "''s"]) + " x" for _ in range(200)]
    assert_same_as_open_clip(simple, rust, texts, 77)
    ascii_plain = [t for t in texts if clip_tokenizer._NOT_PLAIN.search(t) is None]
    assert len(ascii_plain) > 100
    assert [clip_tokenizer.clean(simple, t) for t in ascii_plain] == [simple.clean_fn(t) for t in ascii_plain]


def caption_file(name):
    if name == "coco-val2014":
        return [c for caps in json.loads(shared_path("data", "coco", "captions_val2014_by_image.json").read_text()).values() for c in caps]
    if name == "coco-val2017":
        return [a["caption"] for a in json.loads(shared_path("data", "coco", "captions_val2017.json").read_text())["annotations"]]
    with shared_path("data", "flickr8k", "captions.txt").open(newline="", encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f)]


@pytest.mark.slow  # open_clip's tokenizer on 268,000 captions: ~1 min on a 2-core CPU
@pytest.mark.parametrize("corpus", ["coco-val2014", "coco-val2017", "flickr8k"])
def test_every_real_caption_equals_open_clip(rust, corpus):
    captions = caption_file(corpus)
    assert len(captions) > 25_000
    reference = SimpleTokenizer()
    # open_clip encodes each caption once; its own __call__ still pads and cuts at each context.
    reference.encode = functools.lru_cache(maxsize=None)(reference.encode)
    for context in (77, 16):  # 16 cuts a third of COCO's captions
        lengths = assert_same_as_open_clip(reference, rust, captions, context)
    assert (lengths > 16).mean() > 0.1


def test_small_calls_wait_for_the_build(simple):
    lazy = ClipTokenizer(simple, build_min=100)
    assert torch.equal(lazy(HARD), simple(HARD))
    assert lazy._rust is None  # under build_min: open_clip's tokenizer, no build
    many = HARD * 10
    assert torch.equal(lazy(many, 16), simple(many, context_length=16))
    assert lazy._rust is not None
    assert torch.equal(lazy(HARD), simple(HARD))  # built: now every call takes it


def test_built_once_per_vocabulary(simple):
    assert clip_tokenizer.build(simple) is clip_tokenizer.build(SimpleTokenizer())


def test_only_open_clips_default_tokenizer(simple):
    assert clip_tokenizer.supports(simple)
    for other in (SimpleTokenizer(clean="canonicalize"), SimpleTokenizer(additional_special_tokens=["<mask>"]),
                  SimpleTokenizer(reduction_mask="simple"), None):
        assert not clip_tokenizer.supports(other)
    with pytest.raises(ValueError, match="SimpleTokenizer"):
        ClipTokenizer(SimpleTokenizer(clean="whitespace"))


def test_embedder_vectors_unchanged(tmp_path, simple):
    """The embedder on the Rust tokens gives open_clip's encode_text on open_clip's tokens."""
    embedder = load_embedder(str(make_tiny_clip(tmp_path, seed=2)), device="cpu")
    assert embedder.clip_tokenizer is not None
    captions = HARD + [f"{n} dogs and {n % 7} cats on a red couch, photo {n}" for n in range(clip_tokenizer.LAZY_BUILD_MIN)]
    encoded = embedder.encode_text(captions, batch_size=128)
    assert embedder.clip_tokenizer._rust is not None  # the call was large enough to build and use it
    with torch.inference_mode():
        expected = embedder.model.encode_text(simple(captions), normalize=True).numpy()
    assert np.abs(encoded.vectors - expected).max() <= 1e-5
    full = np.array([len(simple.encode(c)) + 2 for c in captions])
    np.testing.assert_array_equal(encoded.lengths, full)
    np.testing.assert_array_equal(encoded.truncated, full > 77)


def test_pool_setting_restored(rust, monkeypatch):
    """open_clip's fork-safety setting holds again after each call that switched the pool on."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    rust(HARD)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    rust(HARD)
    assert "TOKENIZERS_PARALLELISM" not in os.environ
