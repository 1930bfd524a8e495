// Lockstep conformance scenario for @stomp/stompjs (DESIGN.md sections 2-5).
//
// One implementation, run twice: from Node (node/stompjs.mjs, with `ws` as the global
// WebSocket) and inside headless Chromium (browser/page.html, with the stompjs UMD bundle and the
// browser's own WebSocket and fetch). It therefore uses nothing but what both platforms have:
// Promise, setTimeout, fetch, JSON, Date, and imports only ./common.mjs (which the browser
// runner serves beside it).
//
// runScenario() resolves with a JSON-able summary, or rejects with an Error whose message says
// precisely which expectation failed. Every wait is bounded (WAIT_MS); the only timed wait that is
// not waiting *for* something is the deliberate idle period of step 6.

import { WAIT_MS, ISO_UTC, ScenarioFailure, makeRedactor, forceClose, showJson } from './common.mjs';

// browser/page.html imports makeRedactor from here (this module is its /scenario.mjs).
export { makeRedactor };

const SUBPROTOCOL = 'v12.stomp';

function fail(message) {
  throw new ScenarioFailure(message);
}

function show(value) {
  return showJson(value, 600);
}

// First structural difference between two JSON values, or null when they are deep-equal.
export function jsonDiff(actual, expected, path = '$') {
  if (expected === null || typeof expected !== 'object') {
    return Object.is(actual, expected) || actual === expected
      ? null
      : `${path}: expected ${show(expected)}, got ${show(actual)}`;
  }
  if (Array.isArray(expected)) {
    if (!Array.isArray(actual)) return `${path}: expected an array, got ${show(actual)}`;
    if (actual.length !== expected.length) {
      return `${path}: expected ${expected.length} elements, got ${actual.length} (${show(actual)})`;
    }
    for (let i = 0; i < expected.length; i++) {
      const d = jsonDiff(actual[i], expected[i], `${path}[${i}]`);
      if (d) return d;
    }
    return null;
  }
  if (actual === null || typeof actual !== 'object' || Array.isArray(actual)) {
    return `${path}: expected an object, got ${show(actual)}`;
  }
  const ek = Object.keys(expected).sort();
  const ak = Object.keys(actual).sort();
  const missing = ek.filter((k) => !Object.prototype.hasOwnProperty.call(actual, k));
  const extra = ak.filter((k) => !Object.prototype.hasOwnProperty.call(expected, k));
  if (missing.length || extra.length) {
    return `${path}: keys differ (missing ${show(missing)}, unexpected ${show(extra)})`;
  }
  for (const k of ek) {
    const d = jsonDiff(actual[k], expected[k], `${path}.${k}`);
    if (d) return d;
  }
  return null;
}

// Fails every pending wait as soon as something fatal happens on any connection (ERROR frame,
// unexpected close, lost heart-beat, unexpected frame), so the reason reported is the first cause.
class Guard {
  constructor() {
    this.error = null;
    this.listeners = new Set();
  }

  trip(message) {
    if (this.error) return;
    this.error = new ScenarioFailure(message);
    for (const l of [...this.listeners]) l(this.error);
  }

  check() {
    if (this.error) throw this.error;
  }

  // Wait for `promise`, at most `ms`; `what` (string or function) names it in the timeout message.
  wait(promise, what, ms = WAIT_MS) {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        this.listeners.delete(onTrip);
      };
      const onTrip = (e) => {
        cleanup();
        reject(e);
      };
      const timer = setTimeout(() => {
        cleanup();
        const name = typeof what === 'function' ? what() : what;
        reject(new ScenarioFailure(`timed out after ${ms} ms waiting for ${name}`));
      }, ms);
      this.listeners.add(onTrip);
      Promise.resolve(promise).then(
        (v) => {
          cleanup();
          resolve(v);
        },
        (e) => {
          cleanup();
          reject(e);
        },
      );
    });
  }

  // The deliberate idle period: resolves after `ms` unless something fatal happens meanwhile.
  idle(ms) {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      const onTrip = (e) => {
        clearTimeout(timer);
        reject(e);
      };
      const timer = setTimeout(() => {
        this.listeners.delete(onTrip);
        resolve();
      }, ms);
      this.listeners.add(onTrip);
    });
  }
}

