"""Hub options shared by commands: ``--token``/``--revision`` for inputs, ``--push-to`` for outputs.

Wiring (done in each command module):

    @click.command("scale-intruders")
    ...
    @hub_options          # --token, --revision: for every Hub argument of the command
    @push_to_option       # --push-to REPO_ID, --private: checked before any work starts
    @json_option
    @global_options
    def command(..., push_to: str | None, private: bool, as_json: bool) -> None:
        report = scale_intruders(...)                  # writes and verifies the output
        pushed = push_after(out, push_to, private=private, as_json=as_json)
        if as_json:
            emit_json("scale-intruders", {**report.to_dict(), "push": pushed.to_dict() if pushed else None})
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from surgeon.cli.common import info
from surgeon.errors import SurgeonError
from surgeon.io.model_card import check_base_model
from surgeon.workflows.publish.push import PushReport, preflight_push, push_folder, set_hub_defaults

F = TypeVar("F", bound=Callable[..., Any])


def _remember(ctx: click.Context, key: str, value: str | None) -> None:
    """Store the flag for this invocation and make it the Hub default until the command ends."""
    if "surgeon.hub" not in ctx.meta:
        ctx.meta["surgeon.hub"] = {"token": None, "revision": None}
        ctx.call_on_close(set_hub_defaults)  # back to no defaults: nothing leaks into a later invocation
    ctx.meta["surgeon.hub"][key] = value
    set_hub_defaults(**ctx.meta["surgeon.hub"])


def _set_token(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    _remember(ctx, "token", value)


def _set_revision(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    _remember(ctx, "revision", value)


def _token() -> str | None:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("surgeon.hub", {}).get("token") if ctx is not None else None


def hub_options(func: F) -> F:
    """``--token`` and ``--revision`` for the command's Hub arguments (``org/name[@rev]``)."""
    func = click.option("--revision", metavar="REV", default=None, expose_value=False, is_eager=True,
                        callback=_set_revision,
                        help="Revision (branch, tag, commit) for Hub arguments without @rev. [default: main]")(func)
    func = click.option("--token", metavar="TOKEN", default=None, expose_value=False, is_eager=True,
                        callback=_set_token,
                        help="Hub token for private/gated inputs and --push-to. [default: HF_TOKEN] Never printed.")(func)
    return func


def push_to_option(func: F) -> F:
    """``--push-to REPO_ID`` and ``--private``; the token and repo id are checked before the command runs."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        base_model = kwargs.pop("base_model", None)
        if base_model is not None:
            check_base_model(base_model)
            click.get_current_context().meta["surgeon.base_model"] = base_model
        if kwargs.get("push_to"):
            preflight_push(kwargs["push_to"], token=_token())
        return func(*args, **kwargs)

    wrapper = click.option("--base-model", metavar="REPO_ID", default=None,
                           help="With --push-to: the Hub model the card names as base_model when the provenance "
                                "records none. [default: config.json's _name_or_path when a repo id]")(wrapper)
    wrapper = click.option("--private", is_flag=True, help="With --push-to: create the repo as private.")(wrapper)
    wrapper = click.option("--push-to", metavar="REPO_ID", default=None,
                           help="After the output is written and verified, publish it to this Hub repo "
                                "(same as `surgeon push OUT REPO_ID`).")(wrapper)
    return wrapper  # type: ignore[return-value]


def push_after(out_dir: str, repo_id: str | None, *, private: bool = False, as_json: bool = False) -> PushReport | None:
    """Publish the verified output ``out_dir`` to ``repo_id`` (no-op when None); prints the URL unless ``as_json``.

    On failure the error says that the local output is intact and how to push it again.
    """
    if not repo_id:
        return None
    ctx = click.get_current_context(silent=True)
    base_model = ctx.meta.get("surgeon.base_model") if ctx is not None else None
    try:
        report = push_folder(out_dir, repo_id, private=private, token=_token(), base_model=base_model)
    except SurgeonError as exc:
        raise type(exc)(f"{exc} The output {out_dir} was written and is intact; push it again with "
                        f"`surgeon push {out_dir} {repo_id}`.") from None
    if not as_json:
        info(f"pushed {len(report.files)} files to {report.repo_id}@{report.revision}")
        click.echo(report.pr_url or report.commit_url)
    return report
