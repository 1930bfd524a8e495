#!/usr/bin/env python3
"""A bot that publishes faster than its STOMP rate limit must keep receiving (stomp.py).

Usage: python3 flood.py '<json>'

    {"ws": "ws://127.0.0.1:PORT/ws", "token": "<jwt with scope publish>", "user": "bot",
     "count": 2000, "rate": 500, "timeout_s": 30}

Optional keys: "heartbeat_ms" (default 1000: stomp.py asks heart-beat 1000,1000), "min_rate"
(msgs/s; when set, the effective arrival rate must reach it), "max_gap_s" (when set, no silence
between the first SEND and the last MESSAGE, or between two MESSAGEs, may exceed it). "rate" is
the node's hub.publish_rate; the script only uses it to size its deadline and to report.

Scenario: one stomp.py WSStompConnection connects with the token, subscribes to /user/<user>
with a receipt and waits for it, then sends `count` SENDs to that same topic as fast as stomp.py
will take them (event-type flood.msg, content-type application/json, body {"seq": i}), then one
SEND with event-type flood.end as an end marker. The node slows the sender down to its rate; the
script waits (threading.Condition, no sleeps) for the end marker, at most
count / rate + timeout_s seconds after the first SEND. It fails on an ERROR frame, on the
connection dropping for any reason before our own DISCONNECT (stomp.py's on_disconnected, a
heart-beat timeout, a SEND raising), or on the deadline. Then it checks that exactly `count`
flood.msg MESSAGEs arrived before the marker, in order (data.seq == 0..count-1), none missing,
none repeated, each a well-formed Lockstep MESSAGE (headers, envelope {"id","type","topic","ts",
"data"}, data as sent), and disconnects with a receipt.

Exit 0 and one line `OK {json}` on stdout (arrival rate, time from the first SEND to the last
MESSAGE, ...); exit 1 with `FAIL [step]: reason` and an `observed {json}` line on stderr
otherwise. STOMP_DEBUG=1 logs stomp.py's frames on stderr.
"""

import collections
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import urllib.parse

try:
    import stomp
    import websocket
