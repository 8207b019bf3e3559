"""The charnn command line: a thin click layer over the library modules.

Each command is declared in its own module beside the function that runs it (cli/train.py,
cli/sample.py, ...), and imported only when it is used. Every user-facing error is a
click.ClickException (exit 1) or click.BadParameter/UsageError (exit 2) with a one-line
message; data goes to stdout, progress and notices to stderr.
"""

from __future__ import annotations

import click

from .. import __version__
from .group import Group

# command name -> the module of this package that declares it as <name>_command
COMMANDS = {"train": "train", "sample": "sample", "score": "score", "gradcheck": "gradcheck", "plot": "plot",
            "info": "info", "export": "export", "serve": "serve"}


@click.group(cls=Group, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charnn")
def cli():
    """Recurrent neural network language models (RNN, LSTM, GRU) on text, written from
    scratch in NumPy (CuPy on a GPU).

    \b
      charnn train corpus.txt          train a model (saved under models/)
      charnn sample --temperature 0.8  generate text
      charnn score sentences.txt       log-probability and perplexity of each line
      charnn gradcheck                 check the hand-written gradients
      charnn plot models/run           loss curves as a PNG or SVG
      charnn info models/run           what a model file holds
      charnn export MODEL m.safetensors  the weights under PyTorch's names
      charnn serve                     the model over HTTP (OpenAI-style API, a page)
    """
