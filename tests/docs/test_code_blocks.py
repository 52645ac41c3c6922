"""Every fenced code block of README.md and docs/*.md runs, or is checked against the repository.

* ```python blocks run: each file's blocks in order, in one namespace, as a reader would paste them.
* ```bash / ```console blocks are checked command by command (a ``$ `` prompt is dropped, ``#`` comments and
  ``\\`` continuations are understood): a repository path must exist (a script must be executable); every
  ``VAR=value`` must name an environment variable the code, the scripts or CI read; ``pip install .[x]``
  needs extra ``x`` in setup.py and other pip requirements must be named by setup.py, pyproject.toml or
  scripts/setup.sh; ``python -m M`` needs module ``M`` importable (or named by setup.py / scripts); options
  of ``python -m posenc_kernels`` must be ones it defines. ``python -m posenc_kernels --json`` is cheap and
  side-effect free: it is run (with ``POSENC_NATIVE=0``, so it never compiles) and its JSON read.
  A command nothing here knows how to check fails the test.
* ```text blocks are output, not code; a ``posenc::NAME`` they quote must be an op that exists.
* A block that must not run says so with ``<!-- not-run: REASON -->`` on the line before its fence (REASON
  required); there may be at most ``MAX_NOT_RUN`` of them.
* Unlabelled fences are refused: every block says what it is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"python", "bash", "console", "text"}
MAX_NOT_RUN = 3
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->")
FENCE = re.compile(r"^```(\S*)\s*$")


def blocks(path: Path):
    """``[(lang, first line number, code, not_run_reason or None)]`` of every fenced block in ``path``."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: unterminated code fence")
        prev = lines[start - 1] if start else ""
        tag = NOT_RUN.search(prev)
        out.append((m.group(1), start + 2, "\n".join(body) + "\n", tag.group(1).strip() if tag else None))
        i += 1
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


ALL = [(p, b) for p in DOC_FILES for b in blocks(p)]


# ---------------------------------------------------------------------------------------------- the corpus


def test_every_block_is_labelled_and_tags_are_justified():
    bad = [f"{rel(p)}:{line} ```{lang}" for p, (lang, line, _, _) in ALL if lang not in LANGS]
    assert not bad, f"code fences need one of {sorted(LANGS)}: {bad}"
    tagged = [(rel(p), line, why) for p, (_, line, _, why) in ALL if why is not None]
    assert all(why for _, _, why in tagged), f"a not-run tag needs a reason: {tagged}"
    assert len(tagged) <= MAX_NOT_RUN, f"too many blocks tagged not-run: {tagged}"


def test_docs_exist_and_have_examples():
    names = {p.name for p in DOC_FILES}
    for need in ("install.md", "design.md", "kernels.md", "testing.md", "rope.md", "integrations.md"):
        assert need in names
    assert sum(lang == "python" for _, (lang, *_rest) in ALL) >= 15


# ------------------------------------------------------------------------------------------- python blocks

PY_FILES = [p for p in DOC_FILES if any(b[0] == "python" and b[3] is None for b in blocks(p))]


@pytest.mark.parametrize("path", PY_FILES, ids=[rel(p) for p in PY_FILES])
def test_python_blocks_run(path):
    torch._dynamo.reset()
    namespace = {"__name__": f"docs_{path.stem}"}
    for lang, line, code, why in blocks(path):
        if lang != "python" or why is not None:
            continue
        # Line numbers in a traceback are the Markdown file's own.
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


# -------------------------------------------------------------------------------------------- shell blocks


def _read(*globs: str) -> str:
    text = []
    for g in globs:
        for p in sorted(ROOT.glob(g)):
            if p.is_file():
                text.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(text)


CODE_TEXT = _read("setup.py", "posenc_kernels/**/*.py", "scripts/*", ".ci/run", "benchmarks/gpu_check.sh",
                  "benchmarks/gpu_check/*", "tests/properties/*.py")  # fmt: skip (the last: its budget variables)
