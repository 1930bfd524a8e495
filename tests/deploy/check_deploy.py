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
  in its upstream and passes WebSocket upgrades (Upgrade, Connection, HTTP/1.1). Like the
  Ingress, that gateway passes only /ws, /api/… and /console… to the nodes (locations matched as
  nginx picks them); /metrics, /healthz, /readyz and any other path never reach a node.
- nginx logs: every nginx configuration shipped or written (compose's, deploy/local-cluster's,
  the test harness's in tests/src/nginx.rs) logs requests with a format of its own that has no
  query string or credential ($request, $request_uri, $args, $arg_*, $http_cookie…; browsers
  send their token as ?access_token=), never with nginx's default `combined`, and logs errors
  only at crit and above (nginx quotes the request line in every per-request error message).
- deploy/k8s: each Deployment has readiness on /readyz, liveness on /healthz, a preStop,
  resource requests, terminationGracePeriodSeconds above shutdown grace + preStop, only real
  LOCKSTEP_* keys (its own env, the ConfigMap and the Secret), and the README names the
  external services. An ingress-nginx Ingress comes with the controller ConfigMap whose
  log-format-upstream and error-log-level keep tokens out of the logs, as the README's Helm
  values do.

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


def compose_nginx_mounts(path: Path, services: dict) -> list[tuple[str, Path]]:
    """(service, file) for every nginx configuration a compose service mounts."""
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
    return confs


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
    confs = compose_nginx_mounts(path, services)
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
        node_hosts = {str(h) for name, svc in nodes.items() for h in (name, svc.get("hostname"), svc.get("container_name")) if h}
        check_gateway_routes(rel, conf.read_text(), node_hosts, report)


# --- nginx logs ------------------------------------------------------------------------------

# Browsers send their token as /ws?access_token=…, so no shipped nginx may log the query
# string: not the request line ($request), the raw URI ($request_uri), the arguments ($args,
# $query_string, $arg_*), nor headers that carry credentials or another page's URL.
FORBIDDEN_LOG_VARIABLES = {
    "request", "request_uri", "args", "query_string", "request_body", "http_authorization",
    "http_cookie", "http_referer", "sent_http_set_cookie", "upstream_http_set_cookie",
}
FORBIDDEN_LOG_PREFIXES = ("arg_", "cookie_")
# Every message nginx's error log has about a request quotes its request line, query string
# included, and nothing turns that off: only levels above the per-request `error` may be logged.
ERROR_LOG_LEVELS = ["debug", "info", "notice", "warn", "error", "crit", "alert", "emerg"]
LOWEST_ERROR_LOG_LEVEL = "crit"


def forbidden_log_variables(fmt: str) -> list[str]:
    """The variables of a log format that may hold a token (`$request`, `${args}`, `$arg_x`…)."""
    names = {n.lower() for n in re.findall(r"\$\{?([A-Za-z0-9_]+)", fmt)}
    return sorted(f"${n}" for n in names if n in FORBIDDEN_LOG_VARIABLES or n.startswith(FORBIDDEN_LOG_PREFIXES))


@dataclass
class NginxDirective:
    blocks: tuple[str, ...]  # the enclosing blocks, outermost first: () for the main context
    name: str
    args: list[str]  # unquoted
    # The enclosing block directives themselves (`server`, `location ~ …`), outermost first.
    parents: tuple[NginxDirective, ...] = field(default=(), repr=False, compare=False)


_NGINX_TOKEN = re.compile(
    r"""(?P<space>\s+)|(?P<comment>\#[^\n]*)|"(?P<dq>(?:[^"\\]|\\.)*)"|'(?P<sq>(?:[^'\\]|\\.)*)'"""
    r"""|(?P<punct>[{};])|(?P<word>(?:\$\{[^}\s]*\}|[^\s{};"'])+)""",
    re.S,
)


def nginx_directives(text: str) -> list[NginxDirective]:
    """Every directive of an nginx configuration, block directives (`http {`) included."""
    out: list[NginxDirective] = []
    blocks: list[str] = []
    parents: list[NginxDirective] = []
    words: list[str] = []
    pos = 0
    while pos < len(text):
        m = _NGINX_TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"cannot read nginx configuration at {text[pos:pos + 40]!r}")
        pos = m.end()
        if m.group("space") is not None or m.group("comment") is not None:
            continue
        punct = m.group("punct")
        if punct is None:
            for g in ("dq", "sq", "word"):
                if m.group(g) is not None:
                    words.append(m.group(g))
                    break
            continue
        if punct == "}":
            if words or not blocks:
                raise ValueError("unbalanced `}` or a directive without `;`")
            blocks.pop()
            parents.pop()
        elif words:
            out.append(NginxDirective(tuple(blocks), words[0], words[1:], tuple(parents)))
            if punct == "{":
                blocks.append(words[0])
                parents.append(out[-1])
        else:
            raise ValueError(f"`{punct}` without a directive")
        words = []
    if blocks or words:
        raise ValueError("unterminated block or directive at the end")
    return out


