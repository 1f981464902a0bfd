"""lorazip.io.hub against a loopback fake Hub (tests/hub_server.py), over real HTTP.

huggingface_hub itself is not mocked: the fixture only points its import-time constants
(endpoint, cache, token path, offline flag) at the loopback server and a temporary HF home.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub

from lorazip.errors import LorazipError, SourceError
from lorazip.io.hub import (
    DownloadedAdapter,
    HubRef,
    collection_refs,
    download_adapters,
    looks_like_hub_ref,
    parse_hub_ref,
    read_ref_list,
    search_hub,
)

FAST = {"retry_delay": 0.01}  # keep backoff sleeps negligible


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


def make_adapter(seed: int, *, r: int = 4, dim: int = 64, extra: bool = True) -> dict[str, bytes]:
    """A tiny random PEFT LoRA adapter (config + safetensors), plus files lorazip must not fetch."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for mod in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, dim)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((dim, r)).astype(np.float32)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny/base",
        "task_type": "CAUSAL_LM",
        "seed": seed,
    }
    files = {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": st_save(tensors),
    }
    if extra:
        files["README.md"] = b"# adapter\n"
        files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        files["training_args.bin"] = b"\x80\x04pickle" * 10
        files["checkpoint-10/adapter_model.safetensors"] = st_save(tensors)
    return files


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with FakeHub(page_size=2) as fake:
        home = tmp_path / "hf"
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            fake.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        for var in (
            "HF_ENDPOINT",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_OIDC_RESOURCE",
        ):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_HOME", str(home))
        fake.home = home
        fake.cache = home / "hub"
        yield fake


def add_adapters(
    hub: FakeHub, n: int, org: str = "org", prefix: str = "lora", **kw
) -> list[HubRef]:
    refs = []
    for i in range(n):
        repo_id = f"{org}/{prefix}-{i}"
        hub.add_repo(repo_id, make_adapter(i), **kw)
        refs.append(HubRef(repo_id))
    return refs


def download(hub: FakeHub, refs, **kw):
    kw = {"endpoint": hub.url, "cache_dir": hub.cache, **FAST, **kw}
    return download_adapters(refs, **kw)