class Inbox {
  constructor() {
    this.items = [];
    this.waiters = [];
  }

  push(item) {
    this.items.push(item);
    this.waiters = this.waiters.filter((w) => {
      if (this.items.length >= w.n) {
        w.resolve();
        return false;
      }
      return true;
    });
  }

  atLeast(n) {
    if (this.items.length >= n) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ n, resolve }));
  }
}

// A stompjs Client wired so that anything unexpected trips the guard with a precise message.
function makeStompClient({ Client, cfg, name, token, guard, log }) {
  const conn = {
    name,
    client: null,
    closing: false,
    connectedFrame: null,
    disconnectReceipt: null,
    heartbeatsReceived: 0,
    closeEvent: null,
  };
  let onConnected;
  conn.connected = new Promise((resolve) => {
    onConnected = resolve;
  });
  const client = new Client({
    brokerURL: cfg.ws,
    connectHeaders: { passcode: token },
    heartbeatIncoming: cfg.heartbeat_ms,
    heartbeatOutgoing: cfg.heartbeat_ms,
    reconnectDelay: 0,
    debug: (line) => log(`[${name}] ${line}`),
  });
  client.onConnect = (frame) => {
    conn.connectedFrame = frame;
    onConnected(frame);
  };
  client.onStompError = (frame) => {
    const h = frame.headers || {};
    guard.trip(
      `${name}: server sent an ERROR frame: message=${show(h.message)}` +
        (h['receipt-id'] !== undefined ? ` receipt-id=${show(h['receipt-id'])}` : '') +
        ` body=${show(frame.body)}`,
    );
  };
  client.onWebSocketClose = (evt) => {
    conn.closeEvent = { code: evt && evt.code, reason: evt && evt.reason, wasClean: evt && evt.wasClean };
    if (conn.closing) return;
    const when = conn.connectedFrame
      ? 'after CONNECTED'
      : 'before any CONNECTED frame (upgrade refused? check Origin allow-list, token, URL)';
    guard.trip(
      `${name}: WebSocket closed unexpectedly ${when}: code=${evt && evt.code} reason=${show(evt && evt.reason)}`,
    );
  };
  client.onWebSocketError = (evt) => {
    log(`[${name}] WebSocket error event: ${(evt && (evt.message || evt.type)) || evt}`);
  };
  client.onDisconnect = (frame) => {
    if (conn.closing) {
      conn.disconnectReceipt = frame;
      return;
    }
    guard.trip(`${name}: unexpected onDisconnect (RECEIPT for a DISCONNECT we did not send): ${show(frame.headers)}`);
  };
  client.onHeartbeatReceived = () => {
    conn.heartbeatsReceived += 1;
  };
  client.onHeartbeatLost = () => {
    guard.trip(
      `${name}: stompjs saw no server activity for more than 2 x ${cfg.heartbeat_ms} ms ` +
        '(server did not send the heart-beats it negotiated)',
    );
  };
  client.onUnhandledMessage = (msg) => {
    guard.trip(`${name}: MESSAGE for an unknown subscription: headers=${show(msg.headers)} body=${show(msg.body)}`);
  };
  client.onUnhandledReceipt = (frame) => {
    guard.trip(`${name}: RECEIPT nobody asked for: headers=${show(frame.headers)}`);
  };
  client.onUnhandledFrame = (frame) => {
    guard.trip(`${name}: unexpected ${frame.command} frame: headers=${show(frame.headers)} body=${show(frame.body)}`);
  };
  conn.client = client;
  return conn;
}

function receiptOf(conn, receiptId) {
  return new Promise((resolve) => conn.client.watchForReceipt(receiptId, resolve));
}

