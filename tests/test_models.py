"""Base-model and tokenizer loading (lorazip.models), with a stand-in for transformers: devices,
dtypes, the optional-dependency error and the errors of a model or tokenizer that cannot load."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

import lorazip
from lorazip import models


class FakeTransformers:
    """What lorazip.models uses of transformers: the Auto classes, the version, the progress bars."""

    def __init__(self, version="4.56.0", fail=None):
        self.__version__ = version
        self.calls = []
        self.bars = True
        logging = SimpleNamespace(is_progress_bar_enabled=lambda: self.bars,
                                  disable_progress_bar=lambda: setattr(self, "bars", False),
                                  enable_progress_bar=lambda: setattr(self, "bars", True))
        self.utils = SimpleNamespace(logging=logging)

        def load(kind):
            def from_pretrained(ident, **kwargs):
                self.calls.append((kind, ident, kwargs, self.bars))
                if fail:
                    raise OSError(fail)
                return SimpleNamespace(kind=kind, ident=ident)
            return SimpleNamespace(from_pretrained=from_pretrained)

        self.AutoModelForCausalLM = load("model")
        self.AutoTokenizer = load("tokenizer")


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == "cpu"
    assert models.resolve_device("cpu") == "cpu"
    with pytest.raises(lorazip.OptionError, match="--device cuda: CUDA is not available"):
        models.resolve_device("cuda:1")
    with pytest.raises(lorazip.OptionError, match="unknown device 'tpu'; choose auto, cpu or cuda"):
        models.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device("auto") == "cuda"
    assert models.resolve_device("cuda:1") == "cuda:1"


def test_unknown_dtype():
    models.check_dtype("bfloat16")
    with pytest.raises(lorazip.OptionError, match=r"unknown dtype 'int8'; choose from float32, bfloat16, float16$"):
        models.check_dtype("int8")


def test_missing_dependency_names_what_needs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(models.MissingDependencyError,
                       match=r"^task-level evaluation needs transformers and peft: pip install 'lorazip\[eval\]'$"):
        models.require_hf("task-level evaluation")
    assert issubclass(models.MissingDependencyError, lorazip.LorazipError)


@pytest.mark.parametrize("version, kwarg", [("4.56.1", "dtype"), ("4.55.4", "torch_dtype"), ("main", "dtype")])
def test_model_loads_quietly_in_its_dtype(tmp_path, version, kwarg):
    tf = FakeTransformers(version)
    model, ident = models.load_base_model(tf, tmp_path, None, "float16")
    assert ident == str(tmp_path) and model.ident == str(tmp_path)
    assert tf.calls == [("model", str(tmp_path), {kwarg: torch.float16}, False)]  # no progress bars while loading
    assert tf.bars  # and they are back after


def test_model_that_cannot_load(tmp_path):
    tf = FakeTransformers(fail="no config.json\nmore detail")
    with pytest.raises(lorazip.SourceError, match=r"cannot load the base model \(no config.json\)$"):
        models.load_model(tf, str(tmp_path), torch.float32)
    assert tf.bars
    with pytest.raises(lorazip.SourceError, match="no such base model folder"):
        models.load_model(tf, str(tmp_path / "missing"), torch.float32)
    with pytest.raises(lorazip.SourceError, match=r"cannot load the tokenizer \(no config.json\)$"):
        models.load_tokenizer_for(tf, None, str(tmp_path))


def test_loaded_model_needs_its_tokenizer():
    tf = FakeTransformers()
    named = SimpleNamespace(config=SimpleNamespace(_name_or_path="org/model"))
    with pytest.raises(lorazip.OptionError, match="pass the tokenizer along with an already loaded base model"):
        models.load_base_model(tf, named, None, "float32")
    tok = object()
    assert models.load_base_model(tf, named, tok, "float32") == (named, "org/model")
    assert models.load_base_model(tf, SimpleNamespace(), tok, "float32")[1] == "(in memory)"
    assert models.load_tokenizer_for(tf, tok, "org/model") is tok
    assert models.load_tokenizer_for(tf, None, "org/model").ident == "org/model"
    assert tf.calls == [("tokenizer", "org/model", {}, True)]
