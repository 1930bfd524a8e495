#!/usr/bin/env python3
"""Static checks of deploy/: what no engine on the test machines can run, kept correct by review
and by these checks.

    python3 tests/deploy/check_deploy.py [LOCKSTEP_BIN] [--root DIR]

The `lockstep` binary (argument, else $LOCKSTEP_BIN) is the authority on configuration keys
(`lockstep config`) and subcommands (`lockstep <cmd> --help`). --root checks another copy of
the repository (tests/deploy/test_check_deploy.py mutates copies to show every check fails).

- deploy/Dockerfile: every COPY/ADD source from the build context exists and is not excluded by
  deploy/Dockerfile.dockerignore; every workspace member lands where Cargo expects it; the
  builder's Rust is the pinned toolchain; the runtime stage runs as a non-root USER, has a
  HEALTHCHECK whose command exists in the image, and runs `lockstep serve`.
- deploy/compose.yaml: exactly three Lockstep nodes, every LOCKSTEP_* variable a real key, a
  stop grace above the shutdown grace, and the nginx configuration it mounts lists every node
  in its upstream and passes WebSocket upgrades (Upgrade, Connection, HTTP/1.1).
- deploy/k8s: each Deployment has readiness on /readyz, liveness on /healthz, a preStop,
  resource requests, terminationGracePeriodSeconds above shutdown grace + preStop, only real
  LOCKSTEP_* keys (its own env, the ConfigMap and the Secret), and the README names the
  external services.

Prints one line per check and exits 1 when any failed.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml
from dockerfile_parse import DockerfileParser

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent


class Report:
    """Collects check results and prints them as they come."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def check(self, what: str, ok: bool, why: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed.append(what)
            print(f"FAIL {what}")
            for line in why.strip().splitlines():
                print(f"       {line}")
        return ok

    def fail(self, what: str, why: str) -> None:
        self.check(what, False, why)


# --- durations -------------------------------------------------------------------------------

_UNITS = {
    "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "secs": 1, "second": 1,
    "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60, "h": 3600,
    "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
}


def seconds(text: str | int | float) -> float:
    """A humantime (`20s`, `1m 30s`, `500ms`) or compose (`1m30s`) duration, in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text.strip().lower())
    joined = "".join(f"{n}{u}" for n, u in parts)
    if not parts or joined != re.sub(r"\s+", "", text.strip().lower()):
        raise ValueError(f"not a duration: {text!r}")
    total = 0.0
    for number, unit in parts:
        if unit not in _UNITS:
            raise ValueError(f"unknown unit {unit!r} in {text!r}")
        total += float(number) * _UNITS[unit]
    return total


# --- the binary ------------------------------------------------------------------------------


class Binary:
    """The `lockstep` binary, run with a clean environment (a stray LOCKSTEP_* variable would
    be refused as an unknown key)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.problem = ""
        if not path:
            self.problem = "no lockstep binary: pass its path or set LOCKSTEP_BIN"
        elif not os.access(path, os.X_OK):
            self.problem = f"{path} is not an executable lockstep binary"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.path
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
        return subprocess.run(
            [self.path, *args], capture_output=True, text=True, env=env, timeout=30, check=False
        )

    def keys(self) -> set[str]:
        """Every environment name `lockstep config` lists, plus LOCKSTEP_CONFIG (the file)."""
        out = self.run("config")
        if out.returncode != 0:
            raise RuntimeError(f"`{self.path} config` failed: {out.stderr.strip()}")
        names = set(re.findall(r"\bLOCKSTEP_[A-Z0-9_]+\b", out.stdout))
        if not names:
            raise RuntimeError(f"`{self.path} config` listed no LOCKSTEP_* variable")
        return names | {"LOCKSTEP_CONFIG"}

    def has_subcommand(self, argv: list[str]) -> tuple[bool, str]:
        """Whether `lockstep ARGV --help` is accepted (the subcommand exists)."""
        out = self.run(*argv, "--help")
        return out.returncode == 0, (out.stderr or out.stdout).strip()


