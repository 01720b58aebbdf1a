"""Every command line the README and the `--help` texts show runs as written.

Command lines are the lines of the README's ```bash blocks, its inline `pipeline ...`
spans that name an example spec (or need none), and the `Example:` lines of every
`--help`. They run in order, in a copy of the repository's `pipelines/` (so their output
lands there), each expected to exit 0. The few that install things or run a whole suite
are run as written by the test named beside them instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import click

from runner.cli import cli
from tests.conftest import BIN

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Installing this project, or running its own tests: the environment running this test is
# that install, and CI runs the suite as written (.ci/run).
THIS_INSTALL = {'python -m pip install -e .', 'python -m pip install -e ".[test]"', "python -m pytest -q",
                'python -m pytest -q -m "not slow"'}
# Lines run as written by another test, which also installs what they install.
ELSEWHERE = {
    "pipeline new-plugin my-source --source": "tests/test_new_plugin.py",
    'pip install -e "./my-source[test]" && (cd my-source && python -m pytest -q)': "tests/test_new_plugin.py",
    "pipeline run my-source/example.yaml --once": "tests/test_new_plugin.py",
    '(for p in plugins/*/; do python -m pip install -e "$p[test]" && (cd "$p" && python -m pytest -q) || exit 1; done)':
        "tests/test_example_plugins.py",
}
# Spec-less commands an inline span may show whole.
NO_SPEC = ("pipeline connectors list", "pipeline transforms list", "pipeline plugins")
_PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b|[\[\]|<>…]|\.\.\.")


def readme_lines() -> list[str]:
    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                lines.append(line)
    for span in re.findall(r"`(pipeline [^`]+)`", text):
        if _PLACEHOLDER.search(span):
            continue
        if "pipelines/" in span or span in NO_SPEC:
            lines.append(span)
    return lines


def help_lines() -> list[str]:
    lines = []

    def walk(command: click.Command, path: list[str]) -> None:
        for line in (command.help or "").splitlines():
            line = line.strip()
            if line.startswith(("pipeline ", "pip ")):
                lines.append(line)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(cli, [])
    return lines


def parts(line: str) -> list[str]:
    """The commands of a line joined by &&, minus installing this project or running its tests."""
    return [p.strip() for p in line.split("&&") if p.strip() not in THIS_INSTALL]


def test_the_documents_show_command_lines_to_check() -> None:
    readme, helps = readme_lines(), help_lines()
    assert "python -m pip install -e . && pipeline run pipelines/activity-tracking.yaml --once" in readme
    assert "pipeline consume activity-dlq --from-beginning pipelines/activity-tracking.yaml" in readme
    assert "pipeline validate pipelines/jsonl-roundtrip.yaml" in helps
    # What is run elsewhere is still what the README says.
    assert set(ELSEWHERE) <= set(readme) | set(helps), set(ELSEWHERE) - set(readme) - set(helps)


def test_every_command_line_of_the_readme_and_the_help_texts_runs_as_written(tmp_path: Path) -> None:
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines",
                    ignore=shutil.ignore_patterns("out", ".pipeline", "__pycache__"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("PIPELINE_SPEC", "PIPELINE_STATE", "OUT_DIR", "PIPELINE_BROKER"):
        env.pop(name, None)
    ran = []
    for line in readme_lines() + help_lines():
        if line in ELSEWHERE:
            continue
        for command in parts(line):
            result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=180, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stderr[-3000:]}"
            assert "Traceback" not in result.stderr, f"`{command}`:\n{result.stderr[-3000:]}"
            ran.append(command)
    assert len(ran) >= 10, ran
