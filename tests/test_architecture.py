"""Layering rules, checked on the source: what may import what."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at_top_level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, id(node) in top))
    return out


def _modules(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_calib_never_imports_qfold():
    offenders = [str(p.relative_to(ROOT)) for p in _modules("calib") for m, _ in _imports(p) if m.split(".")[0] == "qfold"]
    assert offenders == []


def test_tensorrt_is_imported_only_inside_functions_of_the_trt_backend():
    for p in _modules("qfold") + _modules("calib"):
        for m, at_top in _imports(p):
            if m.split(".")[0] == "tensorrt":
                assert p.name == "trt.py" and not at_top, f"{p.relative_to(ROOT)} imports tensorrt"


def test_import_qfold_does_not_import_heavy_optional_modules():
    import subprocess
    import sys

    code = "import sys, qfold, calib; print(sorted(m for m in ('tensorrt', 'onnxruntime', 'matplotlib', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_no_module_patches_torch_or_onnx_classes():
    """No assignment to attributes of torch/onnx/onnxruntime objects at module level (no monkey-patching)."""
    for p in _modules("qfold") + _modules("calib"):
        tree = ast.parse(p.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute):
                        base = t
                        while isinstance(base, ast.Attribute):
                            base = base.value
                        assert not (isinstance(base, ast.Name) and base.id in ("torch", "nn", "F", "onnx", "ort")), (
                            f"{p.relative_to(ROOT)}:{node.lineno} patches {ast.unparse(t)}"
                        )


def test_the_repository_stands_alone_no_file_cites_notes_outside_it():
    """Facts the code relies on live under docs/ in the project's own words, never in a path outside the checkout."""
    suffixes = {".py", ".md", ".sh", ".toml", ".txt", ".json"}
    files = [p for d in ("qfold", "calib", "tools", "tests", "docs", ".ci") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts]
    files += [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "pyproject.toml"]
    needle = "shared/" + "research"  # split so this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in files if needle in p.read_text(errors="ignore")]
    assert offenders == []
    assert (ROOT / "docs" / "tensorrt-qdq-rules.md").is_file()
