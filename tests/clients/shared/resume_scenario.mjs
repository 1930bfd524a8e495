// Lockstep resume conformance for @stomp/stompjs (DESIGN.md §12: per-topic offsets and resume).
//
// One implementation, run twice: from Node (node/resume.mjs, `ws` as the global WebSocket) and in
// headless Chromium (browser/resume.mjs serves browser/page.html, whose `import … from
// '/scenario.mjs'` it answers with this file). It therefore uses only what both platforms have
// (Promise, setTimeout, fetch, JSON, Date) and imports only ./common.mjs, which the browser run
// serves beside it. It exports the same names the page uses from scenario.mjs: runScenario and
// makeRedactor.
//
// Wire contract under test:
// - every MESSAGE carries `x-stream-offset:<n>` (its offset in the topic, contiguous from 1) and
//   `x-stream-epoch:<e>` ([A-Za-z0-9_-]);
// - SUBSCRIBE with `x-stream-offset: next|last|offset=<n>` (+ `x-stream-epoch` with offset=) gets,
//   as the subscription's first frame, a MESSAGE `event-type:lockstep.subscribed` with
//   `x-recovered:true|false`, `x-stream-offset:<P>`, `x-stream-epoch:<e>` and the envelope
//   {"id","type":"lockstep.subscribed","topic","ts","data":{"recovered","offset":P,"epoch"}};
//   every event with offset > P follows, in order; `x-recovered:false` means no missed event at
//   all, only live events after P;
// - `POST /api/v1/publish` answers `202 {"id","offset","epoch"}`.
//
// Scenario (a-h; `n` is the `data.n` of the `resume.test` events published to /team/<team>):
//  a. connection 1: SUBSCRIBE team `next` (receipt) → subscribed, recovered, P0 and epoch E;
//  b. publish n=1..3 over HTTP: answers offset P0+1..P0+3, epoch E; received live, in order;
//  c. DISCONNECT (receipt); exactly subscribed + n=1..3 arrived; publish n=4..7 meanwhile;
//  d. connection 2: SUBSCRIBE team `offset=<P0+3>` + E → subscribed, recovered, P = P0+3, then
//     n=4..7 in order; publish n=8 → received live;
//  e. SUBSCRIBE /user/<user> (quiet: nothing is ever published to it) `last` → subscribed,
//     recovered, P = 0, no event; again (another id) with `offset=0` + that epoch → the same;
//  f. SUBSCRIBE team `last` → subscribed, recovered, P = P0+7, then n=8 exactly once;
//  g. SUBSCRIBE team `offset=<P0+3>` with a made-up epoch → subscribed, x-recovered:false,
//     P = P0+8 (where live continues), epoch E, no replayed event; then publish n=9 as a barrier:
//     it must be the next frame of every team subscription (d, f, g), so nothing was replayed
//     or repeated before it;
//  h. DISCONNECT (receipt); every subscription holds exactly the frames above and nothing else
//     (the two quiet /user subscriptions: only their lockstep.subscribed, checked after the
//     DISCONNECT receipt, i.e. after every round trip of the run).
// runScenario() resolves with a JSON-able summary or rejects with an Error naming the step and
// the exact frames seen. Every wait is bounded (WAIT_MS); nothing sleeps.

import { ISO_UTC, ScenarioFailure, Waits, makeConn, makeRedactor, forceClose, sameKeys, showJson } from './common.mjs';

// browser/page.html imports makeRedactor from its /scenario.mjs, which is this module in the resume run.
export { makeRedactor };

const EVENT_TYPE = 'resume.test';
const SUBSCRIBED = 'lockstep.subscribed';
const OFFSET_RE = /^(0|[1-9][0-9]*)$/;
const EPOCH_RE = /^[A-Za-z0-9_-]{1,64}$/;

let currentStep = 'setup';

function fail(message) {
  throw new ScenarioFailure(`[${currentStep}] ${message}`);
}

function show(value) {
  return showJson(value, 900);
}

async function connect(conn, waits) {
  conn.client.activate();
  await waits.until(() => conn.connectedFrame !== null, `${conn.name} CONNECTED`);
  const v = conn.connectedFrame.headers.version;
  if (v !== '1.2') fail(`${conn.name}: CONNECTED version ${show(v)}, expected "1.2"`);
}

