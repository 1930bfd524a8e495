#!/usr/bin/env python3
"""Third-party-client conformance check: Lockstep hub vs. the real stomp.py library.

Usage: python3 stomp_py.py '<json>'

    {"http": "http://127.0.0.1:PORT", "ws": "ws://127.0.0.1:PORT/ws",
     "user": "ana", "team": "t1",
     "tokens": {"subscriber": "<jwt>", "publisher": "<jwt>", "sender": "<jwt>"},
     "heartbeat_ms": 500}

Scenario (DESIGN.md sections 2-5): a subscriber connects over WebSocket with stomp.py's
WSStompConnection (STOMP 1.2, heart-beats both ways), subscribes to its user, team and global
topics with receipts, receives three events published over the HTTP API and one sent over STOMP
by a second stomp.py connection, stays idle for a few heart-beat intervals without being dropped,
receives one more event, and disconnects cleanly with receipts.

Exit 0 and one line `OK {json}` on stdout on success; exit 1 with `FAIL [step]: reason` on stderr
otherwise. Every wait is bounded (threading.Event/Condition with a timeout); the only timed wait
is the deliberate idle period of step 6. Set STOMP_DEBUG=1 for stomp.py's debug log
(every frame sent and received) on stderr.
"""

import json
import re
import time

import harness
from harness import (WAIT_S, ISO_Z_RE, CheckFailed, Listener, check, client_versions, config_arg,
                     disconnect_aside, ok, post_json, reported, send_connect, set_step,
                     short, start, start_watchdog, valid_utc_ts, ws_connection)

HEART_BEAT_RE = re.compile(r"^\s*\d+\s*,\s*\d+\s*$")


def die(reason, recorders=()):
    harness.die(reason, recorders, "last events seen by {name} connection")


class Recorder(Listener):
    """Records everything stomp.py reports for one connection; lets the main thread wait on it.
    `troubled` (an Event) is set on ERROR, disconnect or heart-beat timeout."""

    def __init__(self, name):
        super().__init__(name)
        self.messages = []

    def on_message(self, frame):
        with self.cond:
            self._note("MESSAGE %r body=%s" % (frame.headers, short(frame.body, 200)))
            self.messages.append(frame)
            self.cond.notify_all()

    # -- waiting helpers (main thread) ---------------------------------------------------------
    def wait_for(self, predicate, what, timeout=WAIT_S, allow_trouble=False):
        """Wait until predicate() holds (called under the lock); fail on ERROR/disconnect."""
        self.wait_until(
            predicate, time.monotonic() + timeout,
            lambda: None if allow_trouble else self._trouble(what),
            lambda: "timed out after %.1f s waiting for %s on the %s connection" % (timeout, what, self.name))

    def _trouble(self, what):
        if self.errors:
            f = self.errors[0]
            return ("server sent ERROR while waiting for %s on the %s connection: "
                    "headers=%r body=%s" % (what, self.name, f.headers, short(f.body)))
        if self.heartbeat_timeouts:
            return ("stomp.py declared a heart-beat timeout (no heart-beat from the server) "
                    "while waiting for %s on the %s connection" % (what, self.name))
        if self.disconnected:
            return "connection closed while waiting for %s on the %s connection" % (what, self.name)
        return None

    def assert_healthy(self, what):
        with self.cond:
            why = self._trouble(what)
        check(why is None, why)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def parse_args(argv):
    cfg = config_arg(argv, "stomp_py.py")
    for key in ("http", "ws", "user", "team", "tokens", "heartbeat_ms"):
        check(key in cfg, "config is missing %r" % key)
    for key in ("subscriber", "publisher", "sender"):
        check(key in cfg["tokens"], "config.tokens is missing %r" % key)
    check(isinstance(cfg["heartbeat_ms"], int) and cfg["heartbeat_ms"] > 0,
          "heartbeat_ms must be a positive integer")
    return cfg


def make_conn(cfg, name, heartbeats):
    rec = Recorder(name)
    return ws_connection(cfg["ws"], rec, heartbeats), rec


def stomp_connect(conn, rec, login, token, **kwargs):
    send_connect(conn, login, token, **kwargs)
    rec.wait_for(lambda: rec.connected_frame is not None, "CONNECTED")
    return rec.connected_frame