except ImportError as exc:  # pragma: no cover - environment problem, reported clearly
    sys.stderr.write(
        "FAIL [setup]: cannot import stomp.py/websocket-client (%s); run: pip install -r %s\n"
        % (exc, os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt"))
    )
    sys.exit(1)

WAIT_S = 10.0  # bound for connect, the SUBSCRIBE receipt and the DISCONNECT receipt
SUB_ID = "s-flood"
EVENT = "flood.msg"
END_EVENT = "flood.end"
ISO_Z_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")

_step = "setup"
_observed = {}  # filled as the run goes; printed with any failure


class CheckFailed(Exception):
    pass


def set_step(name):
    global _step
    _step = name


def check(cond, reason):
    if not cond:
        raise CheckFailed(reason)


def short(value, limit=300):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "...(%d chars)" % len(text)


def die(reason, rec=None):
    """Report a failure on stderr and exit 1 without waiting on any library thread."""
    out = ["FAIL [%s]: %s" % (_step, reason)]
    if rec is not None:
        try:
            _observed.update(rec.observed())
        except Exception:  # never let reporting hide the failure
            pass
    out.append("observed " + json.dumps(_observed, sort_keys=True))
    if rec is not None:
        out.append("--- last events on the connection ---")
        out.extend("  " + line for line in rec.tail())
    sys.stderr.write("\n".join(out) + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


class Recorder(stomp.ConnectionListener):
    """Everything stomp.py reports for the connection; the main thread waits on `cond`."""

    def __init__(self):
        self.cond = threading.Condition()
        self.t0 = time.monotonic()
        self.connected_frame = None
        self.receipts = []
        self.messages = []  # (monotonic arrival time, headers, body) of flood.msg / other frames
        self.end_marker = None  # (time, headers, body) of the flood.end MESSAGE
        self.after_end = []  # anything delivered after the end marker
        self.errors = []
        self.disconnected = None  # {"t", "thread", "messages"} when on_disconnected fired
        self.close_frame = None  # {"code", "reason", "at_s"} of a WebSocket close from the server
        self.heartbeat_timeouts = 0
        self.heartbeats_received = 0
        self.heartbeats_sent = 0
        self.closing = False  # set just before our own DISCONNECT
        self.first_send = None
        self.sends_done = 0
        self.send_error = None
        self.send_finished = None
        self._log = []

    def _note(self, text):
        self._log.append("%8.3f %s" % (time.monotonic() - self.t0, text))
        del self._log[:-30]

    def tail(self):
        with self.cond:
            return list(self._log)

    def since_first_send(self, t):
        return None if self.first_send is None or t is None else round(t - self.first_send, 3)

    def observed(self):
        with self.cond:
            seqs = [seq_of(b) for (_, _, b) in self.messages]
            last_at = self.messages[-1][0] if self.messages else None
            return {
                "sends_done": self.sends_done,
                "send_error": self.send_error,
                "send_loop_s": self.since_first_send(self.send_finished),
                "messages": len(self.messages),
                "last_seq": seqs[-1] if seqs else None,
                "last_message_at_s": self.since_first_send(last_at),
                "end_marker": self.end_marker is not None,
                "disconnected": self.disconnected,
                "close_frame": self.close_frame,
                "heartbeat_timeouts": self.heartbeat_timeouts,
                "heartbeats": {"sent": self.heartbeats_sent, "received": self.heartbeats_received},
                "errors": [{"headers": f.headers, "body": short(f.body)} for f in self.errors],
            }

    # -- stomp.py callbacks (receiver / heart-beat / sender threads) ---------------------------
    def on_connected(self, frame):
        with self.cond:
            self._note("CONNECTED %r" % (frame.headers,))
            self.connected_frame = frame
            self.cond.notify_all()

    def on_receipt(self, frame):
        with self.cond:
            self._note("RECEIPT %r" % (frame.headers,))
            self.receipts.append(frame.headers.get("receipt-id"))
            self.cond.notify_all()

    def on_message(self, frame):
        now = time.monotonic()
        body = frame.body.decode("utf-8") if isinstance(frame.body, bytes) else frame.body
        with self.cond:
            item = (now, dict(frame.headers), body)
            if self.end_marker is not None:
                self.after_end.append(item)
                self._note("MESSAGE after the end marker %r %s" % (frame.headers, short(body, 120)))
            elif frame.headers.get("event-type") == END_EVENT:
                self.end_marker = item
                self._note("MESSAGE end marker after %d MESSAGEs" % len(self.messages))
            else:
                self.messages.append(item)
                n = len(self.messages)
                if n <= 3 or n % 250 == 0:
                    self._note("MESSAGE #%d %s" % (n, short(body, 120)))
            self.cond.notify_all()

    def on_error(self, frame):
        with self.cond:
            self._note("ERROR %r body=%s" % (frame.headers, short(frame.body, 200)))
            self.errors.append(frame)
            self.cond.notify_all()

    def on_disconnected(self):
        now = time.monotonic()
        with self.cond:
            who = threading.current_thread().name
            self._note("disconnected (reported on thread %s) after %d MESSAGEs" % (who, len(self.messages)))
            if self.disconnected is None:
                self.disconnected = {
                    "at_s": self.since_first_send(now),
                    "thread": who,
                    "by_stomp_py_heartbeat_check": who.startswith("StompHeartbeat"),
                    "messages_by_then": len(self.messages),
                    "sends_by_then": self.sends_done,
                    "expected": self.closing,
                }
            self.cond.notify_all()

    def on_heartbeat_timeout(self):
        with self.cond:
            self._note("heart-beat timeout: stomp.py saw nothing from the server in time and closed")
            self.heartbeat_timeouts += 1
            self.cond.notify_all()

    def on_heartbeat(self):
        with self.cond:
            self.heartbeats_received += 1

    def on_send(self, frame):
        if frame.cmd is None:  # stomp.py's outgoing heart-beat (a lone EOL)
            with self.cond:
                self.heartbeats_sent += 1
        elif frame.cmd != "SEND":
            with self.cond:
                hdrs = dict(frame.headers)
                if "passcode" in hdrs:
                    hdrs["passcode"] = "<%d chars>" % len(str(hdrs["passcode"]))
                self._note("sent %s %r" % (frame.cmd, hdrs))

    # -- waiting (main thread) -----------------------------------------------------------------
    def trouble(self):
        """Why the connection is unusable, or None. Call with the lock held."""
        if self.errors:
            f = self.errors[0]
            return "server sent ERROR: headers=%r body=%s" % (f.headers, short(f.body))
        if self.heartbeat_timeouts:
            return "stomp.py declared a heart-beat timeout (nothing from the server in time) and closed"
        if self.disconnected is not None and not self.closing:
            d = self.disconnected
            if d["by_stomp_py_heartbeat_check"]:
                how = "stomp.py's heart-beat check closed it"
            elif self.close_frame is not None:
                how = "the server closed the WebSocket with code=%s reason=%r" % (
                    self.close_frame["code"], self.close_frame["reason"])
            else:
                how = "socket closed without a close frame (reported on thread %s)" % d["thread"]
            return "connection dropped %s s after the first SEND: %s" % (d["at_s"], how)
        if self.send_error is not None:
            return "a SEND failed in stomp.py: %s" % self.send_error
        return None

    def wait_for(self, predicate, what, deadline, allow_closing=False):
        with self.cond:
            while True:
                if predicate():
                    return
                why = self.trouble()
                if why and not (allow_closing and self.closing):
                    raise CheckFailed("%s while waiting for %s" % (why, what))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckFailed("timed out waiting for %s" % what)
                self.cond.wait(left)


def watch_close_frame(conn, rec):
    """Record the WebSocket close code and reason, which stomp.py itself drops (observation only)."""
    try:
        sock = conn.transport.socket
        orig = sock.recv_data
    except AttributeError:
        return

    def recv_data(*args, **kwargs):
        opcode, data = orig(*args, **kwargs)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            reason = data[2:].decode("utf-8", "replace")
            with rec.cond:
                rec.close_frame = {"code": code, "reason": reason,
                                   "at_s": rec.since_first_send(time.monotonic())}
                rec._note("WebSocket close frame from the server: code=%s reason=%r" % (code, reason))
        return opcode, data

    sock.recv_data = recv_data


def seq_of(body):
    try:
        return json.loads(body)["data"]["seq"]
    except Exception:
        return None


def parse_args(argv):
    if len(argv) != 2:
        raise CheckFailed("usage: flood.py '<json config>'")
    try:
        cfg = json.loads(argv[1])
    except ValueError as exc:
        raise CheckFailed("argument is not JSON: %s" % exc)
    check(isinstance(cfg, dict), "config is not a JSON object")
    for key in ("ws", "token", "user"):
        check(isinstance(cfg.get(key), str) and cfg[key], "config.%s must be a non-empty string" % key)
    for key in ("count", "rate"):
        check(isinstance(cfg.get(key), int) and cfg[key] > 0, "config.%s must be a positive integer" % key)
    check(isinstance(cfg.get("timeout_s"), (int, float)) and cfg["timeout_s"] > 0,
          "config.timeout_s must be a positive number")
    cfg.setdefault("heartbeat_ms", 1000)
    check(isinstance(cfg["heartbeat_ms"], int) and cfg["heartbeat_ms"] >= 0,
          "config.heartbeat_ms must be a non-negative integer")
    cfg.setdefault("min_rate", None)
    cfg.setdefault("max_gap_s", None)
    for key in ("min_rate", "max_gap_s"):
        check(cfg[key] is None or (isinstance(cfg[key], (int, float)) and cfg[key] > 0),
              "config.%s must be a positive number when set" % key)
    return cfg


def ws_endpoint(url):
    u = urllib.parse.urlsplit(url)
    check(u.scheme in ("ws", "wss"), "ws url must be ws:// or wss://, got %r" % url)
    check(u.hostname, "ws url has no host: %r" % url)
    port = u.port or (443 if u.scheme == "wss" else 80)
    path = (u.path or "/") + ("?" + u.query if u.query else "")
    return (u.hostname, port), path, u.scheme == "wss"


def check_flood(messages, topic, count):
    """Exactly flood.msg 0..count-1 in order, each a well-formed MESSAGE. Returns message-ids."""
    seqs = [seq_of(b) for (_, _, b) in messages]
    ints = [s for s in seqs if isinstance(s, int)]
    missing = sorted(set(range(count)) - set(ints))
    dups = sorted(s for s, n in collections.Counter(ints).items() if n > 1)
    first_bad = next((i for i, s in enumerate(seqs) if s != i), None)
    if len(messages) != count or first_bad is not None:
        raise CheckFailed(
            "expected flood.msg seq 0..%d in order before the end marker; got %d MESSAGEs, %d missing "
            "(first %s), %d repeated (first %s), first out of place at position %s (seq %r)"
            % (count - 1, len(messages), len(missing), missing[:10], len(dups), dups[:10], first_bad,
               seqs[first_bad] if first_bad is not None and first_bad < len(seqs) else None))
    ids = []
    for i, (_, h, body) in enumerate(messages):
        where = "MESSAGE seq %d" % i
        check(h.get("destination") == topic, "%s: destination %r != %r" % (where, h.get("destination"), topic))
        check(h.get("subscription") == SUB_ID, "%s: subscription %r != %r" % (where, h.get("subscription"), SUB_ID))
        check(h.get("event-type") == EVENT, "%s: event-type %r != %r" % (where, h.get("event-type"), EVENT))
        check(h.get("content-type") == "application/json",
              "%s: content-type %r != 'application/json'" % (where, h.get("content-type")))
        mid = h.get("message-id")
        check(isinstance(mid, str) and mid, "%s: no message-id header (headers %r)" % (where, h))
        env = json.loads(body)
        check(isinstance(env, dict) and sorted(env) == ["data", "id", "topic", "ts", "type"],
              "%s: envelope keys %r, expected id, type, topic, ts, data: %s"
              % (where, sorted(env) if isinstance(env, dict) else env, short(body)))
        check(env["id"] == mid, "%s: envelope id %r != message-id %r" % (where, env["id"], mid))
        check(env["type"] == EVENT, "%s: envelope type %r" % (where, env["type"]))
        check(env["topic"] == topic, "%s: envelope topic %r" % (where, env["topic"]))
        check(isinstance(env["ts"], str) and ISO_Z_RE.match(env["ts"]), "%s: envelope ts %r" % (where, env["ts"]))
        check(env["data"] == {"seq": i}, "%s: data %r != %r" % (where, env["data"], {"seq": i}))
        ids.append(mid)
    check(len(set(ids)) == len(ids), "message-ids are not unique (%d distinct of %d)" % (len(set(ids)), len(ids)))
    return ids


def main():
    if os.environ.get("STOMP_DEBUG"):
        logging.basicConfig(stream=sys.stderr, level=logging.DEBUG,
                            format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_args(sys.argv)
    except CheckFailed as exc:
        die(str(exc))
    count, rate, hb = cfg["count"], cfg["rate"], cfg["heartbeat_ms"]
    topic = "/user/%s" % cfg["user"]
    flood_budget = count / float(rate) + cfg["timeout_s"]
    _observed.update({"count": count, "rate": rate, "deadline_after_first_send_s": round(flood_budget, 3)})

    rec = Recorder()
    budget = 3 * WAIT_S + flood_budget + 5
    watchdog = threading.Timer(budget, lambda: die("overall watchdog: run exceeded %.0f s" % budget, rec))
    watchdog.daemon = True
    watchdog.start()

    try:
        set_step("connect")
        host_port, path, tls = ws_endpoint(cfg["ws"])
        conn = stomp.WSStompConnection(host_and_ports=[host_port], ws_path=path,
                                       heartbeats=(hb, hb), reconnect_attempts_max=1)
        if tls:
            conn.set_ssl(for_hosts=[host_port])
        conn.set_listener("recorder", rec)
        try:
            # wait=False: stomp.py's own wait has no timeout; we wait on the listener instead.
            conn.connect(username=cfg["user"], passcode=cfg["token"], wait=False)
        except Exception as exc:
            raise CheckFailed("stomp.py could not open the WebSocket / send CONNECT: %s: %s"
                              % (type(exc).__name__, exc))
        watch_close_frame(conn, rec)
        rec.wait_for(lambda: rec.connected_frame is not None, "CONNECTED", time.monotonic() + WAIT_S)
        connected = dict(rec.connected_frame.headers)

        set_step("subscribe")
        conn.subscribe(destination=topic, id=SUB_ID, ack="auto", headers={"receipt": "r-sub"})
        rec.wait_for(lambda: "r-sub" in rec.receipts, "RECEIPT r-sub for SUBSCRIBE %s" % topic,
                     time.monotonic() + WAIT_S)

        # The SENDs run on their own thread: once the node stops reading, stomp.py's send() blocks
        # on the full socket, and the main thread must still notice drops and the deadline.
        set_step("flood")

        def sender():
            try:
                for i in range(count):
                    conn.send(destination=topic, body=json.dumps({"seq": i}),
                              content_type="application/json", headers={"event-type": EVENT})
                    with rec.cond:
                        rec.sends_done = i + 1
                conn.send(destination=topic, body=json.dumps({"end": True}),
                          content_type="application/json", headers={"event-type": END_EVENT})
                with rec.cond:
                    rec.send_finished = time.monotonic()
                    rec.cond.notify_all()
            except Exception as exc:
                with rec.cond:
                    rec.send_error = "after %d SENDs: %s: %s" % (rec.sends_done, type(exc).__name__, exc)
                    rec.cond.notify_all()

        with rec.cond:
            rec.first_send = time.monotonic()
        threading.Thread(target=sender, name="flood-sender", daemon=True).start()
        rec.wait_for(lambda: rec.end_marker is not None,
                     "all %d MESSAGEs and the end marker (%.1f s after the first SEND: count / rate "
                     "+ timeout_s)" % (count, flood_budget),
                     rec.first_send + flood_budget)

        set_step("check")
        with rec.cond:
            messages = list(rec.messages)
            first_send, send_finished = rec.first_send, rec.send_finished
        ids = check_flood(messages, topic, count)
        last_at, first_at = messages[-1][0], messages[0][0]
        elapsed = last_at - first_send
        # Longest silence between the first SEND and the last MESSAGE: a server that stops
        # writing while it throttles shows up here even when everything arrives in the end.
        times = [first_send] + [m[0] for m in messages]
        gap, gap_after = max((times[i + 1] - times[i], i - 1) for i in range(len(times) - 1))

        set_step("disconnect")
        errors = []

        def run_disconnect():
            try:
                conn.disconnect(receipt="r-disc")
            except Exception as exc:
                errors.append(exc)

        with rec.cond:
            rec.closing = True
        t_disc = threading.Thread(target=run_disconnect, name="disconnect", daemon=True)
        t_disc.start()
        rec.wait_for(lambda: "r-disc" in rec.receipts, "RECEIPT r-disc for DISCONNECT",
                     time.monotonic() + WAIT_S, allow_closing=True)
        rec.wait_for(lambda: rec.disconnected is not None, "the socket to close after DISCONNECT",
                     time.monotonic() + WAIT_S, allow_closing=True)
        t_disc.join(WAIT_S)
        check(not t_disc.is_alive(), "stomp.py's disconnect() did not return within %.0f s" % WAIT_S)
        check(not errors, "stomp.py's disconnect() raised %r" % errors[:1])
        with rec.cond:
            check(not rec.errors, "got ERROR: %r" % (rec.errors[0].headers if rec.errors else None))
            check(not rec.heartbeat_timeouts, "stomp.py had a heart-beat timeout")
            check(not rec.after_end, "%d MESSAGE(s) arrived after the end marker, first: %r %s"
                  % (len(rec.after_end), rec.after_end[0][1] if rec.after_end else None,
                     short(rec.after_end[0][2]) if rec.after_end else ""))
            hbs = {"sent": rec.heartbeats_sent, "received": rec.heartbeats_received}

        stomp_version = (".".join(str(x) for x in stomp.__version__)
                         if isinstance(stomp.__version__, tuple) else stomp.__version__)
        summary = {
            "client": "stomp.py %s / websocket-client %s" % (stomp_version, websocket.__version__),
            "server_heart_beat": connected.get("heart-beat"),
            "count": count,
            "rate": rate,
            "received": len(messages),
            "in_order": True,
            "arrival_rate": round(count / elapsed, 1) if elapsed > 0 else None,
            "first_send_to_last_message_s": round(elapsed, 3),
            "first_to_last_message_s": round(last_at - first_at, 3),
            "first_message_latency_s": round(first_at - first_send, 3),
            "send_loop_s": round(send_finished - first_send, 3) if send_finished else None,
            "nominal_s": round(count / float(rate), 3),
            "max_gap_s": round(gap, 3),
            "max_gap_after_seq": gap_after if gap_after >= 0 else None,
            "heartbeats": hbs,
            "first_id": ids[0],
            "last_id": ids[-1],
        }
        set_step("timing")
        if cfg["max_gap_s"] is not None:
            check(gap <= cfg["max_gap_s"],
                  "MESSAGEs stopped for %.3f s (after seq %s; max_gap_s %s): the node did not write "
                  "while it was reading/throttling; summary %s"
                  % (gap, summary["max_gap_after_seq"], cfg["max_gap_s"], json.dumps(summary, sort_keys=True)))
        if cfg["min_rate"] is not None and summary["arrival_rate"] is not None:
            check(summary["arrival_rate"] >= cfg["min_rate"],
                  "arrival rate %.1f msgs/s is below min_rate %s" % (summary["arrival_rate"], cfg["min_rate"]))
        watchdog.cancel()
        sys.stdout.write("OK " + json.dumps(summary, sort_keys=True) + "\n")
        sys.stdout.flush()
        return 0
    except CheckFailed as exc:
        die(str(exc), rec)
    except Exception:
        die("unexpected exception:\n" + traceback.format_exc(), rec)


if __name__ == "__main__":
    main()
    # stomp.py's threads are daemons; exit without joining anything.
    sys.stdout.flush()
    os._exit(0)
