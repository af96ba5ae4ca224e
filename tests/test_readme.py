"""The README is the user's door: its quick start runs as written, and every relative link in
README.md and docs/*.md points to a file that exists. The docs say only what is true of the
code's names (fifty-fourth session): every ``evoplug.NAME`` they use resolves, and every command
line they show (``evoplug SUB ...``, ``python -m evoplug.mm.train ...``, ``python
benchmarks/X.py ...``) uses options its parser has."""
import ast
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^```([\w+-]*)\s*\n(.*?)^```\s*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def section(text: str, heading: str) -> str:
    """The text under the ``## heading`` line, up to the next heading of level 1 or 2."""
    m = re.search(rf"^## {re.escape(heading)}\s*$", text, re.M)
    assert m, f"README.md has no '## {heading}' section"
    end = re.search(r"^#{1,2} ", text[m.end():], re.M)
    return text[m.end(): m.end() + end.start() if end else len(text)]


def quick_start_blocks():
    body = section(README.read_text(encoding="utf-8"), "Quick start")
    return [code for lang, code in FENCE.findall(body) if lang == "python"]


def test_quick_start_runs_as_written():
    """Every ```python block of the 'Quick start' section, in order, in one namespace: the first
    converts DeiT-S and runs it; the next ones continue with its names (``fast``)."""
    pytest.importorskip("timm")
    blocks = quick_start_blocks()
    assert blocks, "no ```python block under '## Quick start'"
    ns = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md quick start, block {i + 1}", "exec"), ns)
    logits = ns["logits"]
    assert tuple(logits.shape) == (8, 1000)
    assert bool(logits.isfinite().all())


def markdown_files():
    return [README] + DOCS


def relative_links(path: Path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                      # http(s)://, mailto:, an anchor in the same page
        yield target


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    missing = []
    for target in relative_links(path):
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)}: links to missing files: {missing}"


def test_readme_stays_a_door():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 230, f"README.md has {n} lines; move details into docs/"


# ---- every `evoplug.NAME` the docs use resolves -------------------------------------------------

#: ``evoplug.a.b`` in any text (prose, inline code, code blocks); ``evoplug.tools.cli:main`` (an
#: entry point) counts as ``evoplug.tools.cli.main``
DOTTED = re.compile(r"\bevoplug(?:\.\w+)+(?::\w+)?")
#: a path the docs name as history, "`evoplug.tools.bench` (formerly `evoplug.bench`)"
FORMERLY = re.compile(r"formerly\s+`evoplug[\w.:]*`")


def python_names(code: str):
    """The evoplug names a ```python block imports (``from evoplug.tools import visualize as
    viz``) and the attributes it reads through them (``viz.record_selection``)."""
    bound, tree = {}, ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "evoplug":
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "evoplug" and a.asname:
                    bound[a.asname] = a.name
    yield from bound.values()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            yield f"{bound[node.value.id]}.{node.attr}"


def documented_names(path: Path):
    text = path.read_text(encoding="utf-8")
    names = {m.replace(":", ".") for m in DOTTED.findall(FORMERLY.sub("", text))}
    for lang, code in FENCE.findall(text):
        if lang == "python":
            names.update(python_names(code))
    return sorted(names)


def resolve(name: str):
    """Import the longest importable module prefix of ``name``, then getattr the rest."""
    if name.startswith(("evoplug.mmseg", "evoplug.mmdet")):
        importlib.import_module("evoplug.integrations.mmcv_ops")   # as the docs say, first
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module or module.startswith(f"{e.name}."):
                continue                  # not a module: an attribute of a shorter prefix
            raise                         # a module that needs something missing
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_api_names_resolve(path):
    missing, unverifiable = [], []
    for name in documented_names(path):
        try:
            resolve(name)
        except ModuleNotFoundError as e:      # an optional package absent on this machine
            unverifiable.append(f"{name} (needs {e.name})")
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, f"{path.relative_to(ROOT)} names what evoplug does not have:\n" + "\n".join(missing)
    if unverifiable:
        pytest.skip(f"not checked here: {unverifiable}")


