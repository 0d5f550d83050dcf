"""One weights path: explicit file -> files on disk (PIPELINE_WEIGHTS, torch hub cache, Hugging Face hub
cache) -> a pinned download from a real HTTP server on 127.0.0.1 -> else one line saying where to put it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.core.errors import BackboneError
from pipeline.models.download import RemoteFile, fetch, offline, on_disk

from .weights_server import checkpoints, downloads_allowed, sha256, weights_server

BODY = os.urandom(300_000)
COMMIT = "a" * 40


@pytest.fixture
def env(monkeypatch, tmp_path):
    return downloads_allowed(monkeypatch, tmp_path)


@pytest.fixture
def server():
    with weights_server() as state:
        yield state


def test_pinned_download_lands_in_the_torch_hub_cache_and_is_reused(env, server):
    remote = RemoteFile(server.serve("w.pth", BODY), sha256(BODY), len(BODY), "w-0123abcd.pth")
    seen = []
    path = fetch(remote, "net", on_progress=lambda done, total: seen.append((done, total)))
    assert path == env / "torch" / "hub" / "checkpoints" / "w-0123abcd.pth"
    assert path.read_bytes() == BODY and checkpoints(env) == ["w-0123abcd.pth"]  # no temporary file left
    assert seen[-1] == (len(BODY), len(BODY))
    assert fetch(remote, "net") == path and server.requests == ["w.pth"]  # the second time: from disk


def test_a_prefix_pin_is_checked_like_torch_hub_does(env, server):
    remote = RemoteFile(server.serve("w.pth", BODY), sha256(BODY)[:8], len(BODY), "w.pth")
    assert fetch(remote, "net").read_bytes() == BODY


def test_a_mismatched_download_is_refused_and_not_left_behind(env, server):
    remote = RemoteFile(server.serve("w.pth", BODY), "0" * 64, len(BODY), "w.pth")
    with pytest.raises(BackboneError, match=r"has SHA-256 [0-9a-f]{64}, not the pinned 0{64}: refused and deleted"):
        fetch(remote, "net")
    assert checkpoints(env) == []


def test_an_interrupted_download_is_never_trusted(env, server):
    remote = RemoteFile(server.serve("w.pth", BODY, truncate=True), sha256(BODY), len(BODY), "w.pth")
    with pytest.raises(BackboneError, match=r"cannot download weights for 'net' from http://127\.0\.0\.1.*nothing"):
        fetch(remote, "net")
    assert checkpoints(env) == []


def test_http_errors_and_timeouts_are_one_line_errors(env, server, monkeypatch):
    missing = RemoteFile(server.url("nope.pth"), "0" * 64, 10, "nope.pth")
    with pytest.raises(BackboneError, match=r"HTTP 404 Not Found; place nope\.pth .* --weights PATH"):
        fetch(missing, "net")
    monkeypatch.setenv("PIPELINE_DOWNLOAD_TIMEOUT", "0.3")
    slow = RemoteFile(server.serve("slow.pth", BODY, stall_s=2), sha256(BODY), len(BODY), "slow.pth")
    with pytest.raises(BackboneError, match=r"timed out \(timeout 0\.3 s, PIPELINE_DOWNLOAD_TIMEOUT\)") as info:
        fetch(slow, "net")
    assert "\n" not in str(info.value) and checkpoints(env) == []


@pytest.mark.parametrize("switch", ["PIPELINE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_refuses_to_download_and_says_where_to_put_the_file(env, server, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    assert offline()
    remote = RemoteFile(server.serve("w.pth", BODY), sha256(BODY), len(BODY), "w-1.pth")
    target = env / "torch" / "hub" / "checkpoints" / "w-1.pth"
    with pytest.raises(BackboneError, match="not on disk and downloads are off") as info:
        fetch(remote, "net")
    message = str(info.value)
    assert str(target) in message and remote.url in message and "--weights PATH" in message
    assert "PIPELINE_WEIGHTS" in message and server.requests == []


def test_files_on_disk_are_found_offline_in_every_place(env, monkeypatch):
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")
    remote = RemoteFile("http://127.0.0.1:9/never", sha256(BODY), len(BODY), "w.pth")
    # the torch hub cache
    torch_copy = env / "torch" / "hub" / "checkpoints" / "w.pth"
    torch_copy.parent.mkdir(parents=True)
    torch_copy.write_bytes(BODY)
    assert fetch(remote, "net") == torch_copy
    # a PIPELINE_WEIGHTS folder comes first
    (env / "mine").mkdir()
    (env / "mine" / "w.pth").write_bytes(BODY)
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(env / "mine"))
    assert fetch(remote, "net") == env / "mine" / "w.pth"
    # an explicit file comes before all, and is used as given
    (env / "other.pth").write_bytes(b"the user's own")
    assert fetch(remote, "net", explicit=env / "other.pth") == env / "other.pth"
    with pytest.raises(BackboneError, match="weights file for 'net' not found"):
        fetch(remote, "net", explicit=env / "absent.pth")


def test_a_copy_on_disk_that_does_not_match_its_pin_is_not_used(env, server, monkeypatch):
    remote = RemoteFile(server.serve("w.pth", BODY), sha256(BODY), len(BODY), "w.pth")
    stale = env / "torch" / "hub" / "checkpoints" / "w.pth"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(BODY[:1000])
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"w\.pth does not match its SHA-256 pin"):
        fetch(remote, "net")
    monkeypatch.delenv("PIPELINE_OFFLINE")
    assert fetch(remote, "net").read_bytes() == BODY  # downloaded again, over the bad copy


def _hub_layout(root: Path, repo: str, revision: str, name: str, data: bytes, blob_name: str) -> Path:
    """huggingface_hub's cache: blobs/<sha256> and snapshots/<commit>/<file> -> ../../blobs/<sha256>."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / blob_name).write_bytes(data)
    snapshot = folder / "snapshots" / revision / name
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(Path("..") / ".." / "blobs" / blob_name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


@pytest.mark.parametrize("revision", [COMMIT, "main"])
def test_the_hugging_face_hub_cache_is_found_without_network(env, monkeypatch, revision):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _hub_layout(env / "hf" / "hub", "org/net", COMMIT, "model.safetensors", BODY, sha256(BODY))
    remote = RemoteFile("http://127.0.0.1:9/never", None, len(BODY), "org--net--model.safetensors",
                        hub=("org/net", revision, "model.safetensors"))
    assert on_disk(remote) == snapshot and fetch(remote, "net") == snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(env / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    assert on_disk(remote) is None


def test_a_hub_blob_that_is_not_its_own_sha256_is_not_used(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_layout(env / "hf" / "hub", "org/net", COMMIT, "model.safetensors", BODY[:10], sha256(BODY))
    remote = RemoteFile("http://127.0.0.1:9/never", None, len(BODY), "org--net--model.safetensors",
                        hub=("org/net", COMMIT, "model.safetensors"))
    with pytest.raises(BackboneError, match="does not match its SHA-256 pin"):
        fetch(remote, "net")


def test_an_unpinned_hub_file_is_checked_against_the_hash_and_commit_the_hub_states(env, server):
    hub = ("org/net", COMMIT, "model.safetensors")
    good = {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{sha256(BODY)}"'}
    remote = RemoteFile(server.serve("good", BODY, headers=good), None, len(BODY), "good.safetensors", hub=hub)
    assert fetch(remote, "net").read_bytes() == BODY
    lying = RemoteFile(server.serve("lying", BODY, headers={**good, "X-Linked-Etag": '"' + "1" * 64 + '"'}),
                       None, len(BODY), "lying.safetensors", hub=hub)
    with pytest.raises(BackboneError, match="refused and deleted"):
        fetch(lying, "net")
    moved = RemoteFile(server.serve("moved", BODY, headers={**good, "X-Repo-Commit": "b" * 40}),
                       None, len(BODY), "moved.safetensors", hub=hub)
    with pytest.raises(BackboneError, match=f"answered for revision b{{40}}, not the pinned {COMMIT}"):
        fetch(moved, "net")
    silent = RemoteFile(server.serve("silent", BODY, headers={"X-Repo-Commit": COMMIT}), None, len(BODY),
                        "silent.safetensors", hub=hub)
    with pytest.raises(BackboneError, match="states no SHA-256"):
        fetch(silent, "net")
    assert checkpoints(env) == ["good.safetensors"]


def test_a_remote_file_without_a_pin_must_be_a_hub_file():
    with pytest.raises(ValueError, match="only a hub file"):
        RemoteFile("http://x/y", None, 1, "y")
    with pytest.raises(ValueError, match="hex digits"):
        RemoteFile("http://x/y", "abc", 1, "y")
