"""Tests for the evaluators and their registry (weightsmith.vet).

Real tiny models built from transformers configs (random init, no download): a GPT-2 with a
256-token byte vocabulary and a BERT encoder. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.errors import WeightsmithError
from weightsmith.vet import EVALUATORS, Context, Entry, for_model, get

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(40)) + "\n"
LN = "transformer.h.0.ln_1.weight"  # (64,)
ATTN = "transformer.h.0.attn.c_attn.weight"  # (64, 192)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("gpt2") / "model", *SIZES["tiny"])


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("bert") / "model"
    BertModel(config).save_pretrained(folder)
    return folder


def original(folder: Path) -> Entry:
    return Entry("original", "original", "original", 0, folder)


def variant(folder: Path, out: Path, changes: dict[str, np.ndarray], label: str = "noise") -> Entry:
    """A copy of the model folder with some tensors replaced, as a baseline entry."""
    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    tensors.update(changes)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return Entry(label, "baseline", "noise", 0, out)


def noisy(values: np.ndarray, radius: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(values.shape).astype(np.float32)
    return values + np.float32(radius * values.std()) * noise


# --- registry -----------------------------------------------------------------------------


def test_registry_lists_the_three_evaluators() -> None:
    assert list(EVALUATORS) == ["lm-perplexity", "embedding-similarity", "weight-stats"]
    for name in EVALUATORS:
        assert get(name).name == name
    with pytest.raises(WeightsmithError, match="unknown"):
        get("bleu")


def test_for_model_picks_evaluators_by_config(gpt2: Path, bert: Path) -> None:
    assert for_model(original(gpt2).config()) == ["lm-perplexity", "weight-stats"]
    assert for_model(original(bert).config()) == ["embedding-similarity", "weight-stats"]
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert for_model(llama) == ["lm-perplexity", "weight-stats"]
    assert for_model({"model_type": "gpt2"}) == ["lm-perplexity", "weight-stats"]
    t5 = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
    }
    assert for_model(t5) == ["weight-stats"]


def test_evaluator_configs_are_validated() -> None:
    with pytest.raises(WeightsmithError, match="max_tokens"):
        get("lm-perplexity")({"max_tokens": 0})
    with pytest.raises(WeightsmithError, match="windw"):
        get("lm-perplexity")({"windw": 8})
    assert get("lm-perplexity")({"window": 8}).config.window == 8


def test_entry_reads_replaced_tensors_from_its_folder(gpt2: Path) -> None:
    entry = original(gpt2)
    assert entry.id == "original"
    values = entry.tensor(ATTN)
    assert values.dtype == np.float32 and values.shape == (64, 192)
    np.testing.assert_array_equal(values, load_file(gpt2 / "model.safetensors")[ATTN])
    with pytest.raises(WeightsmithError, match="no tensor"):
        entry.tensor("transformer.h.9.attn.c_attn.weight")
    assert Entry("noise(r=0.1)", "baseline", "noise", 3, gpt2).id == "noise(r=0.1)#3"


# --- lm-perplexity ------------------------------------------------------------------------


def test_lm_perplexity_predicts_every_byte_once(gpt2: Path) -> None:
    context = Context(original=original(gpt2), tensors=(ATTN,), text=TEXT)
    # short windows: many full ones in batches of 3, and a shorter last one
    scores = get("lm-perplexity")({"window": 24, "batch_size": 3}).evaluate(context.original, context)
    m = scores.metrics
    assert m["tokens"] == m["bytes"] == len(TEXT.encode())
    assert m["nll_per_byte"] == m["nll_per_token"]  # byte-level ids
    assert abs(m["nll_per_byte"] - math.log(256)) < 0.5  # an untrained model is near uniform
    one = get("lm-perplexity")({"window": 24, "batch_size": 1}).evaluate(context.original, context)
    assert one.metrics["nll_per_byte"] == pytest.approx(m["nll_per_byte"], rel=1e-6)


def test_lm_perplexity_matches_the_models_own_loss(gpt2: Path) -> None:
    """Text shorter than a window: one window, whose mean NLL is the model's own loss."""
    from transformers import AutoModelForCausalLM

    text = TEXT[:100]
    context = Context(original=original(gpt2), tensors=(ATTN,), text=text)
    m = get("lm-perplexity")().evaluate(context.original, context).metrics
    model = AutoModelForCausalLM.from_pretrained(gpt2, local_files_only=True).eval()
    ids = torch.tensor([[0x0A, *text.encode()]])  # the newline prefix, then the bytes
    with torch.inference_mode():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert m["tokens"] == 100
    assert m["nll_per_token"] == pytest.approx(loss, rel=1e-5)