// SUBSCRIBE with a receipt; the frames of the subscription are recorded in arrival order.
function subscribe(conn, waits, topic, id, streamHeaders) {
  const frames = [];
  conn.subs.set(id, { topic, frames });
  const receipt = `r-${id}`;
  conn.client.watchForReceipt(receipt, () => {
    conn.receipts.add(receipt);
    waits.changed();
  });
  conn.client.subscribe(
    topic,
    (msg) => {
      frames.push({ headers: { ...msg.headers }, body: msg.body });
      waits.changed();
    },
    { id, receipt, ...streamHeaders },
  );
  return { id, topic, frames, receipt, asked: streamHeaders };
}

// Waits for the SUBSCRIBE's receipt and for at least `count` frames of the subscription.
async function awaitSub(conn, waits, sub, count) {
  await waits.until(
    () => conn.receipts.has(sub.receipt) && sub.frames.length >= count,
    () =>
      `${conn.receipts.has(sub.receipt) ? '' : `RECEIPT ${sub.receipt} and `}${count} frame(s) on subscription ${sub.id} ` +
      `(SUBSCRIBE ${sub.topic} ${show(sub.asked)}); got ${sub.frames.length}: ${show(sub.frames.map(brief))}`,
  );
}

async function disconnect(conn, waits) {
  conn.closing = true;
  await waits.wait(conn.client.deactivate(), `${conn.name} deactivate() (RECEIPT for DISCONNECT, then the WebSocket closing)`);
  if (!conn.disconnectReceipt) fail(`${conn.name}: WebSocket closed during deactivate() without a RECEIPT for DISCONNECT`);
}

// A compact view of a frame for failure messages.
function brief(f) {
  const h = f.headers;
  let data;
  try {
    data = JSON.parse(f.body).data;
  } catch (_) {
    data = `<non-JSON body ${String(f.body).slice(0, 80)}>`;
  }
  const out = { 'event-type': h['event-type'], 'x-stream-offset': h['x-stream-offset'], 'x-stream-epoch': h['x-stream-epoch'] };
  if (h['x-recovered'] !== undefined) out['x-recovered'] = h['x-recovered'];
  out['message-id'] = h['message-id'];
  out.data = data;
  return out;
}

// Checks what every MESSAGE of this contract has; returns {env, offset, epoch}.
function checkCommon(f, sub, where) {
  const h = f.headers;
  const w = `${where}: headers=${show(h)}`;
  if (h.destination !== sub.topic) fail(`${w}: destination ${show(h.destination)}, expected ${show(sub.topic)}`);
  if (h.subscription !== sub.id) fail(`${w}: subscription ${show(h.subscription)}, expected ${show(sub.id)}`);
  const mid = h['message-id'];
  if (typeof mid !== 'string' || mid === '') fail(`${w}: message-id missing or empty`);
  if (h['content-type'] !== 'application/json') fail(`${w}: content-type ${show(h['content-type'])}, expected "application/json"`);
  const off = h['x-stream-offset'];
  if (typeof off !== 'string' || !OFFSET_RE.test(off)) fail(`${w}: x-stream-offset ${show(off)} is not a decimal offset`);
  const epoch = h['x-stream-epoch'];
  if (typeof epoch !== 'string' || !EPOCH_RE.test(epoch)) fail(`${w}: x-stream-epoch ${show(epoch)} is not 1-64 of [A-Za-z0-9_-]`);
  let env;
  try {
    env = JSON.parse(f.body);
  } catch (_) {
    fail(`${w}: body is not JSON: ${show(f.body)}`);
  }
  const we = `${w} body=${show(f.body)}`;
  if (!sameKeys(env, ['id', 'type', 'topic', 'ts', 'data'])) fail(`${we}: envelope keys must be exactly id, type, topic, ts, data`);
  if (env.id !== mid) fail(`${we}: envelope id ${show(env.id)} != message-id ${show(mid)}`);
  if (env.type !== h['event-type']) fail(`${we}: envelope type ${show(env.type)} != event-type header ${show(h['event-type'])}`);
  if (env.topic !== sub.topic) fail(`${we}: envelope topic ${show(env.topic)}, expected ${show(sub.topic)}`);
  if (typeof env.ts !== 'string' || !ISO_UTC.test(env.ts) || Number.isNaN(Date.parse(env.ts))) fail(`${we}: envelope ts ${show(env.ts)} is not ISO-8601 UTC`);
  return { env, offset: Number(off), epoch };
}

