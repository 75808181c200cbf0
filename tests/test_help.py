"""`--help` of every command line: the whole description, each option explained, its default said once."""

from __future__ import annotations

import importlib

import pytest

from pipeline.cli import STAGES

# (module whose main() takes argv, arguments before --help)
COMMANDS = [("pipeline.cli", [stage]) for stage in STAGES] + [
    ("train.__main__", []), ("train.sample", []), ("train.doctor", []),
    *[(f"benchmarks.{name}", []) for name in ("bench_extract", "bench_tokenize", "bench_pack", "bench_loader",
                                              "bench_train", "bench_memory", "bench_scaling", "bench_linear", "bench_sample", "demo",
                                              "synthetic_corpus")],
    ("train.export", []), ("train.evaluation", []),
]


def help_text(module_name: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module_name).main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """Each option's invocation (`--data-dir DATA_DIR`) -> its help text, wrapped lines joined."""
    entries: list[str] = []
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif line.startswith("   ") and entries:
            entries[-1] += "  " + line.strip()  # two spaces: where the help starts on the next line
    return dict(entry.partition("  ")[::2] for entry in entries)


@pytest.mark.parametrize("module_name, argv", COMMANDS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_each_option_is_explained_with_its_default_once(module_name, argv, capsys):
    text = help_text(module_name, argv, capsys)
    entries = option_entries(text)
    assert len(entries) > 1
    for invocation, help in entries.items():
        assert help.strip(), f"{invocation} has no help"
        assert help.count("(default:") <= 1, f"{invocation}: {help}"
        assert "(default: None)" not in help and "(default: False)" not in help, f"{invocation}: {help}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_shows_the_whole_module_docstring(stage, capsys):
    text = help_text("pipeline.cli", [stage], capsys)
    doc = importlib.import_module(STAGES[stage]).__doc__.strip()
    assert doc in text  # line breaks kept, nothing cut mid-sentence


def test_option_entries_catches_a_default_printed_twice():
    text = ("usage: x\n\noptions:\n  --data-dir DATA_DIR   root (default: data)\n"
            "                        (default: data)\n  --manifests MANIFESTS\n                        folder\n")
    entries = option_entries(text)
    assert entries["--data-dir DATA_DIR"].count("(default:") == 2
    assert entries["--manifests MANIFESTS"].strip() == "folder"
