"""The house rules that keep the package navigable: imports flow one way, and the docs' links resolve."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "whisper_lora"

# The declared layer table, lowest first: a module may import from its own layer and the ones below,
# never from above. docs/development.md opens with this table; change both together. Within decode/,
# the order of the modules is the order of the layers (types before kv before rules ...).
LAYERS: list[tuple[str, set[str]]] = [
    ("facts", {"constants", "errors"}),
    ("basics", {"audio", "audio_ctx", "text", "manifest", "tokens", "vad", "settings", "rundir", "devices", "report",
                "allocator"}),
    ("domain", {"models", "ct2", "lora", "data", "features", "shards", "augment", "sources", "doctor", "checkpoint",
                "sagemaker_rules", "model_card"}),
    ("decode: types", {"decode.types"}),
    ("decode: kv", {"decode.kv"}),
    ("decode: rules", {"decode.rules"}),
    ("decode: search", {"decode.search"}),
    ("decode: timing", {"decode.timing"}),
    ("decode: alignatt", {"decode.alignatt"}),
    ("decode: longform", {"decode.longform"}),
    ("decode: backends", {"decode.transformers_backend", "decode.ct2_backend", "decode"}),
    ("runtime", {"serve.service", "streaming", "sentiment", "writers", "scoring", "batch", "openai_checkpoint",
                 "ggml", "diarize"}),
    ("front ends", {"serve.api", "serve.realtime", "serve.ui", "serve.errors", "serve.limits", "serve.metrics", "serve"}),
    ("options", {"config"}),
    ("stages", {"stages"} | {f"stages.{p.stem}" for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}),
    ("entry points", {"cli", "__main__", "sagemaker_entry"}),
]
LEVEL = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
# The package itself: lazy names for `import whisper_lora` users and __version__, which every layer may read.
FACADE = ""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every whisper_lora module a file imports, at the top or inside a function, as names relative to the
    package ('' for the package itself); imports only made for type checkers do not count."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` imports the module x when there is one, else a name of the package
            found |= {f"{module}.{alias.name}" if (PACKAGE.parent / f"{module}.{alias.name}".replace(".", "/")
                                                    ).with_suffix(".py").exists()
                      or (PACKAGE.parent / f"{module}.{alias.name}".replace(".", "/")).is_dir() else module
                      for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m.removeprefix("whisper_lora").removeprefix(".") for m in found if m.split(".")[0] == "whisper_lora"}


def test_every_module_has_a_layer():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {FACADE}
    assert modules <= set(LEVEL), f"not in the layer table: {sorted(modules - set(LEVEL))}"


def test_every_import_points_down_or_sideways_in_the_layer_table():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == FACADE:
            continue
        for imported in sorted(imported_modules(path)):
            if imported == FACADE:
                continue  # __version__
            target = LEVEL.get(imported)
            if target is None or target > LEVEL[name]:
                offenders.append(f"{name} ({LAYERS[LEVEL[name]][0]}) imports {imported} "
                                 f"({LAYERS[target][0] if target is not None else 'no layer'})")
    assert not offenders, "imports that point up the layer table:\n" + "\n".join(offenders)


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
