"""`ldm push DIR REPO_ID`: upload a saved model folder (or LoRA weights) to the Hugging Face Hub.

DIR is what save_pretrained, `ldm train` or `ldm convert` wrote: a pipeline folder, a component
folder, or LoRA weights (a .safetensors file or a folder of them). It goes up as one commit with
a model card (the folder's README.md, or one written for the upload); DIR itself is only read.
The token is --token, else HF_TOKEN, else the saved login (`hf auth login`); it is never
printed. Prefer HF_TOKEN or the login: other local users can see a --token in the process list.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm push", description=__doc__.split("\n")[0])
    p.add_argument("folder", metavar="DIR", help="saved model folder, or a LoRA .safetensors file")
    p.add_argument("repo_id", metavar="REPO_ID", help="user/name (created if missing)")
    p.add_argument(
        "--private",
        action="store_true",
        help="create the repo private (an existing repo keeps its visibility)",
    )
    p.add_argument(
        "--revision",
        metavar="R",
        default=None,
        help="branch to commit to, created from main if missing (default: main)",
    )
    p.add_argument("--message", metavar="M", default=None, help="commit message")
    p.add_argument(
        "--token",
        metavar="T",
        default=None,
        help="Hub token (default: HF_TOKEN, else the saved login)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.hub import PushError, push_folder

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    hub_logger = logging.getLogger("pipelines.hub")
    hub_logger.addHandler(handler)
    hub_logger.setLevel(logging.INFO)
    try:
        url = push_folder(
            args.folder,
            args.repo_id,
            private=True if args.private else None,
            token=args.token,
            revision=args.revision,
            commit_message=args.message,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"ldm push: error: {err}", file=sys.stderr)
        return 2
    except PushError as err:
        print(f"ldm push: error: {err}", file=sys.stderr)
        return 1
    finally:
        hub_logger.removeHandler(handler)
    print(url)
    return 0
