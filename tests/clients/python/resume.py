#!/usr/bin/env python3
"""Lockstep resume (DESIGN.md section 12: offsets, epochs, x-stream-offset) with stomp.py.

Usage: python3 resume.py '<json>'

    {"http": "http://127.0.0.1:PORT", "ws": "ws://127.0.0.1:PORT/ws",
     "user": "ana", "team": "t1",
     "tokens": {"subscriber": "<jwt of user, member of team>",
                "publisher": "<jwt with scope publish for team>"}}

Optional "heartbeat_ms" (default 0: no heart-beats). Other keys (page_port, ...) are ignored.

Wire contract under test: every MESSAGE carries x-stream-offset:<n> (contiguous from 1 per topic)
and x-stream-epoch:<e>; a SUBSCRIBE with x-stream-offset next|last|offset=<n> (+ x-stream-epoch)
first gets a MESSAGE event-type:lockstep.subscribed with x-recovered:true|false,
x-stream-offset:<P>, x-stream-epoch:<e> and the envelope data {recovered, offset: P, epoch};
every event with offset > P follows in order (x-recovered:false: no missed event, only live ones);
POST /api/v1/publish answers 202 {"id","offset","epoch"}.

Scenario (n is data.n of the resume.test events published to /team/<team>), with stomp.py's
WSStompConnection:
 a. connection 1 subscribes to the team topic with x-stream-offset:next (receipt): subscribed,
    recovered, P0 and epoch E;
 b. n=1..3 over HTTP: answers offset P0+1..P0+3 and epoch E; received live in order;
 c. DISCONNECT (receipt): exactly subscribed + n=1..3 arrived; n=4..7 published meanwhile;
 d. connection 2 resumes offset=<P0+3> with E: subscribed (recovered, P = P0+3), then n=4..7 in
    order; n=8 published, received live;
 e. /user/<user> (quiet: nothing is ever published to it) with last: subscribed, recovered,
    P = 0, no event; again (another id) with offset=0 and that epoch: the same;
 f. the team topic with last: subscribed (recovered, P = P0+7), then n=8 exactly once;
 g. the team topic with offset=<P0+3> and a made-up epoch: subscribed, x-recovered:false,
    P = P0+8 (where live continues) in epoch E, no replay; n=9 is then published as a barrier: it
    must be the next frame on every team subscription (d, f, g);
 h. DISCONNECT (receipt); each subscription holds exactly the frames above and nothing else.

Exit 0 and `OK {json}` on stdout; exit 1 with `FAIL [step]: reason` (and the frames seen) on
stderr. Every wait is bounded (threading.Condition with a deadline); nothing sleeps.
STOMP_DEBUG=1 logs stomp.py's frames on stderr.
"""

import json
import re
import time

import harness
from harness import (WAIT_S, ISO_Z_RE, CheckFailed, Listener, check, client_versions, config_arg,
                     disconnect_aside, ok, post_json, reported, send_connect, set_step,
                     start, start_watchdog, valid_utc_ts, ws_connection)

EVENT_TYPE = "resume.test"
SUBSCRIBED = "lockstep.subscribed"
OFFSET_RE = re.compile(r"^(0|[1-9][0-9]*)$")
EPOCH_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def short(value, limit=600):
    return harness.short(value, limit)


def die(reason, recorders=()):
    harness.die(reason, recorders)