def test_lm_perplexity_caps_the_tokens(gpt2: Path) -> None:
    context = Context(original=original(gpt2), tensors=(ATTN,), text=TEXT)
    m = get("lm-perplexity")({"max_tokens": 50}).evaluate(context.original, context).metrics
    assert m["tokens"] == m["bytes"] == 50


def test_lm_perplexity_uses_the_models_tokenizer(gpt2: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(gpt2, folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[UNK]").save_pretrained(folder)

    context = Context(original=original(folder), tensors=(ATTN,), text=TEXT)
    m = get("lm-perplexity")().evaluate(context.original, context).metrics
    assert m["tokens"] == len(TEXT.split())  # words, not bytes
    assert m["bytes"] == len(TEXT.encode())
    assert m["nll_per_byte"] == pytest.approx(m["nll_per_token"] * m["tokens"] / m["bytes"])


def test_lm_perplexity_is_worse_for_a_damaged_model(gpt2: Path, tmp_path: Path) -> None:
    weights = load_file(gpt2 / "model.safetensors")
    damaged = variant(gpt2, tmp_path / "damaged", {ATTN: noisy(weights[ATTN], 30.0)})
    context = Context(original=original(gpt2), tensors=(ATTN,), text=TEXT)
    evaluator = get("lm-perplexity")()
    base = evaluator.evaluate(context.original, context).metrics["nll_per_byte"]
    worse = evaluator.evaluate(damaged, context).metrics["nll_per_byte"]
    assert worse > base


# --- weight-stats -------------------------------------------------------------------------


def test_weight_stats_of_the_original_and_a_noisy_copy(gpt2: Path, tmp_path: Path) -> None:
    weights = load_file(gpt2 / "model.safetensors")
    ln = weights[LN] + np.linspace(-0.1, 0.1, 64, dtype=np.float32)  # LayerNorm init is constant
    base = variant(gpt2, tmp_path / "base", {LN: ln}, label="base")
    context = Context(
        original=Entry("original", "original", "original", 0, base.folder),
        tensors=(LN, ATTN),
        text=TEXT,
    )
    evaluator = get("weight-stats")()

    same = evaluator.evaluate(context.original, context)
    for name in (LN, ATTN):
        t = same.per_tensor[name]
        assert t["rel_l2"] == 0.0 and t["novelty"] == 0.0
        assert t["cosine"] == pytest.approx(1.0)
        assert math.isnan(t["typical_distance"])  # one training example: no typical distance
    sigma = np.linalg.norm(weights[ATTN].astype(np.float64), ord=2)
    assert same.per_tensor[ATTN]["spectral_norm"] == pytest.approx(sigma, rel=1e-9)
    assert same.per_tensor[LN]["spectral_norm"] == pytest.approx(np.linalg.norm(ln), rel=1e-6)

    changed = variant(base.folder, tmp_path / "noisy", {ATTN: noisy(weights[ATTN], 0.5)})
    scores = evaluator.evaluate(changed, context)
    attn = scores.per_tensor[ATTN]
    assert attn["novelty"] == pytest.approx(0.5, rel=0.05)  # noise of radius r: novelty ~ r
    assert attn["rel_l2"] == pytest.approx(
        0.5 * weights[ATTN].std() / np.sqrt((weights[ATTN].astype(np.float64) ** 2).mean()),
        rel=0.05,
    )
    assert 0.0 < attn["cosine"] < 1.0
    assert scores.per_tensor[LN]["novelty"] == 0.0
    # the group's novelty: both tensors together to the one example, RMS over all their values
    n_attn, n_ln = weights[ATTN].size, ln.size
    assert scores.metrics["novelty"] == pytest.approx(attn["novelty"] * math.sqrt(n_attn / (n_attn + n_ln)))
    assert scores.metrics["nearest"] == 0.0


def test_weight_stats_novelty_and_typical_distance_in_a_zoo() -> None:
    rng = np.random.default_rng(0)
    zoo = rng.standard_normal((4, 30, 20)).astype(np.float32)  # K = 4 independent examples
    folder = Path("/nonexistent")  # weight-stats reads only the given tensors
    orig = Entry("original", "original", "original", 0, folder, tensors={"w": zoo[0]})
    member = Entry("member", "baseline", "average", 0, folder, tensors={"w": zoo[2]})
    midway = Entry("mid", "candidate", "x", 0, folder, tensors={"w": (zoo[1] + zoo[3]) / 2})
    context = Context(original=orig, tensors=("w",), text="x", examples={"w": zoo})
    evaluator = get("weight-stats")()
    assert evaluator.evaluate(member, context).metrics["novelty"] == 0.0
    scores = evaluator.evaluate(midway, context).metrics
    # independent unit Gaussians lie sqrt(2) stds apart; the midpoint is half of that away
    assert scores["typical_distance"] == pytest.approx(math.sqrt(2), rel=0.1)
    assert scores["novelty"] == pytest.approx(math.sqrt(2) / 2, rel=0.1)


def test_weight_stats_power_iteration_for_large_tensors() -> None:
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal((2, 200)).astype(np.float32)
    w = 5 * np.outer(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)) + 0.01 * rng.standard_normal((200, 200)).astype(
        np.float32
    )
    orig = Entry("original", "original", "original", 0, Path("/x"), tensors={"w": w})
    context = Context(original=orig, tensors=("w",), text="x")
    exact = get("weight-stats")().evaluate(orig, context).metrics["spectral_norm"]
    power = get("weight-stats")({"exact_svd_max_numel": 100}).evaluate(orig, context)
    assert exact == pytest.approx(np.linalg.norm(w.astype(np.float64), ord=2), rel=1e-9)
    assert power.metrics["spectral_norm"] == pytest.approx(exact, rel=1e-4)


def test_weight_stats_refuses_a_different_shape() -> None:
    orig = Entry("original", "original", "original", 0, Path("/x"), tensors={"w": np.ones((2, 3))})
    wrong = Entry("c", "candidate", "x", 0, Path("/x"), tensors={"w": np.ones((3, 2))})
    context = Context(original=orig, tensors=("w",), text="x")
    with pytest.raises(WeightsmithError, match="shape"):
        get("weight-stats")().evaluate(wrong, context)


# --- embedding-similarity -----------------------------------------------------------------


def test_embedding_similarity_is_one_for_the_original(bert: Path, tmp_path: Path) -> None:
    context = Context(original=original(bert), tensors=("encoder.layer.0.attention.self.query.weight",), text=TEXT)
    evaluator = get("embedding-similarity")({"max_sentences": 30, "batch_size": 8})
    same = evaluator.evaluate(context.original, context).metrics
    assert same["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert same["sentences"] == 30

    name = context.tensors[0]
    weights = load_file(bert / "model.safetensors")
    copy = variant(bert, tmp_path / "perturbed", {name: noisy(weights[name], 3.0)})
    other = evaluator.evaluate(copy, context).metrics
    assert 0.0 < other["cosine"] < 1.0
    assert other["cosine_min"] <= other["cosine"]


def test_embedding_similarity_reloads_for_a_new_context(bert: Path) -> None:
    """The cached original embeddings belong to one context; another text starts afresh."""
    evaluator = get("embedding-similarity")()
    for text in ("one line\n", "two\nlines\n"):
        context = Context(original=original(bert), tensors=("pooler.dense.weight",), text=text)
        assert evaluator.evaluate(context.original, context).metrics["sentences"] == text.count("\n")