function checkConnected(conn, cfg) {
  const h = conn.connectedFrame.headers || {};
  const where = `${conn.name}: CONNECTED frame ${show(h)}`;
  if (h.version !== '1.2') fail(`${where}: expected version "1.2", got ${show(h.version)}`);
  if (typeof h.session !== 'string' || h.session === '') fail(`${where}: expected a non-empty session header`);
  if (typeof h.server !== 'string' || h.server === '') fail(`${where}: expected a non-empty server header (DESIGN §2)`);
  if (typeof h['heart-beat'] !== 'string') fail(`${where}: expected a heart-beat header`);
  const m = /^\s*(\d+)\s*,\s*(\d+)\s*$/.exec(h['heart-beat']);
  if (!m) fail(`${where}: heart-beat header is not "<sx>,<sy>": ${show(h['heart-beat'])}`);
  const sx = Number(m[1]);
  const sy = Number(m[2]);
  // The client asked for heart-beat:<hb>,<hb>; the server is configured to send and expect them,
  // so both directions must be on, or step 6 would prove nothing.
  if (sx === 0 || sy === 0) {
    fail(`${where}: client offered heart-beat ${cfg.heartbeat_ms},${cfg.heartbeat_ms} but server answered ${h['heart-beat']} (a direction is off)`);
  }
  const ws = conn.client.webSocket;
  const protocol = ws ? ws.protocol : undefined;
  if (protocol !== SUBPROTOCOL) {
    fail(`${conn.name}: expected negotiated WebSocket subprotocol ${show(SUBPROTOCOL)}, got ${show(protocol)}`);
  }
  return { version: h.version, server: h.server, session: h.session, 'heart-beat': h['heart-beat'], subprotocol: protocol };
}

async function httpPublish({ cfg, guard, fetchImpl }, topic, type, data) {
  const url = `${cfg.http}/api/v1/publish`;
  const what = `POST ${url} (topic ${topic})`;
  let res;
  try {
    res = await guard.wait(
      fetchImpl(url, {
        method: 'POST',
        headers: { authorization: `Bearer ${cfg.tokens.publisher}`, 'content-type': 'application/json' },
        body: JSON.stringify({ topic, type, data }),
      }),
      `the HTTP response to ${what}`,
    );
  } catch (e) {
    if (e instanceof ScenarioFailure) throw e;
    fail(
      `${what} failed before any HTTP response: ${e}` +
        (typeof window !== 'undefined' ? ' (in a browser this usually means CORS refused the request or its preflight)' : ''),
    );
  }
  const text = await guard.wait(res.text(), `the body of the HTTP response to ${what}`);
  if (res.status !== 202) fail(`${what}: expected HTTP 202, got ${res.status}; body: ${text.slice(0, 600)}`);
  let body;
  try {
    body = JSON.parse(text);
  } catch (e) {
    fail(`${what}: HTTP 202 body is not JSON: ${show(text.slice(0, 600))}`);
  }
  if (!body || typeof body.id !== 'string' || body.id === '') {
    fail(`${what}: HTTP 202 body must be {"id": "<non-empty string>"}, got ${show(body)}`);
  }
  return body.id;
}