// The lockstep.subscribed frame; `exp`: {recovered, offset, epoch?}.
function checkSubscribed(f, sub, exp, where) {
  const h = f.headers;
  if (h['event-type'] !== SUBSCRIBED) {
    fail(`${where}: the subscription's first frame must be event-type ${SUBSCRIBED}, got ${show(brief(f))}`);
  }
  const { env, offset, epoch } = checkCommon(f, sub, where);
  const w = `${where}: ${show(brief(f))}`;
  const rec = h['x-recovered'];
  if (rec !== 'true' && rec !== 'false') fail(`${w}: x-recovered ${show(rec)}, expected "true" or "false"`);
  const recovered = rec === 'true';
  const d = env.data;
  if (!sameKeys(d, ['recovered', 'offset', 'epoch'])) fail(`${w}: envelope data must be exactly {recovered, offset, epoch}, got ${show(d)}`);
  if (d.recovered !== recovered) fail(`${w}: data.recovered ${show(d.recovered)} disagrees with x-recovered:${rec}`);
  if (d.offset !== offset) fail(`${w}: data.offset ${show(d.offset)} disagrees with x-stream-offset:${h['x-stream-offset']}`);
  if (d.epoch !== epoch) fail(`${w}: data.epoch ${show(d.epoch)} disagrees with x-stream-epoch:${epoch}`);
  const why = exp.why ? ` (${exp.why})` : '';
  if (recovered !== exp.recovered) fail(`${w}: expected x-recovered:${exp.recovered}${why}`);
  if (offset !== exp.offset) fail(`${w}: expected x-stream-offset:${exp.offset}${why}`);
  if (exp.epoch !== undefined && epoch !== exp.epoch) fail(`${w}: expected x-stream-epoch:${exp.epoch}${why}`);
  return { recovered, offset, epoch, id: h['message-id'] };
}

// A resume.test event; `exp`: {n, id, offset, epoch} from the publish answer.
function checkEvent(f, sub, exp, where) {
  const h = f.headers;
  const w0 = `${where}: expected n=${exp.n} (offset ${exp.offset}), got ${show(brief(f))}`;
  if (h['event-type'] !== EVENT_TYPE) fail(`${w0}: event-type is not ${EVENT_TYPE}`);
  const { env, offset, epoch } = checkCommon(f, sub, where);
  if (!sameKeys(env.data, ['n']) || env.data.n !== exp.n) fail(`${w0}: data ${show(env.data)}, expected ${show({ n: exp.n })}`);
  if (offset !== exp.offset) fail(`${w0}: x-stream-offset ${offset}, expected ${exp.offset} (the offset POST /api/v1/publish answered)`);
  if (epoch !== exp.epoch) fail(`${w0}: x-stream-epoch ${show(epoch)}, expected ${show(exp.epoch)}`);
  if (h['message-id'] !== exp.id) fail(`${w0}: message-id ${show(h['message-id'])} != id ${show(exp.id)} POST /api/v1/publish answered`);
}

