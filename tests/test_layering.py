"""Layering rules: pure cores stay framework-free (no core module imports ray, checked in a fresh interpreter), stage
shells never import the pipeline (the runner passes each stage its key; shells only get (cfg, run, key)), and the
`ensemble` and `gradients` packages never import each other (what both need lives in `gradfilter_ray.lora`).

The import scan parses the package with `ast` (so function-level imports count and comments do not) and is itself
tested on snippets that break the rule, so a scanner that finds nothing cannot pass by accident.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradfilter_ray"

CORE_MODULES = [
    "gradfilter_ray.config",
    "gradfilter_ray.storage",
    "gradfilter_ray.rundir",
    "gradfilter_ray.driver_claim",
    "gradfilter_ray.models",
    "gradfilter_ray.pipeline",
    "gradfilter_ray.resources",
    "gradfilter_ray.gc",
    "gradfilter_ray.data.formats",
    "gradfilter_ray.data.sources",
    "gradfilter_ray.data.finalize",
    "gradfilter_ray.data.prompt",
    "gradfilter_ray.data.tokenized",
    "gradfilter_ray.gradients.norms",
    "gradfilter_ray.gradients.extract",
    "gradfilter_ray.losses",
    "gradfilter_ray.lora",
    "gradfilter_ray.ensemble.loop",
    "gradfilter_ray.scoring.gsnr",
    "gradfilter_ray.scoring.baselines",
    "gradfilter_ray.scoring.selection",
    "gradfilter_ray.scoring.stability",
    "gradfilter_ray.audit.plant",
    "gradfilter_ray.audit.recovery",
    "gradfilter_ray.finetune.ds_config",
    "gradfilter_ray.finetune.loop",
    "gradfilter_ray.finetune.model",
    "gradfilter_ray.finetune.subset_tokens",
    "gradfilter_ray.finetune.placement",
    "gradfilter_ray.finetune.checkpoints",
    "gradfilter_ray.evaluation.plan",
    "gradfilter_ray.evaluation.vllm_engine",
    "gradfilter_ray.evaluation.hf_engine",
    "gradfilter_ray.evaluation.generate",
    "gradfilter_ray.evaluation.judge",
    "gradfilter_ray.evaluation.pws",
    "gradfilter_ray.evaluation.testsets",
    "gradfilter_ray.evaluation.compare",
    "gradfilter_ray.parquet_stream",
]

PIPELINE = "gradfilter_ray.pipeline"
# The one module that drives the pipeline, the configuration reference, which prints the stage table's keys, and gc,
# which keeps what the kept configs' stage keys reference; everything else (the stage shells above all) must not
# import it.
PIPELINE_IMPORTERS_ALLOWED = {"gradfilter_ray/cli.py", "gradfilter_ray/config_reference.py", "gradfilter_ray/gc.py"}


def test_core_modules_do_not_import_ray():
    code = (
        "import sys, importlib\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def _module_of(path: Path) -> str:
    """Dotted name (a package's __init__ keeps its '.__init__', so relative imports resolve against the package)."""
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def pipeline_imports(source: str, module: str, filename: str = "<snippet>", target: str = PIPELINE) -> list[str]:
    """Every import of `target` (default gradfilter_ray.pipeline) or anything inside it in one module's source (at
    any depth), as 'file:line'."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                names = [str(node.args[0].value)]
        if any(n == target or n.startswith(target + ".") for n in names):
            found.append(f"{filename}:{node.lineno}")
    return found


def test_the_pipeline_import_scanner_catches_every_form():
    module = "gradfilter_ray.finetune.stage"
    for snippet in (
        "from gradfilter_ray.pipeline import stage_key",
        "import gradfilter_ray.pipeline",
        "from gradfilter_ray import pipeline",
        "from .. import pipeline",
        "from ..pipeline import stage_key",
        "def f():\n    from gradfilter_ray.pipeline import stage_key\n    return stage_key",
        "import importlib\nimportlib.import_module('gradfilter_ray.pipeline')",
    ):
        assert pipeline_imports(snippet, module), snippet
    for clean in (
        "from gradfilter_ray.rundir import RunDir",
        "from gradfilter_ray import report",
        "from . import loop",
        "# from gradfilter_ray.pipeline import stage_key",
        "x = 'gradfilter_ray.pipeline'",
    ):
        assert pipeline_imports(clean, module) == [], clean


def test_stage_shells_do_not_import_the_pipeline():
    files = sorted(PACKAGE.rglob("*.py"))
    shells = sorted(PACKAGE.glob("*/stage.py")) + [PACKAGE / "report.py"]
    assert len(shells) >= 7 and all(s.exists() for s in shells)
    importers = {}
    for path in files:
        rel = str(path.relative_to(PACKAGE.parent))
        if path.name == "pipeline.py" and path.parent == PACKAGE:
            continue
        found = pipeline_imports(path.read_text(), _module_of(path), rel)
        if found:
            importers[rel] = found
    shell_names = {str(s.relative_to(PACKAGE.parent)) for s in shells}
    assert not shell_names & set(importers), {k: v for k, v in importers.items() if k in shell_names}
    assert set(importers) <= PIPELINE_IMPORTERS_ALLOWED, importers
    assert "gradfilter_ray/cli.py" in importers  # the scan does see the one real importer


def test_ensemble_and_gradients_do_not_import_each_other():
    # the scanner sees this rule's forms too
    assert pipeline_imports(
        "from ..gradients.norms import x", "gradfilter_ray.ensemble.stage", target="gradfilter_ray.gradients"
    )
    assert pipeline_imports(
        "from gradfilter_ray import ensemble", "gradfilter_ray.gradients.stage", target="gradfilter_ray.ensemble"
    )
    assert not pipeline_imports(
        "from gradfilter_ray.lora import x", "gradfilter_ray.ensemble.stage", target="gradfilter_ray.gradients"
    )
    found = {}
    for package, other in (("ensemble", "gradients"), ("gradients", "ensemble")):
        files = sorted((PACKAGE / package).rglob("*.py"))
        assert len(files) >= 3, files
        for path in files:
            hits = pipeline_imports(
                path.read_text(),
                _module_of(path),
                str(path.relative_to(PACKAGE.parent)),
                target=f"gradfilter_ray.{other}",
            )
            if hits:
                found[str(path.relative_to(PACKAGE.parent))] = hits
    assert found == {}, found
