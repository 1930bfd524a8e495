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
import threading
import time

import harness
from harness import (WAIT_S, ISO_Z_RE, CheckFailed, Listener, check, client_versions, config_arg,
                     disconnect_aside, ok, reported, send_connect, set_step,
                     start, start_watchdog, ws_connection)
import websocket  # after harness, which reports a missing stomp.py/websocket-client

SUB_ID = "s-flood"
EVENT = "flood.msg"
END_EVENT = "flood.end"

_observed = {}  # filled as the run goes; printed with any failure


def short(value, limit=300):
    return harness.short(value, limit)


def die(reason, rec=None):
    """FAIL [step]: reason, the `observed {json}` line, then the connection's last events."""
    if rec is not None:
        try:
            _observed.update(rec.observed())
        except Exception:  # never let reporting hide the failure
            pass
    harness.die(reason, [rec] if rec is not None else (), "last events on the connection", _observed)


class Recorder(Listener):
    """Everything stomp.py reports for the connection; the main thread waits on `cond`."""

    TAIL = 30
    QUIET = ("SEND",)  # thousands of them

    def __init__(self):
        super().__init__()
        self.messages = []  # (monotonic arrival time, headers, body) of flood.msg / other frames
        self.end_marker = None  # (time, headers, body) of the flood.end MESSAGE
        self.after_end = []  # anything delivered after the end marker
        self.disconnected = None  # {"t", "thread", "messages"} when on_disconnected fired
        self.close_frame = None  # {"code", "reason", "at_s"} of a WebSocket close from the server
        self.closing = False  # set just before our own DISCONNECT
        self.first_send = None
        self.sends_done = 0
        self.send_error = None
        self.send_finished = None

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
        def trouble():
            why = self.trouble()
            if why and not (allow_closing and self.closing):
                return "%s while waiting for %s" % (why, what)
            return None
        self.wait_until(predicate, deadline, trouble, lambda: "timed out waiting for %s" % what)


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
    cfg = config_arg(argv, "flood.py")
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
    cfg = start(parse_args, die)
    count, rate, hb = cfg["count"], cfg["rate"], cfg["heartbeat_ms"]
    topic = "/user/%s" % cfg["user"]
    flood_budget = count / float(rate) + cfg["timeout_s"]
    _observed.update({"count": count, "rate": rate, "deadline_after_first_send_s": round(flood_budget, 3)})

    rec = Recorder()
    budget = 3 * WAIT_S + flood_budget + 5
    watchdog = start_watchdog(budget, lambda: die("overall watchdog: run exceeded %.0f s" % budget, rec))

    with reported(lambda reason: die(reason, rec)):
        set_step("connect")
        conn = ws_connection(cfg["ws"], rec, (hb, hb))
        send_connect(conn, cfg["user"], cfg["token"])
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
        with rec.cond:
            rec.closing = True
        t_disc, errors = disconnect_aside(conn, "r-disc", "disconnect")
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

        summary = {
            "client": client_versions(),
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
        ok(summary)
        return 0


if __name__ == "__main__":
    harness.run(main)
