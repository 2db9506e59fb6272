"""Text sources for a centre's corpus: local man pages (roff -> prose), local files, HF datasets.

Kept separate from ``clients.data`` so the roff converter can be tested on its own and the
splitting/sampling code stays short. Nothing here downloads unless the user names ``hf:...``.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clients.hub import HubSourceError, cached_only, hub_unreachable

MAN_ROOT = Path("/usr/share/man")
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


class DataSourceError(ValueError):
    """A source spec cannot be read; the message names the source and how to fix it."""


# --------------------------------------------------------------------------- roff -> text
# Named glyphs (\(xx, \[xx]) and predefined strings (\*(xx) worth keeping as characters.
# Anything not listed is dropped: it is typesetting, not prose.
_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
    "oq": "'", "cq": "'", "ga": "`", "ha": "^", "ti": "~", "rs": "\\", "sl": "/", "at": "@",
    "bu": "•", "co": "©", "rg": "®", "tm": "™", "de": "°", "dg": "†", "sc": "§", "ps": "¶",
    "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "Bq": "„", "bq": "‚", "ss": "ß", "oe": "œ",
    "OE": "Œ", "ae": "æ", "AE": "Æ", "/o": "ø", "/O": "Ø", "mu": "×", "di": "÷", "+-": "±",
    "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "if": "∞", "is": "∫", "pd": "∂",
    "eu": "€", "Eu": "€", "ct": "¢", "Po": "£", "Ye": "¥", "r!": "¡", "r?": "¿", "pc": "·",
    "ba": "|", "br": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩",
    "ua": "↑", "da": "↓", "sh": "#", "Do": "$", "ul": "_", "ru": "_", "tno": "~",
    # Predefined strings used by man/pod2man preambles (\*(Aq, \*(L", \*(C+ ...).
    "Aq": "'", 'L"': '"', 'R"': '"', "C`": '"', "C'": '"', "C+": "C++", "--": "—", "PI": "π",
}
_GREEK = dict(zip("abgdezyhiklmncoprstufxqw", "αβγδεζηθικλμνξοπρστυφχψω", strict=True))
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303",
            ",": "\u0327", "o": "\u030a", "v": "\u030c"}
# One pass over every escape, left to right, so ``\\`` can never start a second escape.
_ESC = re.compile(r"""\\(?:
    (?:\((?P<g2>..)|\[(?P<gb>[^\]\s]*)\])                 # glyph  \(xx  \[name]
  | \*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))        # string \*x \*(xx \*[name]
  | [fFmMgkYVn$][-+]?(?:\(..|\[[^\]]*\]|.)                # font, colour, register, arg
  | s[-+]?(?:\(\d\d|\[[^\]]*\]|'[^']*'|\d)                # point size
  | [hvwlLDoXbxZRNBACS](?P<d>[^\w\s])(?:(?!(?P=d)).)*(?P=d)  # \h'..' and friends
  | (?P<one>.)                                            # one-character escape
  | $)                                                    # trailing \ : line continuation
