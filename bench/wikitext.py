"""MediaWiki XML export -> plain article text (WikiText-like), for the held-out perplexity set.

Templates, tables, references, comments and file/category links are removed (a few text-carrying
inline templates are rendered); [[a|b]] -> b; redirects, disambiguation pages and pages outside the
main namespace are skipped; articles are separated by blank lines, headings kept as "= Title =".
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET

_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations", "notes and references", "references and notes"}
_DROP_LINK_PREFIXES = {"file", "image", "category", "media"}
_INTERWIKI = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*|simple|wikt|wiktionary|commons|wikiquote|wikisource|"
                        r"wikibooks|wikinews|wikiversity|species|meta|q|s|b|n|v|voy")


def _until_stable(pattern: re.Pattern, repl, s: str) -> str:
    """Substitute innermost matches until nothing changes (nested structures go inside out)."""
    while True:
        s2 = pattern.sub(repl, s)
        if s2 == s:
            return s
        s = s2


def _remove_innermost(s: str, pattern: re.Pattern) -> str:
    return _until_stable(pattern, "", s)


_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _link_repl(m: re.Match) -> str:
    inner = m.group(1)
    target, pipe, label = inner.partition("|")
    t = target.strip()
    prefix = t.split(":", 1)[0].strip().lower() if ":" in t else ""
    if prefix.lstrip(":") in _DROP_LINK_PREFIXES and not t.startswith(":"):
        return ""  # images, files, category tags
    if pipe:
        label = label.split("|")[-1].strip()
        if label:
            return label
        return re.sub(r"\s*\(.*\)$", "", t.split(":", 1)[-1])  # pipe trick [[a (b)|]] -> a
    if prefix and _INTERWIKI.fullmatch(prefix):
        return ""  # interlanguage links like [[de:Anarchismus]]
    return t.lstrip(":")


_FILE_LINK_START = re.compile(r"\[\[\s*:?\s*(?:file|image|media)\s*:", re.I)


def _remove_file_links(s: str) -> str:
    """Delete [[File:...]] / [[Image:...]] including captions that hold links, brackets or newlines."""
    out, pos = [], 0
    while True:
        m = _FILE_LINK_START.search(s, pos)
        if not m:
            out.append(s[pos:])
            return "".join(out)
        out.append(s[pos:m.start()])
        depth, i = 1, m.end()
        while i < len(s) and depth:
            if s.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif s.startswith("]]", i):
                depth, i = depth - 1, i + 2
            else:
                i += 1
        pos = i


def _links(s: str) -> str:
    return _until_stable(_INNER_LINK, _link_repl, s)


# Inline templates that carry article text are rendered (roughly as Wikipedia shows them); all other
# templates (citations, infoboxes, navigation, maintenance tags...) are deleted.
_DASHES = {"snd": " – ", "spaced ndash": " – ", "spaced en dash": " – ", "ndash": "–", "mdash": "—", "mdashb": "—", "ndashb": "–",
           "nbsp": " ", "spaces": " ", "!": "|", "·": " · ", "dot": " · ", "middot": "·", "pipe": "|"}
_FIRST_ARG = {"small", "smaller", "larger", "big", "nowrap", "nobr", "nihongo", "flag", "flagcountry",
              "nts", "formatnum", "abbr", "vanchor", "visible anchor", "mvar", "math", "sic", "em",
              "lang-en", "ill", "interlanguage link", "not a typo", "var", "tooltip", "keypress", "val"}
_RANGE_WORDS = {"-", "–", "to", "and", "or", "by", "x", "×", "+", "to(-)", "and(-)"}


def _render_template(m: re.Match) -> str:
    parts = [p.strip() for p in m.group(0)[2:-2].split("|")]
    name = parts[0].lower().replace("_", " ").strip()
    args = [p for p in parts[1:] if not re.match(r"^[\w -]+=", p)]  # positional arguments only
    if name in _DASHES:
        return _DASHES[name]
    if not args:
        return ""
    if name in ("convert", "cvt"):
        if len(args) >= 4 and args[1].lower() in _RANGE_WORDS:
            sep = "–" if args[1] in ("-", "–") else f" {args[1]} "
            return f"{args[0]}{sep}{args[2]} {args[3]}"
        return f"{args[0]} {args[1]}" if len(args) >= 2 else args[0]
    if name == "lang" and len(args) >= 2:
        return args[1]
    if name.startswith("lang-") or name in _FIRST_ARG:
        return args[0]
    if name in ("transl", "transliteration"):
        return args[-1]
    if name == "as of":
        return "As of " + " ".join(args[:3])
    if name == "angbr":
        return f"⟨{args[0]}⟩"
    return ""


_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*?\}\}", re.S)


def _templates(s: str) -> str:
    return _until_stable(_TEMPLATE, _render_template, s)


def _inline(s: str) -> str:
    s = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", s)  # [url label] -> label
    s = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\]", "", s)  # [url] -> nothing
    s = re.sub(r"https?://\S+", "", s)
    s = re.sub(r"<[^<>]*>", "", s)  # remaining html tags (<br/>, <small>, <sup>, <nowiki>...)
    s = html.unescape(s).replace("\xa0", " ")
    s = s.replace("'''", "").replace("''", "")
    s = re.sub(r"__[A-Z]+__", "", s)  # __TOC__, __NOTOC__
    s = re.sub(r"\(\s*[,;:]?\s*\)", "", s)  # parentheses emptied by removed templates
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r" +([,.;:!?)\]])", r"\1", s)
    s = re.sub(r"\( +", "(", s)
    return s.strip()


def wiki_markup_to_text(title: str, markup: str) -> str:
    """MediaWiki markup -> plain article text, WikiText-like ("= Title =" and "== Section ==" lines)."""
    s = markup.replace("\r\n", "\n")
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r"<ref\b[^>]*/>", "", s, flags=re.I)
    s = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", s, flags=re.S | re.I)
    s = re.sub(r"<(gallery|math|timeline|imagemap|score|syntaxhighlight|source|references|hiero|chem)\b[^>]*>"
               r".*?</\1\s*>", "", s, flags=re.S | re.I)
    s = _remove_file_links(s)
    s = _links(s)
    s = _templates(s)
    s = _remove_innermost(s, _TABLE)

    out: list[str] = [f"= {title} ="]
    skip_level: int | None = None
    for raw in s.split("\n"):
        line = raw.strip()
        if not line:
            continue
        m = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if m:
            level = len(m.group(1))
            if skip_level is not None and level > skip_level:
                continue
            skip_level = None
            head = _inline(m.group(2))
            if not head or head.lower() in _DROP_SECTIONS:
                skip_level = level
                continue
            out.append(f"{'=' * level} {head} {'=' * level}")
            continue
        if skip_level is not None:
            continue
        if line[0] in "|!{}" or line.startswith("----"):
            continue  # residue of broken tables/templates, horizontal rules
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list / indent markers
        line = _inline(line)
        if "{{" in line or "}}" in line or "{|" in line:
            continue
        if not re.search(r"[A-Za-z0-9]", line):
            continue
        out.append(line)

    # drop headings left without content (a heading followed by a same-or-higher heading, or at the end)
    kept: list[str] = []
    for i, line in enumerate(out):
        lvl = _heading_level(line)
        if lvl and i > 0:
            nxt = next((ln for ln in out[i + 1:]), None)
            if nxt is None or (_heading_level(nxt) and _heading_level(nxt) <= lvl):
                continue
        kept.append(line)
    if len(kept) <= 1:
        return ""
    return "\n".join(kept)


def _heading_level(line: str) -> int:
    m = re.fullmatch(r"(=+) .* \1", line)
    return len(m.group(1)) if m else 0


def wiki_xml_to_text(xml_bytes: bytes) -> tuple[str, dict]:
    root = ET.fromstring(xml_bytes)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles: list[str] = []
    stats = {"pages": 0, "redirects": 0, "other_namespace": 0, "disambiguation": 0, "empty": 0, "articles": 0}
    for page in root.iter(f"{ns}page"):
        stats["pages"] += 1
        title = page.findtext(f"{ns}title") or ""
        if (page.findtext(f"{ns}ns") or "0") != "0":
            stats["other_namespace"] += 1
            continue
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.find(f"{ns}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT"):
            stats["redirects"] += 1
            continue
        if "(disambiguation)" in title.lower() or re.search(r"\{\{\s*disambig", text, re.I):
            stats["disambiguation"] += 1
            continue
        body = wiki_markup_to_text(title, text)
        if not body:
            stats["empty"] += 1
            continue
        articles.append(body)
    stats["articles"] = len(articles)
    return "\n\n".join(articles) + "\n", stats