class Recorder(Listener):
    """Everything stomp.py reports for one connection, MESSAGEs grouped by subscription."""

    TAIL = 60

    def __init__(self, name):
        super().__init__(name)
        self.subs = {}  # subscription id -> list of (headers, body)
        self.strays = []  # MESSAGEs whose subscription header names none of ours
        self.closing = False

    def expect(self, sub_id):
        with self.cond:
            self.subs[sub_id] = []

    def frames(self, sub_id):
        with self.cond:
            return list(self.subs[sub_id])

    def on_message(self, frame):
        body = frame.body.decode("utf-8") if isinstance(frame.body, bytes) else frame.body
        headers = dict(frame.headers)
        with self.cond:
            self._note("MESSAGE %s" % short(brief(headers, body), 300))
            sub = headers.get("subscription")
            if sub in self.subs:
                self.subs[sub].append((headers, body))
            else:
                self.strays.append((headers, body))
            self.cond.notify_all()

    # -- waiting (main thread) -----------------------------------------------------------------
    def trouble(self):
        """Why the connection is unusable, or None (call with the lock held)."""
        if self.errors:
            f = self.errors[0]
            return "server sent ERROR: headers=%r body=%s" % (f.headers, short(f.body))
        if self.strays:
            h, b = self.strays[0]
            return "MESSAGE for a subscription we do not have: %s headers=%r" % (short(brief(h, b)), h)
        if self.heartbeat_timeouts:
            return "stomp.py declared a heart-beat timeout"
        if self.disconnected and not self.closing:
            return "the connection closed unexpectedly"
        return None

    def wait_for(self, predicate, what):
        def trouble():
            why = self.trouble()
            return why and "%s connection: %s, while waiting for %s" % (self.name, why, what)
        self.wait_until(predicate, time.monotonic() + WAIT_S, trouble,
                        lambda: "%s connection: timed out after %.0f s waiting for %s"
                        % (self.name, WAIT_S, what() if callable(what) else what))


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def parse_args(argv):
    cfg = config_arg(argv, "resume.py")
    check(isinstance(cfg, dict), "config is not a JSON object")
    for key in ("http", "ws", "user", "team"):
        check(isinstance(cfg.get(key), str) and cfg[key], "config.%s must be a non-empty string" % key)
    check(isinstance(cfg.get("tokens"), dict), "config.tokens missing")
    for key in ("subscriber", "publisher"):
        check(isinstance(cfg["tokens"].get(key), str) and cfg["tokens"][key],
              "config.tokens.%s missing" % key)
    hb = cfg.get("heartbeat_ms") or 0
    check(isinstance(hb, int) and hb >= 0, "config.heartbeat_ms must be a non-negative integer")
    cfg["heartbeat_ms"] = hb
    return cfg


def open_conn(cfg, name, recorders):
    rec = Recorder(name)
    hb = cfg["heartbeat_ms"]
    conn = ws_connection(cfg["ws"], rec, (hb, hb))
    recorders.append(rec)
    send_connect(conn, cfg["user"], cfg["tokens"]["subscriber"])
    rec.wait_for(lambda: rec.connected_frame is not None, "CONNECTED")
    version = rec.connected_frame.headers.get("version")
    check(version == "1.2", "%s: CONNECTED version %r, expected '1.2'" % (name, version))
    return conn, rec


class Sub(object):
    def __init__(self, sub_id, topic, asked):
        self.id, self.topic, self.asked = sub_id, topic, asked
        self.receipt = "r-" + sub_id


def subscribe(conn, rec, topic, sub_id, stream_headers):
    sub = Sub(sub_id, topic, stream_headers)
    rec.expect(sub_id)
    headers = dict(stream_headers)
    headers["receipt"] = sub.receipt
    conn.subscribe(destination=topic, id=sub_id, ack="auto", headers=headers)
    return sub


def await_sub(rec, sub, count):
    """The SUBSCRIBE's receipt, and at least `count` frames on the subscription."""
    def what():
        have = rec.subs[sub.id]
        return "%s%d frame(s) on %s (SUBSCRIBE %s %r); got %d: %s" % (
            "" if sub.receipt in rec.receipts else "RECEIPT %s and " % sub.receipt, count, sub.id,
            sub.topic, sub.asked, len(have), short([brief(h, b) for h, b in have], 1500))
    rec.wait_for(lambda: sub.receipt in rec.receipts and len(rec.subs[sub.id]) >= count, what)


def disconnect_cleanly(conn, rec, receipt):
    with rec.cond:
        rec.closing = True
    t, errors = disconnect_aside(conn, receipt, "disconnect-" + rec.name)
    rec.wait_for(lambda: receipt in rec.receipts, "RECEIPT %r for DISCONNECT" % receipt)
    rec.wait_for(lambda: rec.disconnected, "the socket to close after the DISCONNECT receipt")
    t.join(WAIT_S)
    check(not t.is_alive(), "stomp.py's disconnect() on %s did not return within %.0f s" % (rec.name, WAIT_S))
    check(not errors, "stomp.py's disconnect() on %s raised %r" % (rec.name, errors[:1]))
    with rec.cond:
        check(rec.trouble() is None, "%s: %s" % (rec.name, rec.trouble()))