def http_publish(cfg, topic, etype, data):
    status, raw = post_json(cfg["http"].rstrip("/") + "/api/v1/publish", cfg["tokens"]["publisher"],
                            {"topic": topic, "type": etype, "data": data}, "HTTP publish to %s" % topic)
    check(status == 202, "POST /api/v1/publish (topic %s) answered %d, expected 202; body: %s"
          % (topic, status, short(raw.decode("utf-8", "replace"))))
    try:
        reply = json.loads(raw)
    except ValueError:
        raise CheckFailed("POST /api/v1/publish answered 202 with a non-JSON body: %s" % short(raw))
    check(isinstance(reply, dict) and isinstance(reply.get("id"), str) and reply["id"],
          "POST /api/v1/publish answered 202 without a non-empty string \"id\": %s" % short(raw))
    return reply["id"]


def check_message(frame, expected):
    """Assert one MESSAGE frame against the expected {topic, sub_id, type, data, id?}."""
    h = frame.headers
    where = "MESSAGE for %s (%s)" % (expected["topic"], expected["type"])
    check(h.get("destination") == expected["topic"],
          "%s: destination header %r != %r" % (where, h.get("destination"), expected["topic"]))
    check(h.get("subscription") == expected["sub_id"],
          "%s: subscription header %r != %r" % (where, h.get("subscription"), expected["sub_id"]))
    mid = h.get("message-id")
    check(isinstance(mid, str) and mid != "", "%s: message-id header missing or empty (headers %r)"
          % (where, h))
    check(h.get("event-type") == expected["type"],
          "%s: event-type header %r != %r" % (where, h.get("event-type"), expected["type"]))
    check(h.get("content-type") == "application/json",
          "%s: content-type header %r != 'application/json'" % (where, h.get("content-type")))
    body = frame.body
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    if "content-length" in h:
        nbytes = len(body.encode("utf-8"))
        check(h["content-length"].strip() == str(nbytes),
              "%s: content-length header %r but the body is %d bytes of UTF-8"
              % (where, h["content-length"], nbytes))
    try:
        env = json.loads(body)
    except ValueError as exc:
        raise CheckFailed("%s: body is not JSON (%s): %s" % (where, exc, short(body)))
    check(isinstance(env, dict), "%s: body is not a JSON object: %s" % (where, short(body)))
    for key in ("id", "type", "topic", "ts", "data"):
        check(key in env, "%s: envelope lacks %r: %s" % (where, key, short(body)))
    check(env["id"] == mid, "%s: envelope id %r != message-id header %r" % (where, env["id"], mid))
    check(env["type"] == expected["type"],
          "%s: envelope type %r != %r" % (where, env["type"], expected["type"]))
    check(env["topic"] == h.get("destination"),
          "%s: envelope topic %r != destination %r" % (where, env["topic"], h.get("destination")))
    ts = env["ts"]
    check(isinstance(ts, str) and ISO_Z_RE.match(ts),
          "%s: envelope ts %r is not ISO-8601 UTC ending in Z" % (where, ts))
    check(valid_utc_ts(ts), "%s: envelope ts %r is not a valid date-time" % (where, ts))
    check(env["data"] == expected["data"],
          "%s: data changed in transit:\n   sent     %s\n   received %s"
          % (where, json.dumps(expected["data"], ensure_ascii=False, sort_keys=True),
             json.dumps(env["data"], ensure_ascii=False, sort_keys=True)))
    if expected.get("id") is not None:
        check(mid == expected["id"], "%s: message-id %r != id %r returned by the HTTP API"
              % (where, mid, expected["id"]))
    return mid


def disconnect_cleanly(conn, rec, receipt):
    t, errors = disconnect_aside(conn, receipt, "disconnect-" + rec.name)
    rec.wait_for(lambda: receipt in rec.receipts or rec.errors, "RECEIPT %r for DISCONNECT" % receipt,
                 allow_trouble=True)
    with rec.cond:
        if rec.errors:
            f = rec.errors[0]
            raise CheckFailed("server answered DISCONNECT on the %s connection with ERROR: headers=%r "
                              "body=%s" % (rec.name, f.headers, short(f.body)))
    rec.wait_for(lambda: rec.disconnected, "the socket to close after the DISCONNECT receipt",
                 allow_trouble=True)
    t.join(WAIT_S)
    check(not t.is_alive(), "stomp.py's disconnect() on the %s connection did not return within %.0f s"
          % (rec.name, WAIT_S))
    check(not errors, "stomp.py's disconnect() on the %s connection raised %r" % (rec.name, errors[:1]))


