"""Hub sharing without network.

Loading: a Hub id resolves through huggingface_hub's cache, which the test fills in its own layout
(models--user--name/{blobs,refs,snapshots}); with HF_HUB_OFFLINE=1 the requested revision loads
and generates, and a model that is not cached fails with a clear message.

Pushing: the real huggingface_hub client talks real HTTP to a small stand-in for the Hub's write
API on 127.0.0.1 (create repo, branch, validate-yaml, preupload, commit); the test checks the files
that arrive, their bytes and the model card. Test files are small, so the stand-in answers
"regular" upload mode and they travel inline (base64) in the commit. The token never appears in
logs, output, errors or the card.
"""

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("diffusers")

from huggingface_hub import ModelCard, constants  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny import SD_SCHEDULER, save_reference  # noqa: E402

from pipelines import TextToImagePipeline  # noqa: E402
from pipelines import model_card as mc  # noqa: E402
from pipelines.hub import PushError, download, push_folder, push_to_hub  # noqa: E402
from pipelines.loading import resolve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_testSECRETtoken0123456789abcdef"  # a made-up token; must never show up anywhere
COMMIT_MAIN = hashlib.sha1(b"main").hexdigest()
COMMIT_V2 = hashlib.sha1(b"v2").hexdigest()


# ---- a tiny model in two revisions, and a huggingface_hub cache holding them --------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Revision main: a tiny diffusers pipeline; v2: the same with another U-Net output layer."""
    main = save_reference(tmp_path_factory.mktemp("main"), "sd1", SD_SCHEDULER)
    v2 = tmp_path_factory.mktemp("v2") / "model"
    shutil.copytree(main, v2)
    unet_file = v2 / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet_file)
    state["conv_out.weight"] = -state["conv_out.weight"]
    save_file(state, unet_file, metadata={"format": "pt"})
    return Path(main), v2


def _put_snapshot(repo_dir: Path, commit: str, files: dict[str, Path]) -> None:
    """Files in huggingface_hub's cache layout: content-addressed blobs, symlinked snapshots."""
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + rel: folder / rel for rel in mc.visible_files(folder)}