def http_publish(cfg, topic, n):
    payload = {"topic": topic, "type": EVENT_TYPE, "data": {"n": n}}
    what = "POST /api/v1/publish %s" % json.dumps(payload)
    status, raw = post_json(cfg["http"].rstrip("/") + "/api/v1/publish", cfg["tokens"]["publisher"],
                            payload, what)
    text = raw.decode("utf-8", "replace")
    check(status == 202, "%s answered %d, expected 202: %s" % (what, status, short(text)))
    try:
        reply = json.loads(text)
    except ValueError:
        raise CheckFailed("%s answered 202 with a non-JSON body: %s" % (what, short(text)))
    check(isinstance(reply, dict) and isinstance(reply.get("id"), str) and reply["id"],
          "%s: 202 body has no non-empty \"id\": %s" % (what, short(text)))
    off = reply.get("offset")
    check(isinstance(off, int) and not isinstance(off, bool) and off >= 1,
          "%s: 202 body has no integer \"offset\" >= 1: %s" % (what, short(text)))
    check(isinstance(reply.get("epoch"), str) and EPOCH_RE.match(reply["epoch"]),
          "%s: 202 body has no \"epoch\" of [A-Za-z0-9_-]: %s" % (what, short(text)))
    return {"n": n, "id": reply["id"], "offset": off, "epoch": reply["epoch"]}


def brief(h, body):
    """A compact view of a frame for failure messages."""
    try:
        data = json.loads(body).get("data")
    except Exception:
        data = "<non-JSON body %s>" % short(body, 80)
    out = {"event-type": h.get("event-type"), "x-stream-offset": h.get("x-stream-offset"),
           "x-stream-epoch": h.get("x-stream-epoch")}
    if "x-recovered" in h:
        out["x-recovered"] = h["x-recovered"]
    out["message-id"] = h.get("message-id")
    out["data"] = data
    return out


def check_common(h, body, sub, where):
    """What every MESSAGE of the contract has; returns (envelope, offset, epoch)."""
    w = "%s: headers=%r" % (where, h)
    check(h.get("destination") == sub.topic, "%s: destination %r, expected %r" % (w, h.get("destination"), sub.topic))
    check(h.get("subscription") == sub.id, "%s: subscription %r, expected %r" % (w, h.get("subscription"), sub.id))
    mid = h.get("message-id")
    check(isinstance(mid, str) and mid, "%s: message-id missing or empty" % w)
    check(h.get("content-type") == "application/json",
          "%s: content-type %r, expected 'application/json'" % (w, h.get("content-type")))
    if "content-length" in h:
        check(h["content-length"].strip() == str(len(body.encode("utf-8"))),
              "%s: content-length %r but the body is %d bytes" % (w, h["content-length"], len(body.encode("utf-8"))))
    off = h.get("x-stream-offset")
    check(isinstance(off, str) and OFFSET_RE.match(off), "%s: x-stream-offset %r is not a decimal offset" % (w, off))
    epoch = h.get("x-stream-epoch")
    check(isinstance(epoch, str) and EPOCH_RE.match(epoch),
          "%s: x-stream-epoch %r is not 1-64 of [A-Za-z0-9_-]" % (w, epoch))
    try:
        env = json.loads(body)
    except ValueError:
        raise CheckFailed("%s: body is not JSON: %s" % (w, short(body)))
    we = "%s body=%s" % (w, short(body))
    check(isinstance(env, dict) and sorted(env) == ["data", "id", "topic", "ts", "type"],
          "%s: envelope keys must be exactly id, type, topic, ts, data" % we)
    check(env["id"] == mid, "%s: envelope id %r != message-id %r" % (we, env["id"], mid))
    check(env["type"] == h.get("event-type"), "%s: envelope type %r != event-type header" % (we, env["type"]))
    check(env["topic"] == sub.topic, "%s: envelope topic %r, expected %r" % (we, env["topic"], sub.topic))
    ts = env["ts"]
    check(isinstance(ts, str) and ISO_Z_RE.match(ts), "%s: envelope ts %r is not ISO-8601 UTC" % (we, ts))
    check(valid_utc_ts(ts), "%s: envelope ts %r is not a valid date-time" % (we, ts))
    return env, int(off), epoch


