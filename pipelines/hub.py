"""The Hugging Face Hub through huggingface_hub: model ids resolved through its cache, and pushes.

Loading. `download` returns a snapshot folder of huggingface_hub's cache
(HF_HUB_CACHE, by default HF_HOME/hub: models--user--name/snapshots/<commit>/...), fetching what
is missing; with HF_HUB_OFFLINE=1 it reads the cache only (refs/<branch> names the commit) and
says clearly when the model is not there.

Pushing. A pipeline or a component is saved to a temporary folder exactly as save_pretrained
writes it (safetensors only), a model card (README.md, see pipelines.model_card) is added, and
everything goes up as one commit: HfApi.create_repo(exist_ok=True), then create_commit, so a
repo never holds half a model. A local folder is pushed as it is and never modified. The token
is the argument, or when None wherever huggingface_hub finds one (HF_TOKEN, the saved login);
it is never logged, printed or written.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from pipelines import model_card

logger = logging.getLogger(__name__)

# what a pipeline folder needs; other files in a repo (e.g. .ckpt, .bin) are not fetched
ALLOW_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "*/*.json",
    "*/*.txt",
    "*.md",
]
# precision / EMA variants beside the main weights: the loader reads only the main files
IGNORE_PATTERNS = ["*.fp16.*", "*.bf16.*", "*.non_ema.*"]
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
REPO_ID = re.compile(r"([\w.-]+/)?[\w.-]+")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


# ---- loading -----------------------------------------------------------------------------------


def download(repo_id: str, revision: str | None = None) -> Path:
    """A Hub model repo's snapshot folder, from huggingface_hub's cache (offline when cached)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model {repo_id!r} (revision {revision or 'main'})"
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
            )
        )
    except IncompleteSnapshotError as err:
        raise FileNotFoundError(
            f"{where}: its copy in the local cache is incomplete (an "
            "interrupted download?) and the Hub cannot be reached; run once "
            "with network access to complete it"
        ) from err
    except LocalEntryNotFoundError as err:
        # huggingface_hub read HF_HUB_OFFLINE when it was imported: ask it, not os.environ
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache; unset HF_HUB_OFFLINE to "
            "download it once"
            if constants.HF_HUB_OFFLINE
            else "it could not be fetched and is not in the local cache"
        )
        raise FileNotFoundError(f"{where}: {hint} ({constants.HF_HUB_CACHE})") from err
    except GatedRepoError as err:
        raise FileNotFoundError(
            f"{where} is gated: accept its terms on the Hub, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{where}: no such model on the Hub, or it is private (log in "
            "with `hf auth login` or set HF_TOKEN)"
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{where}: the repo has no such branch, tag or commit") from err


# ---- pushing -----------------------------------------------------------------------------------


class PushError(RuntimeError):
    """A push to the Hub failed; nothing local was changed."""


def push_to_hub(
    obj,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    license: str = model_card.DEFAULT_LICENSE,
    tags=(),
) -> str:
    """Upload a pipeline, a component, or a saved folder / LoRA file to the Hub; the commit URL.

    Args:
        obj: a DiffusionPipeline; a UNet, AutoencoderKL or text encoder (ClipTextEncoder,
            T5TextEncoder); or a path: a saved model folder, or LoRA weights (a .safetensors
            file or a folder of them).
        repo_id: "user/name" (or "name" in the token owner's namespace); created if missing.
        private: visibility of a repo this call creates (None: the Hub's default); an
            existing repo keeps its visibility.
        token: a Hub token; None uses HF_TOKEN or the saved login.
        revision: the branch to commit to (created from main if missing); None: main.
        commit_message: the commit's summary.
        base_model, license, tags: for the model card, when the push writes one.
    """
    if isinstance(obj, (str, os.PathLike)):
        return push_folder(
            obj,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            base_model=base_model,
            license=license,
            tags=tags,
        )
    from pipelines.pipeline import DiffusionPipeline

    _check_push_args(repo_id, revision)
    _check_online()  # before the save, which can take a while for a large model
    with tempfile.TemporaryDirectory(prefix="ldm-push-") as tmp:
        if isinstance(obj, DiffusionPipeline):
            obj.save_pretrained(tmp)
        else:
            save_component(obj, Path(tmp))
        return push_folder(
            tmp,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            base_model=base_model,
            license=license,
            tags=tags,
        )


def save_component(module, folder: Path) -> str:
    """Save one component in its diffusers / transformers layout; returns its model-card kind."""
    from autoencoder import AutoencoderKL
    from ldm.unet import UNet
    from pipelines.loading import save_module
    from text_encoder import TextEncoder

    if isinstance(module, UNet):
        save_module(folder, "UNet2DConditionModel", module.config.to_diffusers(), module)
        return "unet"
    if isinstance(module, AutoencoderKL):
        save_module(folder, "AutoencoderKL", module.config.to_diffusers(), module)
        return "vae"
    if isinstance(module, TextEncoder) and hasattr(module, "save_pretrained"):
        module.save_pretrained(
            folder, subfolder_model="text_encoder", subfolder_tokenizer="tokenizer"
        )
        return "text_encoder"
    raise ValueError(
        f"obj: cannot push a {type(module).__name__}; allowed: a DiffusionPipeline, "
        "UNet, AutoencoderKL, ClipTextEncoder, T5TextEncoder, or a path to a saved "
        "folder or .safetensors file"
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    license: str = model_card.DEFAULT_LICENSE,
    tags=(),
) -> str:
    """Upload a saved model folder (or one LoRA .safetensors file) as one commit; the commit URL.

    The folder's README.md is pushed as it is (a card from write_model_card(repo_id=None) gets
    the repo id filled in); without one, a model card is generated for the upload. The local
    folder is only read. Arguments as for push_to_hub.
    """
    _check_push_args(repo_id, revision)
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist")
    kind = model_card.detect_kind(folder)
    files = files_to_push(folder)
    card = _card_text(folder, kind, base_model, license, tags)  # refuses bad card input early
    _check_online()
    size = sum(p.stat().st_size for p in files.values())
    logger.info("pushing %s (%d files, %.1f MB) to %s", kind, len(files) + 1, size / 2**20, repo_id)
    return _commit(
        files,
        card,
        repo_id,
        private=private,
        token=token,
        revision=revision,
        message=commit_message or f"Upload {kind} with ldm-t2i",
    )


def files_to_push(folder: Path) -> dict[str, Path]:
    """{path in repo: local file} for a folder or one file; refuses pickles, needs safetensors."""
    if folder.is_file():
        files = {folder.name: folder}
    else:  # hidden files and folders (.git, .cache, ...) are never pushed
        files = {
            rel: folder / rel
            for rel in model_card.visible_files(folder)
            if rel != model_card.CARD_NAME
        }
    pickles = [rel for rel in files if Path(rel).suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"folder: {str(folder)!r} holds pickle weights "
            f"({', '.join(pickles[:4])}); pushes are safetensors only: convert "
            "them (ldm convert) or remove them"
        )
    if not any(rel.endswith(".safetensors") for rel in files):
        raise ValueError(f"folder: {str(folder)!r} holds no .safetensors weights to push")
    return files


def _card_text(folder: Path, kind: str, base_model, license, tags) -> str:
    """The folder's own README.md, else a generated card (repo id still a placeholder)."""
    existing = folder / model_card.CARD_NAME
    if folder.is_dir() and existing.is_file():
        return existing.read_text(encoding="utf-8")
    weight = folder.name if folder.is_file() else None
    return model_card.render_model_card(
        kind, base_model=base_model, license=license, tags=tags, weight_name=weight
    )


def _check_push_args(repo_id: str, revision: str | None) -> None:
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise ValueError(
            f"repo_id={repo_id!r}: expected 'user/name' (or 'name'), letters, digits, "
            "'-', '_' and '.'"
        )
    if revision is not None and (not revision.strip() or COMMIT_HASH.fullmatch(revision)):
        raise ValueError(
            f"revision={revision!r}: a push goes to a branch name (None: main), not "
            "to a commit hash"
        )


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise PushError(
            "pushing to the Hub needs the network, but HF_HUB_OFFLINE is set; unset "
            "it (or set HF_HUB_OFFLINE=0) to push"
        )


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: HTTP errors, and the HTTP client's transport errors."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError)
    try:
        import httpx2  # huggingface_hub 2.x's HTTP client
    except ImportError:
        return errors
    return (*errors, httpx2.HTTPError)


def _scrub(text: str, token: str | None) -> str:
    """Text with any token the push could have used replaced, should a server echo one."""
    from huggingface_hub import get_token

    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def _reason(err: BaseException) -> str:
    """One line on why a request failed: the Hub's status and message, else the error itself."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if not status:
        return " ".join(str(err).split())
    detail = getattr(err, "server_message", None) or getattr(response, "reason_phrase", "")
    request = f"{response.request.method} {response.request.url.path}"
    hint = (
        " (check that the token - --token, HF_TOKEN or the saved login - may write to it)"
        if status in (401, 403)
        else ""
    )
    return f"the Hub answered {status} to {request}: {' '.join(str(detail).split())}{hint}"


def _commit(
    files: dict[str, Path], card: str, repo_id: str, *, private, token, revision, message: str
) -> str:
    """create_repo(exist_ok) [+ create_branch] + one create_commit of files and the card."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    where = f"{repo_id!r} (revision {revision or 'main'})"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        card = model_card.fill_repo_id(card, repo_id)
        ops = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
            for rel, path in files.items()
        ]
        ops.append(
            CommitOperationAdd(
                path_in_repo=model_card.CARD_NAME, path_or_fileobj=card.encode("utf-8")
            )
        )
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    except _network_errors() as err:
        raise PushError(
            f"push to {where} failed: {_scrub(_reason(err), token)}. The local files "
            "were not changed."
        ) from err
    logger.info("pushed to %s", info.commit_url)
    return str(info.commit_url)