""", re.VERBOSE)
_ONE_CHAR = {"-": "-", " ": " ", "~": " ", "0": " ", "e": "\\", "E": "\\", "\\": "\\",
             ".": ".", "'": "'", "`": "`", "t": "\t", "_": "_"}
# man(7) and mdoc(7) macros whose arguments are prose worth keeping (others are dropped).
_JOINED = {"BR", "RB", "IR", "RI", "BI", "IB"}  # alternating fonts: args are glued together
_SPACED = {"SH", "SS", "B", "I", "SM", "SB", "IP", "TQ", "Sh", "Ss", "Nd", "Nm", "It", "Dl",
           "D1", "Em", "Sy", "Ar", "Cm", "Pa", "Op", "Dq", "Sq", "Ql", "Pq", "Va", "Ev", "Li",
           "Fn", "Ft", "Fa", "Dv", "Er", "Ic", "Ad", "An", "Lk", "Mt", "Tn", "Xr", "Fl", "Aq"}
_HEADING = {"SH", "SS", "Sh", "Ss"}
_PARAGRAPH = {"PP", "LP", "P", "HP", "sp", "Sp", "Pp", "Bl", "El"}
_TAG = {"TP", "TQ", "IP", "It"}  # an item whose tag is the macro argument or the next line
_NOFILL = {"nf": True, "EX": True, "Vb": True, "fi": False, "EE": False, "Ve": False}
_CLOSING = {".", ",", ";", ":", ")", "]", "?", "!"}
_MDOC_CALLABLE = _SPACED - {"SH", "SS", "B", "I", "SM", "SB", "IP", "TQ"} | {
    "Ns", "No", "Oo", "Oc", "Xo", "Xc", "Ux", "Bx", "Nx", "Fx", "Ox", "Bsx", "At", "St", "Qq",
    "Brq", "Bq"}
_SKIP_BLOCK = {"de", "de1", "dei", "am", "am1", "ami", "ig"}  # macro definitions until ".."


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if len(name) == 2 and name[0] == "*" and name[1].lower() in _GREEK:
        g = _GREEK[name[1].lower()]
        return g.upper() if name[1].isupper() else g
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():  # \('e -> é
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if name.startswith("char") and name[4:].isdigit():
        return chr(int(name[4:]))
    if re.fullmatch(r"u[0-9A-F]{4,6}", name):
        return chr(int(name[1:], 16))
    return ""


def _escape(m: re.Match[str]) -> str:
    if (g := m["g2"] or m["gb"]) is not None:
        return _glyph(g)
    if (s := m["s2"] or m["sb"] or m["s1"]) is not None:
        return _GLYPHS.get(s, "")
    if (c := m["one"]) is not None:
        return _ONE_CHAR.get(c, "")  # \& \| \^ \% \c \{ \} ... are zero-width controls
    return ""


def unescape(text: str) -> str:
    """Replace roff escapes in one line of text; a ``\\"`` comment ends the line."""
    for m in re.finditer(r"\\.", text):  # non-overlapping, so ``\\"`` is not a comment
        if m[0] in ('\\"', "\\#"):
            text = text[: m.start()]
            break
    return _ESC.sub(_escape, text)


def _macro_args(rest: str) -> list[str]:
    """Split macro arguments the way roff does: blanks separate, "double quotes" group."""
    return [a.replace('""', '"') if q else a
            for q, a in ((m[1] is not None, m[1] if m[1] is not None else m[2])
                         for m in re.finditer(r'"((?:[^"]|"")*)"?|(\S+)', rest))]


def _macro_text(name: str, args: list[str]) -> str:
    if name in _JOINED:
        return "".join(args)
    if name not in _MDOC_CALLABLE:
        return " ".join(args)
    # mdoc line: the macro names are markup, e.g. ".It Fl a Ar file" -> "-a file",
    # ".Xr ls 1" -> "ls(1)", "Ns" glues the next word to the previous one.
    out: list[str] = []
    tokens, prefix, glue = [name, *args], "", False
    for i, a in enumerate(tokens):
        if a in ("Fl", "Ns"):
            prefix, glue = ("-", glue) if a == "Fl" else (prefix, True)
        elif a in _MDOC_CALLABLE:
            continue
        elif out and i >= 2 and tokens[i - 2] == "Xr" and a[:1].isdigit():
            out[-1] += f"({a})"
        elif (glue or a in _CLOSING) and out:
            out[-1] += prefix + a
        else:
            out.append(prefix + a)
        if a not in ("Fl", "Ns") and a not in _MDOC_CALLABLE:
            prefix, glue = "", False
    text = " ".join(out + ([prefix] if prefix else []))
    return f"[{text}]" if name == "Op" else text


