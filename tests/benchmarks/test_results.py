"""The results pages of the benchmark tools (``benchmarks/_results.py``)."""

import importlib.util
import sys
from pathlib import Path

# benchmarks/ is not an installed package: load the module from its file
_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "_results.py"
_spec = importlib.util.spec_from_file_location("_results", _PATH)
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def test_a_rerun_replaces_its_own_section_and_keeps_the_others(tmp_path):
    page = tmp_path / "tool.md"
    results.write_section(page, "Tool", "What it measures.", "cpu: `python a`", "| 1 |")
    results.write_section(page, "Tool", "What it measures.", "gpu: `python a`", "| 2 |")
    results.write_section(page, "Tool", "Now explained better.", "cpu: `python a`", "| 3 |\n")
    assert results.read_sections(page) == {"cpu: `python a`": "| 3 |", "gpu: `python a`": "| 2 |"}
    assert page.read_text() == (
        "# Tool\n\nNow explained better.\n\n## cpu: `python a`\n\n| 3 |\n\n"
        "## gpu: `python a`\n\n| 2 |\n"
    )


def test_sub_headings_and_fenced_code_stay_inside_their_section(tmp_path):
    page = tmp_path / "tool.md"
    body = "### Quality\n\n```\n## not a heading\n```\n| 1 |"
    results.write_section(page, "Tool", "Intro.", "m: `python a`", body)
    results.write_section(page, "Tool", "Intro.", "m: `python b`", "| 2 |")
    assert results.read_sections(page) == {"m: `python a`": body, "m: `python b`": "| 2 |"}


def test_the_command_leaves_out_where_a_copy_goes(monkeypatch):
    argv = ["benchmarks/tool.py", "--out", "/somewhere", "--n", "4", "--out=/else", "--x", "a b"]
    monkeypatch.setattr(sys, "argv", argv)
    assert results.command() == "python benchmarks/tool.py --n 4 --x 'a b'"


def test_the_machine_is_named():
    assert results.machine().endswith(")")  # "<CPU model>, <n> CPUs (<vector unit>)"
    assert results.cpu_name()