# --- .dockerignore ---------------------------------------------------------------------------


@dataclass
class Pattern:
    regex: re.Pattern[str]
    exclusion: bool
    text: str


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's (Go filepath.Match plus `**`) pattern as an anchored regex."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out += re.escape(c)
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^"):
                    body = "!" + body[1:]
                out += fnmatch.translate(f"[{body}]")[4:-3]
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


class DockerIgnore:
    """The exclusion rules BuildKit applies to the build context."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.patterns: list[Pattern] = []
        if path is None or not path.exists():
            return
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
            line = os.path.normpath(line).lstrip("/")
            if line in ("", "."):
                continue
            self.patterns.append(Pattern(_pattern_regex(line), exclusion, raw.strip()))

    def excluded_by(self, rel: str) -> str | None:
        """The pattern that excludes `rel` (a path relative to the context), or None. As in
        Docker, a pattern matching a parent directory excludes everything under it, and the
        last matching pattern wins."""
        rel = os.path.normpath(rel).lstrip("/")
        if rel in ("", "."):
            return None
        parts = rel.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        verdict: str | None = None
        for p in self.patterns:
            if any(p.regex.fullmatch(prefix) for prefix in prefixes):
                verdict = None if p.exclusion else p.text
        return verdict


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Instruction:
    name: str
    value: str
    line: int


@dataclass
class Stage:
    index: int
    name: str | None
    image: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction | None:
        found = self.all(name)
        return found[-1] if found else None

    def workdir(self, before_line: int) -> str:
        wd = "/"
        for i in self.instructions:
            if i.line >= before_line:
                break
            if i.name == "WORKDIR":
                wd = str(PurePosixPath(wd, i.value.strip()))
        return wd


def parse_stages(text: str) -> list[Stage]:
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    stages: list[Stage] = []
    for item in parser.structure:
        name, value, line = item["instruction"], item["value"], item["startline"] + 1
        if name == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(len(stages), alias, words[0] if words else ""))
        elif name != "COMMENT" and stages:
            stages[-1].instructions.append(Instruction(name, value, line))
    return stages


def split_flags(value: str) -> tuple[dict[str, str], list[str]]:
    """`--from=build --chown=1:1 a b dest` → ({from: build, chown: 1:1}, [a, b, dest])."""
    value = value.strip()
    flags: dict[str, str] = {}
    while value.startswith("--"):
        word, _, value = value.partition(" ")
        key, _, val = word[2:].partition("=")
        flags[key] = val
        value = value.strip()
    if value.startswith("["):
        try:
            return flags, [str(a) for a in json.loads(value)]
        except json.JSONDecodeError:
            pass
    return flags, shlex.split(value)


def command_argv(value: str) -> tuple[list[str], bool]:
    """An ENTRYPOINT/CMD/HEALTHCHECK CMD value as argv, and whether it was exec (JSON) form."""
    value = value.strip()
    if value.startswith("["):
        try:
            return [str(a) for a in json.loads(value)], True
        except json.JSONDecodeError:
            pass
    return ["/bin/sh", "-c", value], False


def copied_paths(stage: Stage) -> dict[str, Instruction]:
    """Absolute paths in the image that the stage's COPY/ADD instructions write."""
    out: dict[str, Instruction] = {}
    for ins in stage.instructions:
        if ins.name not in ("COPY", "ADD"):
            continue
        _, args = split_flags(ins.value)
        if len(args) < 2:
            continue
        *sources, dest = args
        base = PurePosixPath(stage.workdir(ins.line), dest)
        if dest.endswith("/") or len(sources) > 1:
            for s in sources:
                out[str(base / PurePosixPath(s).name)] = ins
        else:
            out[str(base)] = ins
    return out


