"""SmallCap end to end: patch features, retrieval without the image's own captions, training
through the CLI (only cross-attention changes), resume after a kill, captioning with
`--mode smallcap` against transformers' own generate, and refused inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from ragcap.cli import app
from ragcap.decoders import SmallCapDecoder, load_decoder
from ragcap.decoders.smallcap import SmallCapConfig, SmallCapInput, cross_attention_lm, reduced_cross_attention
from ragcap.errors import ModelError
from tests.conftest import shared_path
from tests.test_train_clipcap import manifest_rows, random_lm

runner = CliRunner()


def ragcap(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def write_refs(path, rows, first_only: bool = False):
    path.write_text("".join(json.dumps({**r, "references": r["references"][:1] if first_only else r["references"]}) + "\n" for r in rows))
    return path


def write_memory(path, rows, with_ids: bool = True):
    """A JSONL corpus of these images' captions, with their image ids when asked."""
    lines = [{"text": c, **({"image": r["image_id"]} if with_ids else {})} for r in rows for c in r["references"]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def ingest(corpus, collection, clip, with_ids: bool = True):
    ids = ["--id-field", "image"] if with_ids else []
    ragcap("ingest", "jsonl", corpus, "-c", collection, "-m", clip, "--text-field", "text", *ids)
    return collection


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_clip_dir):
    """8 real photographs with their features and patches, a tiny GPT-2, and a corpus of their
    own captions plus 8 other images' captions."""
    root = tmp_path_factory.mktemp("smallcap")
    rows = manifest_rows(16)
    images = shared_path("data", "coco", "images")
    refs = write_refs(root / "refs.jsonl", rows[:8])
    ragcap("embed-images", refs, "--images", images, "-o", root / "features.parquet", "-m", tiny_clip_dir, "--patches")
    return {"root": root, "rows": rows[:8], "images": images, "features": root / "features.parquet",
            "lm": random_lm(root / "lm", width=32, layers=2), "all": write_memory(root / "all.jsonl", rows),
            "others": write_memory(root / "others.jsonl", rows[8:]), "no_ids": write_memory(root / "no-ids.jsonl", rows, with_ids=False)}


TRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--cross-attention-width", "8", "--val-fraction", "0.25", "--json"]


def test_patch_features_are_the_vision_transformers_last_hidden_states(data, tiny_clip_dir):
    from ragcap.embed import load_embedder
    from ragcap.features import read_features
    from ragcap.images import load_image

    features = read_features(data["features"], patches=True)
    assert features.patches.shape == (8, 17, 64)  # 64 px / 16 px patches = 16, plus the class token; width 64
    embedder = load_embedder(str(tiny_clip_dir), image_only=True)
    image = load_image(data["images"] / data["rows"][0]["file"])
    visual = embedder.model.visual
    pixels = embedder.preprocess(image).unsqueeze(0)
    with torch.no_grad():  # open_clip's forward written out, stopping before ln_post
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.transformer(visual.ln_pre(x))
    torch.testing.assert_close(torch.from_numpy(features.patches[0]), x[0], rtol=1e-5, atol=1e-5)
    # The vector column is unchanged by --patches.
    vectors, _ = embedder.encode_image_tokens([image])
    assert features.vectors[0] == pytest.approx(vectors[0], abs=1e-6)


