"""`python scripts/run_ceag.py --help`: short, grouped, printed without importing torch, and showing the defaults
the script uses, read from the real parser (`scripts/run_ceag_help.json`, kept in step here)."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import cli_help

run_ceag = pytest.importorskip("scripts.run_ceag")

# Flags whose help states its own default: (default: <the value used> <what it depends on>).
SELF_DESCRIBED = {"image_size"}


def flag_blocks(text: str) -> dict[str, str]:
    """Each `--flag`'s entry in a help text, whitespace-normalised."""
    blocks = {}
    for chunk in re.split(r"\n(?=  -)", text):
        match = re.match(r"\s+(?:-h, )?--(\w+)", chunk)
        if match:
            blocks[match.group(1)] = " ".join(chunk.split())
    return blocks


def defaults_used() -> tuple:
    return run_ceag.parse_arguments(run_ceag.build_parser(), [])


def test_short_help_is_grouped_short_and_imports_no_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['run_ceag.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / 'run_ceag.py')!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None)\n"
        "print('IMPORTED', [m for m in ('torch', 'transformers', 'datasets', 'hf_ceag') if m in sys.modules])\n"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    text, imported = done.stdout.rsplit("IMPORTED", 1)
    assert imported.strip() == "[]"  # it took 10-20 s when it built the full parser first
    assert elapsed < 5, elapsed
    lines = text.splitlines()
    assert len(lines) <= 152, len(lines)  # 80 columns; --help_all prints the ~700 lines of every flag
    assert any("--group_columns" in line for line in lines[:15])
    titles = [line[:-1] for line in lines if re.fullmatch(r"[a-z][\w :-]*:", line)]
    assert titles == [*cli_help.HELP_GROUPS, "help"]
    assert "--help_all" in text and "--optim_args" not in text.replace("optim_args=", "")


def test_the_snapshot_is_the_real_parsers():
    """The short help's texts and defaults are those of the parser `main` uses: a changed flag, help text or
    recipe default fails here until the snapshot is rewritten."""
    with open(cli_help.SNAPSHOT) as f:
        saved = json.load(f)
    assert saved == cli_help.snapshot_of(run_ceag), "rewrite it: python scripts/cli_help.py"


def test_every_flag_shows_once_the_default_the_script_uses():
    text = cli_help.short_help("run_ceag.py")
    blocks = flag_blocks(text)
    script, config = defaults_used()
    own = [f.name for f in dataclasses.fields(run_ceag.ScriptArguments)]
    own += [
        f.name for f in dataclasses.fields(run_ceag.CEAGConfig) if f.name in run_ceag.CEAGConfig.__annotations__
    ]
    assert len(own) > 30 and not [name for name in own if name not in blocks]
    for name, block in blocks.items():
        if name in ("help", "help_all"):
            continue
        assert block.lower().count("default") == 1, block  # one default per flag
        shown = re.search(r"\(default: (.*?)\)", block).group(1)
        used = script.methods if name == "mitigation" else getattr(script, name, getattr(config, name, None))
        if name in ("methods", "mitigation"):  # shown by the names reports and folders use (nft, ceag, el)
            used = [run_ceag.METHOD_FOLDERS[m] for m in used]
        expected = cli_help.shown(used)
        assert shown == expected or (name in SELF_DESCRIBED and shown.startswith(f"{expected} ")), (name, shown)
        assert "issue" not in block.lower()
    for setting in cli_help.snapshot_of(run_ceag)["also_set"].split(", "):  # the recipe's other settings
        name, value = setting.split("=", 1)
        used = getattr(config, name)
        assert value == ("none" if name == "report_to" and used == [] else cli_help.shown(used)), setting


def test_the_choices_of_every_own_flag_are_named_in_the_short_help():
    own = [f.name for f in dataclasses.fields(run_ceag.ScriptArguments)]
    own += [
        f.name for f in dataclasses.fields(run_ceag.CEAGConfig) if f.name in run_ceag.CEAGConfig.__annotations__
    ]
    blocks = flag_blocks(cli_help.short_help("run_ceag.py"))
    for action in run_ceag.build_parser()._actions:
        if action.choices and action.dest in own:
            missing = [c for c in action.choices if str(c) not in blocks[action.dest]]
            assert not missing, (action.dest, missing)


def test_no_help_text_or_docstring_names_an_issue_number():
    """What and why, as the code stands: no "issue 13" in the help a user reads or in the code's own text."""
    files = [*(ROOT / "hf_ceag").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    found = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in files
             for m in re.finditer(r"(?i)\bissues?\s*#?\d+", path.read_text())]  # fmt: skip
    assert not found
    for action in run_ceag.build_parser()._actions:
        assert not re.search(r"(?i)\bissues?\s*#?\d+", action.help or ""), action.dest