# --- nginx routing ---------------------------------------------------------------------------

# What the compose gateway may pass to the nodes (the Ingress's /ws and /api, and the console
# the nodes will serve at /console), and what it must answer itself: metrics and probes are
# for the compose network, as they are for the cluster behind the Ingress.
GATEWAY_PUBLIC = ("/ws", "/api/v1/publish", "/api/v1/openapi.json", "/console", "/console/teams/t1")
GATEWAY_INTERNAL = ("/metrics", "/healthz", "/readyz")
GATEWAY_OTHER = ("/", "/wss", "/ws/x", "/apis/v1", "/consoles", "/favicon.ico")


def nginx_in(d: NginxDirective, block: NginxDirective, directly: bool = False) -> bool:
    """Whether `d` is inside `block` (that very directive: two `server {` compare equal)."""
    return any(p is block for p in (d.parents[-1:] if directly else d.parents))


def nginx_location(d: NginxDirective) -> tuple[str, str]:
    """(modifier, pattern) of a `location` directive: `=`, `^~`, `~`, `~*`, `@` or ''."""
    args = d.args
    if len(args) >= 2 and args[0] in ("=", "^~", "~", "~*"):
        return args[0], args[1]
    arg = args[0] if args else ""
    for mod in ("=", "^~", "~*", "~", "@"):  # also written without a space: `location =/ws`
        if arg.startswith(mod) and len(arg) > len(mod):
            return mod, arg[len(mod):]
    return "", arg


def nginx_regex(pattern: str, caseless: bool) -> re.Pattern[str]:
    """A location's PCRE as a Python regex (`(?<name>` is `(?P<name>` there)."""
    return re.compile(re.sub(r"\(\?<(?=[A-Za-z_])", "(?P<", pattern), re.I if caseless else 0)


def nginx_route(directives: list[NginxDirective], server: NginxDirective, uri: str) -> NginxDirective | None:
    """The location of `server` that serves the (normalized) `uri`, as nginx picks it: an exact
    match; else the longest prefix if it is `^~`; else the first regex in file order that
    matches; else the longest prefix. None when no location matches or the server answers every
    request itself (`return` in the server block). Nested locations and server-level rewrites
    are refused (ValueError): this check does not follow them."""
    inside = [d for d in directives if nginx_in(d, server, directly=True)]
    if any(d.name == "rewrite" for d in inside):
        raise ValueError("a rewrite in the server block (not followed by this check)")
    if any(d.name == "return" for d in inside):
        return None
    locations = [d for d in inside if d.name == "location"]
    if any(d.name == "location" and any(nginx_in(d, loc) for loc in locations) for d in directives):
        raise ValueError("nested locations (not followed by this check)")
    prefix: tuple[int, NginxDirective] | None = None
    for loc in locations:
        mod, pattern = nginx_location(loc)
        if mod == "=" and uri == pattern:
            return loc
        if mod in ("", "^~") and uri.startswith(pattern) and (prefix is None or len(pattern) > prefix[0]):
            prefix = (len(pattern), loc)
    if prefix is not None and nginx_location(prefix[1])[0] == "^~":
        return prefix[1]
    for loc in locations:
        mod, pattern = nginx_location(loc)
        if mod in ("~", "~*"):
            try:
                regex = nginx_regex(pattern, mod == "~*")
            except re.error as err:
                raise ValueError(f"location {mod} {pattern}: {err}") from err
            if regex.search(uri):
                return loc
    return prefix[1] if prefix else None