def check_subscribed(h, body, sub, exp, where):
    """The lockstep.subscribed frame; exp: {recovered, offset, epoch?, why?}."""
    check(h.get("event-type") == SUBSCRIBED, "%s: the subscription's first frame must be event-type %s, got %s"
          % (where, SUBSCRIBED, short(brief(h, body))))
    env, offset, epoch = check_common(h, body, sub, where)
    w = "%s: %s" % (where, short(brief(h, body)))
    rec = h.get("x-recovered")
    check(rec in ("true", "false"), "%s: x-recovered %r, expected 'true' or 'false'" % (w, rec))
    recovered = rec == "true"
    d = env["data"]
    check(isinstance(d, dict) and sorted(d) == ["epoch", "offset", "recovered"],
          "%s: envelope data must be exactly {recovered, offset, epoch}, got %s" % (w, short(d)))
    check(d["recovered"] is recovered, "%s: data.recovered %r disagrees with x-recovered:%s" % (w, d["recovered"], rec))
    check(isinstance(d["offset"], int) and not isinstance(d["offset"], bool) and d["offset"] == offset,
          "%s: data.offset %r disagrees with x-stream-offset:%s" % (w, d["offset"], offset))
    check(d["epoch"] == epoch, "%s: data.epoch %r disagrees with x-stream-epoch:%s" % (w, d["epoch"], epoch))
    why = " (%s)" % exp["why"] if exp.get("why") else ""
    check(recovered == exp["recovered"], "%s: expected x-recovered:%s%s" % (w, str(exp["recovered"]).lower(), why))
    check(offset == exp["offset"], "%s: expected x-stream-offset:%d%s" % (w, exp["offset"], why))
    if exp.get("epoch") is not None:
        check(epoch == exp["epoch"], "%s: expected x-stream-epoch:%s%s" % (w, exp["epoch"], why))
    return {"recovered": recovered, "offset": offset, "epoch": epoch}


def check_event(h, body, sub, exp, where):
    """A resume.test event; exp: the publish answer {n, id, offset, epoch}."""
    w = "%s: expected n=%d (offset %d), got %s" % (where, exp["n"], exp["offset"], short(brief(h, body)))
    check(h.get("event-type") == EVENT_TYPE, "%s: event-type is not %s" % (w, EVENT_TYPE))
    env, offset, epoch = check_common(h, body, sub, where)
    check(env["data"] == {"n": exp["n"]}, "%s: data %s, expected {\"n\": %d}" % (w, short(env["data"]), exp["n"]))
    check(offset == exp["offset"], "%s: x-stream-offset %d, expected %d (the offset POST /api/v1/publish answered)"
          % (w, offset, exp["offset"]))
    check(epoch == exp["epoch"], "%s: x-stream-epoch %r, expected %r" % (w, epoch, exp["epoch"]))
    check(h.get("message-id") == exp["id"], "%s: message-id %r != id %r POST /api/v1/publish answered"
          % (w, h.get("message-id"), exp["id"]))


def check_exactly(rec, sub, expected, label):
    """Exactly `expected`, in order, on the subscription: [("subscribed", exp) | ("event", exp)]."""
    frames = rec.frames(sub.id)
    everything = "all frames of %s: %s" % (sub.id, short([brief(h, b) for h, b in frames], 3000))
    ids = [h.get("message-id") for h, _ in frames]
    dups = [i for i in ids if ids.count(i) > 1]
    check(not dups, "%s: message-id %r delivered twice on %s; %s" % (label, dups[:1], sub.id, everything))
    offs = [h.get("x-stream-offset") for h, _ in frames if h.get("event-type") == EVENT_TYPE]
    dup_offs = [o for o in offs if offs.count(o) > 1]
    check(not dup_offs, "%s: offset %s delivered twice on %s (duplicate event); %s"
          % (label, dup_offs[:1], sub.id, everything))
    for i, ((h, body), (kind, exp)) in enumerate(zip(frames, expected)):
        where = "%s: frame #%d of %s (SUBSCRIBE %s %r)" % (label, i + 1, sub.id, sub.topic, sub.asked)
        try:
            if kind == "subscribed":
                check_subscribed(h, body, sub, exp, where)
            else:
                check_event(h, body, sub, exp, where)
        except CheckFailed as exc:
            raise CheckFailed("%s; %s" % (exc, everything))
    if len(frames) != len(expected):
        names = ["%s(%d)" % (SUBSCRIBED, e["offset"]) if k == "subscribed" else "n=%d@%d" % (e["n"], e["offset"])
                 for k, e in expected]
        extra = "; extra: %s" % short([brief(h, b) for h, b in frames[len(expected):]]) \
            if len(frames) > len(expected) else ""
        raise CheckFailed("%s: %s received %d frame(s), expected exactly %d [%s]%s; %s"
                          % (label, sub.id, len(frames), len(expected), ", ".join(names), extra, everything))


