// A dashboard opened in the middle of a run, with @stomp/stompjs in headless Chromium (DESIGN
// §13: keys, `x-stream-offset:snapshot`, GET /api/v1/topics/{topic}/snapshot).
//
// Runs in the page: browser/dashboard.mjs serves browser/page.html and answers its
// `import … from '/scenario.mjs'` with this file (and ./common.mjs beside it). That runner is also
// the platform's backend: it publishes job progress and takes and releases locks on the team
// topic while this page opens, and answers on `cfg.backend` (CORS): GET /ready, POST /live,
// GET /final (its record of every offset of the topic: {offset, id, type, key, data}, and its
// own final state), POST /observed. Only what a page has is used (fetch, Promise, setTimeout,
// performance, JSON). Exports runScenario and makeRedactor, as page.html expects.
//
// Steps:
//  1. GET backend /ready: it has been publishing for 2 s, holds the 30 locks and keeps taking and
//     releasing a 31st item.
//  2. GET /api/v1/topics/%2Fteam%2F<team>/snapshot (HTTP snapshot H, position P_h).
//  3. CONNECT, SUBSCRIBE /team/<team> with `x-stream-offset:snapshot` (receipt), while the backend
//     keeps publishing; wait for the receipt and the first live frame.
//  4. POST backend /live (locks are released and retaken, a job completes), GET backend /final
//     (the record, once the backend stopped), wait for the frame at its last offset, DISCONNECT
//     (receipt).
//  5. Check, against the record:
//     - H: its position is in the record's epoch; exactly the keys that have an event at or
//       before P_h, each with its latest such event (offset, id, type, topic, data), in
//       increasing offset order; nothing unkeyed;
//     - frame 1: `lockstep.subscribed`, x-recovered:true, x-stream-offset:<top> (P_h ≤ top ≤ the
//       record's last offset), x-stream-epoch, envelope data agreeing;
//     - then the state frames, every one `x-snapshot:true` and none after the first live frame:
//       exactly one per key with an event at or before top, each that key's latest event at or
//       before top (message-id, event-type, x-key, x-stream-offset, epoch, envelope), offsets
//       increasing; so each of the 10 jobs' progress and each of the 30 locks' holder as of top;
//     - then live frames top+1, top+2, … to the record's last offset: each the record's event at
//       that offset (x-key exactly when keyed), no duplicate, no gap (except events a keyed
//       `x-conflated:<n>` frame says it replaced: its key's n previous events), nothing after;
//     - the dashboard built from state + live frames equals the backend's own final state (each
//       job's last event type and `done`, each item's holder or released).
// Every wait is bounded (WAIT_MS); nothing sleeps.

import { ISO_UTC, ScenarioFailure, Waits, makeConn, makeRedactor, forceClose, sameKeys, showJson } from './common.mjs';

export { makeRedactor };

const SUBSCRIBED = 'lockstep.subscribed';
const OFFSET_RE = /^(0|[1-9][0-9]*)$/;
const EPOCH_RE = /^[A-Za-z0-9_-]{1,64}$/;
const JOBS = 10;
const ITEMS = 30;

let currentStep = 'setup';

function fail(message) {
  throw new ScenarioFailure(`[${currentStep}] ${message}`);
}

function show(value, max = 700) {
  return showJson(value, max);
}

// JSON equality (key order ignored).
function same(a, b) {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  if (ka.length !== Object.keys(b).length) return false;
  return ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && same(a[k], b[k]));
}

const now = () => (typeof performance !== 'undefined' ? performance.now() : Date.now());

// A compact view of a frame for failure messages.
function brief(f) {
  const h = f.headers;
  let data;
  try {
    data = JSON.parse(f.body).data;
  } catch (_) {
    data = `<non-JSON body ${String(f.body).slice(0, 80)}>`;
  }
  const out = { 'event-type': h['event-type'], 'x-stream-offset': h['x-stream-offset'] };
  for (const k of ['x-key', 'x-snapshot', 'x-conflated', 'x-recovered']) if (h[k] !== undefined) out[k] = h[k];
  out.data = data;
  return out;
}

function briefEntry(e) {
  return e ? { offset: e.offset, type: e.type, key: e.key, data: e.data } : e;
}