PACKAGING_TEXT = _read("setup.py", "pyproject.toml", "scripts/setup.sh", "scripts/ci_cuda_wheel")
# Variables read outside this repository by the tools the commands run (torch's extension builder).
FOREIGN_ENV = {"CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "CXX"}


def _extras() -> set[str]:
    m = re.search(r"extras_require=\{(.*?)\n    \}", (ROOT / "setup.py").read_text(), flags=re.S)
    assert m, "setup.py extras_require not found"
    return set(re.findall(r'^\s*"([\w-]+)":', m.group(1), flags=re.M))


def _main_options() -> set[str]:
    return set(re.findall(r'add_argument\("(--[\w-]+)"', (ROOT / "posenc_kernels" / "__main__.py").read_text()))


def commands(code: str, lang: str):
    """Logical command lines of a shell block (prompts, comments and continuations handled)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    for raw in joined.splitlines():
        if lang == "console":
            if not raw.startswith("$ "):
                continue  # output
            raw = raw[2:]
        words = shlex.split(raw, comments=True)
        if words:
            yield from _split_and(words)


def _split_and(words):
    cmd = []
    for w in words:
        if w in ("&&", ";", "||"):
            if cmd:
                yield cmd
            cmd = []
        else:
            cmd.append(w)
    if cmd:
        yield cmd


def check_command(words: list[str]) -> list[str]:
    """Problems with one command (empty when it checks out); raises nothing."""
    problems, env = [], []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        env.append(words.pop(0).split("=", 1)[0])
    if words and words[0] == "export":
        env += [w.split("=", 1)[0] for w in words[1:]]
        words = []
    for var in env:
        if var not in FOREIGN_ENV and var not in CODE_TEXT:
            problems.append(f"environment variable {var} is read by nothing in setup.py, posenc_kernels/, scripts/, tests/properties/")
    if not words:
        return problems
    head, args = words[0], words[1:]
    if head in ("python", "python3") and args[:2] == ["-m", "pip"]:
        head, args = "pip", args[2:]
    if head == "pip":
        if not args or args[0] not in ("install", "wheel"):
            return problems + [f"pip {' '.join(args)}: only install/wheel are understood"]
        for a in args[1:]:
            if a.startswith("-"):
                continue
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", a)
            if m:
                missing = set((m.group(1) or "").split(",")) - {""} - _extras()
                if missing:
                    problems.append(f"pip extra {sorted(missing)} is not in setup.py extras_require")
                continue
            name = re.split(r"[<>=!\[; ]", a)[0]
            if name != "torch" and name not in PACKAGING_TEXT:
                problems.append(f"pip requirement {a!r} is named by neither setup.py, pyproject.toml nor scripts")
            if name == "setuptools" and a.replace('"', "") not in PACKAGING_TEXT:
                problems.append(f"{a!r} differs from the setuptools requirement in pyproject.toml")
        return problems
    if head in ("python", "python3"):
        if args[:1] == ["-m"]:
            mod, rest = args[1], args[2:]
            if mod == "posenc_kernels":
                unknown = [a for a in rest if a.startswith("--") and a not in _main_options()]
                if unknown:
                    problems.append(f"python -m posenc_kernels has no option {unknown}")
            elif mod.startswith("posenc_kernels."):
                import importlib.util

                if importlib.util.find_spec(mod) is None:
                    problems.append(f"module {mod} does not exist")
            elif mod not in CODE_TEXT and mod not in PACKAGING_TEXT:
                problems.append(f"python -m {mod}: the module is used by nothing in this repository")
            paths = [a for a in rest if "/" in a and not a.startswith("-")]
        elif args[:1] == ["-c"]:
            paths = []
        else:
            paths = [a for a in args[:1]]
        for p in paths:
            if not (ROOT / p.split("::")[0]).exists() and p.split("/")[0] in ("tests", "benchmarks", "docs", "scripts"):
                problems.append(f"path {p} does not exist")
        return problems
    if "/" in head:
        path = ROOT / head
        if not path.is_file():
            problems.append(f"{head} does not exist")
        elif not os.access(path, os.X_OK):
            problems.append(f"{head} is not executable")
        return problems
    return problems + [f"command {head!r}: nothing here knows how to check it (tag the block not-run, with a reason)"]


SHELL = [(p, b) for p, b in ALL if b[0] in ("bash", "console") and b[3] is None]


@pytest.mark.parametrize("path,block", SHELL, ids=[f"{rel(p)}:{b[1]}" for p, b in SHELL])
def test_shell_block_references_exist(path, block):
    lang, line, code, _ = block
    cmds = list(commands(code, lang))
    assert cmds, f"{rel(path)}:{line}: a shell block with no command"
    problems = [f"{' '.join(c)}: {p}" for c in cmds for p in check_command(list(c))]
    assert not problems, f"{rel(path)}:{line}:\n" + "\n".join(problems)


def test_status_command_runs():
    """``python -m posenc_kernels --json``, as documented in docs/install.md (never compiling here)."""
    documented = [c for p, (lang, _, code, _) in SHELL for c in commands(code, lang)]
    assert ["python", "-m", "posenc_kernels", "--json"] in documented
    env = dict(os.environ, POSENC_NATIVE="0")
    out = subprocess.run([sys.executable, "-m", "posenc_kernels", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    facts = json.loads(out.stdout)
    for key in ("posenc_kernels", "torch", "triton", "source", "kernels", "cache", "mode", "error"):
        assert key in facts, key
    assert facts["mode"] == "0" and facts["source"] is None and "POSENC_NATIVE=0" in facts["error"]


# --------------------------------------------------------------------------------------------- text blocks


def test_quoted_op_names_exist():
    quoted = {(rel(p), name) for p, (lang, _, code, _) in ALL if lang == "text"
              for name in re.findall(r"posenc::(\w+)", code)}  # fmt: skip
    missing = [(f, n) for f, n in quoted if not hasattr(torch.ops.posenc, n)]
    assert not missing, f"output samples quote ops that do not exist: {missing}"


# -------------------------------------------------------------------------------------- the docs as a whole

TEXT = {p: p.read_text(encoding="utf-8") for p in DOC_FILES}


def test_readme_is_a_front_door():
    text = TEXT[ROOT / "README.md"]
    assert len(text.splitlines()) <= 250
    assert "scripts/test" in text and "scripts/bench" in text
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text(), ".ci/run must call the README's test command"
    assert "torch==2.13.0" in text and "clean clone" in text


def test_no_issue_numbers_or_lab_notebook_phrases():
    pattern = re.compile(r"\bissue[s]? #?\d+|(?<![\w/])#\d+\b|these machines", re.I)
    hits = [(rel(p), m.group(0)) for p, t in TEXT.items() for m in pattern.finditer(t)]
    assert not hits, hits


def test_relative_links_resolve():
    broken = []
    for p, t in TEXT.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", t):
            if re.match(r"^[a-z]+://", target) or target.startswith("#"):
                continue
            file_part, _, anchor = target.partition("#")
            dest = p.parent / file_part
            if not dest.exists():
                broken.append((rel(p), target))
            elif anchor and anchor not in _anchors(dest):
                broken.append((rel(p), target, "no such heading"))
    assert not broken, broken


def _anchors(path: Path) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_public_name_is_documented_with_an_example():
    import inspect

    import posenc_kernels as pk

    python = "\n".join(code for _, (lang, _, code, _) in ALL if lang == "python")
    prose = "\n".join(TEXT.values())
    undocumented, no_example = [], []
    for name in pk.__all__:
        if name not in prose:
            undocumented.append(name)
        obj = getattr(pk, name)
        if callable(obj) and ">>>" not in (inspect.getdoc(obj) or "") and f"pk.{name}" not in python:
            no_example.append(name)
    assert not undocumented, f"public names the README and docs/ never mention: {undocumented}"
    assert not no_example, f"public callables with neither a doctest nor a docs example: {no_example}"


# ------------------------------------------------------------------------------- the checker itself can fail


def test_checker_rejects_what_is_wrong(tmp_path):
    assert check_command(["scripts/nope"])
    assert check_command(["scripts/setup.sh"])  # exists, not executable
    assert check_command(["POSENC_NO_SUCH_VAR=1", "scripts/test"])
    assert check_command(["pip", "install", ".[nosuchextra]"])
    assert check_command(["pip", "install", "nosuchpackage"])
    assert check_command(["python", "-m", "posenc_kernels", "--no-such-flag"])
    assert check_command(["python", "-m", "posenc_kernels.nosuchmodule"])
    assert check_command(["rm", "-rf", "build"])
    assert not check_command(["POSENC_NATIVE=0", "python", "-m", "posenc_kernels", "--json"])
    doc = tmp_path / "x.md"
    doc.write_text("```\nls\n```\n<!-- not-run: needs a GPU -->\n```python\nraise SystemExit\n```\n")
    (unlabelled, _, _, _), (_, line, _, why) = blocks(doc)
    assert unlabelled == "" and why == "needs a GPU" and line == 6