// Checks one received MESSAGE against what was published.
function checkMessage(item, exp) {
  const h = item.headers;
  const where = `MESSAGE on ${exp.topic} (${exp.via}, event-type ${exp.type}) headers=${show(h)}`;
  if (item.via !== exp.sub) fail(`${where}: delivered to subscription callback ${show(item.via)}, expected ${show(exp.sub)}`);
  if (h.destination !== exp.topic) fail(`${where}: destination header ${show(h.destination)}, expected ${show(exp.topic)}`);
  if (h.subscription !== exp.sub) fail(`${where}: subscription header ${show(h.subscription)}, expected ${show(exp.sub)}`);
  const mid = h['message-id'];
  if (typeof mid !== 'string' || mid === '') fail(`${where}: message-id header missing or empty`);
  if (h['event-type'] !== exp.type) fail(`${where}: event-type header ${show(h['event-type'])}, expected ${show(exp.type)}`);
  if (h['content-type'] !== 'application/json') {
    fail(`${where}: content-type header ${show(h['content-type'])}, expected "application/json"`);
  }
  if (exp.id !== null && mid !== exp.id) {
    fail(`${where}: message-id ${show(mid)} differs from the id ${show(exp.id)} returned by POST /api/v1/publish`);
  }
  let env;
  try {
    env = JSON.parse(item.body);
  } catch (e) {
    fail(`${where}: body is not JSON: ${show(item.body)}`);
  }
  if (!env || typeof env !== 'object' || Array.isArray(env)) fail(`${where}: body is not a JSON object envelope: ${show(env)}`);
  const w = `${where} envelope=${show(env)}`;
  if (typeof env.id !== 'string' || env.id === '') fail(`${w}: envelope id missing or empty`);
  if (env.id !== mid) fail(`${w}: envelope id ${show(env.id)} != message-id header ${show(mid)}`);
  if (env.type !== exp.type) fail(`${w}: envelope type ${show(env.type)}, expected ${show(exp.type)}`);
  if (env.topic !== h.destination) fail(`${w}: envelope topic ${show(env.topic)} != destination header ${show(h.destination)}`);
  if (typeof env.ts !== 'string' || !ISO_UTC.test(env.ts) || Number.isNaN(Date.parse(env.ts))) {
    fail(`${w}: envelope ts ${show(env.ts)} is not an ISO-8601 UTC timestamp ending in Z`);
  }
  if (!Object.prototype.hasOwnProperty.call(env, 'data')) fail(`${w}: envelope has no data`);
  const d = jsonDiff(env.data, exp.data, 'data');
  if (d) fail(`${w}: envelope data differs from what was published: ${d}`);
  return { destination: h.destination, subscription: h.subscription, 'message-id': mid, 'event-type': h['event-type'], ts: env.ts };
}

function sameData(body, data) {
  try {
    const env = JSON.parse(body);
    return !!env && typeof env === 'object' && jsonDiff(env.data, data) === null;
  } catch (_) {
    return false;
  }
}

// Pairs received messages with expectations (HTTP ones by the id the API returned, the STOMP SEND
// by elimination), then checks each pair.
function matchAndCheck(items, expectations) {
  const byId = new Map(expectations.filter((e) => e.id !== null).map((e) => [e.id, e]));
  const anonymous = expectations.filter((e) => e.id === null);
  const used = new Set();
  const checked = [];
  for (const item of items) {
    const mid = item.headers['message-id'];
    let exp = byId.get(mid);
    if (exp && used.has(exp)) fail(`message-id ${show(mid)} delivered twice: headers=${show(item.headers)}`);
    const dest = item.headers.destination;
    const type = item.headers['event-type'];
    // The STOMP SEND, recognised by destination and event-type.
    if (!exp) exp = anonymous.find((e) => !used.has(e) && e.topic === dest && e.type === type);
    // An HTTP event whose message-id is not the id the API returned: find it by content so that
    // checkMessage reports the id mismatch rather than an unrelated difference.
    if (!exp) exp = expectations.find((e) => !used.has(e) && e.topic === dest && e.type === type && sameData(item.body, e.data));
    if (!exp) exp = anonymous.find((e) => !used.has(e));
    if (!exp) {
      fail(
        `unexpected extra MESSAGE (via ${item.via}): headers=${show(item.headers)} body=${show(item.body)}; ` +
          `expected only ${expectations.length}: ${expectations.map((e) => `${e.topic} ${e.type} (${e.via})`).join(', ')}`,
      );
    }
    used.add(exp);
    checked.push(checkMessage(item, exp));
  }
  const missing = expectations.filter((e) => !used.has(e));
  if (missing.length) fail(`missing messages: ${missing.map((e) => `${e.topic} ${e.type} (${e.via})`).join(', ')}`);
  const ids = checked.map((c) => c['message-id']);
  if (new Set(ids).size !== ids.length) fail(`message ids are not unique: ${show(ids)}`);
  return checked;
}