def check_dockerfile(root: Path, binary: Binary, report: Report) -> str | None:
    """Returns the listen address the image sets (LOCKSTEP_LISTEN), for the compose checks."""
    dockerfile = root / "deploy" / "Dockerfile"
    if not report.check("deploy/Dockerfile exists", dockerfile.is_file(), f"missing: {dockerfile}"):
        return None
    stages = parse_stages(dockerfile.read_text())
    if not report.check("Dockerfile has a FROM", bool(stages), "no FROM instruction"):
        return None
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile before the context's own.
    ignore_path = dockerfile.with_name("Dockerfile.dockerignore")
    if not ignore_path.exists():
        ignore_path = root / ".dockerignore"
    ignore = DockerIgnore(ignore_path if ignore_path.exists() else None)
    stage_names = {s.name for s in stages if s.name} | {str(s.index) for s in stages}

    # Every COPY/ADD source from the context exists and is sent.
    context_copies: list[tuple[Stage, Instruction, list[str], str]] = []
    for stage in stages:
        for ins in stage.instructions:
            if ins.name not in ("COPY", "ADD"):
                continue
            flags, args = split_flags(ins.value)
            where = f"line {ins.line}: {ins.name} {ins.value}"
            if "from" in flags:
                if flags["from"] not in stage_names and ":" not in flags["from"] and "/" not in flags["from"]:
                    report.fail(f"{ins.name} --from={flags['from']} names a stage", f"{where}\nno stage is called {flags['from']!r}")
                continue
            if args and args[0].startswith("<<"):
                continue  # a heredoc, no context file
            if len(args) < 2:
                report.fail(f"{ins.name} has a source and a destination", where)
                continue
            *sources, dest = args
            for source in sources:
                if ins.name == "ADD" and re.match(r"^(https?://|git@)", source):
                    continue
                rel = os.path.normpath(source).lstrip("/")
                matches = sorted(root.glob(rel)) if any(c in rel for c in "*?[") else [root / rel]
                matches = [m for m in matches if m.exists()]
                if not matches:
                    report.fail(
                        f"{ins.name} source {source} exists in the build context",
                        f"{where}\n{root / rel} does not exist (the context is the repository root)",
                    )
                for m in matches:
                    m_rel = os.path.relpath(m, root)
                    pattern = ignore.excluded_by(m_rel)
                    report.check(
                        f"{ins.name} source {m_rel} exists and is not excluded by {ignore_path.name}",
                        pattern is None,
                        f"{where}\n{ignore_path} excludes it with {pattern!r}",
                    )
                context_copies.append((stage, ins, [source], dest))

    # Every workspace member is copied, to the same path under the builder's WORKDIR.
    manifest = root / "Cargo.toml"
    members = tomllib.loads(manifest.read_text()).get("workspace", {}).get("members", ["."])
    needed = ["Cargo.toml", "Cargo.lock"]
    if (root / "rust-toolchain.toml").exists():
        needed.append("rust-toolchain.toml")
    for m in members:
        needed += ["src"] if m == "." else [m]
    build_stage = next((s for s, *_ in context_copies), None)
    for path in needed:
        landing = None
        for stage, ins, sources, dest in context_copies:
            src = os.path.normpath(sources[0]).lstrip("/") or "."
            if stage is not build_stage:
                continue
            covers = src == "." or path == src or path.startswith(src + "/")
            if not covers:
                continue
            workdir = PurePosixPath(stage.workdir(ins.line))
            base = PurePosixPath(workdir, dest)
            src_path = root / src
            if src_path.is_dir():
                # A directory's contents go into dest.
                target = base / os.path.relpath(path, src) if src != "." else base / path
            elif dest.endswith("/") or dest in (".", "./"):
                target = base / PurePosixPath(src).name
            else:
                target = base
            landing = (os.path.normpath(str(target)), os.path.normpath(str(workdir / path)), ins)
        if landing is None:
            report.fail(
                f"workspace path {path} is copied into the builder",
                f"no COPY in the build stage brings {path} (Cargo.toml members: {members})",
            )
            continue
        got, want, ins = landing
        pattern = ignore.excluded_by(path)
        report.check(
            f"workspace path {path} is copied into the builder at {want}",
            got == want and pattern is None,
            f"line {ins.line}: COPY {ins.value} puts it at {got}; Cargo expects {want}"
            if got != want else f"{ignore_path} excludes it with {pattern!r}",
        )
    # What the build reads inside the copied members (sources, manifests, migrations).
    for m in members:
        base = root / ("src" if m == "." else m)
        hidden = []
        for f in sorted(base.rglob("*")) if base.is_dir() else []:
            rel = os.path.relpath(f, root)
            if any(part in ("target", "node_modules") for part in Path(rel).parts):
                continue
            if f.is_file() and (f.suffix in (".rs", ".toml", ".sql") or "migrations" in Path(rel).parts):
                if (pattern := ignore.excluded_by(rel)) is not None:
                    hidden.append(f"{rel} (by {pattern!r})")
        report.check(
            f"sources of workspace member {m} are not excluded by {ignore_path.name}",
            not hidden,
            "excluded: " + ", ".join(hidden[:10]),
        )

    # The builder uses the pinned toolchain.
    toolchain_file = root / "rust-toolchain.toml"
    if toolchain_file.exists() and build_stage is not None and re.match(r"^(docker\.io/(library/)?)?rust:", build_stage.image):
        channel = tomllib.loads(toolchain_file.read_text()).get("toolchain", {}).get("channel", "")
        tag = build_stage.image.split(":", 1)[1].split("-", 1)[0]
        report.check(
            f"builder image {build_stage.image} is the pinned Rust {channel}",
            tag == channel,
            f"rust-toolchain.toml pins {channel!r}; the image's Rust is {tag!r} (rustup would fetch another toolchain)",
        )

    final = stages[-1]
    final_files = copied_paths(final)

    # Not root.
    user = final.last("USER")
    who = user.value.strip().split(":")[0] if user else "root"
    report.check(
        f"runtime stage runs as a non-root user (USER {user.value.strip() if user else '<unset>'})",
        user is not None and who not in ("root", "0", ""),
        "the runtime stage has no USER, so it runs as root" if user is None else f"line {user.line}: USER {user.value} is root",
    )

    # HEALTHCHECK, with a command that exists in the image.
    health = final.last("HEALTHCHECK")
    if report.check("runtime stage has a HEALTHCHECK", health is not None and health.value.strip().upper() != "NONE",
                    "no HEALTHCHECK in the runtime stage" if health is None else f"line {health.line}: HEALTHCHECK NONE"):
        assert health is not None
        m = re.search(r"(?:^|\s)CMD\s+(.*)$", health.value, re.S)
        if report.check("HEALTHCHECK has a CMD", m is not None, f"line {health.line}: HEALTHCHECK {health.value}"):
            assert m is not None
            argv, exec_form = command_argv(m.group(1))
            words = argv if exec_form else shlex.split(argv[2])
            installs = " ".join(i.value for i in final.all("RUN"))
            for tool in ("curl", "wget"):
                if words and PurePosixPath(words[0]).name == tool:
                    report.check(f"HEALTHCHECK's {tool} is installed in the runtime image",
                                 re.search(rf"\b{tool}\b", installs) is not None,
                                 f"line {health.line}: the runtime stage installs no {tool}; use `lockstep healthcheck`")
            if words and PurePosixPath(words[0]).name == "lockstep":
                check_lockstep_argv("HEALTHCHECK", words, final_files, binary, report, health.line)

    # ENTRYPOINT + CMD run `lockstep serve`.
    entry, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    argv: list[str] = []
    if entry is not None:
        argv, exec_form = command_argv(entry.value)
        if exec_form and cmd is not None:
            argv += command_argv(cmd.value)[0]
    elif cmd is not None:
        argv = command_argv(cmd.value)[0]
    shown = " ".join(argv) or "<nothing>"
    is_serve = len(argv) >= 2 and PurePosixPath(argv[0]).name == "lockstep" and argv[1] == "serve"
    if report.check(f"image runs `lockstep serve` ({shown})", is_serve,
                    "ENTRYPOINT + CMD (exec form) must be /path/to/lockstep serve …"):
        check_lockstep_argv("ENTRYPOINT", argv, final_files, binary, report, (entry or cmd).line)  # type: ignore[union-attr]

    listen = None
    for env in final.all("ENV"):
        m = re.search(r"LOCKSTEP_LISTEN[= ]\s*\"?([^\s\"]+)", env.value)
        if m:
            listen = m.group(1)
    return listen