# ------------------------------------------------------------------------------------------
# scenario
# ------------------------------------------------------------------------------------------
def main():
    cfg = start(parse_args, die)
    hb = cfg["heartbeat_ms"]
    user, team = cfg["user"], cfg["team"]
    t_user, t_team, t_global = "/user/%s" % user, "/team/%s" % team, "/global"
    sub_ids = {t_user: "s-user", t_team: "s-team", t_global: "s-global"}
    recorders = []

    budget = 8 * WAIT_S + (hb * 4 + 500) / 1000.0
    watchdog = start_watchdog(budget, lambda: die("overall watchdog: scenario exceeded %.0f s" % budget,
                                                  recorders))

    with reported(lambda reason: die(reason, recorders)):
        # 1. connect the subscriber -------------------------------------------------------------
        set_step("1 connect subscriber")
        sub, srec = make_conn(cfg, "subscriber", (hb, hb))
        recorders.append(srec)
        connected = stomp_connect(sub, srec, user, cfg["tokens"]["subscriber"])
        ch = connected.headers
        check(ch.get("version") == "1.2", "CONNECTED version header %r != '1.2' (headers %r)"
              % (ch.get("version"), ch))
        check(ch.get("session"), "CONNECTED has no non-empty session header (headers %r)" % (ch,))
        check(ch.get("server"), "CONNECTED has no non-empty server header (headers %r)" % (ch,))
        check("heart-beat" in ch and HEART_BEAT_RE.match(ch["heart-beat"]),
              "CONNECTED heart-beat header missing or malformed: %r (headers %r)"
              % (ch.get("heart-beat"), ch))
        server_sx, server_sy = (int(x) for x in ch["heart-beat"].split(","))
        # Negotiation per STOMP 1.2: client sends every max(cx, sy) if both non-zero; expects the
        # server's every max(cy, sx) if both non-zero.
        client_send_ms = max(hb, server_sy) if server_sy else 0
        server_send_ms = max(hb, server_sx) if server_sx else 0

        # 2. subscribe with receipts ------------------------------------------------------------
        set_step("2 subscribe")
        sub_receipts = []
        for topic in (t_user, t_team, t_global):
            rid = "r-" + sub_ids[topic]
            sub_receipts.append(rid)
            sub.subscribe(destination=topic, id=sub_ids[topic], ack="auto", headers={"receipt": rid})
        srec.wait_for(lambda: all(r in srec.receipts for r in sub_receipts),
                      "RECEIPTs %s for the three SUBSCRIBEs" % sub_receipts)

        # 3. publish three events over HTTP -----------------------------------------------------
        set_step("3 http publish")
        expected = {}
        payloads = {
            t_user: {"job_id": "job-user-1", "done": 1, "total": 4, "stage": "import",
                     "message": "naïve ✓ for you", "ratio": 1.5,
                     "nested": {"level": {"deeper": [1, 2, {"x": None}]}, "ok": True},
                     "items": [812, "812", 0.25, False, None, []]},
            t_team: {"job_id": "job-team-7", "done": 37, "total": 100, "stage": "archive",
                     "message": "naïve ✓ team — 37 %", "ratio": 1.5,
                     "nested": {"who": {"name": "Zoë", "tags": ["a", "b"]}, "empty": {}},
                     "items": ["frame-0001", "frame-0002", {"k": "v\nwith newline"}]},
            t_global: {"job_id": "job-global-3", "done": 3, "total": 3, "stage": "done",
                       "message": "naïve ✓ everyone 🚀", "ratio": 1.5,
                       "nested": {"counts": {"images": 1200, "clouds": 7}, "neg": -42},
                       "items": [1.5, -0.5, 1e-3, "x:y\\z"]},
        }
        for topic in (t_user, t_team, t_global):
            eid = http_publish(cfg, topic, "job.progress", payloads[topic])
            expected[eid] = {"topic": topic, "sub_id": sub_ids[topic], "type": "job.progress",
                             "data": payloads[topic], "id": eid, "via": "http"}

        # 4. a second stomp.py connection SENDs to the team topic -------------------------------
        set_step("4 stomp send")
        snd, nrec = make_conn(cfg, "sender", (0, 0))
        recorders.append(nrec)
        # This one uses the CONNECT command (stomp.py's default for 1.2 is STOMP, used above).
        stomp_connect(snd, nrec, "bot", cfg["tokens"]["sender"], with_connect_command=True)
        send_data = {"task": 17, "assignee": "ana"}
        snd.send(destination=t_team, body=json.dumps(send_data), content_type="application/json",
                 headers={"event-type": "task.assigned", "receipt": "r-send"})
        nrec.wait_for(lambda: "r-send" in nrec.receipts, "RECEIPT 'r-send' for the SEND")
        stomp_expected = {"topic": t_team, "sub_id": sub_ids[t_team], "type": "task.assigned",
                          "data": send_data, "id": None, "via": "stomp"}

        # 5. the subscriber receives exactly these four -----------------------------------------
        set_step("5 receive")
        srec.wait_for(lambda: len(srec.messages) >= 4, "4 MESSAGE frames")
        with srec.cond:
            first = list(srec.messages)
        seen_ids = []
        unmatched_stomp = [stomp_expected]
        for frame in first:
            mid = frame.headers.get("message-id")
            if mid in expected:
                exp = expected.pop(mid)
            elif (frame.headers.get("event-type") == "task.assigned" and unmatched_stomp):
                exp = unmatched_stomp.pop()
            else:
                raise CheckFailed("unexpected MESSAGE (not one of the 4 published, or a duplicate): "
                                  "headers=%r body=%s" % (frame.headers, short(frame.body)))
            seen_ids.append(check_message(frame, exp))
        check(not expected and not unmatched_stomp,
              "missing MESSAGEs for %r" % ([e["topic"] + " " + e["type"] for e in expected.values()]
                                           + [e["topic"] + " " + e["type"] for e in unmatched_stomp]))
        check(len(set(seen_ids)) == len(seen_ids), "message-ids are not unique: %r" % seen_ids)
        check(len(first) == 4, "received %d MESSAGE frames, expected exactly 4" % len(first))

        # 6. idle: heart-beats must keep both connections alive ---------------------------------
        set_step("6 idle heart-beats")
        idle_s = (hb * 4 + 500) / 1000.0
        with srec.cond:
            hb_sent0, hb_recv0 = srec.heartbeats_sent, srec.heartbeats_received
        t0 = time.monotonic()
        # The one deliberate timed wait; it ends early (and fails) on ERROR/disconnect/timeout.
        if srec.troubled.wait(idle_s) or nrec.troubled.wait(0):
            srec.assert_healthy("the idle period (%.1f s into it)" % (time.monotonic() - t0))
            nrec.assert_healthy("the idle period (%.1f s into it)" % (time.monotonic() - t0))
        check(sub.is_connected(), "subscriber connection is no longer connected after the idle period")
        check(snd.is_connected(), "sender connection (heart-beats 0,0) was dropped during the idle period")
        with srec.cond:
            hb_sent = srec.heartbeats_sent - hb_sent0
            hb_recv = srec.heartbeats_received - hb_recv0
            n_msgs = len(srec.messages)
        check(n_msgs == 4, "received %d MESSAGE frames by the end of the idle period, expected exactly 4: "
              "%r" % (n_msgs, [m.headers for m in srec.messages[4:]]))
        if client_send_ms:
            check(hb_sent >= 1, "stomp.py sent no heart-beat during %.1f s idle (negotiated every %d ms) - "
                  "client problem, not a server one" % (idle_s, client_send_ms))
        if server_send_ms and idle_s * 1000 > 2 * server_send_ms:
            check(hb_recv >= 1, "the server sent no heart-beat during %.1f s idle although it must send "
                  "one every %d ms (CONNECTED heart-beat:%s, client asked %d,%d)"
                  % (idle_s, server_send_ms, ch["heart-beat"], hb, hb))
        set_step("6 publish after idle")
        late_data = {"job_id": "job-global-4", "stage": "after-idle", "ratio": 1.5,
                     "message": "still here ✓", "nested": {"ok": True}, "items": [1, 2, 3]}
        late_id = http_publish(cfg, t_global, "job.completed", late_data)
        srec.wait_for(lambda: len(srec.messages) >= 5, "the MESSAGE published after the idle period")
        with srec.cond:
            late = srec.messages[4]
        check_message(late, {"topic": t_global, "sub_id": sub_ids[t_global], "type": "job.completed",
                             "data": late_data, "id": late_id})

        # 7. clean disconnect -------------------------------------------------------------------
        set_step("7 disconnect")
        disconnect_cleanly(snd, nrec, "r-disc-sender")
        disconnect_cleanly(sub, srec, "r-disc-subscriber")
        with srec.cond:
            check(len(srec.messages) == 5, "received %d MESSAGE frames in total, expected 5"
                  % len(srec.messages))
        for rec in (srec, nrec):
            with rec.cond:
                check(not rec.errors, "%s connection got ERROR: %r"
                      % (rec.name, rec.errors[0].headers if rec.errors else None))
                check(not rec.heartbeat_timeouts, "%s connection had a heart-beat timeout" % rec.name)

        summary = {
            "client": client_versions(),
            "session": ch.get("session"),
            "server": ch.get("server"),
            "server_heart_beat": ch.get("heart-beat"),
            "negotiated_ms": {"client_sends": client_send_ms, "server_sends": server_send_ms},
            "idle_s": idle_s,
            "heartbeats_during_idle": {"sent": hb_sent, "received": hb_recv},
            "messages": 5,
            "message_ids": seen_ids + [late_id],
        }
        watchdog.cancel()
        ok(summary)
        return 0


if __name__ == "__main__":
    harness.run(main)