def pretrain_lm(out, tokenizer, prompts: list[str], captions: list[str], steps: int = 300):
    """A tiny GPT-2 (1 layer, width 64, no dropout) that knows these captions as GPT-2 knows
    English: trained to continue the SmallCap prompt of a random image with one of them (loss on
    the caption only). The prompt says nothing about which caption it is, so choosing the right
    one for an image is left to the cross-attention."""
    import random

    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=64, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    draw = random.Random(0)
    for _ in range(steps):
        pairs = [(tokenizer.encode(draw.choice(prompts)), tokenizer.encode(c)) for c in draw.sample(captions, 10)]
        width = max(len(p) + len(c) for p, c in pairs)
        ids = torch.tensor([p + c + [0] * (width - len(p) - len(c)) for p, c in pairs])
        labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c)) for p, c in pairs])[:, 1:]
        hidden = lm.transformer(input_ids=ids).last_hidden_state[:, :-1]
        keep = labels != -100  # the output layer only where the loss is (50k outputs, ~7x less work)
        loss = F.cross_entropy(lm.lm_head(hidden[keep]), labels[keep])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_training_reproduces_the_captions_of_30_photographs(tiny_clip_dir, tmp_path, monkeypatch):
    """30 real COCO photographs with their first caption, a memory of 50 other photographs'
    captions, a tiny frozen LM that knows the captions and a tiny cross-attention trained through
    the CLI: `caption --mode smallcap` writes each image's own caption (measured with these
    settings: 21/30 after 30 epochs, 27/30 after 60; 80 leaves a margin)."""
    from transformers import GPT2TokenizerFast

    from ragcap.decoders.lm_prompt import build_prompt, select_captions
    from ragcap.smallcap_train import smallcap_data
    from ragcap.store import open_store

    rows = manifest_rows(80)
    images = shared_path("data", "coco", "images")
    refs = write_refs(tmp_path / "refs.jsonl", rows[:30], first_only=True)
    ragcap("embed-images", refs, "--images", images, "-o", tmp_path / "features.parquet", "-m", tiny_clip_dir, "--patches")
    ingest(write_memory(tmp_path / "memory.jsonl", rows[30:]), "coco-others", tiny_clip_dir)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(shared_path("models", "gpt2-tokenizer")))
    with open_store() as store:
        neighbours = smallcap_data(store, "coco-others", tmp_path / "features.parquet", tokenizer, 4, 25).neighbours
    captions = [r["references"][0].strip().rstrip(".") + "." for r in rows[:30]]
    lm = pretrain_lm(tmp_path / "lm", tokenizer, [build_prompt(select_captions(n, tokenizer)) for n in neighbours], captions)

    trained = json.loads(ragcap("train-smallcap", "--features", tmp_path / "features.parquet", "-c", "coco-others", "-o", tmp_path / "model",
                                "--lm", lm, "--cross-attention-width", "32", "--epochs", "80", "--lr", "1e-2", "--batch-size", "10",
                                "--val-fraction", "0", "--warmup-steps", "5", "--json").stdout)
    assert trained["captions"] == 30 and trained["epochs"][-1]["train_loss"] < trained["epochs"][0]["train_loss"] / 2
    result = ragcap("caption", *[images / r["file"] for r in rows[:30]], "-c", "coco-others", "--mode", "smallcap",
                    "--decoder", tmp_path / "model", "--json")
    written = {os.path.basename(line["file"]): line["caption"] for line in map(json.loads, result.stdout.splitlines())}
    decoder = load_decoder(tmp_path / "model")
    exact = sum(written[r["file"]] == decoder.target_text(r["references"][0]) for r in rows[:30])
    assert exact >= 27, f"only {exact}/30 reproduced"

    # On a CPU a batch reaches the LM in pieces (ragcap.decoders.lm.CPU_LM_BATCH): same captions, same order.
    sizes = []
    whole = SmallCapDecoder.caption
    monkeypatch.setattr(SmallCapDecoder, "caption", lambda self, cond, options=None: sizes.append(len(cond.neighbours)) or whole(self, cond, options))
    monkeypatch.setattr("ragcap.decoders.lm.CPU_LM_BATCH", 7)
    pieces = ragcap("caption", *[images / r["file"] for r in rows[:30]], "-c", "coco-others", "--mode", "smallcap",
                    "--decoder", tmp_path / "model", "--batch-size", "30", "--json")
    assert sizes == [7, 7, 7, 7, 2]
    assert [json.loads(line)["caption"] for line in pieces.stdout.splitlines()] == [json.loads(line)["caption"] for line in result.stdout.splitlines()]


def test_an_images_own_captions_never_reach_its_prompt(data, tiny_clip_dir):
    """A memory holding the training images' own captions (with and without image ids): each
    image's retrieval skips exactly its own captions, and the count is reported."""
    from ragcap.decoders.tokenizers import load_gpt2_tokenizer
    from ragcap.features import read_features
    from ragcap.smallcap_train import smallcap_data
    from ragcap.store import open_store

    ingest(data["all"], "all", tiny_clip_dir)
    ingest(data["no_ids"], "no-ids", tiny_clip_dir, with_ids=False)
    tokenizer = load_gpt2_tokenizer(data["lm"])
    features = read_features(data["features"])
    with open_store() as store:
        for collection in ("all", "no-ids"):
            found = smallcap_data(store, collection, data["features"], tokenizer, k=4, max_caption_tokens=25)
            search_k = 4 * 3 + 5
            plain = store.search(collection, features.vectors, search_k)
            own = with_own = 0
            for i, row in enumerate(data["rows"]):
                mine = {" ".join(c.split()) for c in row["references"]}  # as ingest stores them
                assert not mine & set(found.neighbours[i]), (collection, row["image_id"])
                assert found.neighbours[i] == [h.payload["caption"] for h in plain[i] if h.payload["caption"] not in mine]
                prompt = tokenizer.decode(found.examples.prompts[i])
                assert not any(c.rstrip(".") in prompt for c in mine)
                own += sum(h.payload["caption"] in mine for h in plain[i])
                with_own += any(h.payload["caption"] in mine for h in plain[i])
            assert found.excluded == own > 0 and found.images_with_own == with_own > 0

    result = ragcap("train-smallcap", "--features", data["features"], "-c", "all", "-o", data["root"] / "leak", "--lm", data["lm"], *TRAIN)
    assert json.loads(result.stdout)["own_captions_excluded"] == own
    assert f"left {own} of the training images' own captions out of their prompts" in result.stderr