def nginx_proxies_to(directives: list[NginxDirective], block: NginxDirective) -> list[str]:
    """The hosts (`lockstep`, `lockstep-1:8080`, `$backend`) a block's proxy_pass directives
    name, those in its `if` and `limit_except` blocks included."""
    hosts = []
    for d in directives:
        if d.name == "proxy_pass" and nginx_in(d, block) and d.args:
            m = re.match(r"^(?:https?://)?([^/]+)", d.args[0])
            hosts.append(m.group(1) if m else d.args[0])
    return hosts


def check_gateway_routes(what: str, text: str, node_hosts: set[str], report: Report) -> None:
    """Only the public paths of the nodes reach them through the gateway (`what` names it):
    every server block routes GATEWAY_PUBLIC to the nodes and no GATEWAY_INTERNAL or
    GATEWAY_OTHER path. A location reaches the nodes when it proxies to an upstream that lists
    a node, to a node itself, or to a variable (which could be either)."""
    try:
        directives = nginx_directives(text)
    except ValueError as err:
        report.fail(f"{what}: nginx configuration can be read", str(err))
        return
    upstreams = {d.args[0]: [s.args[0].rsplit(":", 1)[0] for s in directives
                             if s.name == "server" and nginx_in(s, d, directly=True) and s.args]
                 for d in directives if d.name == "upstream" and d.args}
    to_nodes = {name for name, hosts in upstreams.items() if set(hosts) & node_hosts}

    def reaches_nodes(loc: NginxDirective | None) -> bool:
        hosts = nginx_proxies_to(directives, loc) if loc is not None else []
        return any("$" in h or h in to_nodes or h.rsplit(":", 1)[0] in node_hosts for h in hosts)

    def shown(loc: NginxDirective | None) -> str:
        return "no location" if loc is None else "location " + " ".join(loc.args)

    servers = [d for d in directives if d.name == "server" and d.blocks == ("http",)]
    if not report.check(f"{what}: gateway has a server block", bool(servers), "no server { } in http { }"):
        return
    for i, server in enumerate(servers):
        label = what + (f" (server {i + 1})" if len(servers) > 1 else "")
        try:
            routes = {uri: nginx_route(directives, server, uri)
                      for uri in GATEWAY_PUBLIC + GATEWAY_INTERNAL + GATEWAY_OTHER}
        except ValueError as err:
            report.fail(f"{label}: gateway routes can be followed", str(err))
            continue
        for uri in GATEWAY_PUBLIC:
            report.check(f"{label}: gateway routes {uri} to the nodes", reaches_nodes(routes[uri]),
                         f"{uri} goes to {shown(routes[uri])}, which does not proxy to the nodes")
        for uri in GATEWAY_INTERNAL:
            report.check(f"{label}: gateway keeps {uri} on the compose network", not reaches_nodes(routes[uri]),
                         f"{uri} goes to {shown(routes[uri])}, which proxies it to the nodes: "
                         "Prometheus scrapes the nodes on the compose network, not through the gateway")
        leaks = [f"{uri} ({shown(routes[uri])})" for uri in GATEWAY_OTHER if reaches_nodes(routes[uri])]
        report.check(f"{label}: gateway answers other paths itself ({', '.join(GATEWAY_OTHER)})", not leaks,
                     "proxied to the nodes: " + ", ".join(leaks) + "; only /ws, /api/… and /console… are public")


def shell_heredocs(script: str) -> list[str]:
    """The bodies of a shell script's heredocs as the shell writes them, up to its expansions.
    With an unquoted delimiter, `\\$` is a `$`, and a shell expansion (`$dir`) is written as
    `<dir>`, or dropped where it begins a line (there it expands to whole lines: directives)."""
    bodies = []
    for m in re.finditer(r"<<-?\s*(['\"]?)(\w+)\1[^\n]*\n(.*?)\n[ \t]*\2\n", script, re.S):
        bodies.append(m.group(3) if m.group(1) else _expand_heredoc(m.group(3)))
    return bodies