#: ``evoplug.f(arguments)`` with at most one level of parentheses inside, anywhere in the text
CALL = re.compile(r"\b(evoplug(?:\.\w+)+)\(([^()`]*(?:\([^()`]*\)[^()`]*)*)\)")


def keyword_problems(name: str, arguments: str):
    """The keywords of one documented call that its function does not take; a ``**options``
    function takes the fields of EvoOptions (``evoplug.convert(model, start_block=4)``)."""
    import dataclasses
    import inspect
    import evoplug
    try:
        params = inspect.signature(resolve(name)).parameters
    except (TypeError, ValueError):          # a class or builtin without a signature
        return []
    takes = set(params)
    if any(q.kind is q.VAR_KEYWORD for q in params.values()):
        takes |= {f.name for f in dataclasses.fields(evoplug.EvoOptions)}
    return [f"{name}({kw}=...)" for kw in re.findall(r"(?<![=\w.])(\w+)=(?!=)", arguments) if kw not in takes]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_keywords_exist(path):
    text = FORMERLY.sub("", path.read_text(encoding="utf-8"))
    wrong = [w for name, arguments in CALL.findall(text) for w in keyword_problems(name, arguments)]
    assert not wrong, f"{path.relative_to(ROOT)} passes keywords that evoplug does not take: {wrong}"


# ---- every command line the docs show uses options its parser has -------------------------------

#: where a command starts: a snippet's start (after a ``$`` prompt) or a shell separator
PROGRAM = re.compile(r"(?:^|&&|\|\||[;|(])\s*(?:\$\s+)?"
                     r"(python -m evoplug\.mm\.train|torchrun\b[^#`]*?\s-m evoplug\.mm\.train"
                     r"|python -m evoplug|evoplug|python benchmarks/\w+\.py)(?=\s|$)")
MM_TRAIN = ROOT / "evoplug/integrations/mmpretrain/train.py"   # evoplug/mm/train.py runs its parse_args
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1"}
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
#: placeholders the docs write for a model, images, files
PLACEHOLDERS = {"MODEL": "deit_small_patch16_224", "MODEL...": "deit_small_patch16_224",
                "IMAGES": "calib/", "IMAGES...": "calib/", "IMAGE...": "photo.jpg",
                "FILE": "out.json", "CONFIG": "config.py"}


def code_snippets(path: Path):
    """(snippet, from a code block?): each line of the non-python code blocks (``\\``
    continuations joined), each 4-space-indented command line, each inline code span."""
    text = path.read_text(encoding="utf-8")
    for lang, code in FENCE.findall(text):
        if lang != "python":
            for line in code.replace("\\\n", " ").splitlines():
                yield line, True
    rest = FENCE.sub("", text)
    for line in rest.splitlines():
        if line.startswith("    ") and PROGRAM.search(line):
            yield line, True
    for _, span in SPAN.findall(rest):
        if "\n\n" not in span:
            yield " ".join(span.split()), False


def documented_commands(path: Path):
    """(program, argument words, from a code block?) for each command line the doc shows."""
    for snippet, block in code_snippets(path):
        for m in PROGRAM.finditer(snippet):
            try:
                words = shlex.split(snippet[m.end():], comments=True)
            except ValueError:              # an unclosed quote in prose
                words = snippet[m.end():].split()
            args = []
            for w in words:
                if w in SHELL_STOP:
                    break
                args.append(w)
            program = "python -m evoplug.mm.train" if m.group(1).endswith("evoplug.mm.train") else m.group(1)
            yield ("evoplug" if program == "python -m evoplug" else program), args, block


def options(words):
    return [w.split("=", 1)[0] for w in words if w.startswith("-") and not re.match(r"-[\d.]", w)]


