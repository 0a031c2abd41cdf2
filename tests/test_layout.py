"""The house rules that keep the package navigable: imports flow one way, and the docs' links resolve."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "whisper_lora"
# Entry points sit above the stages: the CLI, `python -m whisper_lora`, and the SageMaker container's entry.
ENTRY_POINTS = {"cli.py", "__main__.py", "sagemaker_entry.py"}


def imported_modules(path: Path) -> set[str]:
    """Every whisper_lora module a file imports, at the top or inside a function, as dotted names."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m.startswith("whisper_lora")}


def test_no_module_outside_the_stages_and_entry_points_imports_a_stage():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "stages" or str(relative) in ENTRY_POINTS:
            continue
        stages = sorted(m for m in imported_modules(path) if m.startswith("whisper_lora.stages"))
        if stages:
            offenders.append(f"{relative}: {', '.join(stages)}")
    assert not offenders, "a module below the stages imports one:\n" + "\n".join(offenders)


def test_the_basic_modules_import_nothing_above_them():
    """errors and constants → audio, text, manifest, tokens: these import only each other."""
    basic = {"errors", "constants", "audio", "text", "manifest", "tokens"}
    for name in basic:
        modules = {m.split(".")[1] for m in imported_modules(PACKAGE / f"{name}.py") if m.count(".") >= 1}
        assert modules <= basic, (name, modules - basic)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and resolved.suffix == ".md":
                headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                            for h in re.findall(r"^#+ (.+)$", resolved.read_text(encoding="utf-8"), re.M)}
                if anchor not in headings:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# A path that leaves the clone: the `shared` folder beside it (where this project's own machines keep material) or the same
# folder built from `Path` parts. A stranger's clone has nothing beside it, so nothing that runs may look there.
OUTSIDE_THE_REPO = re.compile(r"\.\./shared|parents?(\[\d\])?\s*/\s*[\"']shared[\"']")


def test_nothing_that_runs_reads_outside_the_repository():
    places = [REPO / "Makefile", REPO / ".ci" / "run", REPO / "pyproject.toml"]
    for folder in ("whisper_lora", "tests", "bench", "demo", "configs", ".ci"):
        places += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".yaml", ".yml", ".json", ".sh", ""}
                   and p.is_file() and "__pycache__" not in p.parts]
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in places
                 for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 if OUTSIDE_THE_REPO.search(line)]
    assert not offenders, "reads a folder beside the clone:\n" + "\n".join(offenders)


def test_the_recordings_the_tests_use_are_in_the_repository_with_their_licences():
    from conftest import SPEECH_EN

    assert SPEECH_EN.resolve().is_relative_to(REPO.resolve())
    wavs = sorted(SPEECH_EN.rglob("*.wav"))
    assert len(wavs) == 7
    for folder in {w.parent for w in wavs}:
        assert (folder / "transcripts.json").is_file()
        assert any(folder.glob("*COPYING*")) or any(folder.glob("LICENSE*")), folder
