"""The `ldm` command: a small dispatcher that loads only the subcommand it runs.

`ldm generate` must start fast and never import the training stack, so each subcommand lives in
its own layer and is imported only when named.
"""

import importlib
import os
import sys

# subcommand -> (module with a `main(argv) -> int`, one-line help)
COMMANDS = {
    "generate": ("pipelines.cli", "make images from a text prompt (default model, offline)"),
    "convert": (
        "pipelines.cli_convert",
        "convert between a diffusers folder and one .safetensors file",
    ),
    "push": ("pipelines.cli_push", "upload a saved model folder to the Hugging Face Hub"),
    "train": ("train.cli", "train or fine-tune a text-to-image model on captioned images"),
    "train-vae": ("train.cli_vae", "train the KL autoencoder from scratch"),
    "train-text": ("train.text_pretrain", "pretrain a small CLIP text encoder contrastively"),
    "train-default": ("train.default_model", "re-train the embedded default model from scratch"),
    "shapes": ("train.shapes", "write the synthetic captioned shapes dataset"),
    "evaluate": ("train.evaluate", "score images or a model on the shapes benchmark"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ldm COMMAND [options]   (ldm COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"ldm: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def run() -> None:
    """The `ldm` program: main(), then, after `generate`, an exit that skips Python's teardown.

    With torch loaded, the interpreter's shutdown (module teardown, garbage collection) takes
    ~0.5 s, a fifth of a whole `ldm generate`. By the time generate returns, its images are
    written and closed; the standard streams are flushed here, then the process ends at once.
    Other commands (training: trackers, data workers) exit the usual way.
    """
    code = main()
    if sys.argv[1:2] == ["generate"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
