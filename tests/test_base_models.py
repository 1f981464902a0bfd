"""Hub aliases of one base model (``gpt2`` / ``openai-community/gpt2``) count as one base model."""

from __future__ import annotations

import re

import pytest
from helpers import GPT2_LIKE, assert_one_error_line, run_cli, tree_files, write_adapter

import lorazip
from lorazip.errors import ValidationError
from lorazip.io.base_models import LEGACY_CANONICAL_IDS, canonical_base_model, same_base_model

# ----------------------------------------------------------------------------------------------
# The mapping
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "legacy,canonical",
    [
        ("gpt2", "openai-community/gpt2"),
        ("gpt2-medium", "openai-community/gpt2-medium"),
        ("gpt2-xl", "openai-community/gpt2-xl"),
        ("openai-gpt", "openai-community/openai-gpt"),
        ("bert-base-uncased", "google-bert/bert-base-uncased"),
        ("bert-base-multilingual-cased", "google-bert/bert-base-multilingual-cased"),
        ("bert-large-cased-whole-word-masking", "google-bert/bert-large-cased-whole-word-masking"),
        ("roberta-base", "FacebookAI/roberta-base"),
        ("roberta-large-mnli", "FacebookAI/roberta-large-mnli"),
        ("xlm-roberta-large", "FacebookAI/xlm-roberta-large"),
        ("distilbert-base-uncased", "distilbert/distilbert-base-uncased"),
        ("distilgpt2", "distilbert/distilgpt2"),
        ("distilroberta-base", "distilbert/distilroberta-base"),
        ("t5-small", "google-t5/t5-small"),
        ("t5-11b", "google-t5/t5-11b"),
        ("albert-base-v2", "albert/albert-base-v2"),
    ],
)
def test_legacy_ids_map_to_canonical(legacy, canonical):
    assert LEGACY_CANONICAL_IDS[legacy] == canonical
    assert canonical_base_model(legacy) == canonical
    assert canonical_base_model(legacy + "/") == canonical
    assert canonical_base_model(canonical) == canonical  # idempotent
    assert canonical_base_model(canonical + "//") == canonical
    assert same_base_model(legacy, canonical) and same_base_model(canonical, legacy + "/")


def test_table_is_well_formed():
    for legacy, canonical in LEGACY_CANONICAL_IDS.items():
        assert "/" not in legacy, legacy  # only unprefixed ids were moved
        org, name = canonical.split("/")
        assert org and name and re.fullmatch(r"[A-Za-z0-9._-]+", org + name), canonical
        assert canonical not in LEGACY_CANONICAL_IDS  # one step: canonical ids map to themselves
    # one alias per model
    assert len(set(LEGACY_CANONICAL_IDS.values())) == len(LEGACY_CANONICAL_IDS)
    with pytest.raises(TypeError):
        LEGACY_CANONICAL_IDS["x"] = "y"  # read-only


@pytest.mark.parametrize(
    "name",
    ["meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1", "tiny-base", "/models/gpt2", "./gpt2",
     "GPT2", "Gpt2", "some-org/gpt2", "gpt2-tiny", ""],
)
def test_other_names_unchanged(name):
    assert canonical_base_model(name) == name  # case-sensitive; paths and other ids kept


def test_same_base_model():
    assert same_base_model("gpt2", "gpt2")
    assert same_base_model("org/model", "org/model/")
    assert not same_base_model("gpt2", "gpt2-medium")
    assert not same_base_model("gpt2", "openai-community/gpt2-medium")
    assert not same_base_model("gpt2", "GPT2")
    assert not same_base_model("/models/gpt2", "openai-community/gpt2")
    assert not same_base_model("gpt2", None) and not same_base_model(None, "gpt2")
    assert same_base_model(None, None)


# ----------------------------------------------------------------------------------------------
# Collections
# ----------------------------------------------------------------------------------------------


def _two(root, b0, b1):
    write_adapter(root / "a", GPT2_LIKE, seed=0, base_model=b0)
    write_adapter(root / "b", GPT2_LIKE, seed=1, base_model=b1)
    return root