def check_lockstep_argv(what: str, argv: list[str], final_files: dict[str, Instruction], binary: Binary,
                        report: Report, line: int) -> None:
    """argv[0] is a lockstep binary the runtime stage copies in, and argv[1] a subcommand it has."""
    report.check(
        f"{what}'s {argv[0]} is copied into the runtime stage",
        argv[0] in final_files,
        f"line {line}: no COPY in the runtime stage writes {argv[0]} (it writes {sorted(final_files) or 'nothing'})",
    )
    subcommand = argv[1:2]
    if binary.problem:
        report.fail(f"{what}: `lockstep {' '.join(subcommand)}` exists", binary.problem)
        return
    ok, out = binary.has_subcommand(subcommand)
    report.check(f"{what}: `lockstep {' '.join(subcommand)}` exists in {binary.path}", ok,
                 f"line {line}: `{binary.path} {' '.join(subcommand)} --help` failed:\n{out}")


# --- compose ---------------------------------------------------------------------------------


def env_names(environment: object) -> dict[str, str | None]:
    if isinstance(environment, dict):
        return {str(k): None if v is None else str(v) for k, v in environment.items()}
    if isinstance(environment, list):
        out: dict[str, str | None] = {}
        for item in environment:
            k, sep, v = str(item).partition("=")
            out[k] = v if sep else None
        return out
    return {}