/**
 * @param {object} o
 * @param {Function} o.Client  the @stomp/stompjs Client class
 * @param {object} o.cfg       {http, ws, user, team, tokens:{subscriber,publisher,sender}, heartbeat_ms}
 * @param {Function} o.fetch   fetch implementation
 * @param {Function} o.log     trace sink (one line per call)
 * @param {string} o.platform  "node" or "chromium", copied into the summary
 */
export async function runScenario({ Client, cfg, fetch: fetchImpl, log = () => {}, platform }) {
  for (const k of ['http', 'ws', 'user', 'team']) {
    if (typeof cfg[k] !== 'string' || cfg[k] === '') fail(`config: "${k}" must be a non-empty string`);
  }
  for (const k of ['subscriber', 'publisher', 'sender']) {
    if (!cfg.tokens || typeof cfg.tokens[k] !== 'string' || cfg.tokens[k] === '') fail(`config: tokens.${k} missing`);
  }
  if (!Number.isInteger(cfg.heartbeat_ms) || cfg.heartbeat_ms <= 0) fail('config: heartbeat_ms must be a positive integer');

  const started = Date.now();
  const guard = new Guard();
  const ctx = { cfg, guard, fetchImpl };
  const topics = [
    { topic: `/user/${cfg.user}`, sub: 's-user' },
    { topic: `/team/${cfg.team}`, sub: 's-team' },
    { topic: '/global', sub: 's-global' },
  ];
  const inbox = new Inbox();
  const conns = [];

  try {
    // 1. Subscriber connects.
    const sub = makeStompClient({ Client, cfg, name: 'subscriber', token: cfg.tokens.subscriber, guard, log });
    conns.push(sub);
    sub.client.activate();
    await guard.wait(sub.connected, `subscriber CONNECTED (${cfg.ws})`);
    const connected = checkConnected(sub, cfg);

    // 2. Three subscriptions, each with a receipt; all receipts before anything is published.
    const receipts = topics.map((t) => {
      const receiptId = `r-${t.sub}`;
      const r = receiptOf(sub, receiptId);
      sub.client.subscribe(
        t.topic,
        (msg) => inbox.push({ via: t.sub, headers: { ...msg.headers }, body: msg.body, at: Date.now() }),
        { id: t.sub, receipt: receiptId },
      );
      return guard.wait(r, `RECEIPT ${receiptId} for SUBSCRIBE ${t.topic} (id ${t.sub})`);
    });
    await Promise.all(receipts);

    // 3. Three events through the HTTP API.
    const datas = {
      [topics[0].topic]: {
        job_id: 'job-user-1',
        stage: 'import',
        done: 37,
        total: 100,
        ratio: 1.5,
        message: 'naïve ✓ for the user',
        details: { archive: { name: 'frames.tar', parts: [1, 2, 3] }, retry: null, ok: true },
        tags: ['a', 2, false, null, { k: 'v' }],
      },
      [topics[1].topic]: {
        job_id: 'job-team-1',
        stage: 'export',
        done: 3,
        total: 4,
        ratio: -0.25,
        message: 'naïve ✓ team — 日本語 🚀 "quoted" back\\slash\nnew line',
        details: { shards: [{ id: 1, size: 2.75 }, { id: 2, size: 0 }], empty: {} },
        tags: [],
      },
      [topics[2].topic]: {
        job_id: 'job-global-1',
        stage: 'maintenance',
        done: 0,
        total: 1,
        ratio: 1e-7,
        message: 'naïve ✓ global: a:b\\c',
        details: { window: { from: '2026-01-01T00:00:00Z', minutes: 15 } },
        tags: [[1, 2], ['x']],
      },
    };
    const expectations = [];
    for (const t of topics) {
      const id = await httpPublish(ctx, t.topic, 'job.progress', datas[t.topic]);
      expectations.push({ topic: t.topic, sub: t.sub, type: 'job.progress', data: datas[t.topic], id, via: 'HTTP' });
    }

    // 4. A second STOMP client SENDs to the team topic.
    const sender = makeStompClient({ Client, cfg, name: 'sender', token: cfg.tokens.sender, guard, log });
    conns.push(sender);
    sender.client.activate();
    await guard.wait(sender.connected, `sender CONNECTED (${cfg.ws})`);
    const senderData = { task: 17, assignee: cfg.user };
    const sendReceipt = receiptOf(sender, 'send-1');
    sender.client.publish({
      destination: `/team/${cfg.team}`,
      headers: { 'event-type': 'task.assigned', 'content-type': 'application/json', receipt: 'send-1' },
      body: JSON.stringify(senderData),
    });
    await guard.wait(sendReceipt, `RECEIPT send-1 for the sender's SEND to /team/${cfg.team}`);
    expectations.push({ topic: `/team/${cfg.team}`, sub: 's-team', type: 'task.assigned', data: senderData, id: null, via: 'STOMP SEND' });

    // 5. Exactly these four messages.
    await guard.wait(
      inbox.atLeast(expectations.length),
      () =>
        `${expectations.length} MESSAGE frames (got ${inbox.items.length}: ` +
        `${show(inbox.items.map((i) => ({ via: i.via, 'message-id': i.headers['message-id'], 'event-type': i.headers['event-type'] })))})`,
    );
    guard.check();
    const checked = matchAndCheck(inbox.items, expectations);

    // 6. Idle past several heart-beat intervals; nothing may close, nothing more may arrive.
    const idleMs = cfg.heartbeat_ms * 4 + 500;
    const hbBefore = { subscriber: sub.heartbeatsReceived, sender: sender.heartbeatsReceived };
    await guard.idle(idleMs);
    guard.check();
    const hbDuringIdle = {
      subscriber: sub.heartbeatsReceived - hbBefore.subscriber,
      sender: sender.heartbeatsReceived - hbBefore.sender,
    };
    if (inbox.items.length !== expectations.length) {
      matchAndCheck(inbox.items, expectations); // names the extra message
    }
    for (const c of [sub, sender]) {
      if (!c.client.connected) fail(`${c.name}: no longer connected after the ${idleMs} ms idle period`);
      if (hbDuringIdle[c.name] < 1) {
        fail(`${c.name}: received no server heart-beat during ${idleMs} ms of idling (negotiated ${c.connectedFrame.headers['heart-beat']})`);
      }
    }
    const lateData = {
      job_id: 'job-global-2',
      stage: 'after-idle',
      idle_ms: idleMs,
      ratio: 1.5,
      message: 'still here ✓ naïve',
      details: { nested: { deeper: [true, null] } },
      tags: ['late'],
    };
    const lateId = await httpPublish(ctx, '/global', 'job.progress', lateData);
    expectations.push({ topic: '/global', sub: 's-global', type: 'job.progress', data: lateData, id: lateId, via: 'HTTP after idle' });
    await guard.wait(inbox.atLeast(expectations.length), `the MESSAGE published to /global after ${idleMs} ms of idling (id ${lateId})`);
    guard.check();
    const late = matchAndCheck(inbox.items, expectations).slice(checked.length);

    // 7. Clean shutdown: DISCONNECT with receipt, then close.
    for (const c of [sender, sub]) {
      c.closing = true;
      await guard.wait(c.client.deactivate(), `${c.name} deactivate() (RECEIPT for DISCONNECT, then WebSocket close)`);
      if (!c.disconnectReceipt) fail(`${c.name}: WebSocket closed during deactivate() without a RECEIPT for DISCONNECT`);
    }
    guard.check();

    return {
      platform,
      connected,
      sender_session: sender.connectedFrame.headers.session,
      messages: [...checked, ...late],
      idle_ms: idleMs,
      heartbeats_during_idle: hbDuringIdle,
      elapsed_ms: Date.now() - started,
    };
  } finally {
    forceClose(conns);
  }
}