@pytest.mark.parametrize(
    "b0,b1,expected",
    [
        ("gpt2", "openai-community/gpt2", "openai-community/gpt2"),
        ("openai-community/gpt2", "gpt2", "openai-community/gpt2"),
        ("gpt2/", "openai-community/gpt2", "openai-community/gpt2"),
        ("roberta-base", "FacebookAI/roberta-base", "FacebookAI/roberta-base"),
        ("FacebookAI/roberta-base/", "roberta-base", "FacebookAI/roberta-base"),
        ("t5-small", "google-t5/t5-small", "google-t5/t5-small"),
    ],
)
def test_aliases_are_one_base_model(tmp_path, b0, b1, expected):
    coll = lorazip.load_collection(_two(tmp_path / "src", b0, b1))
    assert len(coll) == 2 and coll.base_model == expected


def test_aliases_with_unnamed_base(tmp_path):
    src = _two(tmp_path / "src", "gpt2", "openai-community/gpt2")
    write_adapter(src / "c", GPT2_LIKE, seed=2, base_model=None)
    assert lorazip.load_collection(src).base_model == "openai-community/gpt2"


@pytest.mark.parametrize("name", ["gpt2", "gpt2/", "openai-community/gpt2"])
def test_one_spelling_is_kept(tmp_path, name):
    """All adapters agree on one spelling: it is kept as written (minus a trailing '/')."""
    coll = lorazip.load_collection(_two(tmp_path / "src", name, name))
    assert coll.base_model == name.rstrip("/")


@pytest.mark.parametrize(
    "b0,b1",
    [
        ("gpt2", "gpt2-medium"),
        ("openai-community/gpt2", "gpt2-medium"),
        ("roberta-base", "FacebookAI/roberta-large"),
        ("gpt2", "GPT2"),
        ("/models/gpt2", "gpt2"),
        ("/models/gpt2", "openai-community/gpt2"),
    ],
)
def test_different_base_models_still_an_error(tmp_path, b0, b1):
    src = _two(tmp_path / "src", b0, b1)
    before = tree_files(tmp_path)
    with pytest.raises(ValidationError) as ei:
        lorazip.load_collection(src)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg == (
        f"{src / 'b'}: base model {b1!r} differs from {b0!r} ({src / 'a'}); "
        "compress one base model at a time or pass --base-model to override"
    )
    assert tree_files(tmp_path) == before
    # the override still works
    coll = lorazip.load_collection(src, base_model="openai-community/gpt2")
    assert coll.base_model == "openai-community/gpt2" and len(coll) == 2


def test_error_names_first_spellings(tmp_path):
    """Aliases then another model: the message shows the spellings as the adapters wrote them."""
    src = tmp_path / "src"
    write_adapter(src / "a", GPT2_LIKE, seed=0, base_model="gpt2")
    write_adapter(src / "b", GPT2_LIKE, seed=1, base_model="openai-community/gpt2")
    write_adapter(src / "c", GPT2_LIKE, seed=2, base_model="gpt2-large")
    with pytest.raises(ValidationError, match=r"c: base model 'gpt2-large' differs from 'gpt2' \("):
        lorazip.load_collection(src)


def test_cli_compress_aliases_and_error(tmp_path, capsys):
    src = _two(tmp_path / "src", "gpt2", "openai-community/gpt2")
    out = tmp_path / "x.lorazip.safetensors"
    rc, _out, stderr = run_cli(capsys, "compress", src, "-o", out, "--rank", 2, "--device", "cpu")
    assert rc == 0, stderr
    assert lorazip.load_artifact(out).meta["base_model"] == "openai-community/gpt2"

    bad = _two(tmp_path / "bad", "gpt2", "gpt2-medium")
    out2 = tmp_path / "y.lorazip.safetensors"
    rc, _out, stderr = run_cli(capsys, "compress", bad, "-o", out2, "--rank", 2, "--device", "cpu")
    assert rc != 0
    assert_one_error_line(stderr, "'gpt2-medium'", "'gpt2'", "--base-model")
    assert not out2.exists()