def check_keys(what: str, names: dict[str, str | None], keys: set[str] | None, binary: Binary, report: Report) -> None:
    used = sorted(n for n in names if n.startswith("LOCKSTEP_"))
    if keys is None:
        report.fail(f"{what}: LOCKSTEP_* names are configuration keys", binary.problem or "`lockstep config` failed")
        return
    unknown = [n for n in used if n not in keys]
    report.check(
        f"{what}: {len(used)} LOCKSTEP_* names are configuration keys",
        not unknown,
        "not listed by `lockstep config`: " + ", ".join(unknown),
    )


def is_lockstep_service(svc: dict) -> bool:
    image = str(svc.get("image", ""))
    name = image.rsplit("/", 1)[-1].split(":", 1)[0]
    build = svc.get("build")
    dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
    return name == "lockstep" or str(dockerfile).endswith("deploy/Dockerfile")


def service_command(svc: dict) -> list[str]:
    """The arguments a service passes to the image's ENTRYPOINT (the image's CMD, `serve`, when
    it names none)."""
    command = svc.get("command")
    if command is None:
        return ["serve"]
    return [str(c) for c in command] if isinstance(command, list) else shlex.split(str(command))


def nginx_blocks(text: str, keyword: str) -> dict[str, str]:
    """`keyword NAME { … }` blocks (one level of braces inside)."""
    out = {}
    for m in re.finditer(rf"\b{keyword}\s+(\S+)\s*\{{((?:[^{{}}]|\{{[^{{}}]*\}})*)\}}", text):
        out[m.group(1)] = m.group(2)
    return out


