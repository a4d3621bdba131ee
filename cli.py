"""``disco-cli``: the command line of the DisCo data pipeline and trainer. The commands live in
``commands/``, one module per group; this module assembles them into one typer app."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings

import typer

from disco.commands import convert_official, convert_weights, demo, evaluate, generate, preprocess, report, train
from disco.commands.terminal import OneLineErrors

app = typer.Typer(
    name="disco-cli",
    cls=OneLineErrors,
    help="Preprocess dance videos and photos into DisCo training triplets (foreground, background, pose), and train DisCo on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# In the order `disco-cli --help` lists them: the data, training, generation, scoring, the tour.
for command, name in (
    (preprocess.preprocess, "preprocess"),
    (preprocess.filter_humans, "filter-humans"),
    (report.doctor, "doctor"),
    (report.inspect, "inspect"),
    (convert_weights.convert_weights, "convert-weights"),
    (convert_official.convert_official, "convert-official"),
    (train.model_info, "model-info"),
    (generate.generate, "generate"),
    (generate.export, "export"),
    (evaluate.evaluate, "evaluate"),
    (train.train, "train"),
    (demo.demo, "demo"),
):
    app.command(name)(command)


def main() -> None:
    # MediaPipe (the in-process annotators of generate / demo) logs its start-up through glog and
    # TensorFlow Lite; nothing in it is for a user.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype")
    try:
        app(prog_name="disco-cli")
    finally:
        # The command's work is over, its results written and said. A SIGTERM from here on (`ray job
        # stop` as the job ends) ran Ray's handler (sys.exit) inside Ray's shutdown at exit: a
        # traceback after the summary, and exit code 15 for a finished run.
        with contextlib.suppress(ValueError):  # (not the main thread)
            # A handler that does nothing, not SIG_IGN: a process started now would inherit that.
            signal.signal(signal.SIGTERM, lambda signum, frame: None)


if __name__ == "__main__":
    sys.exit(main())