# ------------------------------------------------------------------------------------------
# scenario
# ------------------------------------------------------------------------------------------
def main():
    cfg = start(parse_args, die)
    team, user = "/team/%s" % cfg["team"], "/user/%s" % cfg["user"]
    recorders = []
    started = time.monotonic()

    # Every wait is bounded by WAIT_S; this bounds the whole run (about 25 waits).
    budget = 4 * WAIT_S
    watchdog = start_watchdog(budget, lambda: die("overall watchdog: scenario exceeded %.0f s" % budget, recorders))

    published = {}

    def publish(n, expect_offset, expect_epoch, why):
        p = http_publish(cfg, team, n)
        check(p["offset"] == expect_offset, "POST /api/v1/publish n=%d answered offset %d, expected %d (%s): %s"
              % (n, p["offset"], expect_offset, why, p))
        check(p["epoch"] == expect_epoch, "POST /api/v1/publish n=%d answered epoch %r, expected %r (the team "
              "topic's epoch): %s" % (n, p["epoch"], expect_epoch, p))
        published[n] = p
        return p

    def ev(n):
        return ("event", published[n])

    with reported(lambda reason: die(reason, recorders)):
        # a. connection 1, x-stream-offset:next ---------------------------------------------------
        set_step("a subscribe next")
        c1, r1 = open_conn(cfg, "connection-1", recorders)
        sa = subscribe(c1, r1, team, "s-a-next", {"x-stream-offset": "next"})
        await_sub(r1, sa, 1)
        h0, b0 = r1.frames(sa.id)[0]
        check(h0.get("event-type") == SUBSCRIBED, "first frame of s-a-next is not %s: %s"
              % (SUBSCRIBED, short(brief(h0, b0))))
        p0_text = h0.get("x-stream-offset")
        check(isinstance(p0_text, str) and OFFSET_RE.match(p0_text),
              "s-a-next: lockstep.subscribed x-stream-offset %r is not a decimal offset (headers %r)" % (p0_text, h0))
        p0 = int(p0_text)
        sub_a = check_subscribed(h0, b0, sa, {"recovered": True, "offset": p0,
                                              "why": "x-stream-offset:next is always served"}, "a: s-a-next frame #1")
        epoch = sub_a["epoch"]
        subscribed_a = ("subscribed", {"recovered": True, "offset": p0, "epoch": epoch})

        # b. three events live --------------------------------------------------------------------
        set_step("b publish live")
        for n in (1, 2, 3):
            publish(n, p0 + n, epoch, "lockstep.subscribed for next said live starts after %d" % p0)
        await_sub(r1, sa, 4)
        check_exactly(r1, sa, [subscribed_a, ev(1), ev(2), ev(3)], "b")
        last_seen = int(r1.frames(sa.id)[3][0]["x-stream-offset"])

        # c. disconnect, four events while away ---------------------------------------------------
        set_step("c disconnect, publish while away")
        disconnect_cleanly(c1, r1, "r-disconnect-1")
        check_exactly(r1, sa, [subscribed_a, ev(1), ev(2), ev(3)], "c (after the DISCONNECT receipt)")
        for n in (4, 5, 6, 7):
            publish(n, p0 + n, epoch, "contiguous offsets")

        # d. resume from the last offset seen ----------------------------------------------------
        set_step("d resume offset=last seen")
        c2, r2 = open_conn(cfg, "connection-2", recorders)
        sd = subscribe(c2, r2, team, "s-d-resume", {"x-stream-offset": "offset=%d" % last_seen,
                                                    "x-stream-epoch": epoch})
        await_sub(r2, sd, 5)
        resumed = ("subscribed", {"recovered": True, "offset": last_seen, "epoch": epoch,
                                  "why": "resume from offset %d of the current epoch, events still in history"
                                         % last_seen})
        check_exactly(r2, sd, [resumed, ev(4), ev(5), ev(6), ev(7)], "d (replay)")
        publish(8, p0 + 8, epoch, "contiguous offsets")
        await_sub(r2, sd, 6)
        check_exactly(r2, sd, [resumed, ev(4), ev(5), ev(6), ev(7), ev(8)], "d (live after the replay)")

        # e. the quiet user topic -----------------------------------------------------------------
        set_step("e quiet user topic")
        se_last = subscribe(c2, r2, user, "s-e-last", {"x-stream-offset": "last"})
        await_sub(r2, se_last, 1)
        h, b = r2.frames(se_last.id)[0]
        user_sub = check_subscribed(h, b, se_last, {
            "recovered": True, "offset": 0,
            "why": "nothing was ever published to %s (a fresh node; runs must not overlap)" % user},
            "e: s-e-last frame #1")
        se_zero = subscribe(c2, r2, user, "s-e-offset0", {"x-stream-offset": "offset=0",
                                                          "x-stream-epoch": user_sub["epoch"]})
        await_sub(r2, se_zero, 1)
        h, b = r2.frames(se_zero.id)[0]
        check_subscribed(h, b, se_zero, {"recovered": True, "offset": 0, "epoch": user_sub["epoch"],
                                         "why": "quiet topic, its own epoch: nothing missed"}, "e: s-e-offset0 frame #1")

        # f. last on the team topic ---------------------------------------------------------------
        set_step("f last on the team topic")
        sf = subscribe(c2, r2, team, "s-f-last", {"x-stream-offset": "last"})
        await_sub(r2, sf, 2)
        last_sub = ("subscribed", {"recovered": True, "offset": p0 + 7, "epoch": epoch,
                                   "why": "last: P = top - 1 = %d - 1" % (p0 + 8)})
        check_exactly(r2, sf, [last_sub, ev(8)], "f")

        # g. a made-up epoch ----------------------------------------------------------------------
        set_step("g made-up epoch")
        bogus = "nope-nope" if epoch == "nope" else "nope"
        sg = subscribe(c2, r2, team, "s-g-bogus", {"x-stream-offset": "offset=%d" % last_seen,
                                                   "x-stream-epoch": bogus})
        await_sub(r2, sg, 1)
        not_recovered = ("subscribed", {
            "recovered": False, "offset": p0 + 8, "epoch": epoch,
            "why": "epoch %s was never issued: nothing replayed, live continues after the top, %d, of epoch %s"
                   % (bogus, p0 + 8, epoch)})
        check_exactly(r2, sg, [not_recovered], "g (before the barrier event)")
        # Barrier: n=9 must be the next frame on every team subscription.
        publish(9, p0 + 9, epoch, "contiguous offsets")
        r2.wait_for(lambda: len(r2.subs[sd.id]) >= 7 and len(r2.subs[sf.id]) >= 3 and len(r2.subs[sg.id]) >= 2,
                    lambda: "n=9 on s-d-resume, s-f-last and s-g-bogus (have %d/7, %d/3, %d/2 frames)"
                    % (len(r2.subs[sd.id]), len(r2.subs[sf.id]), len(r2.subs[sg.id])))
        check_exactly(r2, sg, [not_recovered, ev(9)], "g (no replay: the live n=9 is the next frame)")

        # h. disconnect; everything exactly once, nothing extra -----------------------------------
        set_step("h disconnect")
        disconnect_cleanly(c2, r2, "r-disconnect-2")
        check_exactly(r2, sd, [resumed, ev(4), ev(5), ev(6), ev(7), ev(8), ev(9)], "h")
        check_exactly(r2, sf, [last_sub, ev(8), ev(9)], "h")
        check_exactly(r2, sg, [not_recovered, ev(9)], "h")
        user_subscribed = ("subscribed", {"recovered": True, "offset": 0, "epoch": user_sub["epoch"]})
        check_exactly(r2, se_last, [user_subscribed], "h (quiet topic, last)")
        check_exactly(r2, se_zero, [user_subscribed], "h (quiet topic, offset=0)")
        for rec in (r1, r2):
            with rec.cond:
                check(not rec.errors and not rec.strays and not rec.heartbeat_timeouts,
                      "%s: %s" % (rec.name, rec.trouble()))

        summary = {
            "client": client_versions(),
            "team_topic": team,
            "epoch": epoch,
            "p0": p0,
            "published": [{"n": n, "offset": published[n]["offset"]} for n in sorted(published)],
            "resumed_from": last_seen,
            "replayed": [int(h["x-stream-offset"]) for h, _ in r2.frames(sd.id)[1:5]],
            "user_topic_epoch": user_sub["epoch"],
            "frames": {s.id: len(r.frames(s.id)) for r, s in
                       ((r1, sa), (r2, sd), (r2, se_last), (r2, se_zero), (r2, sf), (r2, sg))},
            "bogus_epoch": {"sent": bogus, "recovered": False, "offset": p0 + 8},
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        watchdog.cancel()
        ok(summary)
        return 0


if __name__ == "__main__":
    harness.run(main)