// Exactly `expected` (in order) on the subscription: [{subscribed: {...}} | {event: {...}}].
function checkExactly(sub, expected, label) {
  const frames = sub.frames;
  const all = () => `all frames of ${sub.id}: ${show(frames.map(brief))}`;
  const ids = frames.map((f) => f.headers['message-id']);
  const dup = ids.find((id, i) => ids.indexOf(id) !== i);
  if (dup !== undefined) fail(`${label}: message-id ${show(dup)} delivered twice on ${sub.id}; ${all()}`);
  const seen = new Map();
  for (const f of frames) {
    if (f.headers['event-type'] !== EVENT_TYPE) continue;
    const o = f.headers['x-stream-offset'];
    if (seen.has(o)) fail(`${label}: offset ${o} delivered twice on ${sub.id} (duplicate event); ${all()}`);
    seen.set(o, true);
  }
  const n = Math.min(frames.length, expected.length);
  for (let i = 0; i < n; i++) {
    const where = `${label}: frame #${i + 1} of ${sub.id} (SUBSCRIBE ${sub.topic} ${show(sub.asked)})`;
    const e = expected[i];
    try {
      if (e.subscribed) checkSubscribed(frames[i], sub, e.subscribed, where);
      else checkEvent(frames[i], sub, e.event, where);
    } catch (err) {
      if (err instanceof ScenarioFailure) throw new ScenarioFailure(`${err.message}; ${all()}`);
      throw err;
    }
  }
  if (frames.length !== expected.length) {
    const exp = expected.map((e) => (e.subscribed ? `${SUBSCRIBED}(${e.subscribed.offset})` : `n=${e.event.n}@${e.event.offset}`));
    fail(
      `${label}: ${sub.id} received ${frames.length} frame(s), expected exactly ${expected.length} [${exp.join(', ')}]` +
        `${frames.length > expected.length ? `; extra: ${show(frames.slice(expected.length).map(brief))}` : ''}; ${all()}`,
    );
  }
}

async function httpPublish({ cfg, waits, fetchImpl }, topic, data) {
  const url = `${cfg.http}/api/v1/publish`;
  const what = `POST ${url} ${show({ topic, type: EVENT_TYPE, data })}`;
  let res;
  try {
    res = await waits.wait(
      fetchImpl(url, {
        method: 'POST',
        headers: { authorization: `Bearer ${cfg.tokens.publisher}`, 'content-type': 'application/json' },
        body: JSON.stringify({ topic, type: EVENT_TYPE, data }),
      }),
      `the HTTP response to ${what}`,
    );
  } catch (e) {
    if (e instanceof ScenarioFailure) throw e;
    fail(`${what} failed before any HTTP response: ${e}${typeof window !== 'undefined' ? ' (in a browser: CORS?)' : ''}`);
  }
  const text = await waits.wait(res.text(), `the body of the HTTP response to ${what}`);
  if (res.status !== 202) fail(`${what}: expected HTTP 202, got ${res.status}: ${text.slice(0, 600)}`);
  let body;
  try {
    body = JSON.parse(text);
  } catch (_) {
    fail(`${what}: 202 body is not JSON: ${show(text.slice(0, 600))}`);
  }
  if (!body || typeof body.id !== 'string' || body.id === '') fail(`${what}: 202 body has no non-empty "id": ${show(body)}`);
  if (!Number.isSafeInteger(body.offset) || body.offset < 1) fail(`${what}: 202 body has no integer "offset" >= 1: ${show(body)}`);
  if (typeof body.epoch !== 'string' || !EPOCH_RE.test(body.epoch)) fail(`${what}: 202 body has no "epoch" of [A-Za-z0-9_-]: ${show(body)}`);
  return { n: data.n, id: body.id, offset: body.offset, epoch: body.epoch };
}

/**
 * @param {object} o
 * @param {Function} o.Client  the @stomp/stompjs Client class
 * @param {object} o.cfg       {http, ws, user, team, tokens:{subscriber, publisher}, heartbeat_ms?}
 * @param {Function} o.fetch   fetch implementation
 * @param {Function} o.log     trace sink (one line per call)
 * @param {string} o.platform  "node" or "chromium", copied into the summary
 */
