"""`surgeon push`: validate a surgeon output folder, then publish it to the Hub in one commit.

Order of work: cheap checks (repo id, offline mode, a token), then the folder
is validated without sending anything (every header and the index re-checked,
every byte read and hashed), then the token is checked with the Hub, the repo
(and branch) created if needed, the model card written or updated, and every
file sent in ONE commit whose ``parent_commit`` is the branch head seen before
uploading. A retry after an ambiguous failure (lost response) therefore cannot
commit twice: the Hub refuses the stale parent (412) and surgeon checks
whether the first attempt already landed. The local folder is only read.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgeon import __version__
from surgeon.errors import CheckpointFormatError, CheckpointNotFoundError, HubError, PickleRefusedError, SurgeonError
from surgeon.io import hub, hub_errors
from surgeon.io.adapter import Adapter, is_adapter_folder
from surgeon.io.checkpoint import PICKLE_SUFFIXES, Checkpoint
from surgeon.io.hub import set_hub_defaults  # re-exported for the CLI
from surgeon.io.model_card import card_metadata, check_base_model, read_provenance, render_card
from surgeon.io.textfile import check_regular

__all__ = ["LocalFile", "PushReport", "preflight_push", "push_folder", "set_hub_defaults", "validate_folder"]
_READ_CHUNK = 16 << 20


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: path in the repo, local path, size and sha256 (hex) of what was read."""

    rel: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class PushReport:
    repo_id: str
    revision: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    created_repo: bool
    unchanged: bool  # the branch already held exactly these files: nothing was committed
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- local validation ------------------------------------------------------------------------

