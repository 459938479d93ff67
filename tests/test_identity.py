"""A model's identity cannot collide: every file of a checkpoint is hashed (hub snapshots by their blob names,
local files once, then from an index), so a changed byte anywhere gets new cache keys and an unchanged copy in
another folder shares them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mmflow.identity
import mmflow_utils as mu
from mmflow.checkpoints import EMBEDDED_MODEL_DIR, locate
from mmflow.identity import INDEX_FILE, folder_identity

WEIGHTS = "model.safetensors"


def one_example() -> list[mu.Example]:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    return [
        mu.Example(
            "e0", "QueryAttr", "What color is the square?", "red", (64, 64), ["square"], [(8, 8, 30, 30)], _image=image
        )
    ]


def rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def swap_weights(t):
    a, b = (next(k for k in t if k.endswith(f"layers.{i}.mlp.down_proj.weight")) for i in (0, 1))
    t[a], t[b] = t[b].clone(), t[a].clone()


def swap_embedding_rows(t):
    key = next(k for k in t if k.endswith("embed_tokens.weight"))
    t[key][[3, 7]] = t[key][[7, 3]].clone()


def nudge_one_weight(t):
    key = next(k for k in t if k.endswith("layers.2.self_attn.q_proj.weight"))
    flat = t[key].view(-1)
    i = int(torch.argmin((flat.abs() - 0.1).abs()))  # |w| ~ 0.1: 3e-8 is a few float32 ulps there
    before = flat[i].item()
    flat[i] += 3e-8
    assert flat[i].item() != before


def change_image_mean(folder: Path) -> None:
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["image_mean"][0] += 0.01
    path.write_text(json.dumps(config, indent=2))


MODIFICATIONS = {
    "two weights swapped": lambda f: rewrite_weights(f, swap_weights),
    "two embedding rows swapped": lambda f: rewrite_weights(f, swap_embedding_rows),
    "one weight changed by 3e-8": lambda f: rewrite_weights(f, nudge_one_weight),
    "image_mean changed": change_image_mean,
}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A results cache filled by the embedded shapes-llava (one example, one flow)."""
    cache = tmp_path_factory.mktemp("results")
    run = mu.Run.load("shapes-llava", cache_dir=str(cache))
    run.knockout(one_example(), ["Question->Last"], keep="all")
    assert run.computed["forwards"] > 0
    return cache, run.fingerprint


@pytest.mark.parametrize("name", list(MODIFICATIONS))
def test_a_modified_copy_gets_its_own_results(filled, tmp_path, name):
    cache, fingerprint = filled
    copy = tmp_path / "copy"
    shutil.copytree(EMBEDDED_MODEL_DIR, copy)
    MODIFICATIONS[name](copy)
    run = mu.Run.load(str(copy), cache_dir=str(cache), inputs="processor")  # the embedded model's default inputs
    assert run.fingerprint != fingerprint
    run.knockout(one_example(), ["Question->Last"], keep="all")
    assert run.computed["forwards"] > 0


def test_an_unchanged_copy_in_another_folder_reuses_the_results(filled, tmp_path):
    cache, fingerprint = filled
    copy = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(EMBEDDED_MODEL_DIR, copy)
    run = mu.Run.load(str(copy), cache_dir=str(cache), inputs="processor")  # the embedded model's default inputs
    assert run.fingerprint == fingerprint
    run.knockout(one_example(), ["Question->Last"], keep="all")
    assert run.computed == {"forwards": 0, "layer_calls": 0}


def test_identity_hashes_every_file_by_content(tmp_path):
    """Independent check: the identity's file digests are hashlib's SHA-256 of each file, and every file counts."""
    copy = tmp_path / "m"
    shutil.copytree(EMBEDDED_MODEL_DIR, copy)
    (copy / "README.md").write_text("notes")  # documentation does not count
    identity = folder_identity(copy)
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in EMBEDDED_MODEL_DIR.iterdir()}
    assert identity.files == expected
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    assert folder_identity(copy).sha256 != identity.sha256


def test_the_index_saves_rereading_and_notices_a_rewrite(tmp_path, monkeypatch):
    folder, cache = tmp_path / "m", tmp_path / "cache"
    shutil.copytree(EMBEDDED_MODEL_DIR, folder)
    past = time.time_ns() - 10**10
    for path in folder.iterdir():
        os.utime(path, ns=(past, past))
    reads = []
    original = mmflow.identity.stream_sha256
    monkeypatch.setattr(mmflow.identity, "stream_sha256", lambda p: reads.append(p.name) or original(p))
    first = folder_identity(folder, cache)
    assert len(reads) == len(list(folder.iterdir())) and (cache / INDEX_FILE).is_file()
    reads.clear()
    assert folder_identity(folder, cache) == first and reads == []
    # same size, same mtime, different content: the ctime gives it away
    config = folder / "config.json"
    stat = config.stat()
    config.write_text(config.read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config.stat().st_size == stat.st_size
    assert folder_identity(folder, cache).sha256 != first.sha256 and reads == ["config.json"]


# ------------------------------------------------------------------------------------------------ hub snapshots


def fake_hub_cache(root: Path, source: Path, repo: str = "org/tiny", revision: str = "a" * 40) -> Path:
    """The Hugging Face cache layout of ``source``: blobs named by content (SHA-256 for the weights, as Git LFS
    does; git's SHA-1 for the small files), a snapshot of symlinks, and refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "snapshots" / revision).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    for path in source.iterdir():
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (repo_dir / "snapshots" / revision / path.name).symlink_to(f"../../blobs/{blob}")
    return repo_dir


def test_a_cached_hub_snapshot_loads_offline_and_is_known_by_its_blobs(tiny_dirs, tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "hub", tiny_dirs["llava"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    located = locate("org/tiny")
    assert located.revision == "a" * 40 and located.folder.name == "a" * 40
    reads = []
    original = mmflow.identity.stream_sha256
    monkeypatch.setattr(mmflow.identity, "stream_sha256", lambda p: reads.append(p.name) or original(p))
    run = mu.Run.load("org/tiny", cache_dir=str(tmp_path / "results"))
    assert WEIGHTS not in reads and reads  # the weights are known by their blob's name, the small files are read
    assert run.identity.revision == "a" * 40
    assert run.identity.sha256 == folder_identity(tiny_dirs["llava"]).sha256  # the blob name is the content hash


def test_a_hub_id_not_in_the_cache_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(mu.MmflowError) as err:
        mu.Run.load("llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path / "results"))
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert "llava-hf/llava-1.5-7b-hf" in message and "huggingface-cli download llava-hf/llava-1.5-7b-hf" in message
    assert "'shapes-llava'" in message and err.value.__cause__ is None and len(message) < 600


def test_a_hub_id_not_in_the_cache_fails_fast_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(mu.MmflowError, match=r"not in the local Hugging Face cache .* and the hub cannot be reached"):
        mu.load_model("llava-hf/llava-1.5-7b-hf")
    assert time.perf_counter() - start < 2