def _expand_heredoc(body: str) -> str:
    def expand(e: re.Match[str]) -> str:
        if e.group(1):
            return e.group(1)[1]
        starts_line = e.start() == 0 or body[e.start() - 1] == "\n"
        return "" if starts_line else f"<{e.group(2) or e.group(3)}>"

    return re.sub(r"(\\[$`\\])|\$(?:\{(\w+)[^}]*\}|(\w+))", expand, body)


def rust_format_strings(source: str) -> list[str]:
    """A Rust file's raw string literals, `{{`/`}}` unescaped and `{name}` arguments written as
    `<name>` (so that the braces nginx reads are the configuration's own)."""
    out = []
    for m in re.finditer(r'\br(#*)"(.*?)"\1', source, re.S):
        body = m.group(2)
        if "{{" in body:
            body = body.replace("{{", "\0").replace("}}", "\1")
            body = re.sub(r"\{(\w*)(?::[^}]*)?\}", r"<\1>", body).replace("\0", "{").replace("\1", "}")
        out.append(body)
    return out


def shipped_nginx_configs(root: Path, report: Report) -> list[tuple[str, str]]:
    """(what, text) for every nginx configuration the project ships or writes: the files compose
    mounts and any other under deploy/, the one deploy/local-cluster writes, and the test
    harness's (tests/src/nginx.rs)."""
    configs: dict[str, str] = {}
    compose = root / "deploy" / "compose.yaml"
    files = set((root / "deploy").rglob("*.conf"))
    if compose.is_file():
        services = (yaml.safe_load(compose.read_text()) or {}).get("services") or {}
        files |= {conf for _, conf in compose_nginx_mounts(compose, services) if conf.is_file()}
    for f in sorted(files):
        text = f.read_text()
        if re.search(r"\b(http|events|server|location)\s*\{", text):
            configs[os.path.relpath(f, root)] = text
    for rel, extract in (("deploy/local-cluster", shell_heredocs), ("tests/src/nginx.rs", rust_format_strings)):
        path = root / rel
        found = [s for s in (extract(path.read_text()) if path.is_file() else []) if re.search(r"\bhttp\s*\{", s)]
        if report.check(f"{rel} writes an nginx configuration whose logs are checked", bool(found),
                        f"no nginx configuration (an `http {{` block) found in {path}; update check_deploy.py"):
            for i, text in enumerate(found):
                configs[rel + (f" (configuration {i + 1})" if len(found) > 1 else "")] = text
    return list(configs.items())


def check_nginx_logs(root: Path, report: Report) -> None:
    for what, text in shipped_nginx_configs(root, report):
        try:
            directives = nginx_directives(text)
        except ValueError as err:
            report.fail(f"{what}: nginx configuration can be read", str(err))
            continue
        formats = {d.args[0]: " ".join(a for a in d.args[1:] if not a.startswith("escape="))
                   for d in directives if d.name == "log_format" and d.args}
        for name, fmt in formats.items():
            bad = forbidden_log_variables(fmt)
            report.check(f"{what}: log_format {name} logs no query string or credential", not bad,
                         f"it logs {', '.join(bad)}; log $request_method $uri $server_protocol instead")
        for d in directives:
            if d.name != "access_log" or d.args[:1] == ["off"]:
                continue
            fmt = d.args[1] if len(d.args) > 1 and "=" not in d.args[1] else None
            report.check(
                f"{what}: access_log {d.args[0] if d.args else ''} names a format of its own ({fmt or 'combined'})",
                fmt is not None and fmt in formats,
                "without a format name access_log logs `combined`, whose $request has the query string"
                if fmt is None or fmt == "combined" else f"no log_format {fmt} in this configuration",
            )
        # An http block without access_log (in it, or in each of its servers) logs `combined`.
        if any(d.name == "http" and not d.blocks for d in directives):
            server_logs: dict[int, bool] = {}
            current = None
            for i, d in enumerate(directives):
                if d.name == "server" and d.blocks == ("http",):
                    current = i
                    server_logs[i] = False
                elif d.name == "access_log" and d.blocks == ("http", "server") and current is not None:
                    server_logs[current] = True
            at_http = any(d.name == "access_log" and d.blocks == ("http",) for d in directives)
            report.check(
                f"{what}: the http block sets access_log",
                at_http or (bool(server_logs) and all(server_logs.values())),
                "without access_log in http (or in every server) nginx logs `combined`, query strings included",
            )
        errors = [d for d in directives if d.name == "error_log"]
        levels = [(d.args[1] if len(d.args) > 1 else "error") for d in errors]
        low = [lv for lv in levels if lv not in ERROR_LOG_LEVELS or
               ERROR_LOG_LEVELS.index(lv) < ERROR_LOG_LEVELS.index(LOWEST_ERROR_LOG_LEVEL)]
        report.check(
            f"{what}: error_log at {LOWEST_ERROR_LOG_LEVEL} or above ({', '.join(levels) or 'unset'})",
            any(not d.blocks for d in errors) and not low,
            "error log messages about a request quote its request line, query string included; "
            f"set error_log … {LOWEST_ERROR_LOG_LEVEL} in the main context"
            + (f" (found {', '.join(low)})" if low else " (without one nginx logs at `error`)"),
        )


