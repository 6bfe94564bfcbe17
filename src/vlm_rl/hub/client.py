"""The hub client: `push_folder` and `download` through `huggingface_hub`, with every hub failure
(HTTP 401/403/404/5xx, connection refused, timeout) translated into a `HubError` that says what
failed, for which repo and endpoint, and what to do. The token is handed to `huggingface_hub`
only: never logged, never written into the card or any pushed file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx  # httpx2 on huggingface_hub 2.x, httpx on 1.x

from vlm_rl.errors import VlmRlError
from vlm_rl.hub.cards import write_model_card

logger = logging.getLogger(__name__)


class HubError(VlmRlError, RuntimeError):
    """A hub operation failed; the message names the repo, the endpoint and what to do next."""


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    card: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> str:
    """Upload `folder` to the model repo `repo_id`; returns the commit URL (it ends with the commit oid).

    Creates the repo if needed (`private` applies only then) and the branch `revision` if given
    and missing. `card` holds `write_model_card`'s keyword arguments (all but folder and
    repo_id); the card is written into a temporary copy of the folder, so the run folder is
    never modified. `extra_files` maps names in the repo to files outside `folder` that go with it
    (a run's report.html), copied into that temporary copy too.

    Args:
        token: defaults to $HF_TOKEN, then the login of `hf auth login`.
        endpoint: a self-hosted hub; defaults to $HF_ENDPOINT, then https://huggingface.co.

    Raises:
        HubError: the hub refused or could not be reached; the original error is chained.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: nothing to push to {repo_id}")
    token = _resolve_token(token)
    endpoint = _resolve_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    logger.info("pushing %s to %s at %s (revision %s)", folder, repo_id, endpoint, revision or "main")
    with tempfile.TemporaryDirectory(prefix="vlm_rl-push-") as staging_root:
        upload_folder = folder
        if card is not None or extra_files:
            upload_folder = Path(staging_root) / folder.name
            shutil.copytree(
                folder, upload_folder, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".git")
            )
            for name, path in (extra_files or {}).items():
                target = upload_folder / name
                target.unlink(missing_ok=True)  # never write through a hard link into the run folder
                shutil.copyfile(path, target)
            if card is not None:
                write_model_card(upload_folder, repo_id=repo_id, **card)
        if token:
            _refuse_if_token_inside(upload_folder, token, repo_id, folder)
        step = "creating the repo"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != constants.DEFAULT_REVISION:
                step = f"creating the branch {revision!r} in"
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            step = "uploading to"
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=upload_folder,
                revision=revision,
                commit_message=commit_message or f"Upload {folder.name} with vlm_rl",
            )
        except Exception as err:
            hub_error = _as_hub_error(err, step, repo_id, endpoint, token, folder=folder, revision=revision)
            if hub_error is None:
                raise
            raise hub_error from err
    logger.info("pushed %s to %s", folder, commit.commit_url)
    return commit.commit_url


def download(
    repo_id: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> Path:
    """Download the model repo `repo_id` (at `revision`) into the hub cache; returns the snapshot folder.

    Token and endpoint resolve as in `push_folder`. Raises HubError (original error chained).
    """
    token = _resolve_token(token)
    endpoint = _resolve_endpoint(endpoint)
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint))
    except Exception as err:
        hub_error = _as_hub_error(
            err, "downloading", repo_id, endpoint, token, folder=None, revision=revision
        )
        if hub_error is None:
            raise
        raise hub_error from err


def _resolve_token(token: str | None) -> str | None:
    """Explicit token, else $HF_TOKEN, else the saved login (None: anonymous)."""
    return token or os.environ.get("HF_TOKEN") or get_token()


def _resolve_endpoint(endpoint: str | None) -> str:
    # Read $HF_ENDPOINT now: huggingface_hub reads it once, at import.
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link (instant, no extra disk) when on the same filesystem, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _refuse_if_token_inside(upload_folder: Path, token: str, repo_id: str, folder: Path) -> None:
    """Raise before uploading if any file contains the token (e.g. saved training args with hub_token)."""
    needle = token.encode()
    leaking = [
        path.relative_to(upload_folder).as_posix()
        for path in sorted(upload_folder.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(upload_folder).parts and _contains(path, needle)
    ]
    if leaking:
        raise HubError(
            f"refusing to push {folder} to {repo_id}: {', '.join(leaking)} contain(s) your Hugging Face token. "
            "Remove the token from those files (or exclude them) and push again; nothing was uploaded."
        )


def _contains(path: Path, needle: bytes, chunk_size: int = 1 << 20) -> bool:
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def _network_cause(err: BaseException) -> BaseException | None:
    """The HTTP / transport error behind `err` (huggingface_hub wraps some, e.g. in LocalEntryNotFoundError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (HfHubHTTPError, httpx.TransportError, OfflineModeIsEnabled)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _as_hub_error(
    err: Exception,
    step: str,
    repo_id: str,
    endpoint: str,
    token: str | None,
    *,
    folder: Path | None,
    revision: str | None,
) -> HubError | None:
    """A HubError explaining `err`; None when `err` is not a hub failure (a bug, to be seen as is)."""
    cause = _network_cause(err)
    if cause is None:
        return None
    namespace = repo_id.split("/")[0]
    if isinstance(cause, OfflineModeIsEnabled):
        reason, advice = "offline mode is on (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE to reach the hub"
    elif isinstance(cause, httpx.TimeoutException):
        reason, advice = (
            f"the hub did not answer in time ({type(cause).__name__})",
            "check the network and retry",
        )
    elif isinstance(cause, httpx.TransportError):
        reason = f"could not connect ({type(cause).__name__}: {cause})"
        advice = "check the network, a proxy, and that the endpoint (HF_ENDPOINT or endpoint=) is right"
    else:
        status = cause.response.status_code if cause.response is not None else None
        detail = f": {cause.server_message.strip()}" if cause.server_message else ""
        if status == 401:
            reason = f"authentication failed (401{detail})" if token else "no token was sent (401)"
            advice = "check HF_TOKEN / `hf auth login`, or pass token= (pushing needs write access;"
            advice += " a private or missing repo also answers 401 to an unauthorised token)"
        elif status == 403:
            reason = f"permission denied (403{detail})"
            access = "write access" if folder is not None else "access (a gated repo: request it on its page)"
            advice = f"use a token with {access} to {namespace!r} ({endpoint}/settings/tokens)"
        elif status == 404:
            reason = f"not found (404{detail})"
            advice = "check the repo id" + (f", the revision {revision!r}" if revision else "")
            advice += ", and that your token can see the repo"
        elif status is not None and status >= 500:
            reason, advice = f"the hub had a server error ({status}{detail})", "retry later"
        else:
            reason, advice = f"the hub refused the request ({status}{detail})", "see the chained error"
    message = f"{step} {repo_id!r} at {endpoint} failed: {reason}. What to do: {advice}."
    if folder is not None:
        message += f" The local folder {folder} was left intact."
    if token and len(token) >= 8:  # never echo a token, even if a server message quoted it
        message = message.replace(token, "<token>")
    return HubError(message)