// GET/POST with a bounded wait; JSON in and out. `expect`: the status wanted.
async function call(waits, fetchImpl, method, url, { token, body, expect = 200, what } = {}) {
  const label = what || `${method} ${url}`;
  let res;
  try {
    res = await waits.wait(
      fetchImpl(url, {
        method,
        headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
        body: body === undefined ? undefined : JSON.stringify(body),
      }),
      `the HTTP response to ${label}`,
    );
  } catch (e) {
    if (e instanceof ScenarioFailure) throw e;
    fail(`${label} failed before any HTTP response: ${e} (CORS? is the server up?)`);
  }
  const text = await waits.wait(res.text(), `the body of the HTTP response to ${label}`);
  if (res.status !== expect) fail(`${label}: expected HTTP ${expect}, got ${res.status}: ${text.slice(0, 600)}`);
  try {
    return JSON.parse(text);
  } catch (_) {
    fail(`${label}: body is not JSON: ${show(text.slice(0, 600))}`);
  }
  return undefined;
}

// The backend's answers: {ok: true, …} or {error}.
async function backendCall(ctx, method, path, body) {
  const answer = await call(ctx.waits, ctx.fetchImpl, method, `${ctx.cfg.backend}${path}`, { body, what: `backend ${method} ${path}` });
  if (!answer || answer.ok !== true) fail(`backend: ${answer && answer.error ? answer.error : `unexpected answer to ${method} ${path}: ${show(answer)}`}`);
  return answer;
}

// What a page shows: each job's last event type and `done`, each item's holder (null: released).
function dashboardOf(events) {
  const jobs = {};
  const locks = {};
  for (const e of events) {
    if (e.key && e.key.startsWith('job:')) jobs[e.data.job_id] = { type: e.type, done: e.data.done };
    if (e.key && e.key.startsWith('lock:')) locks[e.data.item] = e.type === 'lock.acquired' ? e.data.holder : null;
  }
  return { jobs, locks };
}

function diffViews(kind, got, want) {
  const out = [];
  for (const k of new Set([...Object.keys(got), ...Object.keys(want)])) {
    if (!same(got[k], want[k])) out.push(`${kind} ${k}: dashboard ${show(got[k])}, backend ${show(want[k])}`);
  }
  return out;
}

/**
 * @param {object} o
 * @param {Function} o.Client  the @stomp/stompjs Client class
 * @param {object} o.cfg       {http, ws, user, team, backend, tokens:{subscriber, …}, heartbeat_ms?}
 * @param {Function} o.fetch   fetch implementation
 * @param {Function} o.log     trace sink
 * @param {string} o.platform  copied into the summary
 */