def command_parser(program: str, args):
    """(the option strings, a parse function or None, the words after the subcommand) of one
    documented command. Benchmark scripts build their parsers in ``main``: their options are read
    from their source, as are ``evoplug.mm.train``'s (its ``parse_args`` builds and parses)."""
    if program == "evoplug":
        from evoplug.tools.cli import build_parser
        parser = build_parser()
        if args and not args[0].startswith("-"):
            sub = next(a for a in parser._actions if a.dest == "command")
            assert args[0] in sub.choices, f"`evoplug {args[0]}`: no such subcommand ({sorted(sub.choices)})"
            parser, args = sub.choices[args[0]], args[1:]
        return set(parser._option_string_actions), parser.parse_args, args
    if program == "python -m evoplug.mm.train":
        try:
            from evoplug.integrations.mmpretrain.train import parse_args
            importlib.import_module("mmengine")      # parse_args needs it: else names only
        except ImportError:
            parse_args = None
        return source_options(MM_TRAIN) | {"-h", "--help"}, parse_args, args
    script = ROOT / program.split()[-1]
    assert script.exists(), f"`{program}`: {script.relative_to(ROOT)} does not exist"
    return source_options(script) | {"-h", "--help"}, None, args


def source_options(source: Path):
    """The option strings of every ``add_argument`` call in a Python file."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-"))
    return found


def check_command(program, args, block):
    """What is wrong with one documented command line ('' when nothing)."""
    known, parse, rest = command_parser(program, args)
    unknown = sorted(set(options(rest)) - known)
    if unknown:
        return f"`{program} {shlex.join(args)}`: no option {unknown}"
    if block and parse and "--help" not in rest and "..." not in " ".join(rest):
        return check_parse(parse, rest, f"{program} {shlex.join(args)}")   # a runnable example parses
    return ""


def check_parse(parse_args, words, command):
    words = [PLACEHOLDERS.get(w, w) for w in words]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_args(words)
    except SystemExit:
        return f"`{command}`: {err.getvalue().strip().splitlines()[-1]}"
    return ""


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_command_lines_use_existing_options(path, monkeypatch):
    """Options must be the parser's own, spelled in full (argparse would take an abbreviation);
    a command in a code block must parse as a whole, placeholders (MODEL, FILE) filled in."""
    monkeypatch.setenv("LOCAL_RANK", "0")          # evoplug.mm.train's parse_args sets it
    wrong = [w for w in (check_command(*c) for c in documented_commands(path)) if w]
    assert not wrong, f"{path.relative_to(ROOT)}:\n" + "\n".join(wrong)


#: options of other programs that the docs show in inline code: option -> whose
FOREIGN_OPTIONS = {"--nproc_per_node": "torchrun's"}


def all_known_options():
    """Every option of the ``evoplug`` command, ``evoplug.mm.train``, the benchmark scripts and the
    examples (``make demo ARGS="--distill-steps 50"``)."""
    from evoplug.tools.cli import build_parser
    top = build_parser()
    known = set(top._option_string_actions)
    for parser in next(a for a in top._actions if a.dest == "command").choices.values():
        known |= set(parser._option_string_actions)
    sources = [MM_TRAIN, *(ROOT / "benchmarks").glob("*.py"),
               *(ROOT / "examples").rglob("*.py")]
    return known.union(*map(source_options, sources))


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_inline_options_exist_somewhere(path):
    """An option in inline code away from its command (``python benchmarks/gemm_rows.py`` ...
    ``--parts 3 --turn-batch 32``) is at least an option of one of the project's parsers."""
    known = all_known_options() | set(FOREIGN_OPTIONS)
    spans = [span for _, span in SPAN.findall(FENCE.sub("", path.read_text(encoding="utf-8")))]
    unknown = sorted({m for span in spans for m in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)} - known)
    assert not unknown, f"{path.relative_to(ROOT)}: options no parser has: {unknown}"