@pytest.fixture(scope="module")
def hf_home(models, tmp_path_factory):
    """HF_HOME with user/tiny cached: refs/main -> main; refs/v2 -> v2 (+ main under variant/)."""
    main, v2 = models
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--user--tiny"
    _put_snapshot(repo, COMMIT_MAIN, _files(main))
    _put_snapshot(repo, COMMIT_V2, {**_files(v2), **_files(main, "variant/")})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    (repo / "refs" / "v2").write_text(COMMIT_V2)
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    """huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import: patch its constants."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub" / "models--user--tiny" / "snapshots"


def _generate(pipe) -> np.ndarray:
    pipe.progress = False
    return pipe(
        "a red circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def _conv_out(folder: Path) -> torch.Tensor:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.weight"]


def test_hub_id_loads_the_requested_revision_from_the_cache_offline(models, offline_cache):
    main, v2 = models
    assert download("user/tiny") == offline_cache / COMMIT_MAIN
    assert download("user/tiny", revision="v2") == offline_cache / COMMIT_V2
    assert resolve("user/tiny", revision=COMMIT_V2) == offline_cache / COMMIT_V2
    assert resolve("user/tiny", "v2", "unet") == offline_cache / COMMIT_V2 / "unet"
    expected = {"main": _conv_out(main), "v2": _conv_out(v2)}
    cases = [
        ({}, "main"),
        ({"revision": "main"}, "main"),
        ({"revision": "v2"}, "v2"),
        ({"revision": COMMIT_V2}, "v2"),
        ({"revision": "v2", "subfolder": "variant"}, "main"),
    ]
    images = {}
    for kwargs, which in cases:
        pipe = TextToImagePipeline.from_pretrained("user/tiny", **kwargs)
        torch.testing.assert_close(
            pipe.unet.conv_out.weight,
            expected[which],
            rtol=0,
            atol=0,
            msg=f"{kwargs} loaded the wrong weights",
        )
        if which not in images:  # each revision generates (the same code as a local folder)
            images[which] = _generate(pipe)
    assert np.isfinite(images["main"]).all() and images["main"].shape == (1, 16, 16, 3)
    assert np.abs(images["main"] - images["v2"]).max() > 1e-2  # the revisions differ


def test_uncached_model_or_revision_fails_clearly_offline(offline_cache):
    with pytest.raises(
        FileNotFoundError,
        match=r"'user/absent' \(revision main\): HF_HUB_OFFLINE "
        r"is set and it is not in the local cache",
    ):
        TextToImagePipeline.from_pretrained("user/absent")
    with pytest.raises(FileNotFoundError, match=r"'user/tiny' \(revision v3\).*not in the local"):
        download("user/tiny", revision="v3")
    with pytest.raises(FileNotFoundError, match="not a Hub id"):
        resolve("not a/hub id")


def test_environment_variables_point_huggingface_hub_at_the_cache(hf_home, tmp_path):
    """The real route, in a fresh process: HF_HOME and HF_HUB_OFFLINE set before import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    code = (
        "from pipelines.hub import download\n"
        "print(download('user/tiny', 'v2'))\n"
        "try:\n    download('user/absent')\nexcept FileNotFoundError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert Path(lines[0]) == hf_home / "hub" / "models--user--tiny" / "snapshots" / COMMIT_V2
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in lines[1]


# ---- a stand-in for the Hub's write API ----------------------------------------------------------

MAX_REQUESTS = 200  # bounds the serving loop, whatever happens
LIFETIME_S = 120


class FakeHub:
    """Answers the endpoints huggingface_hub's create_repo/create_branch/create_commit call."""

    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        # "commit" (any repo) or "user/name/commit": what answers 500. Not preupload: the client
        # retries that with back-off for half a minute.
        self.fail: set[str] = set()
        self.server = HTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.server.timeout = 0.1
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        deadline = time.monotonic() + LIFETIME_S
        while (
            not self._stop.is_set()
            and len(self.requests) < MAX_REQUESTS
            and time.monotonic() < deadline
        ):
            self.server.handle_request()
        self.server.server_close()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def answer(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        self.requests.append(
            {
                "method": method,
                "path": path,
                "headers": {k.lower(): v for k, v in headers.items()},
                "body": body,
            }
        )
        path = path.split("?")[0]
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/([^/]+)", path)
        if method != "POST" or m is None or m[1] not in self.repos:
            return 404, {"error": f"no route {method} {path}"}
        repo, endpoint, revision = m[1], m[2], unquote(m[3])
        if endpoint in self.fail or f"{repo}/{endpoint}" in self.fail:
            return 500, {"error": "simulated server failure"}
        if endpoint == "branch":
            self.repos[repo]["branches"].add(revision)
            return 200, {}
        if endpoint == "preupload":
            files = json.loads(body)["files"]
            return 200, {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                    for f in files
                ]
            }
        return self._commit(repo, revision, body)

    def _create(self, payload: dict) -> tuple[int, dict]:
        repo = f"{payload.get('organization') or 'me'}/{payload['name']}"
        url = f"{self.url}/{repo}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo] = {"visibility": payload.get("visibility"), "branches": {"main"}}
        return 200, {"url": url}

    def _commit(self, repo: str, revision: str, body: bytes) -> tuple[int, dict]:
        if revision not in self.repos[repo]["branches"]:
            return 404, {"error": f"Invalid rev id: {revision}"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = {}
        for line in lines[1:]:
            if line["key"] != "file":  # small test files all travel inline, as "regular" files
                return 400, {"error": f"unexpected commit operation {line['key']}"}
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append(
            {
                "repo": repo,
                "revision": revision,
                "files": files,
                "summary": lines[0]["value"]["summary"],
            }
        )
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}


class _Handler(BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold the server

    def _reply(self, method):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, payload = self.server.hub.answer(method, self.path, self.headers, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply("GET")

    def do_POST(self):
        self._reply("POST")

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running FakeHub that huggingface_hub talks to; no saved login, no HF_TOKEN."""
    fake = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield fake
    fake.stop()


def _card(data: bytes) -> tuple[dict, str]:
    card = ModelCard(data.decode())
    return card.data.to_dict(), card.text


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder, hidden ones too, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_pipeline_uploads_exactly_the_saved_folder_and_a_card(models, hub, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = TextToImagePipeline.from_pretrained(models[0])
    url = push_to_hub(pipe, "user/pushed", private=True, token=TOKEN, commit_message="first model")
    (commit,) = hub.commits
    assert url.startswith(f"{hub.url}/user/pushed/commit/")
    assert (commit["repo"], commit["revision"], commit["summary"]) == (
        "user/pushed",
        "main",
        "first model",
    )
    assert hub.repos["user/pushed"]["visibility"] == "private"
    pipe.save_pretrained(tmp_path / "saved")
    saved = _tree(tmp_path / "saved")
    assert set(commit["files"]) == set(saved) | {"README.md"}
    assert all(commit["files"][rel] == data for rel, data in saved.items())
    meta, text = _card(commit["files"]["README.md"])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "openrail++" and {"ldm-t2i", "text-to-image"} <= set(meta["tags"])
    assert 'TextToImagePipeline.from_pretrained("user/pushed")' in text
    assert 'StableDiffusionPipeline.from_pretrained("user/pushed")' in text
    # what arrived is a folder diffusers loads
    received = tmp_path / "received"
    for rel, data in commit["files"].items():
        (received / rel).parent.mkdir(parents=True, exist_ok=True)
        (received / rel).write_bytes(data)
    ref = StableDiffusionPipeline.from_pretrained(received, safety_checker=None)
    assert ref.unet.config.block_out_channels == list(pipe.unet.config.block_out_channels)
    auth = {r["headers"].get("authorization") for r in hub.requests}
    assert auth == {f"Bearer {TOKEN}"}  # every request carried the token


def test_push_components_each_in_its_own_layout(models, hub):
    pipe = TextToImagePipeline.from_pretrained(models[0])
    push_to_hub(pipe.unet, "user/unet")
    push_to_hub(pipe.vae, "user/vae", base_model="user/tiny")
    push_to_hub(pipe.text_encoder, "user/text")
    unet, vae, text = hub.commits
    assert set(unet["files"]) == {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}
    assert json.loads(unet["files"]["config.json"])["_class_name"] == "UNet2DConditionModel"
    assert json.loads(vae["files"]["config.json"])["_class_name"] == "AutoencoderKL"
    assert {
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
    } <= set(text["files"])
    meta, card = _card(unet["files"]["README.md"])
    assert "pipeline_tag" not in meta and "unet" in meta["tags"]
    assert 'UNet2DConditionModel.from_pretrained("user/unet")' in card
    meta, card = _card(vae["files"]["README.md"])
    assert (meta["base_model"], meta["base_model_relation"]) == ("user/tiny", "finetune")
    assert 'AutoencoderKL.from_pretrained("user/vae")' in card
    meta, card = _card(text["files"]["README.md"])
    assert meta["library_name"] == "transformers" and 'subfolder="text_encoder"' in card
    with pytest.raises(ValueError, match="obj: cannot push a Linear"):
        push_to_hub(torch.nn.Linear(2, 2), "user/linear")


def _lora_file(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "unet.down.lora_A.weight": torch.randn(4, 32, generator=g),
            "unet.down.lora_B.weight": torch.zeros(32, 4),
        },
        path,
    )
    return path


def test_push_lora_file_and_folder_with_a_card_written_before_the_repo_existed(hub, tmp_path):
    push_folder(
        _lora_file(tmp_path / "pytorch_lora_weights.safetensors"),
        "user/lora",
        base_model="user/tiny",
        revision="dev",
    )
    (single,) = hub.commits
    assert single["revision"] == "dev" and "dev" in hub.repos["user/lora"]["branches"]
    assert set(single["files"]) == {"pytorch_lora_weights.safetensors", "README.md"}
    assert (
        single["files"]["pytorch_lora_weights.safetensors"]
        == (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    )
    meta, card = _card(single["files"]["README.md"])
    assert (meta["base_model"], meta["base_model_relation"]) == ("user/tiny", "adapter")
    assert "lora" in meta["tags"]
    assert 'load_lora_weights("user/lora", weight_name="pytorch_lora_weights.safetensors")' in card

    folder = tmp_path / "lora"
    (folder / "samples").mkdir(parents=True)
    _lora_file(folder / "lora.safetensors")
    (folder / "samples" / "0.png").write_bytes(b"\x89PNG fake")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("never pushed")
    mc.write_model_card(folder, samples=[("samples/0.png", "a red circle")], tags=["shapes"])
    before = _tree(folder)
    push_folder(folder, "newrepo")  # no namespace: the Hub puts it in the token owner's
    push_folder(folder, "newrepo")  # again: the repo exists, that is fine
    first, again = hub.commits[1:]
    assert first["repo"] == again["repo"] == "me/newrepo"
    assert set(first["files"]) == {"lora.safetensors", "samples/0.png", "README.md"}
    meta, card = _card(first["files"]["README.md"])
    assert meta["widget"] == [{"text": "a red circle", "output": {"url": "samples/0.png"}}]
    assert "shapes" in meta["tags"] and mc.REPO_PLACEHOLDER not in card
    assert 'load_lora_weights("me/newrepo", weight_name="lora.safetensors")' in card
    assert _tree(folder) == before  # the local card still has the placeholder: only read


def test_failed_upload_is_a_clear_error_and_leaves_the_folder_intact(models, hub, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(models[0], folder)
    mc.write_model_card(folder, training={"steps": 10})
    before = _tree(folder)
    hub.fail = {"commit"}
    with pytest.raises(
        PushError,
        match=r"push to 'user/broken' \(revision main\) failed: the Hub "
        r"answered 500 to POST /api/models/user/broken/commit/main: simulated "
        r"server failure. The local files were not changed",
    ) as err:
        push_folder(folder, "user/broken", token=TOKEN)
    assert TOKEN not in str(err.value)
    assert _tree(folder) == before and hub.commits == []


def test_push_refuses_pickles_and_offline_mode_before_any_request(hub, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"pickle weights \(unet/diffusion_pytorch_model.bin\)"):
        push_folder(folder, "user/x")
    with pytest.raises(ValueError, match="repo_id='a/b/c'"):
        push_folder(folder, "a/b/c")
    with pytest.raises(ValueError, match="revision=.*not to a commit hash"):
        push_folder(folder, "user/x", revision=COMMIT_V2)
    (folder / "unet" / "diffusion_pytorch_model.bin").unlink()
    _lora_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        push_folder(folder, "user/x")
    assert hub.requests == []


def test_token_never_appears_in_logs_output_or_uploads(hub, tmp_path, caplog, capfd, monkeypatch):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    lora = _lora_file(tmp_path / "lora.safetensors")
    push_folder(lora, "user/secret", token=TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual place: huggingface_hub finds it
    push_folder(lora, "user/secret", revision="exp")
    hub.fail = {"commit"}
    with pytest.raises(PushError) as err:
        push_folder(lora, "user/secret")
    out, errs = capfd.readouterr()
    assert caplog.records, "the push should have logged something"
    seen = [caplog.text, out, errs, str(err.value)]
    seen += [data.decode("latin-1") for c in hub.commits for data in c["files"].values()]
    assert not [s for s in seen if TOKEN in s]
    assert len(hub.commits) == 2 and {r["headers"].get("authorization") for r in hub.requests} == {
        f"Bearer {TOKEN}"
    }


def test_cli_push_with_the_token_from_the_environment_or_the_option(hub, tmp_path):
    """`ldm push` in a fresh process, with HF_ENDPOINT read at import like a user's would be."""
    lora = _lora_file(tmp_path / "lora.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "home"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    hub.fail = {"user/broken/commit"}
    other = "hf_otherSECRET987654321"
    ok = ["push", str(lora), "user/cli", "--private", "--revision", "dev", "--message", "hi"]
    broken = ["push", str(lora), "user/broken", "--token", other]
    # two runs of the command in one process (the same main() `ldm` calls), to save a start-up
    code = (
        "import sys, ldm_cli\n"
        f"a = ldm_cli.main({ok!r})\n"
        "print('=====', flush=True); print('=====', file=sys.stderr, flush=True)\n"
        f"b = ldm_cli.main({broken!r})\n"
        "print('exit codes', a, b)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    out_ok, out_broken = run.stdout.split("=====\n")
    err_ok, err_broken = run.stderr.split("=====\n")
    assert out_broken.strip().endswith("exit codes 0 1"), run.stderr
    (commit,) = hub.commits
    assert out_ok.strip().startswith(f"{hub.url}/user/cli/commit/")
    assert (commit["repo"], commit["revision"], commit["summary"]) == ("user/cli", "dev", "hi")
    assert hub.repos["user/cli"]["visibility"] == "private"
    auth = [r["headers"].get("authorization") for r in hub.requests]
    assert f"Bearer {TOKEN}" in auth and auth[-1] == f"Bearer {other}"  # env, then --token
    assert "Traceback" not in err_broken
    assert re.search(
        r"ldm push: error: push to 'user/broken' \(revision main\) failed: the Hub "
        r"answered 500",
        err_broken,
    )
    assert TOKEN not in run.stdout + run.stderr and other not in run.stdout + run.stderr


# ---- model cards and the dataset hash ------------------------------------------------------------


def test_model_card_has_metadata_training_data_samples_and_usage(tmp_path):
    folder = tmp_path / "model"
    (folder / "samples").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "samples" / "a b.png").write_bytes(b"png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "0.txt").write_text("a red circle")
    path = mc.write_model_card(
        folder,
        base_model="user/base",
        training={"steps": 100, "lr": 1e-4, "ema": True},
        dataset={"size": 1, "content_hash": mc.dataset_hash(data), "description": "shapes"},
        samples=[("samples/a b.png", "a red | circle")],
        license="mit",
        tags=["shapes"],
    )
    meta, text = _card(path.read_bytes())
    assert meta["license"] == "mit" and meta["base_model"] == "user/base"
    assert meta["widget"] == [{"text": "a red | circle", "output": {"url": "samples/a b.png"}}]
    assert "| lr | 0.0001 |" in text and "| ema | true |" in text
    assert f"`sha256:{mc.dataset_hash(data)}`" in text and "- size: 1 examples" in text
    assert "![a red \\| circle](samples/a%20b.png)" in text
    assert f'from_pretrained("{mc.REPO_PLACEHOLDER}")' in text
    assert "Fine-tuned from [user/base](https://huggingface.co/user/base)." in text
    with pytest.raises(ValueError, match="license='wtf'; allowed: openrail\\+\\+"):
        mc.write_model_card(folder, license="wtf")
    with pytest.raises(FileNotFoundError, match="samples: image 'samples/none.png'"):
        mc.write_model_card(folder, samples=[("samples/none.png", "x")])
    with pytest.raises(ValueError, match="must be relative to the folder"):
        mc.write_model_card(folder, samples=[("../x.png", "x")])
    with pytest.raises(ValueError, match=r"dataset: unknown keys \['rows'\]"):
        mc.write_model_card(folder, dataset={"rows": 3})


def test_local_base_model_stays_out_of_the_metadata_and_cache_paths_name_their_repo(tmp_path):
    snapshot = tmp_path / "hub" / "models--user--base" / "snapshots" / COMMIT_MAIN
    assert mc.hub_id_of(snapshot) == "user/base"
    assert mc.hub_id_of(tmp_path) is None and mc.hub_id_of("user/base") == "user/base"
    meta = mc.card_metadata("pipeline", base_model=str(tmp_path / "my-model"))
    assert "base_model" not in meta  # the Hub refuses base_model values that are not repo ids


def test_dataset_hash_covers_names_and_bytes_but_not_hidden_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("ab")
    (tmp_path / "d" / "sub" / "b.txt").write_text("c")
    h = mc.dataset_hash(tmp_path / "d")
    assert h == mc.dataset_hash(tmp_path / "d") and len(h) == 64
    (tmp_path / "d" / ".DS_Store").write_text("x")
    assert mc.dataset_hash(tmp_path / "d") == h
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "sub" / "b.txt").write_text("bc")  # same bytes overall, other boundary
    assert mc.dataset_hash(tmp_path / "d") != h
    (tmp_path / "d" / "a.txt").write_text("ab")
    (tmp_path / "d" / "sub" / "b.txt").rename(tmp_path / "d" / "sub" / "c.txt")
    (tmp_path / "d" / "sub" / "c.txt").write_text("c")
    assert mc.dataset_hash(tmp_path / "d") != h  # renamed
    (tmp_path / "d" / "sub" / "c.txt").rename(tmp_path / "d" / "sub" / "b.txt")
    assert mc.dataset_hash(tmp_path / "d") == h