def check_compose(root: Path, keys: set[str] | None, binary: Binary, image_listen: str | None, report: Report) -> None:
    path = root / "deploy" / "compose.yaml"
    if not report.check("deploy/compose.yaml exists", path.is_file(), f"missing: {path}"):
        return
    doc = yaml.safe_load(path.read_text()) or {}
    services: dict = doc.get("services") or {}
    nodes = {
        name: svc for name, svc in services.items()
        if isinstance(svc, dict) and is_lockstep_service(svc) and service_command(svc)[:1] == ["serve"]
    }
    report.check(
        f"compose.yaml has exactly three Lockstep nodes ({', '.join(nodes) or 'none'})",
        len(nodes) == 3,
        f"found {len(nodes)}; the deployment is three named nodes behind nginx",
    )
    for name, svc in nodes.items():
        replicas = (svc.get("deploy") or {}).get("replicas", 1)
        report.check(f"compose node {name} is one container", replicas in (None, 1) and svc.get("scale", 1) == 1,
                     f"{name} asks for {replicas} replicas; name each node instead")
    for name, svc in services.items():
        if not isinstance(svc, dict):
            continue
        names = env_names(svc.get("environment"))
        env_files = svc.get("env_file") or []
        for f in [env_files] if isinstance(env_files, (str, dict)) else env_files:
            f_path = path.parent / (f["path"] if isinstance(f, dict) else f)
            if f_path.exists():
                for line in f_path.read_text().splitlines():
                    if "=" in line and not line.lstrip().startswith("#"):
                        names[line.split("=", 1)[0].strip()] = ""
        if any(n.startswith("LOCKSTEP_") for n in names) or name in nodes:
            check_keys(f"compose service {name}", names, keys, binary, report)
    for name, svc in nodes.items():
        env = env_names(svc.get("environment"))
        try:
            # `${VAR:-default}` counts as its default.
            grace_text = re.sub(r"^\$\{\w+:?-([^}]*)\}$", r"\1", env.get("LOCKSTEP_SHUTDOWN_GRACE") or "") or "10s"
            grace = seconds(grace_text)
            stop = seconds(svc.get("stop_grace_period", "10s"))
        except ValueError as err:
            report.fail(f"compose node {name}: stop_grace_period and shutdown grace are durations", str(err))
            continue
        report.check(f"compose node {name}: stop_grace_period {stop:g}s > shutdown grace {grace:g}s", stop > grace,
                     "Docker kills the container mid-drain; raise stop_grace_period")

    # The nginx configuration mounted into a service.
    confs: list[tuple[str, Path]] = []
    for name, svc in services.items():
        for vol in (svc or {}).get("volumes", []) if isinstance(svc, dict) else []:
            if isinstance(vol, dict):
                source, target = str(vol.get("source", "")), str(vol.get("target", ""))
            else:
                bits = str(vol).split(":")
                if len(bits) < 2:
                    continue
                source, target = bits[0], bits[1]
            if target == "/etc/nginx/nginx.conf" or (target.startswith("/etc/nginx/conf.d/") and target.endswith(".conf")):
                confs.append((name, (path.parent / source).resolve()))
    if not report.check("compose.yaml mounts an nginx configuration in front of the nodes", bool(confs),
                        "no service mounts a file at /etc/nginx/nginx.conf or /etc/nginx/conf.d/*.conf"):
        return
    for service, conf in confs:
        rel = os.path.relpath(conf, root)
        if not report.check(f"{service}'s {rel} exists", conf.is_file(), f"missing: {conf}"):
            continue
        text = re.sub(r"#[^\n]*", "", conf.read_text())
        upstreams = nginx_blocks(text, "upstream")
        passes = re.findall(r"\bproxy_pass\s+https?://([^/;\s]+)", text)
        used = [u for u in passes if u in upstreams]
        if not report.check(f"{rel}: proxy_pass goes to an upstream", bool(used),
                            f"proxy_pass targets {passes or 'nothing'}; upstreams: {sorted(upstreams) or 'none'}"):
            continue
        for upstream in used:
            servers = re.findall(r"^\s*server\s+([^\s;]+)", upstreams[upstream], re.M)
            known = {h for name, svc in services.items() if isinstance(svc, dict)
                     for h in (name, svc.get("hostname"), svc.get("container_name")) if h}
            for server in servers:
                host = server.rsplit(":", 1)[0]
                # nginx refuses to start when a server's name does not resolve.
                report.check(f"{rel}: upstream {upstream} server {server} is a compose service",
                             host in known, f"no service {host!r} in compose.yaml (services: {sorted(services)})")
            for name, svc in nodes.items():
                listen = env_names(svc.get("environment")).get("LOCKSTEP_LISTEN") or image_listen or "127.0.0.1:8080"
                port = listen.rsplit(":", 1)[-1]
                hosts = {name, str(svc.get("hostname", name)), str(svc.get("container_name", name))}
                report.check(
                    f"{rel}: upstream {upstream} lists node {name} on port {port}",
                    any(s in {f"{h}:{port}" for h in hosts} for s in servers),
                    f"upstream {upstream} has {servers or 'no servers'}",
                )
        directives = re.findall(r"^\s*(proxy_set_header|proxy_http_version)\s+([^;]+);", text, re.M)
        headers = {v.split(None, 1)[0].lower(): v.split(None, 1)[1].strip() if len(v.split(None, 1)) > 1 else ""
                   for d, v in directives if d == "proxy_set_header"}
        report.check(f"{rel}: passes the Upgrade header (proxy_set_header Upgrade $http_upgrade)",
                     headers.get("upgrade") == "$http_upgrade", f"Upgrade is {headers.get('upgrade', 'not set')}")
        connection = headers.get("connection")
        maps = re.findall(r"\bmap\s+\$http_upgrade\s+(\$\w+)", text)
        report.check(
            f"{rel}: sets Connection for upgrades (proxy_set_header Connection {connection or '…'})",
            connection is not None and (connection in maps or connection.strip('"').lower() == "upgrade"),
            f"Connection is {connection or 'not set'}; map $http_upgrade to it (maps: {maps or 'none'})",
        )
        versions = [v.strip() for d, v in directives if d == "proxy_http_version"]
        report.check(f"{rel}: proxies with HTTP/1.1 (WebSocket upgrades need it)", "1.1" in versions,
                     f"proxy_http_version is {versions or 'unset (1.0)'}")


