"""The default namespace follows the weights, not just the model path."""

import os
import shutil

import pytest

from sglang_tokenlake.namespace import default_namespace, hub_snapshot, weights_digest


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "model-00001-of-00002.safetensors").write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    (d / "model-00002-of-00002.safetensors").write_bytes(b"\1" * 1000)
    (d / "tokenizer.json").write_text("{}")
    (d / "README.md").write_text("docs")
    return d


def test_same_files_same_namespace_and_path_prefix(model_dir, tmp_path):
    ns = default_namespace(str(model_dir))
    assert ns.startswith(f"{model_dir}#") and ns == default_namespace(str(model_dir))
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)  # another host's copy: other file times, same weights
    os.utime(copy / "model-00002-of-00002.safetensors", (1, 1))
    assert weights_digest(str(copy)) == weights_digest(str(model_dir))


@pytest.mark.parametrize("change", ["big-shard-byte", "small-shard", "config", "new-shard"])
def test_changed_weights_change_the_namespace(model_dir, change):
    before = default_namespace(str(model_dir))
    big = model_dir / "model-00001-of-00002.safetensors"
    if change == "big-shard-byte":  # same size, one sampled byte differs
        data = bytearray(big.read_bytes())
        data[0] ^= 0xFF
        big.write_bytes(bytes(data))
    elif change == "small-shard":
        (model_dir / "model-00002-of-00002.safetensors").write_bytes(b"\2" * 1000)
    elif change == "config":
        (model_dir / "config.json").write_text('{"hidden_size": 16}')
    else:
        (model_dir / "extra.bin").write_bytes(b"x")
    assert default_namespace(str(model_dir)) != before


def test_files_that_do_not_hold_weights_leave_it(model_dir):
    before = default_namespace(str(model_dir))
    (model_dir / "README.md").write_text("other docs")
    (model_dir / "tokenizer.json").write_text('{"v": 2}')
    assert default_namespace(str(model_dir)) == before


def test_revision_and_weight_version_are_part_of_it(model_dir):
    base = default_namespace(str(model_dir))
    assert default_namespace(str(model_dir), weight_version="default") == base
    v2 = default_namespace(str(model_dir), weight_version="step-200")
    assert v2 == base + "~step-200"
    assert "@abc123#" in default_namespace(str(model_dir), revision="abc123")


def test_hub_id_is_digested_from_the_hf_cache(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert default_namespace("org/tiny") == "org/tiny"  # not downloaded: the id alone
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee\n")
    shutil.copytree(model_dir, repo / "snapshots" / "c0ffee")
    assert hub_snapshot("org/tiny") == str(repo / "snapshots" / "c0ffee")
    assert default_namespace("org/tiny") == f"org/tiny#{weights_digest(str(model_dir))}"
    assert default_namespace("org/tiny", revision="c0ffee").startswith("org/tiny@c0ffee#")


def test_a_path_without_weights_is_the_path(tmp_path):
    assert default_namespace(str(tmp_path)) == str(tmp_path)
    assert default_namespace("/no/such/model") == "/no/such/model"


def _cache(namespace=None):
    from cache_harness import make_pools

    from sglang_tokenlake.config import TokenLakeConfig
    from sglang_tokenlake.sglang.cache import TokenLakeCache

    params, _, _ = make_pools(64)
    return TokenLakeCache(params, TokenLakeConfig(segment_size=8, namespace=namespace),
                          model_id="start-up namespace")


def test_a_weight_update_rederives_the_namespace_at_the_flush(model_dir, tmp_path):
    """SGLang's update_weights_from_disk points the runner's model_config at the new
    path, then flushes the cache: the flush hook derives the namespace from it."""
    from types import SimpleNamespace

    from sglang_tokenlake.sglang.plugin import _after_flush_cache, namespace_of

    server_args = SimpleNamespace(model_path=str(model_dir), revision=None, weight_version="default")
    config = SimpleNamespace(model_path=str(model_dir))
    cache = _cache()
    sched = SimpleNamespace(tree_cache=cache, server_args=server_args,
                            tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model_config=config)))
    _after_flush_cache(True, sched)
    first = cache.namespace
    assert first == namespace_of(server_args) == default_namespace(str(model_dir))
    (model_dir / "model-00002-of-00002.safetensors").write_bytes(b"\3" * 1000)  # in place
    _after_flush_cache(False, sched)  # a flush refused (requests running) changes nothing
    assert cache.namespace == first
    _after_flush_cache(True, sched)
    assert cache.namespace not in (first, None) and cache.namespace.startswith(f"{model_dir}#")
    new_dir = tmp_path / "step-2"
    shutil.copytree(model_dir, new_dir)
    config.model_path = str(new_dir)  # an update from another directory
    _after_flush_cache(True, sched)
    assert cache.namespace.startswith(f"{new_dir}#")

    fixed = _cache(namespace="pinned")
    sched.tree_cache = fixed
    _after_flush_cache(True, sched)
    assert fixed.namespace == "pinned"  # --tokenlake-namespace is never replaced