def validate_folder(folder: str | os.PathLike[str]) -> list[LocalFile]:
    """Check that ``folder`` is a complete, readable surgeon output and hash every file.

    Headers, shard sizes and the index are validated by :class:`Checkpoint`;
    then every file is read to the end (a truncated or unreadable file fails
    here, before anything is sent).
    """
    root = Path(folder)
    if not root.exists():
        raise CheckpointNotFoundError(f"{root}: no such folder; give the output folder of a surgeon command.")
    if not root.is_dir():
        raise CheckpointFormatError(
            f"{root}: surgeon push publishes a folder, not a file; write the output with -o FOLDER and push that."
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    for odd in (p for p in root.rglob("*") if not p.is_file() and not p.is_dir() and not _hidden(p.relative_to(root))):
        check_regular(odd, what="file to push", error=CheckpointFormatError)  # never silently left out
    pickles = [p for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PickleRefusedError(
            f"{pickles[0]}: pickle weights are never published by surgeon (loading them can run code); "
            "delete them or convert them to safetensors first."
        )
    _validate_weights(root, files)
    return [_hash(root, p) for p in files]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _validate_weights(root: Path, files: list[Path]) -> None:
    weights = {p for p in files if p.name.endswith(".safetensors")}
    if not weights:
        raise CheckpointNotFoundError(f"{root}: no .safetensors weights to publish; give a model or adapter folder.")
    if is_adapter_folder(root):
        with Adapter.open(root) as adapter:
            covered = {p.resolve() for p in adapter.weights.files}
    else:
        with Checkpoint.open(root) as ckpt:
            covered = {p.resolve() for p in ckpt.files}
    stray = sorted(p.relative_to(root).as_posix() for p in weights if p.resolve() not in covered)
    if stray:
        raise CheckpointFormatError(
            f"{root}: {stray[0]} is not part of the checkpoint (the index does not name it); it would be published "
            "as a stray file. Delete it or fix the index."
        )


def _hash(root: Path, path: Path) -> LocalFile:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read ({exc.strerror}); fix the file before pushing.") from None
    if size != path.stat().st_size:
        raise CheckpointFormatError(f"{path}: changed size while being read; wait for the writer to finish.")
    return LocalFile(path.relative_to(root).as_posix(), path, size, digest.hexdigest())


# -- checks with the Hub ---------------------------------------------------------------------

def preflight_push(repo_id: str, *, token: str | None = None, check_token: bool = True) -> str:
    """Fail fast (before any long work) if a push to ``repo_id`` cannot work; returns the token to use.

    Checks the repo id, offline mode, that a token exists and, with
    ``check_token``, that the Hub accepts it (``whoami``).
    """
    if not hub.is_repo_id(repo_id):
        raise HubError(
            f"{repo_id!r} is not a Hub repo id to push to; write it as org/name (letters, digits, '-', '_', '.'), "
            "with the branch in --revision."
        )
    if hub.offline():
        raise HubError(f"{repo_id}: cannot push while HF_HUB_OFFLINE=1; unset it to publish.")
    tok = hub.resolve_token(token)
    if not tok:
        raise HubError(
            f"{repo_id}: pushing needs a Hub token with write access; set HF_TOKEN, pass --token, or run `hf auth login`."
        )
    if check_token:
        try:
            hub_errors.with_retries(lambda: hub.api(tok).whoami(token=tok))
        except Exception as exc:
            raise hub_errors.hub_error(exc, repo_id=repo_id, action="check the token", token=tok) from None
    return tok


# -- the push --------------------------------------------------------------------------------

def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
) -> PushReport:
    """Publish ``folder`` to ``repo_id`` (branch ``revision``, default main) in one commit.

    ``base_model``: the Hub repo id the card names as ``base_model`` when the provenance has no Hub
    input (else config.json's ``_name_or_path`` when that is a repo id)."""
    if base_model is not None:
        check_base_model(base_model)
    tok = preflight_push(repo_id, token=token, check_token=False)
    local = validate_folder(folder)
    root, branch = Path(folder), revision or "main"
    card_metadata(root, read_provenance(root), base_model=base_model)  # a --base-model conflict fails before the Hub
    try:
        with hub.hf_progress_bars():
            return _push(root, local, repo_id, private=private, branch=branch, create_pr=create_pr,
                         message=commit_message, token=tok, base_model=base_model)
    except SurgeonError as exc:
        raise type(exc)(hub.redact(str(exc), tok)) from None
    except Exception as exc:
        raise hub_errors.hub_error(exc, repo_id=repo_id, revision=branch, action="push", token=tok) from None


def _push(root: Path, local: list[LocalFile], repo_id: str, *, private: bool, branch: str, create_pr: bool,
          message: str | None, token: str, base_model: str | None = None) -> PushReport:
    from huggingface_hub import CommitOperationAdd

    api = hub.api(token)
    created = _ensure_repo(api, repo_id, private)
    parent, remote_files = _ensure_branch(api, repo_id, branch)
    card = render_card(root, repo_id=repo_id, existing=_existing_card(api, repo_id, parent, local, remote_files),
                       base_model=base_model)
    card_bytes = card.encode("utf-8")
    ops = []
    for f in local:
        if f.rel == "README.md":
            continue
        op = CommitOperationAdd(path_in_repo=f.rel, path_or_fileobj=str(f.path))
        _reuse_hash(op, f.sha256)
        ops.append(op)
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
    record = read_provenance(root)
    title = message or (f"Upload surgeon {record['command']} output" if record else "Upload with surgeon push")
    description = f"Pushed by surgeon {__version__} after validating {len(ops)} files locally."
    url, oid, pr_url = _commit(api, repo_id, ops, local, card_bytes, branch=branch, parent=parent,
                               create_pr=create_pr, title=title, description=description)
    names = sorted({f.rel for f in local} | {"README.md"})
    return PushReport(repo_id, branch, url, oid, pr_url, created, oid == parent and not create_pr, names,
                      sum(f.size for f in local if f.rel != "README.md") + len(card_bytes))


def _reuse_hash(op: Any, sha256_hex: str) -> None:
    """Hand the sha256 computed during validation to huggingface_hub so it does not read the file again."""
    try:
        op.upload_info.sha256 = bytes.fromhex(sha256_hex)
    except AttributeError:  # an older huggingface_hub without the setter: it hashes the file itself
        pass


def _ensure_repo(api: Any, repo_id: str, private: bool) -> bool:
    """Create ``repo_id`` if needed; True when this call created it."""
    try:
        hub_errors.with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=False))
        return True
    except Exception as exc:
        status = hub_errors.http_status(exc)
        if status == 409:
            return False
        if status in (401, 403):  # no right to create in the namespace; the repo may exist and be writable
            try:
                hub_errors.with_retries(lambda: api.model_info(repo_id))
                return False
            except Exception:
                raise exc from None
        raise