# --- Kubernetes ------------------------------------------------------------------------------


def prestop_seconds(prestop: dict) -> float | None:
    if isinstance(prestop.get("sleep"), dict):
        return float(prestop["sleep"].get("seconds", 0))
    command = (prestop.get("exec") or {}).get("command") or []
    m = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", " ".join(str(c) for c in command))
    return float(m.group(1)) if m else None


def check_k8s(root: Path, keys: set[str] | None, binary: Binary, report: Report) -> None:
    k8s = root / "deploy" / "k8s"
    docs: list[tuple[Path, dict]] = []
    for f in sorted(k8s.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict):
                docs.append((f, doc))
    by_kind = lambda kind: [(f, d) for f, d in docs if d.get("kind") == kind]  # noqa: E731
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for _, d in by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: {**(d.get("stringData") or {}), **(d.get("data") or {})} for _, d in by_kind("Secret")}
    for f, d in by_kind("ConfigMap") + by_kind("Secret"):
        names = {k: None for k in {**(d.get("data") or {}), **(d.get("stringData") or {})}}
        check_keys(f"k8s {d['kind']} {d['metadata']['name']} ({f.name})", names, keys, binary, report)

    # The Ingress is the public side: clients need /ws and /api; /metrics, /healthz and /readyz
    # are for Prometheus and the kubelet inside the cluster.
    for f, d in by_kind("Ingress"):
        paths = [(p.get("path") or "/", p.get("pathType"))
                 for rule in d["spec"].get("rules") or [] for p in (rule.get("http") or {}).get("paths") or []]

        def covers(path: str, kind: str | None, target: str) -> bool:
            if kind == "Exact":
                return target == path
            prefix = path.rstrip("/")
            return target == path or target.startswith(prefix + "/")

        name = d["metadata"]["name"]
        for public in ("/ws", "/api/v1/publish"):
            report.check(f"Ingress {name} routes {public}", any(covers(p, k, public) for p, k in paths), f"paths {paths}")
        for internal in ("/metrics", "/healthz", "/readyz"):
            report.check(f"Ingress {name} keeps {internal} inside the cluster",
                         not any(covers(p, k, internal) for p, k in paths), f"paths {paths} expose it")

    deployments = by_kind("Deployment")
    if not report.check("deploy/k8s has a Deployment", bool(deployments), f"no kind: Deployment in {k8s}/*.yaml"):
        return
    for f, d in deployments:
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        containers = [c for c in pod.get("containers", []) if "lockstep" in str(c.get("image", "")) or c.get("name") == "lockstep"]
        if not report.check(f"Deployment {name} runs a lockstep container", bool(containers), f"{f.name}: no container with the lockstep image"):
            continue
        for c in containers:
            what = f"Deployment {name} container {c['name']}"
            ready = ((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path")
            live = ((c.get("livenessProbe") or {}).get("httpGet") or {}).get("path")
            report.check(f"{what}: readiness probe on /readyz", ready == "/readyz", f"readinessProbe.httpGet.path is {ready!r}")
            report.check(f"{what}: liveness probe on /healthz", live == "/healthz", f"livenessProbe.httpGet.path is {live!r}")
            prestop = (c.get("lifecycle") or {}).get("preStop")
            sleep = prestop_seconds(prestop) if prestop else None
            report.check(f"{what}: preStop delay ({sleep:g}s)" if sleep is not None else f"{what}: preStop delay",
                         sleep is not None and sleep > 0,
                         "no lifecycle.preStop" if not prestop else f"cannot tell how long preStop {prestop} waits (sleep N)")
            requests = (c.get("resources") or {}).get("requests") or {}
            report.check(f"{what}: resource requests for cpu and memory ({requests})",
                         "cpu" in requests and "memory" in requests, "resources.requests needs cpu and memory (the HPA scales on CPU)")
            # The shutdown grace the container sees: its env, else its envFrom sources.
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            check_keys(f"{what} env", env, keys, binary, report)
            grace_text = env.get("LOCKSTEP_SHUTDOWN_GRACE")
            if grace_text is None:
                for src in c.get("envFrom") or []:
                    ref = src.get("configMapRef") or src.get("secretRef") or {}
                    pool = configmaps if "configMapRef" in src else secrets
                    prefix = src.get("prefix", "")
                    for k, v in (pool.get(ref.get("name"), {}) or {}).items():
                        if prefix + k == "LOCKSTEP_SHUTDOWN_GRACE":
                            grace_text = str(v)
            try:
                grace = seconds(grace_text or "10s")
            except ValueError as err:
                report.fail(f"{what}: LOCKSTEP_SHUTDOWN_GRACE is a duration", str(err))
                continue
            term = pod.get("terminationGracePeriodSeconds", 30)
            report.check(
                f"{what}: terminationGracePeriodSeconds {term} > shutdown grace {grace:g}s + preStop {sleep or 0:g}s",
                term > grace + (sleep or 0),
                "the kubelet would kill the pod mid-drain: raise terminationGracePeriodSeconds",
            )
    readme = k8s / "README.md"
    text = readme.read_text() if readme.exists() else ""
    report.check(
        "deploy/k8s/README.md explains the external services (Redis Cluster, PostgreSQL)",
        "Redis Cluster" in text and "PostgreSQL" in text,
        f"{readme} must say how to point the nodes at Redis / Redis Cluster and PostgreSQL" if text else f"missing: {readme}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", nargs="?", help="the lockstep binary (default: $LOCKSTEP_BIN)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="repository root to check")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    binary = Binary(args.binary or os.environ.get("LOCKSTEP_BIN"))
    report = Report()
    print(f"checking {root}/deploy with {binary.path or '<no lockstep binary>'}")
    keys = None
    if binary.problem:
        report.fail("lockstep binary for `lockstep config`", binary.problem)
    else:
        try:
            keys = binary.keys()
            report.check(f"`lockstep config` lists {len(keys) - 1} configuration keys", True)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            report.fail("`lockstep config` lists the configuration keys", str(err))
    listen = check_dockerfile(root, binary, report)
    check_compose(root, keys, binary, listen, report)
    check_k8s(root, keys, binary, report)
    print()
    if report.failed:
        print("failed checks:")
        for what in report.failed:
            print(f"  {what}")
    print(f"check_deploy: {report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