# --- Kubernetes ------------------------------------------------------------------------------


def prestop_seconds(prestop: dict) -> float | None:
    if isinstance(prestop.get("sleep"), dict):
        return float(prestop["sleep"].get("seconds", 0))
    command = (prestop.get("exec") or {}).get("command") or []
    m = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", " ".join(str(c) for c in command))
    return float(m.group(1)) if m else None


def check_ingress_nginx_logs(k8s: Path, docs: list[tuple[Path, dict]], report: Report) -> None:
    """An Ingress served by ingress-nginx is logged with the controller's `log-format-upstream`,
    whose default has $request: a ConfigMap key, not an annotation. deploy/k8s ships that
    ConfigMap (applied to the controller, not with the kustomization), and the README's Helm
    values for it say the same."""
    ingresses = [d for _, d in docs if d.get("kind") == "Ingress" and (
        (d.get("spec") or {}).get("ingressClassName") == "nginx"
        or any(str(k).startswith("nginx.ingress.kubernetes.io/") for k in (d["metadata"].get("annotations") or {})))]
    if not ingresses:
        return
    names = ", ".join(d["metadata"]["name"] for d in ingresses)
    maps = [(f, d) for f, d in docs if d.get("kind") == "ConfigMap" and "log-format-upstream" in (d.get("data") or {})]
    if not report.check(
        f"deploy/k8s has the ingress-nginx ConfigMap with log-format-upstream (for Ingress {names})",
        bool(maps),
        "ingress-nginx's default log format has $request, the request line with ?access_token=…; "
        "ship a controller ConfigMap that sets log-format-upstream without it",
    ):
        return
    for f, d in maps:
        data = {str(k): str(v) for k, v in (d.get("data") or {}).items()}
        what = f"ingress-nginx ConfigMap {d['metadata']['name']} ({f.name})"
        bad = forbidden_log_variables(data["log-format-upstream"])
        report.check(f"{what}: log-format-upstream logs no query string or credential", not bad,
                     f"it logs {', '.join(bad)}; log $request_method $uri $server_protocol instead")
        level = data.get("error-log-level", "notice")
        report.check(
            f"{what}: error-log-level {level} is {LOWEST_ERROR_LOG_LEVEL} or above",
            level in ERROR_LOG_LEVELS and ERROR_LOG_LEVELS.index(level) >= ERROR_LOG_LEVELS.index(LOWEST_ERROR_LOG_LEVEL),
            "error log messages about a request quote its request line, query string included "
            "(the controller's default level is notice)",
        )
    readme = k8s / "README.md"
    for block in re.findall(r"```ya?ml\n(.*?)```", readme.read_text() if readme.exists() else "", re.S):
        try:
            values = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        config = ((values.get("controller") or {}).get("config") if isinstance(values, dict) else None) or {}
        if isinstance(config, dict) and "log-format-upstream" in config:
            f, d = maps[0]
            want = {str(k): str(v) for k, v in (d.get("data") or {}).items()}
            got = {str(k): str(v) for k, v in config.items()}
            report.check(f"deploy/k8s/README.md's Helm values (controller.config) are {f.name}'s data", got == want,
                         f"README: {got}\n{f.name}: {want}")


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

    check_ingress_nginx_logs(k8s, docs, report)

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
    check_nginx_logs(root, report)
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
