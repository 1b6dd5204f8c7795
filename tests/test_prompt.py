"""SmallCap prompt, 25-token filter and batched causal-LM captioning (ragcap.decoders.lm_prompt)."""

from pathlib import Path

import pytest
import torch

from ragcap.decoders.lm import CPU_LM_BATCH, lm_batch
from ragcap.decoders.lm_prompt import PromptCaptioner, build_prompt, first_sentence, save_random_lm, select_captions
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "models" / "gpt2-tokenizer"
needs_tokenizer = pytest.mark.skipif(
    not (TOKENIZER_DIR / "vocab.json").is_file(),
    reason="real GPT-2 tokenizer (../shared/models/gpt2-tokenizer/vocab.json + merges.txt) is absent",
)

NEIGHBOURS = [
    "a man riding a wave on top of a surfboard",
    "a surfer rides a large wave in the ocean",
    "a person on a surfboard in the water",
    "a surfer is riding a big wave",
    "a man surfing on a wave at the beach",
]


def test_prompt_is_smallcaps_template_byte_for_byte():
    # SmallCap: template.txt read with .strip() + ' ', "||" -> '\n\n'.join(caps[:k]) + '.'
    expected = (
        "Similar images show\n\n"
        "a man riding a wave on top of a surfboard\n\n"
        "a surfer rides a large wave in the ocean\n\n"
        "a person on a surfboard in the water\n\n"
        "a surfer is riding a big wave.\n\n"
        "This image shows "
    )
    assert build_prompt(NEIGHBOURS[:4]) == expected


def test_prompt_without_neighbours_is_smallcaps_no_retrieval_prefix():
    assert build_prompt([]) == "This image shows "


def test_first_sentence_cuts_at_period_or_newline():
    assert first_sentence(" a dog on a couch. It sleeps.") == "a dog on a couch"
    assert first_sentence("a red bus\n\nSimilar images show") == "a red bus"
    assert first_sentence("  no end at all ") == "no end at all"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))


@needs_tokenizer
def test_filter_keeps_25_gpt2_tokens_and_skips_26(tokenizer):
    exactly_25 = "dog" + " dog" * 24
    exactly_26 = "dog" + " dog" * 25
    assert len(tokenizer.encode(exactly_25)) == 25 and len(tokenizer.encode(exactly_26)) == 26
    picked = select_captions([exactly_26, "a cat", exactly_25, "a bird", "a cow", "a pig"], tokenizer, k=4)
    assert picked == ["a cat", exactly_25, "a bird", "a cow"]


@needs_tokenizer
def test_select_normalises_like_smallcaps_datastore(tokenizer):
    # Raw COCO captions carry whitespace and final periods; Karpathy-tokenised ones do not.
    picked = select_captions(["A dog on a bed. \n", "   ", ".", "Two cats."], tokenizer, k=4)
    assert picked == ["A dog on a bed", "Two cats"]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    if not (TOKENIZER_DIR / "vocab.json").is_file():
        pytest.skip("real GPT-2 tokenizer (../shared/models/gpt2-tokenizer) is absent")
    lm_dir = save_random_lm(tmp_path_factory.mktemp("lm"), TOKENIZER_DIR, n_layer=2, n_embd=64, n_head=2)
    return PromptCaptioner(str(lm_dir), device="cpu", batch_size=4)


# Prompts of different lengths, so batches are left-padded.
IMAGES = [
    NEIGHBOURS[:4],
    ["a cat"],
    ["a plate of food with broccoli and rice on a wooden table next to a glass of water", "a meal"],
    [],
    NEIGHBOURS[2:],
]


def test_random_gpt2_completes_prompt_with_one_clean_sentence(captioner):
    captions = captioner.generate(IMAGES)
    assert len(captions) == len(IMAGES)
    for caption in captions:
        assert isinstance(caption, str) and caption == caption.strip()
        assert "\n" not in caption and "." not in caption


def test_batched_equals_one_at_a_time(captioner):
    # Left padding is only harmless if position ids skip the pads; wrong ids change padded rows.
    options = SearchOptions(beam=3, max_tokens=12)
    batched = captioner.caption(IMAGES, options=options)
    single = [captioner.caption([image], options=options)[0] for image in IMAGES]
    assert batched == single


def test_greedy_batched_equals_one_at_a_time(captioner):
    options = SearchOptions(beam=1, max_tokens=6)
    assert captioner.generate(IMAGES[:2], options=options) == [captioner.generate([image], options=options)[0] for image in IMAGES[:2]]


def test_defaults_are_smallcaps_generate_call(captioner):
    """SmallCap's infer.py: generate(num_beams=3, max_new_tokens=25, length_penalty=0, early
    stopping) on one prompt; ragcap's own search must give the same caption, batched."""
    tokenizer, model = captioner.tokenizer, captioner.model
    expected = []
    for prompt in captioner.prompts(IMAGES):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, **captioner.generate_kwargs())
        expected.append(first_sentence(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    assert captioner.generate(IMAGES) == expected


def test_missing_lm_dir_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="language model not found.*--lm DIR.*save-random-lm"):
        PromptCaptioner(str(tmp_path / "no-such-model"))


def test_dir_without_weights_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="could not be loaded"):
        PromptCaptioner(str(tmp_path))


def test_dir_without_tokenizer_files_is_a_model_error(captioner, tmp_path):
    # Before: a tokenizer of special tokens only, then an IndexError while captioning.
    captioner.model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="tokenizer in .* is empty"):
        PromptCaptioner(str(tmp_path))


def test_the_prompt_lm_takes_batches_whole_on_a_gpu_and_in_pieces_on_a_cpu(captioner, tiny_clip_dir):
    """On a GPU one LM call per batch of images (--batch-size): a batch of 256 images is 256
    prompts at once. On a CPU at most CPU_LM_BATCH prompts at once (their beams' caches)."""
    from pipelines.base import CaptionRecord
    from ragcap.api import load_captioner
    from ragcap.caption import CaptionSettings
    from ragcap.embed import load_embedder
    from ragcap.ingest import IngestOptions, ingest
    from ragcap.store import open_store

    embedder = load_embedder(str(tiny_clip_dir))
    with open_store() as store:
        ingest((CaptionRecord(caption=c, corpus="test") for c in NEIGHBOURS), store, "mem", embedder.info, lambda: embedder, IngestOptions())
        for batch_size, on_cpu in ((3, 3), (64, CPU_LM_BATCH)):
            settings = CaptionSettings(modes=("prompt",), batch_size=batch_size)
            loaded = load_captioner(store, "mem", settings, lm=str(captioner.model.name_or_path), image_only=False)
            assert loaded.prompter.batch_size == on_cpu == lm_batch(batch_size, torch.device("cpu"))
            assert lm_batch(batch_size, torch.device("cuda")) == batch_size


def test_save_random_lm_refuses_bad_sizes_and_a_missing_tokenizer_folder(tmp_path):
    # Before: a width the heads do not divide was "unexpected ValueError ... a bug in ragcap",
    # and a missing --tokenizer folder a hub "Repo id must use alphanumeric chars" error.
    from ragcap.errors import OptionError

    with pytest.raises(OptionError, match="--width 30, --heads 4.*multiple of the heads"):
        save_random_lm(tmp_path / "lm", TOKENIZER_DIR, n_layer=1, n_embd=30, n_head=4)
    with pytest.raises(ModelError, match="--tokenizer .*no-such-folder: no such directory"):
        save_random_lm(tmp_path / "lm", tmp_path / "no-such-folder", n_layer=1, n_embd=32, n_head=2)
    assert not (tmp_path / "lm").exists()
