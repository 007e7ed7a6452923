"""glibc's malloc told to keep freed blocks (``keep_freed_cpu_memory``): when it is set, when it is
left alone, and that it changes nothing computed. malloc's settings are per process, so each case
runs in its own interpreter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

PROBE = """
import json
from polyalign.models.loading import keep_freed_cpu_memory
print(json.dumps([keep_freed_cpu_memory(), keep_freed_cpu_memory()]))
"""

GENERATE = """
import json, torch
from polyalign.models import load_model, load_tokenizer
from polyalign.models.loading import keep_freed_cpu_memory
tok = load_tokenizer("builtin:tiny-random")
model = load_model("builtin:tiny-random", dtype="float32", device="cpu")
torch.manual_seed(0)
x = torch.randint(3, 200, (4, 12))
with torch.no_grad():
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    big = [torch.randn(64, 1 << 18).sum().item() for _ in range(3)]     # 64 MiB blocks, freed and reused
print(json.dumps({"kept": keep_freed_cpu_memory(), "tokens": out.tolist()}))
"""


def run(code: str, **env: str) -> object:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "POLYALIGN_CPU_MALLOC")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_set_once_on_glibc_unless_the_user_says_otherwise():
    assert run(PROBE) == [True, True]
    assert run(PROBE, POLYALIGN_CPU_MALLOC="default") == [False, False]
    assert run(PROBE, MALLOC_ARENA_MAX="2") == [False, False]                  # the user's own malloc settings win
    assert run(PROBE, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536") == [False, False]


@glibc
def test_load_model_on_the_cpu_sets_it_and_generation_is_the_same_either_way():
    kept, plain = run(GENERATE), run(GENERATE, POLYALIGN_CPU_MALLOC="default")
    assert (kept["kept"], plain["kept"]) == (True, False)
    assert kept["tokens"] == plain["tokens"]


def test_release_freed_cpu_memory_hands_kept_blocks_back():
    """With freed blocks kept (polyalign's default), memory freed by a finished phase stays resident
    until ``release_freed_cpu_memory``; in a fresh process, so the settings and counts are its own."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent('''
        import platform, torch
        from polyalign.models.loading import keep_freed_cpu_memory, release_freed_cpu_memory
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        kept = keep_freed_cpu_memory()
        xs = [torch.ones(5_000_000) for _ in range(40)]      # 40 x 20 MB: from the heap under a 32 MiB cap too
        pins = [torch.ones(1000) for _ in range(8)]
        del xs
        before = rss()
        trimmed = release_freed_cpu_memory()
        print(platform.libc_ver()[0], kept, trimmed, before, rss())
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    libc, kept, trimmed, before, after = out.stdout.split()
    if libc != "glibc" or kept != "True":
        pytest.skip("glibc's malloc settings are not polyalign's here")
    assert trimmed == "True"
    assert float(before) - float(after) > 400          # most of the 800 MB freed goes back
