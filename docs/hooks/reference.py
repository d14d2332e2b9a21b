"""mkdocs hook: the configuration and CLI reference pages, generated from the code at every build.

A written copy of ~130 config fields, ~25 serve settings and eleven verbs would drift from the code the day
a field is added; these pages hold a marker instead, which this hook replaces with what `strop.config` (each
field's `doc(...)`), `strop.serve.settings` and the typer app in `strop.cli` say. A page whose marker is
missing fails the build, so the reference cannot silently stop being generated.

Raw HTML tables rather than Markdown tables: cell text holds `|` (choices), `<name>` placeholders and
backticks, which Markdown tables would split or swallow; here every value is escaped once, by html.escape.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import re

from mkdocs.exceptions import PluginError

CONFIG_MARKER = "<!-- strop:config-reference -->"
SERVE_MARKER = "<!-- strop:serve-reference -->"
TASKS_MARKER = "<!-- strop:task-list -->"
CLI_MARKER = "<!-- strop:cli-reference -->"


def _inline(text: str) -> str:
    """Escaped text whose `backticks` become <code>, as the field docs write code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _default(value) -> str:
    if value is None:
        return "<em>empty</em>"
    shown = value if isinstance(value, str) else json.dumps(value)
    return f"<code>{html.escape(str(shown), quote=False)}</code>"


def _field_row(key: str, f: dataclasses.Field, default) -> str:
    doc = f.metadata.get("doc", "")
    if not doc:  # a field without its one line of documentation is a bug (STYLE.md: every field has one)
        raise PluginError(f"config field {key} has no doc(...) text")
    text = _inline(doc)
    choices = f.metadata.get("choices")
    if choices:
        text += " One of: " + ", ".join(f"<code>{html.escape(str(c))}</code>" for c in choices) + "."
    kind = html.escape(str(f.type), quote=False)
    return (
        f'<tr id="{key}"><td><a href="#{key}"><code>{key}</code></a></td><td><code>{kind}</code></td>'
        f"<td>{_default(default)}</td><td>{text}</td></tr>"
    )


def _table(rows: list[str]) -> str:
    head = "<tr><th>key</th><th>type</th><th>default</th><th>meaning</th></tr>"
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>\n"


def _section_rows(cls, prefix: str) -> tuple[list[str], list[tuple[str, object]]]:
    """Rows of a section's own fields, and its sub-sections (name, instance), in declaration order."""
    defaults = cls()
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        else:
            rows.append(_field_row(prefix + f.name, f, value))
    return rows, sections


def config_reference() -> str:
    """One table per config section ([run] for the top-level fields), in --help-config's order."""
    from strop.config import Config

    rows, sections = _section_rows(Config, "")
    parts = [
        "## run {#run}\n",
        "Top-level keys: `name=...`, `task=...` on the command line.\n",
        _table(rows),
    ]
    for name, value in sections:
        sub_rows, nested = _section_rows(type(value), f"{name}.")
        if nested:  # no section nests another today; a new nesting must be rendered, not dropped
            raise PluginError(
                f"config section {name} has sub-sections {[n for n, _ in nested]}; teach the "
                "reference hook to render them"
            )
        parts += [
            f"## {name} {{#section-{name}}}\n",
            f"Keys `{name}.*`: a `{name}:` section in YAML or `{name}.KEY=VALUE` on the command line.\n",
            _table(sub_rows),
        ]
    return "\n".join(parts)


def serve_reference() -> str:
    from strop.serve.settings import ServeConfig

    rows, nested = _section_rows(ServeConfig, "serve.")
    if nested:
        raise PluginError("ServeConfig has sub-sections; teach the reference hook to render them")
    return _table(rows)


def task_list() -> str:
    from strop.tasks import TASKS

    items = [f"- `{name}`: {task.description}" for name, task in TASKS.items()]
    return "\n".join(["- `auto`: inferred from the training data (the default)"] + items) + "\n"


def _escape_md(text: str) -> str:
    """Docstring prose as literal Markdown text: no HTML tags (`<name>`), no emphasis, no links."""
    return re.sub(r"([\\`*_\[\]#|])", r"\\\1", html.escape(text, quote=False))


def _argument_name(param) -> str:
    """An argument as usage shows it: its metavar, else NAME ([NAME] optional, NAME... repeated)."""
    if param.metavar:
        return param.metavar
    name = param.name.upper() + ("..." if param.nargs == -1 else "")
    return name if param.required else f"[{name}]"


def _kind(param, ctx) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    if hasattr(param, "display_type"):  # typer >= 0.2x: '<int range>'
        return param.display_type(ctx).strip("<>")
    return getattr(getattr(param, "type", None), "name", "")  # click's ParamType


def _param_row(param, ctx) -> str:
    if param.param_type_name == "argument":
        names = _argument_name(param)
    else:
        names = ", ".join(list(param.opts) + list(param.secondary_opts))
    if param.required:
        shown = "<em>required</em>"
    elif param.default in (None, (), []) or (getattr(param, "is_flag", False) and param.default is False):
        shown = ""  # nothing given = nothing happens: an empty cell says it best
    elif param.secondary_opts and isinstance(param.default, bool):  # --int8/--no-int8: name the switch
        shown = _default(param.opts[0] if param.default else param.secondary_opts[0])
    else:
        shown = _default(param.default)
    help_text = html.escape(getattr(param, "help", None) or "", quote=False)
    return (
        f"<tr><td><code>{html.escape(names)}</code></td><td>{html.escape(_kind(param, ctx))}</td>"
        f"<td>{shown}</td><td>{help_text}</td></tr>"
    )


def cli_reference() -> str:
    """One section per verb of `strop`: usage, its help text as the command prints it, and its arguments."""
    import typer.main

    from strop.cli import app

    group = typer.main.get_command(app)
    ctx_class = type(group).context_class
    parts = [_escape_md(group.help or "") + "\n"]
    for name, command in group.commands.items():
        ctx = ctx_class(command, info_name=f"strop {name}")
        params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
        arguments = [_argument_name(p) for p in params if p.param_type_name == "argument"]
        usage = " ".join([f"strop {name}", "[OPTIONS]"] + arguments)
        paragraphs = [p.strip() for p in inspect.cleandoc(command.help or "").split("\n\n") if p.strip()]
        # the docstrings break lines on purpose (one example per line): keep the breaks
        body = "\n\n".join("  \n".join(_escape_md(line) for line in p.splitlines()) for p in paragraphs)
        head = "<tr><th>argument / option</th><th>type</th><th>default</th><th>meaning</th></tr>"
        rows = "\n".join(_param_row(p, ctx) for p in params)
        table = f"<table>\n<thead>{head}</thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n"
        parts += [f"## strop {name} {{#strop-{name}}}\n", f"```text\n{usage}\n```\n", body + "\n", table]
    return "\n".join(parts)


GENERATORS = {
    CONFIG_MARKER: config_reference,
    SERVE_MARKER: serve_reference,
    TASKS_MARKER: task_list,
    CLI_MARKER: cli_reference,
}
# which page must carry which markers: a marker deleted from its page fails the build
REQUIRED = {
    "reference/config.md": (CONFIG_MARKER, SERVE_MARKER, TASKS_MARKER),
    "reference/cli.md": (CLI_MARKER,),
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker in REQUIRED.get(page.file.src_uri, ()):
        if marker not in markdown:
            raise PluginError(
                f"{page.file.src_uri} lost its {marker} marker: the generated reference has nowhere to go"
            )
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
