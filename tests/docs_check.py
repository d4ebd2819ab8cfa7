"""The docs checker behind tests/test_docs.py: what README.md and docs/ show must exist in the code.

Checked in every code block and inline code span: each `python -m MODULE [subcommand]` (also after
`torchrun ... -m` and `deepspeed --module`) names a module that exists; each `--flag` after it, after a
launch script (launch/*.sh, launch/slurm/*.sbatch) or after a benchmark script is in that command's
`--help`; each `key=value` override of a training command and each dotted `section.key=value` anywhere is
a real key of pipeline.config; each repository path (configs/..., launch/..., benchmarks/...) exists.
Every relative markdown link resolves, to a heading too when it has an #anchor.

Why hand-written: the checks are specific to this repository's commands (a link checker such as lychee
would cover only the last one). All `--help` texts come from one subprocess (torch is imported once), so
the whole check takes seconds.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("model", "data", "train", "optim", "loss", "deepspeed", "checkpoint")
# Commands whose key=value words are config overrides.
OVERRIDE_MODULES = ("pipeline.pretrain", "pipeline.finetune", "launch.plan", "launch.config_check")
SEPARATORS = {"&&", "||", ";", "|", ">", ">>", "2>&1", "&"}
PATH_RE = re.compile(r"^(configs|launch|benchmarks|pipeline|data_prep|model|core|tests|docs)/[\w./-]+"
                     r"\.(py|yaml|sh|sbatch|md|example)$")
OVERRIDE_RE = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)*)=")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "launch" / "README.md",
            REPO / "configs" / "README.md"]


@dataclass
class Command:
    where: str          # file:line
    kind: str           # "module" or "script"
    name: str           # module name or script path
    sub: str | None     # data_prep's subcommand
    args: list[str]


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every shell-ish line: fenced blocks (not python/yaml ones; a trailing
    backslash joins lines) and inline code spans outside fences."""
    out, fence, lang, pending = [], False, "", ""
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence, lang = (not fence), stripped[3:].strip()
            continue
        if fence:
            if lang in ("python", "yaml", "json", "text"):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            out.append((no, pending + stripped))
            pending = ""
        else:
            out += [(no, span) for span in re.findall(r"`([^`\n]+)`", line)]
    return out


def _tokens(code: str) -> list[str]:
    try:
        return shlex.split(code, comments=True)
    except ValueError:  # an unbalanced quote in an inline span: words are good enough
        return code.split()


def _after_interpreter(words: list[str], i: int) -> bool:
    """Whether words[i] (-m / --module) belongs to python, torchrun or deepspeed (not e.g. pytest's -m MARKERS)."""
    for w in reversed(words[:i]):
        if w in SEPARATORS:
            return False
        if re.fullmatch(r"(.*/)?(python[0-9.]*|torchrun|deepspeed)", w) or w == "torch.distributed.run":
            return True
    return False


def parse_commands(text: str, where: str) -> tuple[list[Command], list[tuple[str, str]]]:
    """The commands a text shows, and every (file:line, key) override it shows."""
    commands, overrides = [], []
    for no, code in code_lines(text):
        at = f"{where}:{no}"
        # A quoted command (`sbatch --wrap "srun ... -m pipeline.evaluate ..."`) is checked like any other.
        words = [w.removeprefix("$(").rstrip(")") for t in _tokens(code) for w in t.split()]
        if "error:" not in code:  # an error message quoting a bad override is not an override
            overrides += [(at, m.group(1)) for w in words if (m := OVERRIDE_RE.match(w))
                          and m.group(1).split(".")[0] in SECTIONS and "." in m.group(1)]
        i = 0
        while i < len(words):
            w = words[i]
            name = kind = None
            if w in ("-m", "--module") and i + 1 < len(words) and re.fullmatch(r"[a-z_][\w.]*", words[i + 1]) \
                    and _after_interpreter(words, i):
                name, kind, i = words[i + 1], "module", i + 2
            elif re.fullmatch(r"(\./)?benchmarks/\w+\.py", w) and _after_interpreter(words, i):
                name, kind, i = w.removeprefix("./"), "module", i + 1  # a script: its --help like a module's
            elif re.fullmatch(r"(\./)?launch/[\w/.-]+\.(sh|sbatch)", w):
                name, kind, i = w.removeprefix("./"), "script", i + 1
            else:
                i += 1
                continue
            if name.startswith(("torch.", "deepspeed")):
                continue  # a launcher (python -m torch.distributed.run): its own flags are its; -m MODULE follows
            args = []
            while i < len(words) and words[i] not in SEPARATORS and not words[i].startswith("#"):
                args.append(words[i])
                i += 1
            sub = args[0] if name == "data_prep" and args and not args[0].startswith("-") else None
            commands.append(Command(at, kind, name, sub, args[1:] if sub else args))
            if kind == "script" and "--module" in args[:-1]:  # the sbatch script's entry point must exist
                commands.append(Command(at, "module", args[args.index("--module") + 1], None, []))
            if kind == "script" and "slurm/shard" in name and "--" in args:  # what follows -- is data_prep shard's
                commands.append(Command(at, "module", "data_prep", "shard", args[args.index("--") + 1:]))
    return commands, overrides


