"""Every example the CLI shows is a valid command: each `dsarl ...` line of `dsarl --help`, of every
`dsarl COMMAND --help` and of the cli module docstring parses, and the config it names loads (with its
overrides) into that stage's schema."""
import shlex

import pytest

from dsarl.launch import cli
from dsarl.launch.config import load_config
from dsarl.launch.stage_config import STAGE_SCHEMAS, stage_schema


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def example_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("dsarl ")]


def check_example(line: str) -> None:
    args = cli.parse_args(shlex.split(line)[1:])
    stage = args.stage if args.command in ("submit", "config") else args.command
    config = getattr(args, "config", None)
    if stage in STAGE_SCHEMAS and config is not None:
        load_config(stage_schema(stage), config, getattr(args, "overrides", []))


def test_every_help_example_parses_and_its_config_loads(capsys):
    examples = {"docstring": example_lines(cli.__doc__), "dsarl --help": example_lines(help_text(["--help"], capsys))}
    for name in cli.COMMANDS:
        examples[f"dsarl {name} --help"] = example_lines(help_text([name, "--help"], capsys))
    for where, lines in examples.items():
        assert lines, f"{where} shows no example"
        for line in lines:
            try:
                check_example(line)
            except SystemExit as e:  # argparse's exit on a bad command line
                pytest.fail(f"{where}: {line!r} does not parse (exit {e.code}): {capsys.readouterr().err}")
    every_command = {shlex.split(line)[1] for lines in examples.values() for line in lines}
    assert every_command == set(cli.COMMANDS)
