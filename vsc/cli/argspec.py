"""
Options as data, for the subcommands that must start fast (``vsc card
status``, ``vsc card sign``...: issue 15 asks them to cost little more than
``python -c pass``, and importing argparse, with the re module it needs,
costs about as much as the interpreter's own start-up).

One list of Option rows gives both parsers: ``add_options`` puts them on an
argparse parser (help, every error message, every unusual spelling), and
``parse_plain`` reads argv only when it is in the plain form (``--opt
VALUE``, ``--switch``, positionals, nothing else) and returns None for
anything else, so that argparse parses it and answers exactly as it always
does. For the argv ``parse_plain`` accepts, its result is the one argparse
gives (tests/test_cli.py checks that on every row of every fast subcommand).
"""

from __future__ import annotations


class Namespace:
    """What argparse's ``parse_args`` returns: the values as attributes (without importing argparse)."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Namespace({', '.join(f'{k}={v!r}' for k, v in sorted(self.__dict__.items()))})"


class Option:
    """``--name VALUE`` (``switch``: ``--name`` alone), or a positional when ``name`` has no leading dash."""

    __slots__ = ("name", "dest", "help", "required", "choices", "type", "default", "switch", "group")

    def __init__(self, name: str, help: str = "", *, dest: str | None = None, required: bool = False,
                 choices=None, type=str, default=None, switch: bool = False, group: str | None = None):
        self.name = name
        self.dest = dest or name.lstrip("-").replace("-", "_")
        self.help = help
        self.required = required
        self.choices = choices
        self.type = type
        self.default = False if switch else default
        self.switch = switch
        self.group = group  # options of one group exclude each other

    @property
    def positional(self) -> bool:
        return not self.name.startswith("-")


def add_options(parser, options) -> None:
    """The options on an argparse parser."""
    groups: dict = {}
    for o in options:
        target = parser
        if o.group is not None:
            if o.group not in groups:
                groups[o.group] = parser.add_mutually_exclusive_group()
            target = groups[o.group]
        if o.switch:
            target.add_argument(o.name, dest=o.dest, action="store_true", help=o.help)
        elif o.positional:
            target.add_argument(o.name, type=o.type, choices=o.choices, help=o.help)
        else:
            target.add_argument(o.name, dest=o.dest, required=o.required, choices=o.choices, type=o.type,
                                default=o.default, help=o.help)


def parse_plain(argv: list[str], options) -> dict | None:
    """
    {dest: value} for every option (defaults filled in) when argv is plain and
    complete; None when argparse must parse it (help, an error, an abbreviated
    or ``--opt=value`` spelling, a value that starts with a dash...).
    """
    by_name = {o.name: o for o in options if not o.positional}
    positionals = [o for o in options if o.positional]
    out = {o.dest: o.default for o in options}
    seen_groups: dict[str, str] = {}
    given = set()
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-"):
            if not positionals:
                return None
            o = positionals.pop(0)
            value = word
        else:
            o = by_name.get(word)
            if o is None:
                return None
            if o.switch:
                out[o.dest] = True
                i += 1
                continue
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            i += 1
            value = argv[i]
            if o.group is not None and seen_groups.setdefault(o.group, o.name) != o.name:
                return None
        try:
            value = o.type(value)
        except (TypeError, ValueError):
            return None
        if o.choices is not None and value not in o.choices:
            return None
        out[o.dest] = value
        given.add(o.name)
        i += 1
    if positionals or any(o.required and o.name not in given for o in options):
        return None
    return out
