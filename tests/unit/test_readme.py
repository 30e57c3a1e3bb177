"""The README and docs/ show commands a user will paste: each one must still parse with today's flags.

Every shell line in a ```bash``` or ```console``` block (and every ``!`` line of a ```python``` block)
that runs a nanoresume tool is parsed by that tool's own parser, and a train command's values are
validated as a run would validate them, without training. ``.ci/run`` must run exactly the README's
install, lint and test commands.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from nanoresume.config import COMMAND_OPTIONS, TrainConfig, _typed_only, build_parser, resolve_config
from tests.helpers import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_lines(text: str) -> list[str]:
    """The shell lines of a document's code blocks, continuations joined, prompts and ``!`` removed."""
    lines, language, pending = [], None, ""
    for raw in text.splitlines():
        fence = re.match(r"^```(\w*)", raw)
        if fence:
            language, pending = (None if language is not None else fence.group(1)), ""
            continue
        if language not in ("bash", "console", "python"):
            continue
        line = raw.strip()
        if language == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if language == "python":
            if not line.startswith("!") and not pending:
                continue
            line = line.removeprefix("!")
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def tool_command(line: str) -> tuple[str, list[str]] | None:
    """(tool, its argv) when ``line`` runs a nanoresume tool, else None."""
    words = shlex.split(line, comments=True)
    ends = [i for i, word in enumerate(words) if word in ("&", "|", "||", "&&", ";") or word.startswith(">")]
    words = words[:ends[0]] if ends else words
    while words and (words[0] in ("srun", "exec") or re.match(r"^\w+=", words[0])):
        words = words[1:]
    if not words:
        return None
    if words[0] == "torchrun":
        rest = words[1:]
        if "-m" in rest and rest[rest.index("-m") + 1:][:1] == ["nanoresume"]:
            words = ["nanoresume", *rest[rest.index("-m") + 2:]]
        else:
            script = next((w for w in rest if w.endswith(".py")), None)
            words = ["python", *rest[rest.index(script):]] if script else []
    if words[:3] == ["python", "-m", "nanoresume"]:
        words = ["nanoresume", *words[3:]]
    if words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
        name = Path(words[1]).stem
        tool = {"train": "train", "sample": "sample", "evaluate": "evaluate", "ckpt": "ckpt"}.get(name)
        return (tool, words[2:]) if tool else ("script:" + words[1], words[2:])
    if words[:1] == ["nanoresume"] and len(words) > 1:
        return words[1], words[2:]
    return None


def commands() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for line in shell_lines(document.read_text()):
            if tool_command(line) is not None:
                found.append((f"{document.relative_to(REPO)}: {line}", line))
    return found


def check_train(argv: list[str]) -> None:
    try:
        typed = vars(_typed_only(build_parser()).parse_args(argv))
    except SystemExit as e:
        if e.code == 0:
            return  # --help, --version
        raise AssertionError(f"does not parse (exit {e.code})") from None
    if "config" in typed:
        return  # the values come from a file the document only names
    # the files a document names (--data, --resume PATH) are the reader's, not this checkout's
    values = {name: value for name, value in typed.items() if name not in COMMAND_OPTIONS + ("data", "resume")}
    resolve_config(dataclasses.replace(TrainConfig(), **values))


def check_tool(tool: str, argv: list[str]) -> None:
    if tool == "train":
        return check_train(argv)
    if tool.startswith("script:"):
        script = REPO / tool.removeprefix("script:")
        assert script.is_file(), f"{script} does not exist"
        source = script.read_text()
        for word in argv:
            if word.startswith("--"):
                assert f'"{word.split("=")[0]}"' in source, f"{script.name} has no flag {word}"
        return
    if tool == "self-test":
        assert (REPO / argv[0]).is_file(), f"{argv[0]} does not exist"
        return
    from nanoresume.tools import ckpt, evaluation, sampling

    parser = {"sample": sampling, "evaluate": evaluation, "ckpt": ckpt}[tool].build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"does not parse (exit {e.code})") from None


@pytest.mark.parametrize("where, line", commands(), ids=[where for where, _ in commands()])
def test_every_documented_command_parses_with_todays_flags(where: str, line: str) -> None:
    tool, argv = tool_command(line)
    assert tool in ("train", "sample", "evaluate", "ckpt", "self-test") or tool.startswith("script:"), where
    check_tool(tool, argv)


def test_the_documents_show_the_main_commands():
    lines = {line for _, line in commands()}
    for command in ("nanoresume train", "nanoresume train --resume auto", "nanoresume ckpt list out"):
        assert any(line.split("#")[0].strip() == command for line in lines), command


def test_a_command_with_an_unknown_flag_is_caught():
    with pytest.raises(AssertionError, match="does not parse"):
        check_train(["--max-stepz", "5"])
    with pytest.raises(Exception, match="--batch-size 0"):
        check_train(["--batch-size", "0"])


def test_ci_runs_exactly_the_readmes_install_lint_and_test_commands():
    readme = shell_lines((REPO / "README.md").read_text())
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    install = next(line for line in ci if line.startswith("pip install"))
    assert install.replace(" --quiet", "") in readme
    assert "ruff check ." in ci and "pytest" in ci
    readme_commands = {" ".join(shlex.split(line, comments=True)) for line in readme}
    assert {"ruff check .", "pytest"} <= readme_commands


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings: ``## DDP or FSDP`` -> ``ddp-or-fsdp``."""
    headings = re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_in_the_readme_and_docs_exists():
    for document in DOCUMENTS:
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)]*))?\)", document.read_text()):
            path = (document.parent / target).resolve() if target else document
            assert path.exists(), f"{document.relative_to(REPO)} links {target}, which does not exist"
            if anchor:
                assert anchor in anchors(path.read_text()), f"{document.relative_to(REPO)} links #{anchor} of {target}"


def test_the_readme_stays_a_guide():
    readme = (REPO / "README.md").read_text()
    assert readme.count("\n") <= 450, "the README grows past a guide; move the mechanism into docs/"
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    order = ["## Set-up", "## The first run", "## Stop and resume", "## Use the model", "## Your own data",
             "## Notebooks and Colab", "## More processes", "## Python API", "## Troubleshooting and exit codes"]
    assert [h for h in headings if h in order] == order


def test_troubleshooting_names_every_exit_code_a_run_uses():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Troubleshooting and exit codes"):]
    for code in ("0", "1", "2", "75", "129", "130", "138", "143", "128 + N", "137", "141"):
        cell = rf"\| ({re.escape(code)}|[\d, ]*\b{code}\b[\d, ]*) \|"
        assert re.search(cell, table), f"exit code {code} is not explained"