export async function runResumeScenario({ Client, cfg, fetch: fetchImpl, log = () => {}, platform }) {
  currentStep = 'config';
  for (const k of ['http', 'ws', 'user', 'team']) {
    if (typeof cfg[k] !== 'string' || cfg[k] === '') fail(`"${k}" must be a non-empty string`);
  }
  for (const k of ['subscriber', 'publisher']) {
    if (!cfg.tokens || typeof cfg.tokens[k] !== 'string' || cfg.tokens[k] === '') fail(`tokens.${k} missing`);
  }
  const started = Date.now();
  const waits = new Waits(() => currentStep);
  const ctx = { cfg, waits, fetchImpl };
  const team = `/team/${cfg.team}`;
  const user = `/user/${cfg.user}`;
  const conns = [];
  const published = []; // index n-1
  const publish = async (n, expectOffset, expectEpoch, why) => {
    const p = await httpPublish(ctx, team, { n });
    if (p.offset !== expectOffset) fail(`POST /api/v1/publish n=${n} answered offset ${p.offset}, expected ${expectOffset} (${why}): ${show(p)}`);
    if (p.epoch !== expectEpoch) fail(`POST /api/v1/publish n=${n} answered epoch ${show(p.epoch)}, expected ${show(expectEpoch)} (the team topic's epoch): ${show(p)}`);
    published[n - 1] = p;
    return p;
  };
  const ev = (n) => ({ event: published[n - 1] });

  try {
    // a. connection 1, SUBSCRIBE team with x-stream-offset:next.
    currentStep = 'a subscribe next';
    const c1 = makeConn({ Client, cfg, name: 'connection-1', token: cfg.tokens.subscriber, waits, log, show });
    c1.subs = new Map(); // subscription id -> {topic, frames: [{headers, body}]}
    conns.push(c1);
    await connect(c1, waits);
    const sa = subscribe(c1, waits, team, 's-a-next', { 'x-stream-offset': 'next' });
    await awaitSub(c1, waits, sa, 1);
    const f0 = sa.frames[0];
    if (f0.headers['event-type'] !== SUBSCRIBED) fail(`first frame of s-a-next is not ${SUBSCRIBED}: ${show(brief(f0))}`);
    const p0 = Number(f0.headers['x-stream-offset']);
    const subA = checkSubscribed(f0, sa, { recovered: true, offset: p0, why: 'x-stream-offset:next is always served' }, 'a: s-a-next frame #1');
    const E = subA.epoch;

    // b. three events over HTTP, received live.
    currentStep = 'b publish live';
    for (let n = 1; n <= 3; n++) await publish(n, p0 + n, E, `lockstep.subscribed for next said live starts after ${p0}`);
    await awaitSub(c1, waits, sa, 4);
    checkExactly(sa, [{ subscribed: { recovered: true, offset: p0, epoch: E } }, ev(1), ev(2), ev(3)], 'b');
    const lastSeen = Number(sa.frames[3].headers['x-stream-offset']);

    // c. disconnect, then four events while away.
    currentStep = 'c disconnect, publish while away';
    await disconnect(c1, waits);
    checkExactly(sa, [{ subscribed: { recovered: true, offset: p0, epoch: E } }, ev(1), ev(2), ev(3)], 'c (after the DISCONNECT receipt)');
    for (let n = 4; n <= 7; n++) await publish(n, p0 + n, E, 'contiguous offsets');

    // d. connection 2 resumes from the last offset seen.
    currentStep = 'd resume offset=last seen';
    const c2 = makeConn({ Client, cfg, name: 'connection-2', token: cfg.tokens.subscriber, waits, log, show });
    c2.subs = new Map();
    conns.push(c2);
    await connect(c2, waits);
    const sd = subscribe(c2, waits, team, 's-d-resume', { 'x-stream-offset': `offset=${lastSeen}`, 'x-stream-epoch': E });
    await awaitSub(c2, waits, sd, 5);
    const resumed = { subscribed: { recovered: true, offset: lastSeen, epoch: E, why: `resume from offset ${lastSeen} of the current epoch, events still in history` } };
    checkExactly(sd, [resumed, ev(4), ev(5), ev(6), ev(7)], 'd (replay)');
    await publish(8, p0 + 8, E, 'contiguous offsets');
    await awaitSub(c2, waits, sd, 6);
    checkExactly(sd, [resumed, ev(4), ev(5), ev(6), ev(7), ev(8)], 'd (live after the replay)');

    // e. the quiet user topic: last, then offset=0 with its epoch.
    currentStep = 'e quiet user topic';
    const seLast = subscribe(c2, waits, user, 's-e-last', { 'x-stream-offset': 'last' });
    await awaitSub(c2, waits, seLast, 1);
    const userSub = checkSubscribed(
      seLast.frames[0],
      seLast,
      { recovered: true, offset: 0, why: `nothing was ever published to ${user} (a fresh node; runs must not overlap)` },
      'e: s-e-last frame #1',
    );
    const seZero = subscribe(c2, waits, user, 's-e-offset0', { 'x-stream-offset': 'offset=0', 'x-stream-epoch': userSub.epoch });
    await awaitSub(c2, waits, seZero, 1);
    checkSubscribed(seZero.frames[0], seZero, { recovered: true, offset: 0, epoch: userSub.epoch, why: 'quiet topic, its own epoch: nothing missed' }, 'e: s-e-offset0 frame #1');

    // f. last on the team topic: the latest event, once.
    currentStep = 'f last on the team topic';
    const sf = subscribe(c2, waits, team, 's-f-last', { 'x-stream-offset': 'last' });
    await awaitSub(c2, waits, sf, 2);
    const lastSub = { subscribed: { recovered: true, offset: p0 + 7, epoch: E, why: `last: P = top - 1 = ${p0 + 8} - 1` } };
    checkExactly(sf, [lastSub, ev(8)], 'f');

    // g. a made-up epoch: x-recovered:false, no replay.
    currentStep = 'g made-up epoch';
    const bogus = E === 'nope' ? 'nope-nope' : 'nope';
    const sg = subscribe(c2, waits, team, 's-g-bogus', { 'x-stream-offset': `offset=${lastSeen}`, 'x-stream-epoch': bogus });
    await awaitSub(c2, waits, sg, 1);
    const notRecovered = {
      subscribed: { recovered: false, offset: p0 + 8, epoch: E, why: `epoch ${bogus} was never issued: nothing replayed, live continues after the top, ${p0 + 8}, of epoch ${E}` },
    };
    checkExactly(sg, [notRecovered], 'g (before the barrier event)');
    // Barrier: n=9 must be the next frame on every team subscription.
    await publish(9, p0 + 9, E, 'contiguous offsets');
    await waits.until(
      () => sd.frames.length >= 7 && sf.frames.length >= 3 && sg.frames.length >= 2,
      () => `n=9 on s-d-resume, s-f-last and s-g-bogus (have ${sd.frames.length}/7, ${sf.frames.length}/3, ${sg.frames.length}/2 frames)`,
    );
    checkExactly(sg, [notRecovered, ev(9)], 'g (no replay: the live n=9 is the next frame)');

    // h. disconnect; everything exactly once, nothing extra.
    currentStep = 'h disconnect';
    await disconnect(c2, waits);
    checkExactly(sd, [resumed, ev(4), ev(5), ev(6), ev(7), ev(8), ev(9)], 'h');
    checkExactly(sf, [lastSub, ev(8), ev(9)], 'h');
    checkExactly(sg, [notRecovered, ev(9)], 'h');
    checkExactly(seLast, [{ subscribed: { recovered: true, offset: 0, epoch: userSub.epoch } }], 'h (quiet topic, last)');
    checkExactly(seZero, [{ subscribed: { recovered: true, offset: 0, epoch: userSub.epoch } }], 'h (quiet topic, offset=0)');

    return {
      platform,
      team_topic: team,
      epoch: E,
      p0,
      published: published.map((p) => ({ n: p.n, offset: p.offset })),
      resumed_from: lastSeen,
      user_topic_epoch: userSub.epoch,
      frames: {
        's-a-next': sa.frames.length,
        's-d-resume': sd.frames.length,
        's-e-last': seLast.frames.length,
        's-e-offset0': seZero.frames.length,
        's-f-last': sf.frames.length,
        's-g-bogus': sg.frames.length,
      },
      replayed: sd.frames.slice(1, 5).map((f) => Number(f.headers['x-stream-offset'])),
      bogus_epoch: { sent: bogus, recovered: false, offset: p0 + 8 },
      elapsed_ms: Date.now() - started,
    };
  } finally {
    forceClose(conns);
  }
}

// browser/page.html calls runScenario from '/scenario.mjs'; browser/resume.mjs serves this file there.
export const runScenario = runResumeScenario;
