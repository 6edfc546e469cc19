"""The commands of `python -m pruning`, one module per job: `apply` (apply and evaluate a pruning by
hand), `train` (train and the method registry's options), `runs` (list, stop, resume, delete, export).
Each module adds its subcommands to the parser (`add_commands`); `pruning.__main__` dispatches."""