def _ensure_branch(api: Any, repo_id: str, branch: str) -> tuple[str, list[str]]:
    """(head commit of ``branch``, files there); the branch is created from main when missing."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        info = hub_errors.with_retries(lambda: api.model_info(repo_id, revision=branch))
    except RevisionNotFoundError:
        if branch.startswith("refs/"):
            raise
        hub_errors.with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
        info = hub_errors.with_retries(lambda: api.model_info(repo_id, revision=branch))
    return str(info.sha), [s.rfilename for s in (info.siblings or [])]


def _existing_card(api: Any, repo_id: str, parent: str, local: list[LocalFile], remote: list[str]) -> str | None:
    """The card to update: the folder's README.md, else the one on the branch, else None."""
    mine = next((f for f in local if f.rel == "README.md"), None)
    if mine is not None:
        return mine.path.read_text("utf-8", errors="replace")
    if "README.md" not in remote:
        return None
    path = hub_errors.with_retries(lambda: api.hf_hub_download(repo_id, "README.md", revision=parent,
                                                        cache_dir=hub.cache_dir()))
    return Path(path).read_text("utf-8", errors="replace")


def _commit(api: Any, repo_id: str, ops: list[Any], local: list[LocalFile], card: bytes, *, branch: str,
            parent: str, create_pr: bool, title: str, description: str) -> tuple[str, str, str | None]:
    """Send the commit, retrying transient failures; returns (commit url, commit oid, pr url)."""
    maybe_landed = False
    for attempt in range(1, hub_errors.RETRY_ATTEMPTS + 1):
        try:
            info = api.create_commit(repo_id, ops, commit_message=title, commit_description=description,
                                     revision=branch, create_pr=create_pr, parent_commit=parent)
            return str(info.commit_url), str(info.oid), getattr(info, "pr_url", None)
        except Exception as exc:
            if hub_errors.http_status(exc) == 412 and maybe_landed:
                landed = _landed(api, repo_id, branch, local, card)
                if landed is not None:
                    return landed
            wait = hub_errors.retry_wait(exc, attempt)
            if wait is None or attempt == hub_errors.RETRY_ATTEMPTS:
                raise
            if _commit_may_have_landed(exc):
                if create_pr:
                    raise HubError(
                        f"{repo_id}: the connection failed while the Hub was creating the pull request; it may exist "
                        f"already. Check {hub.endpoint()}/{repo_id}/discussions before pushing again."
                    ) from None
                maybe_landed = True
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _commit_may_have_landed(exc: BaseException) -> bool:
    """True when the commit request itself failed without a clear refusal (lost response, 500/502/504)."""
    status = hub_errors.http_status(exc)
    if status is not None and status not in (500, 502, 504):
        return False
    for err in hub_errors.chain(exc):
        try:
            url = str(err.request.url)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            continue
        if "/commit/" in url:
            return True
    return False


def _landed(api: Any, repo_id: str, branch: str, local: list[LocalFile], card: bytes) -> tuple[str, str, None] | None:
    """If the branch head already holds exactly our files (an earlier attempt landed), its commit."""
    from huggingface_hub.hf_api import RepoFile

    info = hub_errors.with_retries(lambda: api.model_info(repo_id, revision=branch))
    tree = {f.path: f for f in hub_errors.with_retries(
        lambda: list(api.list_repo_tree(repo_id, revision=str(info.sha), recursive=True))) if isinstance(f, RepoFile)}
    wanted = {f.rel: (f.sha256, f.path) for f in local if f.rel != "README.md"}
    wanted["README.md"] = (hashlib.sha256(card).hexdigest(), card)
    for rel, (sha, source) in wanted.items():
        remote = tree.get(rel)
        if remote is None:
            return None
        if remote.lfs is not None:
            if remote.lfs.sha256 != sha:
                return None
        elif remote.blob_id != _git_oid(source):
            return None
    return f"{hub.endpoint()}/{repo_id}/commit/{info.sha}", str(info.sha), None


def _git_oid(source: Path | bytes) -> str:
    data = source if isinstance(source, bytes) else source.read_bytes()  # regular (non-LFS) files are small
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
