"""Every flag of every script, nested ones included, has help text (tyro takes it from the field's comment or
docstring; a flag without one shows only its default)."""
import argparse
import re
import warnings

import pytest
import tyro

import bench
import export
import plot
import sample
import train_causal
import train_rcm


def flags(parser, path=""):
    """(subcommand path, flag, help text less tyro's default/required note) of every option of a parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from flags(sub, f"{path} {name}")
        elif action.option_strings[:1] != ["-h"]:  # flags, and positional arguments
            text = re.sub(r"\s*\((default: .*|required|fixed to: .*)\)$", "", action.help or "", flags=re.S)
            yield path, (action.option_strings or [str(action.metavar or action.dest)])[0], text.strip()


def parser_of(cls, default=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # get_parser: the parser the CLI prints as --help
        return tyro.extras.get_parser(cls, default=default)


CLIS = {**{f"train_rcm.py {name}": (type(cfg), cfg) for name, (_, cfg) in train_rcm.PRESETS.items()},
        **{f"train_causal.py {name}": (type(cfg), cfg) for name, (_, cfg) in train_causal.PRESETS.items()},
        "sample.py": (sample.Config, None),
        **{f"bench.py {cls.__name__}": (cls, None) for cls in bench.BENCHES},
        **{f"export.py {cls.__name__}": (cls, None) for cls in (export.Diffusers, export.Lora)},
        "plot.py": (plot.Plot, None)}


@pytest.mark.parametrize("cli", CLIS)
def test_every_flag_has_help_text(cli):
    found = list(flags(parser_of(*CLIS[cli])))
    assert len(found) >= 2
    bare = [f"{path} {flag}".strip() for path, flag, text in found if not text]
    assert not bare, f"{cli}: flags without help text: {bare}"


def test_bench_busy_seconds_is_the_union_of_kernel_spans():
    """bench --profile's GPU idle share: kernels on two streams overlap; gaps between kernels are idle time."""
    assert bench.busy_seconds([(0, 2e6), (1e6, 3e6), (5e6, 6e6), (5.5e6, 5.8e6)]) == 4.0
    assert bench.busy_seconds([(3e6, 4e6), (0, 1e6)]) == 2.0
