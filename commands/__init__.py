"""The commands of ``disco-cli``, one module per group; ``cli.py`` assembles them into the app.

Each command turns its options into the config object of its stage and calls that stage; heavy
libraries are imported inside the command, so ``disco-cli --help`` starts fast."""