export async function runDashboardScenario({ Client, cfg, fetch: fetchImpl, log = () => {}, platform }) {
  currentStep = 'config';
  for (const k of ['http', 'ws', 'user', 'team', 'backend']) {
    if (typeof cfg[k] !== 'string' || cfg[k] === '') fail(`"${k}" must be a non-empty string`);
  }
  if (!cfg.tokens || typeof cfg.tokens.subscriber !== 'string') fail('tokens.subscriber missing');
  const waits = new Waits(() => currentStep);
  const ctx = { cfg, waits, fetchImpl };
  const topic = `/team/${cfg.team}`;
  const conns = [];
  const observed = { platform };
  // The `observed` line, printed by the backend; not through `waits`, which a failure may have tripped.
  const report = async (ok) => {
    let timer;
    try {
      const posted = fetchImpl(`${cfg.backend}/observed`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ ok, observed }),
      }).then((r) => r.text());
      await Promise.race([posted, new Promise((resolve) => (timer = setTimeout(resolve, 2_000)))]);
    } catch (_) {
      // the verdict matters more than the observed line
    } finally {
      clearTimeout(timer);
    }
  };

  try {
    // 1. The backend is mid-run.
    currentStep = '1 backend ready';
    const ready = await backendCall(ctx, 'GET', '/ready');
    observed.ready_offset = ready.now_offset;

    // 2. The HTTP snapshot, before subscribing.
    currentStep = '2 HTTP snapshot';
    const snapUrl = `${cfg.http}/api/v1/topics/${encodeURIComponent(topic)}/snapshot`;
    const http = await call(waits, fetchImpl, 'GET', snapUrl, { token: cfg.tokens.subscriber });
    if (!sameKeys(http, ['position', 'events']) || !sameKeys(http.position, ['offset', 'epoch']) || !Array.isArray(http.events)) {
      fail(`GET ${snapUrl} answered ${show(http)}, expected {position: {offset, epoch}, events: [...]}`);
    }
    observed.http_snapshot = { offset: http.position.offset, keys: http.events.length };

    // 3. The dashboard subscribes while the backend publishes.
    currentStep = '3 subscribe snapshot';
    // Every MESSAGE is logged by stompjs; keep the trace lines short.
    const conn = makeConn({ Client, cfg, name: 'dashboard', token: cfg.tokens.subscriber, waits, log, show, traceWidth: 400 });
    conns.push(conn);
    conn.client.activate();
    await waits.until(() => conn.connectedFrame !== null, 'CONNECTED');
    if (conn.connectedFrame.headers.version !== '1.2') fail(`CONNECTED version ${show(conn.connectedFrame.headers.version)}, expected "1.2"`);
    const frames = [];
    const sub = { id: 'dash-0', topic, receipt: 'r-dash-0' };
    conn.client.watchForReceipt(sub.receipt, () => {
      conn.receipts.add(sub.receipt);
      waits.changed();
    });
    const tSubscribe = now();
    conn.client.subscribe(
      topic,
      (msg) => {
        frames.push({ headers: { ...msg.headers }, body: msg.body, t: now() });
        waits.changed();
      },
      { id: sub.id, receipt: sub.receipt, 'x-stream-offset': 'snapshot' },
    );
    // The subscribed frame, the state, then at least one live frame (the backend keeps going).
    const firstLive = () => frames.findIndex((f, i) => i > 0 && f.headers['x-snapshot'] === undefined);
    await waits.until(
      () => conn.receipts.has(sub.receipt) && frames.length > 0 && (frames[0].headers['event-type'] !== SUBSCRIBED || firstLive() > 0),
      () => `RECEIPT ${sub.receipt} (${conn.receipts.has(sub.receipt) ? 'got it' : 'not yet'}), the ${SUBSCRIBED} frame and a first live frame; got ${frames.length} frame(s): ${show(frames.slice(0, 5).map(brief))}`,
    );
    if (frames[0].headers['event-type'] !== SUBSCRIBED) fail(`the subscription's first frame must be ${SUBSCRIBED}, got ${show(brief(frames[0]))}`);
    observed.live_before_backend_live = frames.length - firstLive();

    // 4. The live phase, then everything the backend did.
    currentStep = '4 live phase';
    const live = await backendCall(ctx, 'POST', '/live');
    observed.live_phase_from = live.offset;
    const { record } = await backendCall(ctx, 'GET', '/final');
    const last = record.final_offset;
    const E = record.epoch;
    const maxOffset = () => frames.reduce((m, f) => Math.max(m, Number(f.headers['x-stream-offset']) || 0), 0);
    await waits.until(
      () => maxOffset() >= last,
      () => `the frame at the backend's last offset ${last}; the highest offset received is ${maxOffset()} (${frames.length} frames)`,
    );
    conn.closing = true;
    await waits.wait(conn.client.deactivate(), 'deactivate() (RECEIPT for DISCONNECT, then the WebSocket closing)');
    if (!conn.disconnectReceipt) fail('WebSocket closed during deactivate() without a RECEIPT for DISCONNECT');

    // 5. The checks.
    currentStep = '5 check';
    const entries = record.entries;
    entries.forEach((e, i) => {
      if (e.offset !== i + 1) fail(`backend record: entry #${i} has offset ${e.offset}, expected ${i + 1}`);
    });
    if (entries.length !== last) fail(`backend record holds ${entries.length} entries for offsets 1..${last}`);
    const at = (o) => entries[o - 1];
    // Each key's latest event at or before `top`, in offset order.
    const stateAt = (top) => {
      const latest = new Map();
      for (const e of entries) if (e.offset <= top && e.key) latest.set(e.key, e);
      return [...latest.values()].sort((a, b) => a.offset - b.offset);
    };
    const whereIs = (o) => `offset ${o} (record: ${show(briefEntry(at(o)))})`;

    // 5a. The HTTP snapshot.
    const ph = http.position.offset;
    if (http.position.epoch !== E) fail(`HTTP snapshot epoch ${show(http.position.epoch)}, the topic's epoch is ${show(E)} (every publish answered it)`);
    if (!Number.isSafeInteger(ph) || ph < ready.now_offset || ph > last) {
      fail(`HTTP snapshot position ${ph}: must be between the backend's offset when it said ready (${ready.now_offset}) and its last (${last})`);
    }
    {
      const want = stateAt(ph);
      const got = http.events;
      let prev = 0;
      const keys = new Set();
      for (const g of got) {
        if (!sameKeys(g, ['offset', 'key', 'event'])) fail(`HTTP snapshot entry ${show(g)} is not {offset, key, event}`);
        if (!(g.offset > prev)) fail(`HTTP snapshot entries not in increasing offset order: ${g.offset} after ${prev}`);
        if (g.offset > ph) fail(`HTTP snapshot entry at offset ${g.offset} is above its position ${ph}`);
        if (keys.has(g.key)) fail(`HTTP snapshot holds key ${g.key} twice`);
        keys.add(g.key);
        prev = g.offset;
      }
      const wantKeys = new Set(want.map((e) => e.key));
      const missing = [...wantKeys].filter((k) => !keys.has(k));
      const extra = [...keys].filter((k) => !wantKeys.has(k));
      if (missing.length || extra.length) {
        fail(`HTTP snapshot at ${ph}: keys missing ${show(missing)}, unexpected ${show(extra)} (${got.length} entries, ${want.length} keys expected)`);
      }
      for (const e of want) {
        const g = got.find((x) => x.key === e.key);
        const ev = g.event || {};
        if (g.offset !== e.offset || ev.id !== e.id || ev.type !== e.type || ev.topic !== topic || !same(ev.data, e.data) || !ISO_UTC.test(String(ev.ts))) {
          fail(`HTTP snapshot at ${ph}, key ${e.key}: got offset ${g.offset} ${show(ev)}; the latest event of the key at or before ${ph} is ${show({ ...briefEntry(e), id: e.id })}`);
        }
      }
    }

    // 5b. The subscribed frame.
    const f0 = frames[0];
    const h0 = f0.headers;
    const top = Number(h0['x-stream-offset']);
    let env0;
    try {
      env0 = JSON.parse(f0.body);
    } catch (_) {
      fail(`${SUBSCRIBED} body is not JSON: ${show(f0.body)}`);
    }
    if (h0['x-recovered'] !== 'true') fail(`${SUBSCRIBED}: x-recovered ${show(h0['x-recovered'])}, expected "true" (a snapshot is always served): ${show(h0)}`);
    if (!OFFSET_RE.test(String(h0['x-stream-offset'])) || top < ph || top > last) {
      fail(`${SUBSCRIBED}: x-stream-offset ${show(h0['x-stream-offset'])} must be an offset between the HTTP snapshot's ${ph} (taken before) and the backend's last ${last}`);
    }
    if (h0['x-stream-epoch'] !== E) fail(`${SUBSCRIBED}: x-stream-epoch ${show(h0['x-stream-epoch'])}, expected ${show(E)}`);
    if (!sameKeys(env0, ['id', 'type', 'topic', 'ts', 'data']) || env0.type !== SUBSCRIBED || env0.topic !== topic || env0.id !== h0['message-id']) {
      fail(`${SUBSCRIBED}: envelope ${show(env0)} (message-id ${show(h0['message-id'])})`);
    }
    if (!same(env0.data, { recovered: true, offset: top, epoch: E })) fail(`${SUBSCRIBED}: envelope data ${show(env0.data)}, expected ${show({ recovered: true, offset: top, epoch: E })}`);
    if (h0.destination !== topic || h0.subscription !== sub.id) fail(`${SUBSCRIBED}: destination/subscription ${show(h0)}`);
    observed.top = top;
    observed.epoch = E;

    // Every other frame: an event of the record.
    const checkEvent = (f, e, where) => {
      const h = f.headers;
      const w = `${where}: got ${show(brief(f))}, the record at ${e ? e.offset : '?'} is ${show(briefEntry(e))}`;
      if (!e) fail(`${where}: ${show(brief(f))} is at an offset the backend never caused`);
      if (h.destination !== topic || h.subscription !== sub.id || h['content-type'] !== 'application/json') fail(`${w}: headers ${show(h)}`);
      if (h['x-stream-epoch'] !== E) fail(`${w}: x-stream-epoch ${show(h['x-stream-epoch'])}, expected ${show(E)}`);
      if (h['message-id'] !== e.id) fail(`${w}: message-id ${show(h['message-id'])}, the event's id is ${show(e.id)}`);
      if (h['event-type'] !== e.type) fail(`${w}: event-type differs`);
      if (e.key ? h['x-key'] !== e.key : h['x-key'] !== undefined) fail(`${w}: x-key ${show(h['x-key'])}, expected ${e.key ? show(e.key) : 'none (an unkeyed event)'}`);
      let env;
      try {
        env = JSON.parse(f.body);
      } catch (_) {
        fail(`${w}: body is not JSON`);
      }
      if (!sameKeys(env, ['id', 'type', 'topic', 'ts', 'data']) || env.id !== e.id || env.type !== e.type || env.topic !== topic || !ISO_UTC.test(String(env.ts))) {
        fail(`${w}: envelope ${show(env)}`);
      }
      if (!same(env.data, e.data)) fail(`${w}: data ${show(env.data)} differs from what was published, ${show(e.data)}`);
    };

    // 5c. The state frames.
    let n = 1;
    while (n < frames.length && frames[n].headers['x-snapshot'] !== undefined) n += 1;
    const state = frames.slice(1, n);
    const liveFrames = frames.slice(n);
    const stray = liveFrames.find((f) => f.headers['x-snapshot'] !== undefined);
    if (stray) fail(`a frame marked x-snapshot after the first live frame: ${show(brief(stray))}`);
    const want = stateAt(top);
    {
      const wantKeys = want.map((e) => e.key);
      const jobKeys = wantKeys.filter((k) => k.startsWith('job:')).length;
      const lockKeys = wantKeys.filter((k) => k.startsWith('lock:')).length;
      // The scenario itself: the backend said ready only once every job ran and every lock was taken.
      if (jobKeys !== JOBS || lockKeys < ITEMS) fail(`the record at ${top} has ${jobKeys} job keys and ${lockKeys} lock keys, expected ${JOBS} and at least ${ITEMS} (backend bug?)`);
      let prev = 0;
      const seen = new Map();
      state.forEach((f, i) => {
        const h = f.headers;
        const where = `state frame #${i + 1} (frame #${i + 2})`;
        if (h['x-snapshot'] !== 'true') fail(`${where}: x-snapshot ${show(h['x-snapshot'])}, expected "true"`);
        if (h['x-conflated'] !== undefined) fail(`${where}: a state frame carries x-conflated: ${show(brief(f))}`);
        const o = Number(h['x-stream-offset']);
        if (!OFFSET_RE.test(String(h['x-stream-offset'])) || o < 1) fail(`${where}: x-stream-offset ${show(h['x-stream-offset'])}`);
        if (o > top) fail(`${where}: offset ${o} is above the snapshot's position ${top}: ${show(brief(f))}`);
        if (o <= prev) fail(`${where}: offset ${o} after ${prev}: state frames must come in increasing offset order`);
        prev = o;
        const k = h['x-key'];
        if (k === undefined) fail(`${where}: a state frame without x-key: ${show(brief(f))}`);
        if (seen.has(k)) fail(`${where}: key ${k} again (first at offset ${seen.get(k)})`);
        seen.set(k, o);
        const e = at(o);
        if (!e || e.key !== k) fail(`${where}: ${show(brief(f))}, but the record at ${o} is ${show(briefEntry(e))}`);
        const latest = want.find((x) => x.key === k);
        if (!latest) fail(`${where}: key ${k} had no event at or before ${top}`);
        if (latest.offset !== o) {
          fail(`${where}: key ${k} stands at offset ${o} (${show(e.data)}), but its latest event at or before ${top} is ${whereIs(latest.offset)}${o < latest.offset ? ': the state is stale' : ''}`);
        }
        checkEvent(f, e, where);
      });
      const missing = want.filter((e) => !seen.has(e.key));
      if (missing.length) {
        fail(`the state frames (${state.length}) lack ${missing.length} key(s) with an event at or before ${top}: ${show(missing.map(briefEntry))}`);
      }
    }
    const atTop = dashboardOf(state.map((f) => at(Number(f.headers['x-stream-offset']))));
    const wantAtTop = dashboardOf(want);
    const topDiff = [...diffViews('job', atTop.jobs, wantAtTop.jobs), ...diffViews('lock', atTop.locks, wantAtTop.locks)];
    if (topDiff.length) fail(`the dashboard at ${top} differs from the backend's record: ${topDiff.join('; ')}`);

    // 5d. The live frames: top+1 … last, contiguous (bar conflation), each once.
    let prev = top;
    const missed = new Set();
    let conflated = 0;
    liveFrames.forEach((f, i) => {
      const where = `live frame #${i + 1} (frame #${n + i + 1})`;
      const o = Number(f.headers['x-stream-offset']);
      if (!OFFSET_RE.test(String(f.headers['x-stream-offset']))) fail(`${where}: x-stream-offset ${show(f.headers['x-stream-offset'])}`);
      if (o <= prev) {
        fail(`${where}: offset ${o} after ${prev}: ${o === prev || o <= top ? 'a duplicate' : 'out of order'} (${o <= top ? `at or below the snapshot position ${top}` : 'already delivered'}): ${show(brief(f))}`);
      }
      for (let g = prev + 1; g < o; g++) missed.add(g);
      prev = o;
      const e = at(o);
      checkEvent(f, e, where);
      const c = f.headers['x-conflated'];
      if (c !== undefined) {
        const k = Number(c);
        if (!Number.isInteger(k) || k < 1 || !e.key) fail(`${where}: x-conflated ${show(c)} on ${show(briefEntry(e))}`);
        const before = entries.filter((x) => x.key === e.key && x.offset < o).slice(-k);
        const notMissed = before.filter((x) => !missed.has(x.offset));
        if (before.length !== k || notMissed.length) {
          fail(`${where}: x-conflated:${k} at ${o} (key ${e.key}), but its previous ${k} event(s) ${show(before.map((x) => x.offset))} were not all skipped (delivered: ${show(notMissed.map((x) => x.offset))})`);
        }
        for (const x of before) missed.delete(x.offset);
        conflated += 1;
      }
    });
    if (missed.size) {
      const list = [...missed].slice(0, 10);
      fail(`live frames skipped ${missed.size} offset(s) that no x-conflated frame accounts for: ${list.map(whereIs).join(', ')}${missed.size > 10 ? ', …' : ''}`);
    }
    if (prev !== last) fail(`the live frames end at ${prev}, the backend's last offset is ${last}`);
    if (!liveFrames.length && last > top) fail(`no live frame after the snapshot (top ${top}, last ${last})`);

    // 5e. The final dashboard.
    const finalEvents = new Map();
    for (const f of [...state, ...liveFrames]) {
      const e = at(Number(f.headers['x-stream-offset']));
      if (e.key) finalEvents.set(e.key, e);
    }
    const fin = dashboardOf([...finalEvents.values()].sort((a, b) => a.offset - b.offset));
    const finDiff = [...diffViews('job', fin.jobs, Object.fromEntries(Object.entries(record.jobs).map(([j, v]) => [j, { type: v.type, done: v.done }]))), ...diffViews('lock', fin.locks, record.locks)];
    if (finDiff.length) fail(`the final dashboard differs from the backend's final state: ${finDiff.join('; ')}`);

    const tComplete = state.length ? state[state.length - 1].t : frames[0].t;
    Object.assign(observed, {
      state_frames: state.length,
      locks_held_at_top: Object.values(atTop.locks).filter((h) => h).length,
      backend_events_per_s: Math.round((entries.length * 1000) / Math.max(1, entries[entries.length - 1].at_ms - entries[0].at_ms)),
      state_keys: { jobs: Object.keys(atTop.jobs).length, locks: Object.keys(atTop.locks).length, other: state.length - Object.keys(atTop.jobs).length - Object.keys(atTop.locks).length },
      published_between_http_snapshot_and_subscribe: top - ph,
      live_frames: liveFrames.length,
      conflated_frames: conflated,
      last_offset: last,
      subscribe_to_first_frame_ms: Math.round(frames[0].t - tSubscribe),
      subscribe_to_complete_dashboard_ms: Math.round(tComplete - tSubscribe),
      final: {
        jobs_completed: Object.values(fin.jobs).filter((j) => j.type === 'job.completed').length,
        locks_held: Object.values(fin.locks).filter((h) => h).length,
        locks_released: Object.values(fin.locks).filter((h) => !h).length,
      },
    });
    await report(true);
    const keep = ['top', 'epoch', 'state_frames', 'live_frames', 'conflated_frames', 'last_offset', 'backend_events_per_s', 'subscribe_to_first_frame_ms', 'subscribe_to_complete_dashboard_ms'];
    return {
      platform,
      http_snapshot_offset: ph,
      ...Object.fromEntries(keep.map((k) => [k, observed[k]])),
      jobs_at_top: Object.fromEntries(Object.entries(atTop.jobs).map(([j, v]) => [j, v.done])),
    };
  } catch (e) {
    observed.failed_at = currentStep;
    await report(false);
    throw e;
  } finally {
    forceClose(conns);
  }
}

// browser/page.html calls runScenario from '/scenario.mjs'; browser/dashboard.mjs serves this file
// there.
export const runScenario = runDashboardScenario;
