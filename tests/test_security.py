"""Security properties: no remote code unless the config allows it, no pickle that can run code, no shell, and no
secret from the environment in any output, log or report.

The source scan parses the package with `ast` (so comments and strings do not count) and is itself tested on
snippets that break each rule, so a scanner that finds nothing cannot pass by accident.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from cli_runs import CANARY_SECRETS

from gradfilter_ray.config import ModelSpec, load
from gradfilter_ray.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gradfilter_ray"
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"
DEMO = REPO / "jobs" / "configs" / "demo.yaml"

# ----- source scan -----

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
FORBIDDEN_CALLS = {
    "os.system",
    "os.popen",
    "os.execl",
    "os.execlp",
    "os.execv",
    "os.execvp",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "eval",
    "exec",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "pandas.read_pickle",
    "pd.read_pickle",
}
SUBPROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call"}
SUBPROCESS_CALLS |= {"subprocess.check_output"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """Every breach of the rules above in one module's source, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{where}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in FORBIDDEN_CALLS:
            found.append(f"{where}: calls {name}")
        if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
            if not _is_true(keywords.get("weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
        if _is_true(keywords.get("shell")):
            found.append(f"{where}: shell=True")
        if _is_true(keywords.get("allow_pickle")):
            found.append(f"{where}: allow_pickle=True")
        if _is_true(keywords.get("trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True hard-coded")
        if name in SUBPROCESS_CALLS and node.args and not isinstance(node.args[0], ast.List | ast.Tuple | ast.Name):
            found.append(f"{where}: {name} with a command string")
    return found


def test_the_scanner_catches_every_rule():
    snippet = """
import pickle
from dill import loads
import os, subprocess, torch, yaml
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
subprocess.run("ls -l", shell=True)
subprocess.check_output(f"git {x}")
os.system("rm -rf /")
eval("1 + 1")
yaml.load(text)
np.load("a.npy", allow_pickle=True)
AutoModel.from_pretrained(name, trust_remote_code=True)
"""
    found = violations(snippet)
    for expected in (
        "imports pickle",
        "imports dill",
        "torch.load without weights_only=True",
        "shell=True",
        "subprocess.run with a command string",
        "subprocess.check_output with a command string",
        "calls os.system",
        "calls eval",
        "calls yaml.load",
        "allow_pickle=True",
        "trust_remote_code=True hard-coded",
    ):
        assert any(expected in v for v in found), expected
    assert len([v for v in found if "torch.load" in v]) == 2
    clean = 'import subprocess, torch\ntorch.load("x", weights_only=True)\nsubprocess.run(["git", "rev-parse"])\n'
    assert violations(clean) == []


def test_package_source_has_no_pickle_shell_eval_or_unsafe_load():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [v for path in files for v in violations(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


# ----- model loading -----


def test_trust_remote_code_is_off_unless_the_config_turns_it_on(monkeypatch):
    import transformers

    from gradfilter_ray.models import load_causal_lm, load_tokenizer

    for path in (TINY, DEMO):
        cfg = load(path)
        assert cfg.proxy.model.trust_remote_code is False and cfg.finetune.model.trust_remote_code is False
    assert ModelSpec(name_or_path="x").trust_remote_code is False

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    spec = ModelSpec(name_or_path="bundled:stories260K")
    load_causal_lm(spec)
    load_tokenizer(spec)
    assert [(n, kw.get("trust_remote_code")) for n, kw in calls] == [
        ("AutoModelForCausalLM", False),
        ("AutoTokenizer", False),
    ]
    calls.clear()
    trusting = replace(spec, trust_remote_code=True)
    load_causal_lm(trusting)
    load_tokenizer(trusting)
    assert [kw.get("trust_remote_code") for _, kw in calls] == [True, True]


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_checkpoint_cannot_run_code_when_loaded(tmp_path):
    from gradfilter_ray.models import load_causal_lm

    folder = tmp_path / "evil_model"
    folder.mkdir()
    shutil.copy(PACKAGE / "assets" / "models" / "stories260K" / "config.json", folder)
    marker = tmp_path / "code_ran"
    with (folder / "pytorch_model.bin").open("wb") as fh:  # no safetensors: only a pickle to load from
        pickle.dump({"model.embed_tokens.weight": _Payload(str(marker))}, fh)
    with pytest.raises(Exception):  # noqa: B017 - transformers' or torch's refusal, whatever its type
        load_causal_lm(ModelSpec(name_or_path=str(folder)))
    assert not marker.exists()
    # control: the payload is live, an unrestricted unpickling does run it
    import torch

    try:
        torch.load(folder / "pytorch_model.bin", weights_only=False)
    except Exception:  # noqa: BLE001 - only the side effect matters
        pass
    assert marker.exists()


# ----- secrets -----


@pytest.mark.slow
def test_secrets_in_the_environment_appear_in_no_output_log_or_report(reference_run):
    """The session's reference run (tests/cli_runs.py: every stage up to the report, ensemble and extraction
    included) had CANARY_SECRETS in its environment, which its driver and every Ray worker inherit."""
    out, log, ray_tmp = reference_run["out"], reference_run["log"], Path(reference_run["ray_tmp"])
    assert reference_run["rc"] == 0, log[-4000:]
    ray_files = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    ray_text = {p: p.read_bytes() for p in ray_files if p.stat().st_size < 50_000_000}
    assert any(p.name.endswith((".log", ".out", ".err")) for p in ray_text)  # Ray's logs were there to scan
    assert "[scoring] running" in log and "[report] running" in log and "[gradients] running" in log
    manifest = RunDir(out).read_manifest()
    assert manifest["stages"]["report"]["status"] == "done" and manifest["versions"]

    outputs = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "manifest.json" in outputs and out / "report" / "index.html" in outputs
    texts = {"driver stdout and stderr": log.encode(), **outputs}
    for name, secret in CANARY_SECRETS.items():
        leaks = [str(where) for where, blob in texts.items() if secret.encode() in blob]
        assert leaks == [], f"{name} leaked into {leaks}"
        # Ray's own session files (logs, configs) on the run's RAY_TMPDIR are checked too
        ray_leaks = [str(p) for p, blob in ray_text.items() if secret.encode() in blob]
        assert ray_leaks == [], f"{name} leaked into Ray's session files {ray_leaks}"
    assert json.dumps(manifest).count("gfrcanary") == 0
