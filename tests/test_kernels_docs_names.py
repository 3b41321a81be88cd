"""Every kernel-level name docs/kernels.md shows in its signature blocks imports from
`inlaid.kernels`, as the page says (num_groups, default_g_idx, GPTQFormatError and
QuantLinearError were only in the submodules: an outside probe following the page)."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import inlaid.kernels

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"


def test_the_names_the_kernels_page_shows_import_from_the_package():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    signature = re.compile(r"(?:^|\s)([a-z_][a-z0-9_]*)\([^)]*\)\s*->", re.M)  # name(args) -> result
    signatures = {name for block in blocks for name in signature.findall(block)}
    errors = set(re.findall(r"\b([A-Z]\w*Error)\b", DOC.read_text())) - set(dir(builtins))
    assert {"pack_qweight", "num_groups", "default_g_idx", "dequantize_gptq"} <= signatures
    assert {"GPTQFormatError", "QuantLinearError"} <= errors
    missing = sorted(name for name in signatures | errors if not hasattr(inlaid.kernels, name))
    assert not missing, f"docs/kernels.md shows {missing}, which `inlaid.kernels` does not export"
    assert set(inlaid.kernels.__all__) >= signatures | errors
