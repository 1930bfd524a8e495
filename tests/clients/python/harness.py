"""Harness code shared by the stomp.py conformance scripts (stomp_py.py, flood.py, resume.py).

The scripts are run as files (`python3 tests/clients/python/<script>.py '<json>'`), so this
directory is on sys.path and they `import harness`. What lives here is plumbing, not scenario:
the JSON config argument, failure reporting (`FAIL [step]: reason`, an optional `observed {json}`
line, the last events of each connection) and the `OK {json}` line, a stomp.py WSStompConnection
from a ws:// URL, a listener whose state the main thread waits on under a threading.Condition
with a deadline, HTTP POSTs with a timeout, and the watchdog. Each script keeps its own checks
and messages.
"""

import contextlib
import datetime
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

try:
    import stomp
    import websocket
except ImportError as exc:  # pragma: no cover - environment problem, reported clearly
    sys.stderr.write(
        "FAIL [setup]: cannot import stomp.py/websocket-client (%s); run: pip install -r %s\n"
        % (exc, os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt"))
    )
    sys.exit(1)

WAIT_S = 10.0  # bound for every awaited thing (connect, receipts, messages, HTTP)
ISO_Z_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")

_step = "setup"


class CheckFailed(Exception):
    pass


def set_step(name):
    """Names the step a failure is reported in: `FAIL [<step>]: …`."""
    global _step
    _step = name


def check(cond, reason):
    if not cond:
        raise CheckFailed(reason)


def short(value, limit=400):
    """A value for a failure message, cut at `limit` characters (dicts and lists as JSON)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(%d chars)" % len(text)


def valid_utc_ts(ts):
    """Whether `ts`, already matching ISO_Z_RE, is a real date-time (Python 3 parses at most
    microseconds, so longer fractions are cut first)."""
    try:
        datetime.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", ts[:-1]) + "+00:00")
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
def die(reason, listeners=(), title="last events seen by {name}", observed=None):
    """Report a failure on stderr and exit 1 without waiting on any library thread.

    `FAIL [step]: reason`, then `observed {json}` when given, then the recent events of each
    listener under `--- <title> ---` (title formatted with the listener's name).
    """
    out = ["FAIL [%s]: %s" % (_step, reason)]
    if observed is not None:
        out.append("observed " + json.dumps(observed, sort_keys=True))
    for rec in listeners:
        out.append("--- %s ---" % title.format(name=rec.name))
        out.extend("  " + line for line in rec.tail())
    sys.stderr.write("\n".join(out) + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def ok(summary):
    sys.stdout.write("OK " + json.dumps(summary, ensure_ascii=False, sort_keys=True) + "\n")
    sys.stdout.flush()


def client_versions():
    version = stomp.__version__
    if isinstance(version, tuple):
        version = ".".join(str(x) for x in version)
    return "stomp.py %s / websocket-client %s" % (version, websocket.__version__)


def start(parse_args, die):
    """The script's config from its command line, parsed by parse_args(argv); a config error is
    reported with die(reason), which exits 1. STOMP_DEBUG=1 turns on stomp.py's debug log (every
    frame sent and received) on stderr."""
    if os.environ.get("STOMP_DEBUG"):
        logging.basicConfig(stream=sys.stderr, level=logging.DEBUG,
                            format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    try:
        return parse_args(sys.argv)
    except CheckFailed as exc:
        die(str(exc))


def start_watchdog(seconds, on_expiry):
    """Whatever hangs (a library call without a timeout), the script still ends."""
    watchdog = threading.Timer(seconds, on_expiry)
    watchdog.daemon = True
    watchdog.start()
    return watchdog


@contextlib.contextmanager
def reported(die):
    """The body of a scenario: a CheckFailed is reported by its message, anything else by its
    traceback, with die(reason), which exits 1."""
    try:
        yield
    except CheckFailed as exc:
        die(str(exc))
    except Exception:
        die("unexpected exception:\n" + traceback.format_exc())


def run(main):
    """Runs main() (which reports and exits 1 itself on failure), then exits 0 at once."""
    main()
    # stomp.py's threads are daemons; exit without joining anything.
    sys.stdout.flush()
    os._exit(0)


def config_arg(argv, script):
    """The JSON config, the only argument."""
    if len(argv) != 2:
        raise CheckFailed("usage: %s '<json config>'" % script)
    try:
        return json.loads(argv[1])
    except ValueError as exc:
        raise CheckFailed("argument is not JSON: %s" % exc)


# ------------------------------------------------------------------------------------------
# connections
# ------------------------------------------------------------------------------------------
def ws_endpoint(url):
    """Split ws://host:port/path into stomp.py's host_and_ports + ws_path."""
    u = urllib.parse.urlsplit(url)
    check(u.scheme in ("ws", "wss"), "ws url must be ws:// or wss://, got %r" % url)
    check(u.hostname, "ws url has no host: %r" % url)
    port = u.port or (443 if u.scheme == "wss" else 80)
    path = (u.path or "/") + ("?" + u.query if u.query else "")
    return (u.hostname, port), path, u.scheme == "wss"


def ws_connection(url, listener, heartbeats):
    """A stomp.py WSStompConnection to `url` with `listener` attached, not yet connected."""
    host_port, path, tls = ws_endpoint(url)
    conn = stomp.WSStompConnection(host_and_ports=[host_port], ws_path=path, heartbeats=heartbeats,
                                   reconnect_attempts_max=1)
    if tls:
        conn.set_ssl(for_hosts=[host_port])
    conn.set_listener("recorder", listener)
    return conn


def send_connect(conn, login, passcode, **kwargs):
    """Opens the WebSocket and sends CONNECT; the caller waits for CONNECTED on its listener."""
    try:
        # wait=False: stomp.py's own wait has no timeout; we wait on the listener instead.
        conn.connect(username=login, passcode=passcode, wait=False, **kwargs)
    except Exception as exc:
        raise CheckFailed("stomp.py could not open the WebSocket / send CONNECT: %s: %s"
                          % (type(exc).__name__, exc))


def disconnect_aside(conn, receipt, thread_name):
    """conn.disconnect(receipt=...) blocks in transport.stop() without a timeout: run it aside.

    Returns the (started, daemon) thread and the list its exception, if any, lands in."""
    errors = []

    def run_disconnect():
        try:
            conn.disconnect(receipt=receipt)
        except Exception as exc:  # reported by the caller
            errors.append(exc)

    t = threading.Thread(target=run_disconnect, name=thread_name, daemon=True)
    t.start()
    return t, errors


def post_json(url, token, payload, what):
    """POST `payload` as JSON with a bearer token, bounded by WAIT_S; returns (status, raw body).
    An HTTP error status is an answer; anything else failing raises `<what> failed: …`."""
    req = urllib.request.Request(
        url,
        data=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
        method="POST",
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json",
                 "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except Exception as exc:
        raise CheckFailed("%s failed: %s: %s" % (what, type(exc).__name__, exc))


class Listener(stomp.ConnectionListener):
    """What stomp.py reports for one connection, kept under `cond`, which the main thread waits on.

    The callbacks run on stomp.py's receiver / heart-beat / sender threads; each notifies `cond`.
    `troubled` is set on ERROR, on the socket closing and on a heart-beat timeout, for a timed
    wait that must end early on any of them. Scripts subclass it for their MESSAGEs.
    """

    TAIL = 40  # events kept for the failure report
    QUIET = ()  # commands sent too often to note each one (flood.py: SEND)

    def __init__(self, name="connection"):
        self.name = name
        self.cond = threading.Condition()
        self.t0 = time.monotonic()
        self.connected_frame = None
        self.receipts = set()
        self.errors = []
        self.disconnected = False
        self.heartbeat_timeouts = 0
        self.heartbeats_received = 0
        self.heartbeats_sent = 0
        self.troubled = threading.Event()
        self._log = []

    # -- bookkeeping (with the lock held) -------------------------------------------------------
    def _note(self, text):
        self._log.append("%8.3f %s" % (time.monotonic() - self.t0, text))
        del self._log[:-self.TAIL]

    def tail(self):
        with self.cond:
            return list(self._log)

    # -- stomp.py callbacks ---------------------------------------------------------------------
    def on_connected(self, frame):
        with self.cond:
            self._note("CONNECTED %r" % (frame.headers,))
            self.connected_frame = frame
            self.cond.notify_all()

    def on_receipt(self, frame):
        with self.cond:
            self._note("RECEIPT %r" % (frame.headers,))
            self.receipts.add(frame.headers.get("receipt-id"))
            self.cond.notify_all()

    def on_error(self, frame):
        with self.cond:
            self._note("ERROR %r body=%s" % (frame.headers, short(frame.body, 200)))
            self.errors.append(frame)
            self.troubled.set()
            self.cond.notify_all()

    def on_disconnected(self):
        with self.cond:
            self._note("disconnected")
            self.disconnected = True
            self.troubled.set()
            self.cond.notify_all()

    def on_heartbeat_timeout(self):
        with self.cond:
            self._note("heart-beat timeout: stomp.py saw nothing from the server in time and closed")
            self.heartbeat_timeouts += 1
            self.troubled.set()
            self.cond.notify_all()

    def on_heartbeat(self):
        with self.cond:
            self.heartbeats_received += 1

    def on_send(self, frame):
        with self.cond:
            if frame.cmd is None:  # stomp.py's outgoing heart-beat (a lone EOL)
                self.heartbeats_sent += 1
            elif frame.cmd not in self.QUIET:
                hdrs = dict(frame.headers)
                if "passcode" in hdrs:  # the token stays out of the output
                    hdrs["passcode"] = "<%d chars>" % len(str(hdrs["passcode"]))
                self._note("sent %s %r" % (frame.cmd, hdrs))

    # -- waiting (main thread) ------------------------------------------------------------------
    def wait_until(self, predicate, deadline, trouble, timed_out):
        """Waits until predicate() holds; both run under the lock. Raises CheckFailed with
        trouble() as soon as it returns a reason, or with timed_out() at `deadline`."""
        with self.cond:
            while True:
                if predicate():
                    return
                why = trouble()
                if why:
                    raise CheckFailed(why)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckFailed(timed_out())
                self.cond.wait(left)