def _flags(args: list[str]) -> list[str]:
    flags = []
    for a in args:
        if a == "--":
            break  # shard.sbatch: what follows is data_prep shard's
        if a.startswith("--") and len(a) > 2:
            flags.append(a.split("=", 1)[0])
    return flags


def _help_key(c: Command) -> tuple[str, str | None]:
    return (c.name, c.sub)


_HELPER = r"""
import contextlib, io, json, runpy, sys
out = {}
for mod, sub in json.loads(sys.argv[1]):
    buf = io.StringIO()
    sys.argv = [mod] + ([sub] if sub else []) + ["--help"]
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if mod.endswith(".py"):
                runpy.run_path(mod, run_name="__main__")
            else:
                runpy.run_module(mod, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code or 0
        except BaseException as e:
            code, _ = 1, buf.write(f"{type(e).__name__}: {e}")
    out[mod + " " + (sub or "")] = [code, buf.getvalue()]
print("\n@@HELP@@" + json.dumps(out))
"""


_HELP_CACHE: dict = {}  # one --help per command for the whole test session


def help_texts(keys: set[tuple[str, str | None]], scripts: set[str]) -> dict:
    """(rc, --help text) per module (+ subcommand) and per launch script: one Python process for all modules."""
    result: dict = {}
    keys = {k for k in keys if (k[0], k[1] or "") not in _HELP_CACHE}
    scripts = {s for s in scripts if s not in _HELP_CACHE}
    if keys:
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
        proc = subprocess.run([sys.executable, "-c", _HELPER, json.dumps(sorted(keys, key=str))], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=env)
        payload = proc.stdout.rsplit("@@HELP@@", 1)
        assert len(payload) == 2, proc.stderr[-2000:]
        result.update({tuple(k.split(" ", 1)): v for k, v in json.loads(payload[1]).items()})
    for script in scripts:
        path = REPO / script
        if path.is_file():
            proc = subprocess.run(["bash", str(path), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
            result[script] = [proc.returncode, proc.stdout + proc.stderr]
        else:
            result[script] = [127, ""]
    _HELP_CACHE.update(result)
    return _HELP_CACHE


def config_keys() -> set[str]:
    from pipeline.config_reference import config_keys as keys
    return keys()


def check_commands(commands: list[Command], overrides: list[tuple[str, str]], helps: dict) -> list[str]:
    problems, keys = [], config_keys()
    tops = {k for k in keys if "." not in k}
    for c in commands:
        key = c.name if c.kind == "script" else (c.name, c.sub or "")
        rc, text = helps.get(key, (127, ""))
        if rc != 0:
            problems.append(f"{c.where}: `{c.name}{' ' + c.sub if c.sub else ''}` does not exist or its --help "
                            f"fails (exit {rc}): {text.strip().splitlines()[-1:] }")
            continue
        for flag in _flags(c.args):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{c.where}: {flag} is not an option of `{c.name}{' ' + c.sub if c.sub else ''}` "
                                f"(not in its --help)")
        if c.name in OVERRIDE_MODULES or c.kind == "script" and "slurm/shard" not in c.name:
            for a in c.args:
                m = OVERRIDE_RE.match(a)
                if a == "--":
                    break
                if m and "." not in m.group(1) and m.group(1) not in tops:
                    problems.append(f"{c.where}: {m.group(1)}= is not a config key (pipeline/config.py)")
    for where, key in overrides:
        if key not in keys:
            problems.append(f"{where}: {key}= is not a config key (pipeline/config.py; see docs/config.md)")
    return problems


def check_paths(text: str, where: str) -> list[str]:
    problems = []
    for no, code in code_lines(text):
        for w in _tokens(code):
            w = w.rstrip(",:;)")
            if PATH_RE.match(w) and not (REPO / w).exists():
                problems.append(f"{where}:{no}: {w} does not exist")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out, fence = set(), False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.+)", line)):
            s = slug(m.group(1))
            out.add(f"{s}-{seen[s]}" if s in seen else s)
            seen[s] = seen.get(s, 0) + 1
    return out


def check_links(text: str, doc: Path) -> list[str]:
    problems, fence = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc.name}:{no}"
            if not path.exists():
                problems.append(f"{where}: link {target} does not resolve")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}: link {target}: no heading #{anchor} in {path.name}")
    return problems


def check_texts(texts: dict[Path, str]) -> list[str]:
    """Every problem in these documents (path -> text), one line each."""
    commands, overrides, problems = [], [], []
    for doc, text in texts.items():
        where = str(doc.relative_to(REPO)) if doc.is_relative_to(REPO) else doc.name
        found, keys = parse_commands(text, where)
        commands += found
        overrides += keys
        problems += check_paths(text, where) + check_links(text, doc)
    modules = {_help_key(c) for c in commands if c.kind == "module"}
    helps = help_texts(modules, {c.name for c in commands if c.kind == "script"})
    return problems + check_commands(commands, overrides, helps)