def assert_complete(hub: FakeHub, adapter: DownloadedAdapter) -> None:
    """The folder holds exactly the repo's adapter files, byte for byte."""
    files = hub.repos[adapter.ref.repo_id].commits[adapter.commit]
    assert sorted(p.name for p in adapter.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (adapter.path / name).read_bytes() == files[name]


def raises_source_error(match: str):
    return pytest.raises(SourceError, match=match)


# ----------------------------------------------------------------------------------------------
# Refs, lists
# ----------------------------------------------------------------------------------------------


def test_parse_hub_ref():
    assert parse_hub_ref("Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task190") == HubRef(
        "Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task190"
    )
    assert parse_hub_ref("org/name@v1.0") == HubRef("org/name", "v1.0")
    assert parse_hub_ref("org/name@refs/pr/3") == HubRef("org/name", "refs/pr/3")
    assert parse_hub_ref(" hf://org/name@abc ") == HubRef("org/name", "abc")
    assert parse_hub_ref("https://huggingface.co/org/name") == HubRef("org/name")
    assert str(HubRef("org/name", "dev")) == "org/name@dev"
    for bad in (
        "name",
        "org/name/extra",
        "org/",
        "/name",
        "org/na me",
        "org/name@",
        "./org/name",
        "org--x/y",
        "a/b@x y",
    ):
        assert not looks_like_hub_ref(bad), bad
        with raises_source_error("not a Hub repo id"):
            parse_hub_ref(bad)
    assert looks_like_hub_ref("org/name@main")
    assert issubclass(SourceError, LorazipError)


def test_read_ref_list(tmp_path):
    f = tmp_path / "refs.txt"
    f.write_text("# my adapters\n\norg/a\n  org/b@v2   # pinned\norg/a\n#org/c\n")
    assert read_ref_list(f) == [HubRef("org/a"), HubRef("org/b", "v2")]

    f.write_text("org/a\nnot a repo\n")
    with raises_source_error(r"refs.txt:2: 'not a repo' is not a Hub repo id"):
        read_ref_list(f)
    f.write_text("# nothing\n\n")
    with raises_source_error("names no repos"):
        read_ref_list(f)
    with raises_source_error("does not exist"):
        read_ref_list(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------------
# Downloads: content, cache, rerun, offline
# ----------------------------------------------------------------------------------------------


def test_download_fetches_only_adapter_files(hub):
    refs = add_adapters(hub, 3)
    calls = []
    report = download(hub, refs, progress=lambda d, t: calls.append((d, t)))

    assert report.skipped == []
    assert [a.ref for a in report.adapters] == refs
    for a in report.adapters:
        assert a.commit == hub.repos[a.ref.repo_id].refs["main"]
        assert (
            a.path
            == hub.cache / f"models--org--{a.ref.repo_id.split('/')[1]}" / "snapshots" / a.commit
        )
        assert_complete(hub, a)
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]

    fetched = {(e.repo_id, e.filename) for e in hub.log if e.route in ("resolve", "cdn")}
    assert {f for _, f in fetched} == {"adapter_config.json", "adapter_model.safetensors"}
    # Big files come from the CDN, without the token; each body is downloaded exactly once.
    assert sorted((e.repo_id, e.filename) for e in hub.body_downloads()) == sorted(
        (r.repo_id, f) for r in refs for f in ("adapter_config.json", "adapter_model.safetensors")
    )
    assert all(
        e.route == "cdn" for e in hub.body_downloads() if e.filename.endswith(".safetensors")
    )


def test_rerun_downloads_nothing(hub):
    refs = add_adapters(hub, 3)
    first = download(hub, refs)
    hub.clear_log()
    second = download(hub, refs)
    assert second.adapters == first.adapters
    assert hub.body_downloads() == []
    assert hub.requests("resolve") == [] and hub.requests("cdn") == []  # not even a HEAD
    assert {e.route for e in hub.log} == {"info"}  # one commit lookup per repo


def test_interrupted_download_resumes_missing_files_only(hub):
    refs = add_adapters(hub, 2)
    download(hub, refs)
    # Simulate an interrupted run: one weights file never made it to the cache.
    victim = hub.cache / "models--org--lora-1" / "snapshots" / hub.repos["org/lora-1"].refs["main"]
    blob = (victim / "adapter_model.safetensors").resolve()
    (victim / "adapter_model.safetensors").unlink()
    blob.unlink()
    hub.clear_log()
    report = download(hub, refs)
    assert [(e.repo_id, e.filename) for e in hub.body_downloads()] == [
        ("org/lora-1", "adapter_model.safetensors")
    ]
    for a in report.adapters:
        assert_complete(hub, a)


def test_offline_uses_cache_only(hub, monkeypatch):
    refs = add_adapters(hub, 2)
    online = download(hub, refs)
    hub.clear_log()
    assert download(hub, refs, offline=True).adapters == online.adapters
    assert hub.log == []  # not a single request

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the standard switch, read at call time
    assert download(hub, refs).adapters == online.adapters
    assert hub.log == []


def test_offline_uncached_repo_fails_clearly(hub, monkeypatch):
    refs = add_adapters(hub, 2)
    download(hub, refs[:1])
    with raises_source_error(
        r"^org/lora-1: not in the Hub cache .* offline mode is on: download it online first"
    ):
        download(hub, refs, offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with raises_source_error("offline mode"):
        search_hub("org", None, endpoint=hub.url)


def test_a_mistyped_local_path_that_fails_as_a_repo_says_no_such_folder(hub, tmp_path, monkeypatch):
    """``runs/missing`` beside a folder ``runs`` is tried as a Hub repo id (it is one), and where that
    fails the error says no such local folder exists either; an ``org`` that is no local folder keeps
    the Hub's message alone."""
    from lorazip.io.sources import gather_sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with raises_source_error(r"^runs/missing: no such local folder, and as a Hub repo: runs/missing: not in the Hub"):
        gather_sources(["runs/missing"], offline=True)
    with raises_source_error(r"^org/missing: not in the Hub cache"):
        gather_sources(["org/missing"], offline=True)


def test_defaults_follow_standard_env_vars(hub, monkeypatch):
    from huggingface_hub import constants

    # Import-time constants point at a dead endpoint: only the env read at call time can work.
    dead = "http://127.0.0.1:9"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.home / "wrong"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(hub.home / "other-home"))
    hub.add_repo("org/gated", make_adapter(7), gated=True)
    hub.gated_access["org/gated"] = {"hf_valid"}
    monkeypatch.setenv("HF_TOKEN", "hf_valid")

    report = download_adapters([HubRef("org/gated")], **FAST)
    assert report.adapters[0].path.is_relative_to(hub.home / "other-home" / "hub")
    assert_complete(hub, report.adapters[0])
    assert any(e.authorized for e in hub.requests("resolve"))
    assert not any(e.authorized for e in hub.requests("cdn"))  # token never leaves the Hub

    monkeypatch.setenv("HF_HUB_CACHE", str(hub.home / "explicit-cache"))
    report = download_adapters(["org/gated"], **FAST)
    assert report.adapters[0].path.is_relative_to(hub.home / "explicit-cache")


def test_no_progress_bars_from_the_library(hub, capfd):
    refs = add_adapters(hub, 2)
    download(hub, refs)
    out, err = capfd.readouterr()
    assert "Fetching" not in err + out and "%|" not in err + out


def test_duplicates_and_string_refs(hub):
    add_adapters(hub, 2)
    report = download(hub, ["org/lora-1", "org/lora-0", HubRef("org/lora-1")])
    assert [a.ref for a in report.adapters] == [HubRef("org/lora-1"), HubRef("org/lora-0")]


# ----------------------------------------------------------------------------------------------
# Listing: search with pagination, collections
# ----------------------------------------------------------------------------------------------


def test_search_by_author_and_substring_paginates(hub):
    wanted = add_adapters(
        hub, 7, org="Lots-of-LoRAs", prefix="Mistral-7B-Instruct-v0.2-4b-r16-task"
    )
    add_adapters(hub, 2, org="Lots-of-LoRAs", prefix="Llama-2-7b-task")
    add_adapters(hub, 2, org="someone", prefix="Mistral-7B-Instruct-v0.2-4b-r16-task")

    refs = search_hub("Lots-of-LoRAs", "Mistral-7B-Instruct-v0.2-4b-r16", endpoint=hub.url)
    assert refs == sorted(wanted, key=lambda r: r.repo_id)
    assert len(hub.requests("list")) == 4  # 7 results, 2 per page: followed the Link headers

    assert len(search_hub("Lots-of-LoRAs", None, endpoint=hub.url)) == 9
    assert len(search_hub(None, "llama-2", endpoint=hub.url)) == 2
    assert len(search_hub("Lots-of-LoRAs", "Mistral", endpoint=hub.url, limit=3)) == 3
    with raises_source_error(r"no model repos on .* match author='nobody'"):
        search_hub("nobody", None, endpoint=hub.url)
    with raises_source_error("needs an author and/or a search"):
        search_hub(None, None, endpoint=hub.url)


def test_search_server_error_is_one_line(hub):
    hub.add_fault(403, route="list")
    with raises_source_error(
        r"^cannot list Hub models \(author='org'\): HTTP 403, it needs a token: set HF_TOKEN"
    ):
        search_hub("org", None, endpoint=hub.url)


def test_collection_resolves(hub):
    refs = add_adapters(hub, 3)
    slug = "org/my-loras-65f1a2b3c4d5e6f7a8b9c0d1"
    hub.add_collection(
        slug,
        [
            ("model", "org/lora-2"),
            ("dataset", "org/data"),
            ("model", "org/lora-0"),
            ("paper", "2106.09685"),
        ],
    )
    assert collection_refs(slug, endpoint=hub.url) == [refs[2], refs[0]]
    assert collection_refs(f"https://huggingface.co/collections/{slug}", endpoint=hub.url) == [
        refs[2],
        refs[0],
    ]
    with raises_source_error(r"cannot read Hub collection 'org/nope-1': not found"):
        collection_refs("org/nope-1", endpoint=hub.url)
    with raises_source_error("not a Hub collection slug"):
        collection_refs("just-a-name", endpoint=hub.url)


def test_ref_list_file_downloads(hub, tmp_path):
    add_adapters(hub, 3)
    f = tmp_path / "adapters.txt"
    f.write_text("org/lora-2\norg/lora-0  # the first one\n")
    report = download(hub, read_ref_list(f))
    assert [str(a.ref) for a in report.adapters] == ["org/lora-2", "org/lora-0"]


# ----------------------------------------------------------------------------------------------
# Revisions
# ----------------------------------------------------------------------------------------------


def test_revision_pins_the_commit(hub):
    old = hub.add_repo("org/evolving", make_adapter(1))
    hub.add_tag("org/evolving", "v1", old)
    new = hub.add_repo("org/evolving", make_adapter(2))  # main moves on
    assert old != new

    report = download(
        hub, [parse_hub_ref("org/evolving@v1"), HubRef("org/evolving"), HubRef("org/evolving", old)]
    )
    by_rev = {a.ref.revision: a for a in report.adapters}
    assert by_rev["v1"].commit == old and by_rev[old].commit == old and by_rev[None].commit == new
    assert_complete(hub, by_rev["v1"])
    assert_complete(hub, by_rev[None])
    assert json.loads((by_rev["v1"].path / "adapter_config.json").read_text())["seed"] == 1

    with raises_source_error(
        r"^org/evolving@nope: revision 'nope' not found: check the branch, tag or commit"
    ):
        download(hub, ["org/evolving@nope"])


# ----------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------


def test_repo_not_found(hub):
    with raises_source_error(
        r"^org/missing: repository not found on http://127\.0\.0\.1:\d+: check the name$"
    ):
        download(hub, ["org/missing"])


def test_private_repo_needs_token(hub):
    hub.add_repo("org/private", make_adapter(1), private=True)
    with raises_source_error(r"^org/private: .*needs a token: set HF_TOKEN or pass --token"):
        download(hub, ["org/private"])
    report = download(hub, ["org/private"], token="hf_valid")
    assert_complete(hub, report.adapters[0])


def test_rejected_token(hub):
    add_adapters(hub, 1)
    with raises_source_error(r"^org/lora-0: access denied \(HTTP 401\): the token was rejected"):
        download(hub, ["org/lora-0"], token="hf_expired")


def test_gated_repo_needs_token(hub):
    hub.add_repo("org/gated", make_adapter(1), gated=True)
    with raises_source_error(r"^org/gated: gated repo needs a token: set HF_TOKEN or pass --token"):
        download(hub, ["org/gated"])
    with raises_source_error(r"^org/gated: gated repo and the token has no access \(HTTP 403\)"):
        download(hub, ["org/gated"], token="hf_valid")
    hub.gated_access["org/gated"] = {"hf_valid"}
    assert_complete(hub, download(hub, ["org/gated"], token="hf_valid").adapters[0])


def test_generic_403(hub):
    add_adapters(hub, 1)
    hub.add_fault(403, route="resolve", repo_id="org/lora-0")
    with raises_source_error(
        r"^org/lora-0: access denied \(HTTP 403\): needs a token: set HF_TOKEN or pass --token"
    ):
        download(hub, ["org/lora-0"])


def test_bin_only_repo(hub):
    hub.add_repo(
        "org/old-style",
        {
            "adapter_config.json": b'{"peft_type": "LORA"}',
            "adapter_model.bin": b"\x80\x04" * 100,
            "README.md": b"",
        },
    )
    with raises_source_error(
        r"^org/old-style: only pickled \.bin weights \(adapter_model\.bin\); lorazip loads safetensors only"
    ):
        download(hub, ["org/old-style"])
    assert hub.requests("cdn") == []  # the .bin was never downloaded


def test_not_an_adapter_repo(hub):
    hub.add_repo(
        "org/model",
        {"config.json": b"{}", "model.safetensors": make_adapter(0)["adapter_model.safetensors"]},
    )
    with raises_source_error(
        r"^org/model: no adapter_config\.json at the repo root: not a PEFT adapter repo"
    ):
        download(hub, ["org/model"])


def test_server_error_then_success_is_retried(hub):
    refs = add_adapters(hub, 2)
    hub.add_fault(500, route="info", repo_id="org/lora-0", times=2)
    hub.add_fault(503, route="cdn", repo_id="org/lora-1", times=1)
    report = download(hub, refs, retries=3)
    for a in report.adapters:
        assert_complete(hub, a)
    assert [e.status for e in hub.requests("info", "org/lora-0")][:3] == [500, 500, 200]
    assert [e.status for e in hub.requests("cdn", "org/lora-1")] == [503, 200]


def test_persistent_server_error_gives_up_with_clear_error(hub):
    add_adapters(hub, 1)
    hub.add_fault(500, route="info", repo_id="org/lora-0")
    t0 = time.monotonic()
    with raises_source_error(
        r"^org/lora-0: Hub server error \(HTTP 500\) after 2 retries: try again later .*--skip-failed"
    ):
        download(hub, ["org/lora-0"], retries=2, retry_delay=0.05)
    assert time.monotonic() - t0 >= 0.05 + 0.1  # exponential backoff: 0.05 then 0.1 s
    # the server thread logs a request after answering it: give the last entry a moment to land
    deadline = time.monotonic() + 5
    while len(hub.requests("info", "org/lora-0")) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(hub.requests("info", "org/lora-0")) == 3


def test_connection_dropped_mid_file_is_retried(hub):
    refs = add_adapters(hub, 2)
    hub.add_fault("drop", route="cdn", repo_id="org/lora-0", times=1)
    hub.add_fault(
        "drop",
        route="resolve",
        repo_id="org/lora-1",
        filename="adapter_config.json",
        method="GET",
        times=1,
    )
    report = download(hub, refs)
    for a in report.adapters:
        assert_complete(hub, a)
    assert [e.status for e in hub.requests("cdn", "org/lora-0")] == [200, 200]
    assert [e.status for e in hub.requests("resolve", "org/lora-1") if e.method == "GET"] == [
        200,
        200,
    ]


def test_connection_dropped_mid_file_resumes_with_range(hub, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub resumes from the last chunk it wrote (10 MB by default): use small chunks.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    refs = add_adapters(hub, 1)
    hub.add_fault("drop", route="cdn", repo_id="org/lora-0", times=1)
    report = download(hub, refs)
    assert_complete(hub, report.adapters[0])
    cdn = hub.requests("cdn", "org/lora-0")
    assert [e.status for e in cdn] == [200, 206]
    assert cdn[0].range is None and cdn[1].range.startswith("bytes=") and cdn[1].range != "bytes=0-"


def test_connection_always_dropped_gives_clear_error(hub):
    refs = add_adapters(hub, 1)
    hub.add_fault("drop", route="cdn", repo_id="org/lora-0")
    # huggingface_hub itself retries a dropped body 5 times (1 s apart) before giving up.
    with raises_source_error(
        r"^org/lora-0: connection problem \(RemoteProtocolError: .*\) \(retries disabled\)"
    ):
        download(hub, refs, retries=0)
    snapshot = (
        hub.cache / "models--org--lora-0" / "snapshots" / hub.repos["org/lora-0"].refs["main"]
    )
    assert not (snapshot / "adapter_model.safetensors").exists()
    assert not any(p.name.endswith(".incomplete") for p in hub.cache.rglob("*"))


def test_truncated_transfer_is_never_returned(hub):
    refs = add_adapters(hub, 2)
    # Headers promise the full size (HEAD), the body stops half-way, every time.
    hub.add_fault("short", route="cdn", repo_id="org/lora-1")
    with raises_source_error(
        r"^org/lora-1: a download was cut short \(size mismatch\) after 1 retry"
    ):
        download(hub, refs, retries=1)
    commit = hub.repos["org/lora-1"].refs["main"]
    snapshot = hub.cache / "models--org--lora-1" / "snapshots" / commit
    assert not (snapshot / "adapter_model.safetensors").exists()
    assert not any(p.name.endswith(".incomplete") for p in hub.cache.rglob("*"))

    report = download(hub, refs, retries=1, skip_failed=True)
    assert [a.ref for a in report.adapters] == refs[:1]
    assert [r for r, _ in report.skipped] == refs[1:]


def test_truncated_file_accepted_by_huggingface_hub_is_caught(hub):
    """The Hub lies consistently (HEAD and body both half size): only lorazip's check sees it."""
    refs = add_adapters(hub, 1)
    hub.add_fault(
        "short",
        route="resolve",
        repo_id="org/lora-0",
        filename="adapter_model.safetensors",
        times=1,
    )
    hub.add_fault("short", route="cdn", repo_id="org/lora-0", times=1)
    report = download(hub, refs)  # first try truncated -> evicted -> second try complete
    assert_complete(hub, report.adapters[0])
    assert len(hub.requests("cdn", "org/lora-0")) == 2

    hub.add_repo("org/liar", make_adapter(3))
    hub.add_fault(
        "short", route="resolve", repo_id="org/liar", filename="adapter_model.safetensors"
    )
    hub.add_fault("short", route="cdn", repo_id="org/liar")
    with raises_source_error(
        r"^org/liar: downloaded files are incomplete or corrupt \(adapter_model\.safetensors: \d+ bytes, "
        r"the Hub lists \d+\) after 1 retry"
    ):
        download(hub, ["org/liar"], retries=1)
    snapshot = hub.cache / "models--org--liar" / "snapshots" / hub.repos["org/liar"].refs["main"]
    assert not (snapshot / "adapter_model.safetensors").exists()  # the bad file was evicted


def test_skip_failed_reports_and_continues(hub):
    good = add_adapters(hub, 3)
    hub.add_repo("org/old-style", {"adapter_config.json": b"{}", "adapter_model.bin": b"x"})
    hub.add_repo("org/down", make_adapter(9))
    hub.add_fault(502, route="info", repo_id="org/down")
    refs = [
        good[0],
        HubRef("org/missing"),
        HubRef("org/old-style"),
        good[1],
        HubRef("org/down"),
        good[2],
    ]
    calls = []
    report = download(
        hub, refs, skip_failed=True, retries=1, progress=lambda d, t: calls.append((d, t))
    )

    assert [a.ref for a in report.adapters] == good
    assert [str(r) for r, _ in report.skipped] == ["org/missing", "org/old-style", "org/down"]
    reasons = {str(r): why for r, why in report.skipped}
    assert "repository not found" in reasons["org/missing"]
    assert "only pickled .bin weights" in reasons["org/old-style"]
    assert "HTTP 502" in reasons["org/down"]
    assert all("\n" not in why and why.startswith(f"{r}: ") for r, why in report.skipped)
    assert not any("--skip-failed" in why for _, why in report.skipped)  # already on
    assert calls[0] == (0, 6) and calls[-1] == (6, 6) and len(calls) == 7


def test_first_failure_raises_without_skip_failed(hub):
    good = add_adapters(hub, 2)
    with raises_source_error(r"^org/missing: repository not found"):
        download(hub, [good[0], HubRef("org/missing"), good[1]], max_workers=1)


def test_repos_download_in_parallel_but_bounded(hub):
    refs = add_adapters(hub, 6)
    hub.add_fault("slow", route="info", delay=0.3)
    t0 = time.monotonic()
    report = download(hub, refs, max_workers=3)
    elapsed = time.monotonic() - t0
    assert len(report.adapters) == 6
    assert 2 <= hub.max_in_flight["info"] <= 3  # several repos at a time, never more than 3
    assert elapsed < 6 * 0.3  # not one after the other


def test_download_options_are_validated(hub):
    from lorazip.errors import OptionError

    with pytest.raises(OptionError):
        download(hub, ["org/x"], max_workers=0)
    assert download(hub, []).adapters == []


def test_cache_blob_layout_is_standard(hub):
    """Files land in the standard HF cache layout, blobs named by sha256 (LFS) / git sha1."""
    refs = add_adapters(hub, 1)
    a = download(hub, refs).adapters[0]
    files = hub.repos["org/lora-0"].commits[a.commit]
    blobs = {p.name for p in (hub.cache / "models--org--lora-0" / "blobs").iterdir()}
    assert hashlib.sha256(files["adapter_model.safetensors"]).hexdigest() in blobs
    assert (hub.cache / "models--org--lora-0" / "refs" / "main").read_text() == a.commit
    assert os.path.islink(a.path / "adapter_model.safetensors") or os.name == "nt"


# ----------------------------------------------------------------------------------------------
# End to end: the CLI against the loopback Hub
# ----------------------------------------------------------------------------------------------


def test_cli_compress_from_author_search_compresses_every_listed_adapter(hub, tmp_path, monkeypatch, capsys):
    import lorazip
    from lorazip.cli.main import main

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    wanted = add_adapters(hub, 5, org="Lots-of-LoRAs", prefix="Mistral-7B-Instruct-v0.2-4b-r16-task")
    add_adapters(hub, 2, org="Lots-of-LoRAs", prefix="Llama-2-7b-task")
    out = tmp_path / "lol.lorazip.safetensors"
    rc = main(["compress", "--hub-author", "Lots-of-LoRAs", "--hub-search", "Mistral-7B-Instruct-v0.2-4b-r16",
               "-o", str(out), "--rank", "4", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n_adapters"] == 5
    art = lorazip.load_artifact(out)
    recorded = {a["source"]["hub"]["repo_id"]: a["source"]["hub"]["commit"] for a in art.meta["adapters"]}
    assert set(recorded) == {r.repo_id for r in wanted}
    for repo_id, commit in recorded.items():
        assert commit in hub.repos[repo_id].commits  # the resolved commit is recorded
    # a rerun from the cache downloads nothing and gives the same artifact bytes
    fetched = len(hub.requests("cdn")) + len(hub.requests("resolve"))
    assert fetched > 0
    out2 = tmp_path / "again.lorazip.safetensors"
    assert main(["compress", "--hub-author", "Lots-of-LoRAs", "--hub-search", "Mistral-7B-Instruct-v0.2-4b-r16",
                 "-o", str(out2), "--rank", "4"]) == 0
    assert len(hub.requests("cdn")) + len(hub.requests("resolve")) == fetched
    assert out2.read_bytes() == out.read_bytes()
    # a missing repo named on the command line: one clear line, exit 1, no artifact
    rc = main(["compress", "Lots-of-LoRAs/nope", "-o", str(tmp_path / "x.safetensors")])
    assert rc == 1 and not (tmp_path / "x.safetensors").exists()
    assert "Lots-of-LoRAs/nope" in capsys.readouterr().err
