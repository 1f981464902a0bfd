"""Base-model ids that name the same Hugging Face Hub model.

In 2024 the Hugging Face Hub moved its legacy *canonical* models, the ones whose ids had no
organisation (``gpt2``, ``bert-base-uncased``, ``roberta-base``, ``t5-small``...), under
organisations (``openai-community/gpt2``, ``google-bert/bert-base-uncased``,
``FacebookAI/roberta-base``, ``google-t5/t5-small``...). The old ids still resolve (the Hub
redirects them), so adapters trained on the same weights record either spelling in
``base_model_name_or_path``. :data:`LEGACY_CANONICAL_IDS` lists those renames, so that a
collection mixing ``gpt2`` and ``openai-community/gpt2`` adapters counts as one base model.

The table holds only renames known for certain; an id it does not list is compared as it is
written (a missing alias gives the usual "base model differs" error, which ``--base-model``
overrides). Matching is case-sensitive, as Hub ids are written.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping


def _under(org: str, *names: str) -> dict[str, str]:
    return {n: f"{org}/{n}" for n in names}


#: Legacy unprefixed Hub id -> the id the Hub moved it to in 2024.
LEGACY_CANONICAL_IDS: Mapping[str, str] = MappingProxyType({
    **_under(
        "openai-community",
        "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-gpt",
        "roberta-base-openai-detector", "roberta-large-openai-detector",
    ),
    **_under(
        "google-bert",
        "bert-base-uncased", "bert-base-cased", "bert-large-uncased", "bert-large-cased",
        "bert-base-multilingual-uncased", "bert-base-multilingual-cased", "bert-base-chinese",
        "bert-base-german-cased", "bert-base-cased-finetuned-mrpc",
        "bert-large-uncased-whole-word-masking", "bert-large-cased-whole-word-masking",
        "bert-large-uncased-whole-word-masking-finetuned-squad",
        "bert-large-cased-whole-word-masking-finetuned-squad",
    ),
    **_under(
        "FacebookAI",
        "roberta-base", "roberta-large", "roberta-large-mnli",
        "xlm-roberta-base", "xlm-roberta-large",
        "xlm-roberta-large-finetuned-conll02-dutch", "xlm-roberta-large-finetuned-conll02-spanish",
        "xlm-roberta-large-finetuned-conll03-english", "xlm-roberta-large-finetuned-conll03-german",
        "xlm-mlm-en-2048", "xlm-mlm-ende-1024", "xlm-mlm-enfr-1024", "xlm-mlm-enro-1024",
        "xlm-mlm-xnli15-1024", "xlm-mlm-tlm-xnli15-1024", "xlm-clm-ende-1024", "xlm-clm-enfr-1024",
        "xlm-mlm-17-1280", "xlm-mlm-100-1280",
    ),
    **_under(
        "distilbert",
        "distilbert-base-uncased", "distilbert-base-cased", "distilbert-base-multilingual-cased",
        "distilbert-base-german-cased", "distilbert-base-uncased-distilled-squad",
        "distilbert-base-cased-distilled-squad", "distilbert-base-uncased-finetuned-sst-2-english",
        "distilgpt2", "distilroberta-base",
    ),
    **_under("google-t5", "t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b"),
    **_under(
        "albert",
        "albert-base-v1", "albert-large-v1", "albert-xlarge-v1", "albert-xxlarge-v1",
        "albert-base-v2", "albert-large-v2", "albert-xlarge-v2", "albert-xxlarge-v2",
    ),
    **_under("xlnet", "xlnet-base-cased", "xlnet-large-cased"),
    **_under("transfo-xl", "transfo-xl-wt103"),
    **_under("almanach", "camembert-base"),
    **_under("Salesforce", "ctrl"),
})


def canonical_base_model(name: str) -> str:
    """The canonical Hub id of base model ``name``.

    Trailing ``/`` are dropped; a legacy unprefixed id of :data:`LEGACY_CANONICAL_IDS` becomes
    its organisation-prefixed id (``"gpt2"`` -> ``"openai-community/gpt2"``); anything else
    (canonical ids, other Hub ids, local paths) is returned as it is.
    """
    name = name.rstrip("/")
    return LEGACY_CANONICAL_IDS.get(name, name)


def same_base_model(a: str | None, b: str | None) -> bool:
    """Whether ``a`` and ``b`` name the same base model (equal after :func:`canonical_base_model`).

    ``None`` (no base model recorded) equals only ``None``.
    """
    if a is None or b is None:
        return a is b
    return canonical_base_model(a) == canonical_base_model(b)