def test_only_cross_attention_changes_in_training(data, tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file

    ingest(data["others"], "others", tiny_clip_dir)
    clip_before = {p.name: p.read_bytes() for p in tiny_clip_dir.iterdir()}
    trained = json.loads(ragcap("train-smallcap", "--features", data["features"], "-c", "others", "-o", tmp_path / "model",
                                "--lm", data["lm"], "--keep-checkpoint", *TRAIN).stdout)
    assert trained["epochs"][-1]["val_loss"] is not None and trained["encoder"] == trained["retrieval"] == f"local:{tiny_clip_dir.resolve()}"
    decoder = load_decoder(tmp_path / "model")
    assert isinstance(decoder, SmallCapDecoder) and decoder.config.cross_attention_width == 8
    lm = load_file(data["lm"] / "model.safetensors")
    after = decoder.state_dict()
    changed = set()
    torch.manual_seed(0)  # the run's seed: the same initial cross-attention
    initial = SmallCapDecoder(decoder.config, decoder.embedder, cross_attention_lm(data["lm"], decoder.config), decoder.tokenizer).state_dict()
    for name, tensor in after.items():
        theirs = name.removeprefix("lm.")
        if "crossattention" in name or "ln_cross_attn" in name:
            changed.add(name) if not torch.equal(tensor, initial[name]) else None
        else:
            assert torch.equal(tensor, lm.get(theirs, lm.get("transformer.wte.weight"))), name  # frozen LM
    assert len(changed) == 2 * 8  # every cross-attention tensor and its LayerNorm's, both blocks
    assert {p.name: p.read_bytes() for p in tiny_clip_dir.iterdir()} == clip_before  # the encoder is only read
    saved = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)["model"]
    assert set(saved) == {n for n in after if "crossattention" in n or "ln_cross_attn" in n}