def roff_to_text(roff: str) -> str:
    """Convert a man page's roff source to readable plain prose (regex-based, best effort).

    Requests and typesetting escapes are dropped; headings and the text arguments of
    font/heading macros are kept. Filled text is joined into one line per paragraph, as
    roff would fill it, so prose reads naturally; no-fill blocks (.nf, .EX) keep lines.
    """
    out: list[str] = []  # finished lines
    para: list[str] = []  # pieces of the paragraph being filled
    nofill = tag = skip_block = False
    table, page_name = "", ""  # table: "fmt" while skipping tbl format lines, "data" inside

    def flush(blank: bool = False) -> None:
        if para:
            out.append(" ".join(para))
            para.clear()
        if blank and out and out[-1]:
            out.append("")

    def emit(text: str, own_line: bool = False) -> None:
        nonlocal tag
        if own_line or nofill or tag or table:
            flush()
            out.append(text)
            tag = False
        elif text:
            para.append(text)

    for raw in roff.splitlines():
        if skip_block:
            # ".." ends a definition; generated pages also write ".  ." inside .if blocks
            skip_block = re.fullmatch(r"\.[ \t]*\.\s*", raw) is None
            continue
        m = re.match(r"""^[.'][ \t]*([^\s\\"]*)[ \t]*(.*)$""", raw)
        if m is None:  # a text line
            if table == "fmt":
                table = "data" if raw.rstrip().endswith(".") else "fmt"
            elif table == "data" and raw.strip() not in ("_", "=", "T}"):
                emit(unescape(re.sub(r"T[{}]", "", raw).replace("\t", " ")).strip())
            elif not raw.strip():
                flush(blank=True)  # a blank input line is a paragraph break in roff
            elif table != "data":
                if raw[0] in " \t" and not nofill:
                    flush()  # a leading space forces a line break
                emit(unescape(raw).rstrip())
            continue
        name, rest = m[1], m[2]
        if name in _SKIP_BLOCK:
            skip_block = True
        elif name in ("TS", "T&"):
            flush()
            table = "fmt"
        elif name == "TE":
            table = ""
        elif name in _NOFILL or name in ("Bd", "Ed"):
            flush()
            nofill = _NOFILL.get(name, name == "Bd" and bool(re.search("-literal|-unfilled", rest)))
        elif name == "br":
            flush()
        elif name in _PARAGRAPH or name in _TAG or name in _HEADING:
            flush(blank=True)
            tag = name in _HEADING or name in ("TP", "TQ")  # the next line is a heading/tag
        if name not in _JOINED and name not in _SPACED:
            continue
        args = _macro_args(rest)
        if name == "Nm":  # mdoc: a bare .Nm repeats the page's name
            page_name = page_name or (args[0] if args else "")
            args = args or [page_name]
        text = unescape(_macro_text(name, args[:1] if name in ("IP", "TQ") else args)).strip()
        if name in _HEADING and text:
            emit(text, own_line=True)
            out.append("")
            tag = False
        elif name in _TAG and text:
            emit(text, own_line=len(text) > 2)  # option tags on their own line, bullets inline
            tag = False
        elif text:
            emit(text)
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in out)).strip()


# --------------------------------------------------------------------------- readers
@contextmanager
def quiet_datasets() -> Iterator[Any]:
    """Import ``datasets`` lazily (~1.5 s) with its per-call progress bars off, then restore."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def manpage_paths(lang: str) -> list[Path]:
    root = MAN_ROOT if lang == "en" else MAN_ROOT / lang
    pattern = "man7/*.gz" if lang == "en" else "man*/*.gz"
    paths = sorted(root.glob(pattern)) if root.is_dir() else []
    if not paths:
        pkg = "man-db manpages" if lang == "en" else f"manpages-{lang}"
        raise DataSourceError(
            f"source 'manpages:{lang}': no man pages found under {root / pattern}; "
            f"install it with: apt-get install {pkg}")
    return paths


def _manpages(lang: str) -> Iterator[str]:
    for path in manpage_paths(lang):
        if path.is_symlink():  # aliases (atq -> at) would duplicate documents
            continue
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if re.match(r"\s*\.so\s", raw):  # one-line redirect to another page
            continue
        if text := roff_to_text(raw):
            yield text


def _text_column(path: Path, builder: str) -> Iterator[str]:
    with quiet_datasets() as datasets:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    if "text" not in ds.column_names:
        raise DataSourceError(f"{path}: no 'text' column (columns: {ds.column_names})")
    yield from _strings(ds, str(path))


def _strings(ds: Any, where: str) -> Iterator[str]:
    for batch in ds.iter(batch_size=1024):
        for t in batch["text"]:
            if t is not None and not isinstance(t, str):
                raise DataSourceError(f"{where}: 'text' holds {type(t).__name__}, not strings")
            if t:
                yield t


UNDECODABLE = ("stop", "skip")  # what a .txt/.md that is not UTF-8 does: stop preparation, or skip the file


def _local(path: Path, undecodable: str = "stop", skipped: list[Path] | None = None) -> Iterator[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataSourceError(f"source '{path}': no {'/'.join(LOCAL_SUFFIXES)} files in it")
    elif path.suffix in LOCAL_SUFFIXES:
        files = [path]
    else:
        raise DataSourceError(f"source '{path}': unsupported file type, use {LOCAL_SUFFIXES}")
    for f in files:
        if f.suffix in (".txt", ".md"):
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                if undecodable == "skip":
                    if skipped is not None:
                        skipped.append(f)
                    continue
                raise DataSourceError(
                    f"{f}: not UTF-8 text ({err.reason} at byte {err.start}); convert it (e.g. `iconv -f "
                    f"latin1 -t utf-8`), remove it, or skip such files with --undecodable skip "
                    f"(spec: undecodable = \"skip\"), which counts them in the manifest") from None
            if text:
                yield text
        else:
            yield from _text_column(f, "parquet" if f.suffix == ".parquet" else "json")


def _hub(spec: str) -> Iterator[str]:
    name, _, config = spec.partition(":")
    with quiet_datasets() as datasets:
        if why := hub_unreachable():
            try:
                ds = cached_only(datasets, spec, why)
            except HubSourceError as err:
                raise DataSourceError(str(err)) from None
        else:
            ds = datasets.load_dataset(name, config or None, split="train")
    if "text" not in ds.column_names:
        raise DataSourceError(f"source 'hf:{spec}': no 'text' column (columns: {ds.column_names})")
    yield from _strings(ds, f"hf:{spec}")


def read_documents(source: str, max_bytes: int | None = None, *, undecodable: str = "stop",
                   skipped: list[Path] | None = None) -> Iterator[str]:
    """Yield the documents of ``source``: ``manpages:LANG``, ``hf:NAME[:CONFIG]`` or a path.

    ``max_bytes`` caps the total UTF-8 size (the last document is cut on a character
    boundary) so tests and demos can take a small, still deterministic, prefix.
    ``undecodable``: a local .txt/.md that is not UTF-8 stops with an error naming it ("stop"),
    or is left out and appended to ``skipped`` ("skip").
    """
    if undecodable not in UNDECODABLE:
        raise DataSourceError(f"undecodable must be one of {', '.join(UNDECODABLE)}; got {undecodable!r}")
    if source.startswith("manpages:"):
        lang = source.split(":", 1)[1]
        manpage_paths(lang)  # fail now, not on first next(), with the install hint
        docs = _manpages(lang)
    elif source.startswith("hf:"):
        docs = _hub(source[3:])
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataSourceError(f"source '{source}': no such file or directory")
        docs = _local(path, undecodable, skipped)
    return _capped(docs, max_bytes)


def _capped(docs: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    left = max_bytes
    if left is not None and left < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    for doc in docs:
        if left is None:
            yield doc
            continue
        data = doc.encode("utf-8")
        if len(data) >= left:
            if cut := data[:left].decode("utf-8", errors="ignore"):
                yield cut
            return
        left -= len(data)
        yield doc