def test_smallcap7m_trains_seven_million_parameters(data):
    """GPT-2 small with cross-attention 768 / 4 over ViT-B/32's 768-wide patches: 7.1M trainable
    (SmallCap's 3.5M and 1.8M models: / 8 and / 16)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ragcap.decoders.tokenizers import load_gpt2_tokenizer
    from ragcap.embedder_info import EmbedderInfo

    tokenizer = load_gpt2_tokenizer(data["lm"])
    for width, millions in ((192, 7.1), (96, 3.6), (48, 1.8)):
        config = SmallCapConfig(encoder_width=768, cross_attention_width=width, retrieval_spec="RN50x64:openai", retrieval_dim=1024)
        with torch.device("meta"):
            lm = GPT2LMHeadModel(GPT2Config(add_cross_attention=True))
            for i, block in enumerate(lm.transformer.h):
                block.crossattention = reduced_cross_attention(lm.config, width, 768, i)
            decoder = SmallCapDecoder(config, EmbedderInfo("ViT-B-32:openai", 512), lm, tokenizer)
        trainable = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
        assert round(trainable / 1e6, 1) == millions, (width, trainable)


def test_killed_training_resumes_to_the_same_weights(data, tiny_clip_dir, tmp_path):
    ingest(data["others"], "others", tiny_clip_dir)
    args = ["train-smallcap", "--features", data["features"], "-c", "others", "--lm", data["lm"], "--epochs", "5", "--batch-size", "4",
            "--lr", "1e-3", "--cross-attention-width", "8", "--val-fraction", "0.25", "--json"]
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "ragcap.cli", *map(str, args), "-o", str(killed)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None and not (killed / "train_log.jsonl").exists():
        time.sleep(0.02)
    assert child.poll() is None, "the training ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len((killed / "train_log.jsonl").read_text().splitlines()) < 5 and not (killed / "config.json").exists()

    resumed = json.loads(ragcap(*args, "-o", killed, "--resume").stdout)
    straight = json.loads(ragcap(*args, "-o", tmp_path / "straight").stdout)
    assert resumed["epochs"] == straight["epochs"]
    a, b = load_decoder(killed).state_dict(), load_decoder(tmp_path / "straight").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_batched_beam_search_gives_transformers_generate_captions(data, tiny_clip_dir, tmp_path):
    """SmallCap's own procedure is one image per `generate` call (beam 3, 25 tokens, '.' as end of
    text); ragcap's batched, KV-cached search over several images gives the same captions."""
    from ragcap.decoders.lm_prompt import SMALLCAP_GENERATE
    from ragcap.decoders.tokenizers import load_gpt2_tokenizer
    from ragcap.embedder_info import EmbedderInfo
    from ragcap.generation import SearchOptions

    config = SmallCapConfig(encoder_width=64, cross_attention_width=16, retrieval_spec="r", retrieval_dim=32)
    torch.manual_seed(3)
    lm = cross_attention_lm(data["lm"], config)
    for name, p in lm.named_parameters():  # cross-attention strong enough that images change the captions
        if "crossattention" in name and name.endswith("weight"):
            p.data.normal_(0, 0.5)
    decoder = SmallCapDecoder(config, EmbedderInfo("e", 32), lm, load_gpt2_tokenizer(data["lm"])).eval()
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(5, 17, 64, generator=g)
    neighbours = [[r["references"][0], r["references"][1]] for r in data["rows"][:4]] + [[]]  # one without neighbours
    for options in (SearchOptions(), SearchOptions(beam=1), SearchOptions(beam=2, max_tokens=7)):
        ours = decoder.caption(SmallCapInput(patches, neighbours), options)
        resolved = decoder.search_defaults(options)
        kwargs = dict(SMALLCAP_GENERATE, num_beams=resolved.beam, max_new_tokens=resolved.max_tokens, eos_token_id=decoder.stop_id,
                      pad_token_id=decoder.stop_id)
        for i, ids in enumerate(decoder.prompt_ids(neighbours)):
            with torch.no_grad():
                out = lm.generate(torch.tensor([ids]), encoder_hidden_states=patches[i : i + 1], attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
            new = out[0, len(ids) :].tolist()
            theirs = decoder.detokenize(new[: new.index(decoder.stop_id)] if decoder.stop_id in new else new)
            assert ours[i][0].text == theirs, (options, i)
    assert len({row[0].text for row in decoder.caption(SmallCapInput(patches, neighbours))}) > 1  # the images matter


def test_int8_quantizes_the_cross_attention_lm_whole_and_still_captions(data):
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    from ragcap.decoders.tokenizers import load_gpt2_tokenizer
    from ragcap.embedder_info import EmbedderInfo
    from ragcap.precision import prepare

    config = SmallCapConfig(encoder_width=64, cross_attention_width=16, retrieval_spec="r", retrieval_dim=32)
    torch.manual_seed(3)
    decoder = SmallCapDecoder(config, EmbedderInfo("e", 32), cross_attention_lm(data["lm"], config), load_gpt2_tokenizer(data["lm"])).eval()
    patches, neighbours = torch.randn(3, 17, 64), [[r["references"][0]] for r in data["rows"][:3]]
    exact = decoder.caption(SmallCapInput(patches, neighbours))
    prepare(decoder, torch.device("cpu"), "int8")
    block = decoder.lm.transformer.h[0]
    # Self-attention, cross-attention (query from the text, keys and values from the image) and MLP.
    layers = (block.attn.c_attn, block.attn.c_proj, block.crossattention.q_attn, block.crossattention.c_attn, block.mlp.c_fc)
    assert all(isinstance(layer, QuantizedLinear) for layer in layers)
    low = decoder.caption(SmallCapInput(patches, neighbours))
    # Scores are summed log-probabilities (~-250 for 25 tokens of a random LM): within 2% of fp32's.
    assert len(low) == 3 and all(abs(a[0].score - b[0].score) < 0.02 * abs(b[0].score) for a, b in zip(low, exact))


def test_refused_inputs(data, tiny_clip_dir, tmp_path):
    from tests.helpers import make_tiny_clip

    ingest(data["others"], "others", tiny_clip_dir)
    model = tmp_path / "model"
    ragcap("train-smallcap", "--features", data["features"], "-c", "others", "-o", model, "--lm", data["lm"], *TRAIN)
    paths = [data["images"] / r["file"] for r in data["rows"][:2]]

    # A memory of another embedder than the one the model retrieved with in training.
    other = make_tiny_clip(tmp_path / "other-clip", seed=7)
    ingest(data["others"], "other-embedder", other)
    result = ragcap("caption", *paths, "-c", "other-embedder", "--mode", "smallcap", "--decoder", model, ok=False)
    assert result.exit_code == 1 and "retrieves from memories of" in result.output and str(other.resolve()) in result.output
    # Training against it without matching query features.
    result = ragcap("train-smallcap", "--features", data["features"], "-c", "other-embedder", "-o", tmp_path / "x", "--lm", data["lm"], ok=False)
    assert result.exit_code == 1 and "--query-features" in result.output and not (tmp_path / "x" / "config.json").exists()

    # An empty memory.
    from ragcap.embed import load_embedder
    from ragcap.store import open_store

    with open_store() as store:
        store.create("empty", load_embedder(str(tiny_clip_dir)).info)
    result = ragcap("train-smallcap", "--features", data["features"], "-c", "empty", "-o", tmp_path / "y", "--lm", data["lm"], ok=False)
    assert result.exit_code == 1 and "collection 'empty' is empty" in result.output and not (tmp_path / "y" / "config.json").exists()
    result = ragcap("caption", *paths, "-c", "empty", "--mode", "smallcap", "--decoder", model, ok=False)
    assert result.exit_code == 1 and "is empty" in result.output

    # Features without patches.
    ragcap("embed-images", data["root"] / "refs.jsonl", "--images", data["images"], "-o", tmp_path / "plain.parquet", "-m", tiny_clip_dir)
    result = ragcap("train-smallcap", "--features", tmp_path / "plain.parquet", "-c", "others", "-o", tmp_path / "z", "--lm", data["lm"], ok=False)
    assert result.exit_code == 1 and "has no patch features" in result.output and not (tmp_path / "z" / "config.json").exists()

    # A missing image: reported on its line, the others captioned, non-zero exit.
    result = ragcap("caption", paths[0], tmp_path / "absent.jpg", paths[1], "-c", "others", "--mode", "smallcap", "--decoder", model, "--json", ok=False)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1 and [bool(line.get("error")) for line in lines] == [False, True, False]
    # Texts are not images; a pd decoder is not a SmallCap one.
    result = ragcap("caption", "--text", "a dog", "-c", "others", "--mode", "smallcap", "--decoder", model, ok=False)
    assert result.exit_code == 1 and "captions images" in result.output
    result = ragcap("caption", paths[0], "-c", "others", "--mode", "pd,smallcap", "--decoder", model, ok=False)
    assert result.exit_code == 1 and "mode pd needs a trained decoder" in result.output
    result = ragcap("caption", paths[0], "-c", "others", "--mode", "smallcap", "--decoder", model, "--decoder", model, ok=False)
    assert result.exit_code == 1 and "serve the same modes" in result.output

    # A model directory whose weights have the wrong shapes.
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["lm.transformer.h.0.crossattention.q_attn.weight"] = torch.zeros(32, 4)
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_decoder(model)


def test_eval_scores_smallcap_prompt_and_pd_side_by_side(data, tiny_clip_dir, tmp_path):
    """One run: a SmallCap model and DeCap's decoder (two --decoder), the prompt mode's LM; each
    mode's captions are the ones `caption` writes with the same settings."""
    from ragcap.decoders import DeCapConfig, DeCapDecoder
    from ragcap.embed import load_embedder

    ingest(data["others"], "others", tiny_clip_dir)
    ragcap("train-smallcap", "--features", data["features"], "-c", "others", "-o", tmp_path / "smallcap", "--lm", data["lm"], *TRAIN)
    DeCapDecoder(DeCapConfig(embed_dim=32, n_layer=1, n_head=2, n_embd=32, max_tokens=8), load_embedder(str(tiny_clip_dir)).info).save(tmp_path / "decap")
    rows = data["rows"][:3]
    images = tmp_path / "images"
    images.mkdir()
    for row in rows:
        (images / row["file"]).write_bytes((data["images"] / row["file"]).read_bytes())
    refs = write_refs(tmp_path / "refs.jsonl", rows)
    common = ["-c", "others", "--mode", "smallcap,prompt,pd", "--decoder", tmp_path / "smallcap", "--decoder", tmp_path / "decap",
              "--lm", data["lm"], "--max-tokens", "6"]
    report = json.loads(ragcap("eval", refs, "--images", images, *common, "--no-spice", "--json").stdout)
    assert set(report["scores"]) == {"smallcap", "prompt", "pd"} and report["images_scored"] == 3
    captioned = {}
    for line in map(json.loads, ragcap("caption", *[images / r["file"] for r in rows], *common, "--json").stdout.splitlines()):
        captioned.setdefault(os.path.basename(line["file"]), {})[line["mode"]] = line["caption"]
    files = {str(r["image_id"]): r["file"] for r in rows}
    assert {files[key]: modes for key, modes in report["captions"].items()} == captioned
