#!/usr/bin/env node
// A bot that publishes faster than its STOMP rate limit must keep receiving (@stomp/stompjs).
//
//   node node/flood.mjs '{"ws":"ws://127.0.0.1:PORT/ws","token":"<jwt with scope publish>",
//     "user":"bot","count":2000,"rate":500,"timeout_s":30}'
//
// Optional: "heartbeat_ms" (default 1000, both directions), "min_rate" (msgs/s; when set, the
// effective arrival rate must reach it), "max_gap_s" (when set, no silence between the first SEND
// and the last MESSAGE, or between two MESSAGEs, may exceed it). "rate" is the node's
// hub.publish_rate; the script uses it only to size its deadline and to report.
//
// The same scenario as ../python/flood.py: connect with the token, SUBSCRIBE to /user/<user> with
// a receipt and wait for it, publish `count` SENDs to that topic (event-type flood.msg, body
// {"seq": i}) and then one flood.end marker. stompjs' publish() is fire-and-forget (ws buffers),
// so they go out in a loop, yielding to the event loop (setImmediate) every CHUNK frames so that
// incoming frames and heart-beats are processed meanwhile. The node slows the sender down to its
// rate; the script waits for the end marker at most count / rate + timeout_s seconds after the
// first SEND, and fails at once on an ERROR frame, on the WebSocket closing before our own
// DISCONNECT, or on stompjs declaring the server's heart-beats lost. Then exactly `count`
// flood.msg MESSAGEs must have arrived before the marker, in order (data.seq == 0..count-1), none
// missing, none repeated, each a well-formed Lockstep MESSAGE; then a clean DISCONNECT.
//
// Exit 0 after `OK {summary}` on stdout; exit 1 with `FAIL [node] <reason>`, an `observed {json}`
// line and a redacted stompjs trace on stderr.

import { Client } from '@stomp/stompjs';
import { performance } from 'node:perf_hooks';
import { ISO_UTC } from '../shared/common.mjs';
import { makeTrace, packageVersion, runMain, useWsAsWebSocket } from '../shared/node_harness.mjs';

useWsAsWebSocket();

const WAIT_MS = 10_000; // connect, the SUBSCRIBE receipt, deactivate()
const CHUNK = 100; // SENDs between two turns of the event loop
const SUB_ID = 's-flood';
const EVENT = 'flood.msg';
const END_EVENT = 'flood.end';
const TRACE_LINES = 200;

class Failure extends Error {}
const fail = (m) => {
  throw new Failure(m);
};
const show = (v) => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 300 ? `${s.slice(0, 300)}…` : s;
};
const now = () => performance.now();
const secs = (ms) => (ms === null || ms === undefined ? null : Math.round(ms) / 1000);

function parseConfig(argv) {
  if (argv.length < 3) fail("usage: node node/flood.mjs '<json config>'");
  let cfg;
  try {
    cfg = JSON.parse(argv[2]);
  } catch (e) {
    fail(`config argument is not JSON: ${e.message}`);
  }
  for (const k of ['ws', 'token', 'user']) {
    if (typeof cfg[k] !== 'string' || cfg[k] === '') fail(`config.${k} must be a non-empty string`);
  }
  for (const k of ['count', 'rate']) {
    if (!Number.isInteger(cfg[k]) || cfg[k] <= 0) fail(`config.${k} must be a positive integer`);
  }
  if (typeof cfg.timeout_s !== 'number' || !(cfg.timeout_s > 0)) fail('config.timeout_s must be a positive number');
  if (cfg.heartbeat_ms === undefined) cfg.heartbeat_ms = 1000;
  if (!Number.isInteger(cfg.heartbeat_ms) || cfg.heartbeat_ms < 0) fail('config.heartbeat_ms must be a non-negative integer');
  for (const k of ['min_rate', 'max_gap_s']) {
    if (cfg[k] !== undefined && cfg[k] !== null && !(typeof cfg[k] === 'number' && cfg[k] > 0)) fail(`config.${k} must be a positive number when set`);
  }
  return cfg;
}

function seqOf(body) {
  try {
    return JSON.parse(body).data.seq;
  } catch (_) {
    return undefined;
  }
}

// Exactly flood.msg 0..count-1 in order, each a well-formed MESSAGE. Returns the message-ids.
function checkFlood(messages, topic, count) {
  const seqs = messages.map((m) => seqOf(m.body));
  const ints = seqs.filter(Number.isInteger);
  const seen = new Map();
  for (const s of ints) seen.set(s, (seen.get(s) || 0) + 1);
  const missing = [];
  for (let i = 0; i < count; i++) if (!seen.has(i)) missing.push(i);
  const dups = [...seen].filter(([, n]) => n > 1).map(([s]) => s).sort((a, b) => a - b);
  const firstBad = seqs.findIndex((s, i) => s !== i);
  if (messages.length !== count || firstBad !== -1) {
    fail(
      `expected flood.msg seq 0..${count - 1} in order before the end marker; got ${messages.length} MESSAGEs, ` +
        `${missing.length} missing (first ${show(missing.slice(0, 10))}), ${dups.length} repeated ` +
        `(first ${show(dups.slice(0, 10))}), first out of place at position ${firstBad === -1 ? null : firstBad}` +
        ` (seq ${firstBad === -1 ? null : show(seqs[firstBad])})`,
    );
  }
  const ids = [];
  messages.forEach(({ headers: h, body }, i) => {
    const where = `MESSAGE seq ${i}`;
    if (h.destination !== topic) fail(`${where}: destination ${show(h.destination)} != ${show(topic)}`);
    if (h.subscription !== SUB_ID) fail(`${where}: subscription ${show(h.subscription)} != ${show(SUB_ID)}`);
    if (h['event-type'] !== EVENT) fail(`${where}: event-type ${show(h['event-type'])} != ${show(EVENT)}`);
    if (h['content-type'] !== 'application/json') fail(`${where}: content-type ${show(h['content-type'])}`);
    const mid = h['message-id'];
    if (typeof mid !== 'string' || mid === '') fail(`${where}: no message-id header (${show(h)})`);
    const env = JSON.parse(body);
    const keys = env && typeof env === 'object' ? Object.keys(env).sort() : [];
    if (keys.join(',') !== 'data,id,topic,ts,type') fail(`${where}: envelope keys ${show(keys)}, expected id,type,topic,ts,data: ${show(body)}`);
    if (env.id !== mid) fail(`${where}: envelope id ${show(env.id)} != message-id ${show(mid)}`);
    if (env.type !== EVENT) fail(`${where}: envelope type ${show(env.type)}`);
    if (env.topic !== topic) fail(`${where}: envelope topic ${show(env.topic)}`);
    if (typeof env.ts !== 'string' || !ISO_UTC.test(env.ts)) fail(`${where}: envelope ts ${show(env.ts)}`);
    if (show(env.data) !== show({ seq: i })) fail(`${where}: data ${show(env.data)} != ${show({ seq: i })}`);
    ids.push(mid);
  });
  if (new Set(ids).size !== ids.length) fail(`message-ids are not unique (${new Set(ids).size} distinct of ${ids.length})`);
  return ids;
}

async function main() {
  let cfg;
  try {
    cfg = parseConfig(process.argv);
  } catch (e) {
    process.stderr.write(`FAIL [node] ${e.message}\n`);
    return 1;
  }
  const redact = (line) => String(line).split(cfg.token).join('<token>');
  const { lines: trace, log } = makeTrace(redact, TRACE_LINES, 300);
  const topic = `/user/${cfg.user}`;
  const floodBudgetMs = (cfg.count / cfg.rate + cfg.timeout_s) * 1000;

  // Everything the run has seen, printed with any failure.
  const st = {
    connected: null,
    receipts: new Set(),
    messages: [], // {at, headers, body}
    endMarker: null,
    afterEnd: [],
    firstSend: null,
    sendsDone: 0,
    sendError: null,
    sendFinished: null,
    closing: false,
    closed: null,
    heartbeatLost: false,
    heartbeatsReceived: 0,
    errors: [],
  };
  const observed = () => ({
    count: cfg.count,
    rate: cfg.rate,
    deadline_after_first_send_s: secs(floodBudgetMs),
    sends_done: st.sendsDone,
    send_error: st.sendError,
    send_loop_s: st.sendFinished === null ? null : secs(st.sendFinished - st.firstSend),
    messages: st.messages.length,
    last_seq: st.messages.length ? seqOf(st.messages[st.messages.length - 1].body) : null,
    last_message_at_s: st.messages.length && st.firstSend !== null ? secs(st.messages[st.messages.length - 1].at - st.firstSend) : null,
    end_marker: st.endMarker !== null,
    closed: st.closed,
    heartbeat_lost: st.heartbeatLost,
    heartbeats_received: st.heartbeatsReceived,
    errors: st.errors,
  });

  // The first fatal event fails every pending wait with its reason.
  let tripped = null;
  const waiters = new Set();
  const trip = (msg) => {
    if (tripped) return;
    tripped = new Failure(msg);
    for (const w of [...waiters]) w();
  };
  const changed = () => {
    for (const w of [...waiters]) w();
  };
  // Resolves when pred() holds; rejects on a trip (unless allowClosing and we are closing) or at deadline.
  const waitFor = (pred, what, deadline, allowClosing = false) =>
    new Promise((resolve, reject) => {
      let timer;
      const check = () => {
        if (pred()) {
          done();
          resolve();
        } else if (tripped && !(allowClosing && st.closing)) {
          done();
          reject(new Failure(`${tripped.message} while waiting for ${what}`));
        }
      };
      const done = () => {
        clearTimeout(timer);
        waiters.delete(check);
      };
      timer = setTimeout(() => {
        done();
        reject(new Failure(`timed out waiting for ${what}`));
      }, Math.max(0, deadline - now()));
      waiters.add(check);
      check();
    });

  const overallMs = 3 * WAIT_MS + floodBudgetMs + 5000;
  const watchdog = setTimeout(() => {
    process.stderr.write(
      `FAIL [node] overall watchdog: run exceeded ${overallMs} ms\nobserved ${JSON.stringify(observed())}\n` +
        `--- stompjs trace ---\n${trace.join('\n')}\n`,
    );
    process.exit(1);
  }, overallMs);

  const client = new Client({
    brokerURL: cfg.ws,
    connectHeaders: { login: cfg.user, passcode: cfg.token },
    heartbeatIncoming: cfg.heartbeat_ms,
    heartbeatOutgoing: cfg.heartbeat_ms,
    reconnectDelay: 0,
    debug: (line) => {
      // One entry per SEND and MESSAGE would push everything else out of the trace.
      if (!/^(>>> SEND|<<< MESSAGE|Received data)/.test(line)) log(line);
    },
  });
  client.onConnect = (frame) => {
    st.connected = frame;
    changed();
  };
  client.onStompError = (frame) => {
    st.errors.push({ headers: frame.headers, body: frame.body.slice(0, 300) });
    trip(`server sent ERROR: headers=${show(frame.headers)} body=${show(frame.body)}`);
  };
  client.onWebSocketClose = (evt) => {
    const at = st.firstSend === null ? null : secs(now() - st.firstSend);
    st.closed = { code: evt && evt.code, reason: evt && evt.reason, at_s: at, messages_by_then: st.messages.length, sends_by_then: st.sendsDone, expected: st.closing };
    if (!st.closing) {
      trip(
        `WebSocket closed ${at === null ? 'before the flood' : `${at} s after the first SEND`}: code=${evt && evt.code} ` +
          `reason=${show(evt && evt.reason)}${st.heartbeatLost ? ' (stompjs closed it: server heart-beats lost)' : ''}`,
      );
    }
    changed();
  };
  client.onWebSocketError = (evt) => log(`WebSocket error event: ${(evt && (evt.message || evt.type)) || evt}`);
  client.onHeartbeatReceived = () => {
    st.heartbeatsReceived += 1;
  };
  client.onHeartbeatLost = () => {
    st.heartbeatLost = true;
    log(`heart-beat lost after ${st.messages.length} MESSAGEs`);
    trip(`stompjs saw no server activity for more than 2 x max(${cfg.heartbeat_ms}, server heart-beat) ms and closed the connection`);
  };
  client.onDisconnect = (frame) => {
    if (!st.closing) trip(`unexpected RECEIPT for a DISCONNECT we did not send: ${show(frame.headers)}`);
  };
  client.onUnhandledMessage = (m) => trip(`MESSAGE for an unknown subscription: ${show(m.headers)}`);
  client.onUnhandledReceipt = (f) => {
    st.receipts.add(f.headers['receipt-id']);
    changed();
  };
  client.onUnhandledFrame = (f) => trip(`unexpected ${f.command} frame: ${show(f.headers)}`);

  let step = 'connect';
  try {
    client.activate();
    await waitFor(() => st.connected !== null, `CONNECTED (${cfg.ws})`, now() + WAIT_MS);

    step = 'subscribe';
    client.watchForReceipt('r-sub', () => {
      st.receipts.add('r-sub');
      changed();
    });
    client.subscribe(
      topic,
      (msg) => {
        const item = { at: now(), headers: { ...msg.headers }, body: msg.body };
        if (st.endMarker !== null) st.afterEnd.push(item);
        else if (msg.headers['event-type'] === END_EVENT) st.endMarker = item;
        else st.messages.push(item);
        if (st.endMarker !== null) changed();
      },
      { id: SUB_ID, receipt: 'r-sub' },
    );
    await waitFor(() => st.receipts.has('r-sub'), `RECEIPT r-sub for SUBSCRIBE ${topic}`, now() + WAIT_MS);

    step = 'flood';
    st.firstSend = now();
    const deadline = st.firstSend + floodBudgetMs;
    const arrived = waitFor(
      () => st.endMarker !== null,
      `all ${cfg.count} MESSAGEs and the end marker (${secs(floodBudgetMs)} s after the first SEND: count / rate + timeout_s)`,
      deadline,
    );
    arrived.catch(() => {}); // awaited below; avoid an unhandled rejection while sending
    const headers = { 'event-type': EVENT, 'content-type': 'application/json' };
    try {
      for (let i = 0; i < cfg.count; i++) {
        if (tripped) break;
        client.publish({ destination: topic, body: JSON.stringify({ seq: i }), headers });
        st.sendsDone = i + 1;
        if ((i + 1) % CHUNK === 0) await new Promise(setImmediate);
      }
      if (!tripped) {
        client.publish({ destination: topic, body: JSON.stringify({ end: true }), headers: { ...headers, 'event-type': END_EVENT } });
        st.sendFinished = now();
      }
    } catch (e) {
      st.sendError = `after ${st.sendsDone} SENDs: ${e && e.message ? e.message : e}`;
      trip(`publish() threw ${st.sendError}`);
    }
    await arrived;

    step = 'check';
    const messages = st.messages.slice();
    const ids = checkFlood(messages, topic, cfg.count);
    const first = messages[0].at;
    const last = messages[messages.length - 1].at;
    const elapsed = last - st.firstSend;
    // Longest silence between the first SEND and the last MESSAGE: a server that stops writing
    // while it throttles shows up here even when everything arrives in the end.
    let gap = messages[0].at - st.firstSend;
    let gapAfter = null;
    for (let i = 1; i < messages.length; i++) {
      if (messages[i].at - messages[i - 1].at > gap) {
        gap = messages[i].at - messages[i - 1].at;
        gapAfter = i - 1;
      }
    }

    step = 'disconnect';
    st.closing = true;
    let receipt = null;
    client.onDisconnect = (frame) => {
      receipt = frame;
    };
    // deactivate() sends DISCONNECT with a receipt and resolves once the WebSocket has closed; it
    // has no timeout of its own, so the wait is on our close record, bounded.
    const deactivated = client.deactivate();
    deactivated.catch(() => {});
    await waitFor(() => st.closed !== null, 'deactivate(): RECEIPT for DISCONNECT, then the WebSocket closing', now() + WAIT_MS, true);
    if (!receipt) fail('the WebSocket closed during deactivate() without a RECEIPT for DISCONNECT');
    if (st.errors.length) fail(`got ERROR: ${show(st.errors[0])}`);
    if (st.heartbeatLost) fail('stompjs lost the server heart-beats');
    if (st.afterEnd.length) fail(`${st.afterEnd.length} MESSAGE(s) arrived after the end marker, first: ${show(st.afterEnd[0].headers)} ${show(st.afterEnd[0].body)}`);

    const summary = {
      client: `@stomp/stompjs ${packageVersion('@stomp/stompjs')} / ws ${packageVersion('ws')} / node ${process.version}`,
      server_heart_beat: st.connected.headers['heart-beat'],
      count: cfg.count,
      rate: cfg.rate,
      received: messages.length,
      in_order: true,
      arrival_rate: elapsed > 0 ? Math.round((cfg.count / (elapsed / 1000)) * 10) / 10 : null,
      first_send_to_last_message_s: secs(elapsed),
      first_to_last_message_s: secs(last - first),
      first_message_latency_s: secs(first - st.firstSend),
      send_loop_s: secs(st.sendFinished - st.firstSend),
      nominal_s: secs((cfg.count / cfg.rate) * 1000),
      max_gap_s: secs(gap),
      max_gap_after_seq: gapAfter,
      heartbeats_received: st.heartbeatsReceived,
      first_id: ids[0],
      last_id: ids[ids.length - 1],
    };
    step = 'timing';
    if (typeof cfg.max_gap_s === 'number' && gap > cfg.max_gap_s * 1000) {
      fail(
        `MESSAGEs stopped for ${secs(gap)} s (after seq ${gapAfter}; max_gap_s ${cfg.max_gap_s}): the node did not ` +
          `write while it was reading/throttling; summary ${JSON.stringify(summary)}`,
      );
    }
    if (typeof cfg.min_rate === 'number' && summary.arrival_rate !== null && summary.arrival_rate < cfg.min_rate) {
      fail(`arrival rate ${summary.arrival_rate} msgs/s is below min_rate ${cfg.min_rate}`);
    }
    process.stdout.write(`OK ${JSON.stringify(summary)}\n`);
    return 0;
  } catch (e) {
    process.stderr.write(`FAIL [node] [${step}] ${redact(e && e.message ? e.message : e)}\n`);
    if (!(e instanceof Failure) && e && e.stack) process.stderr.write(`${redact(e.stack)}\n`);
    process.stderr.write(`observed ${JSON.stringify(observed())}\n`);
    process.stderr.write(`--- stompjs trace (last ${trace.length} lines, SEND/MESSAGE frames omitted) ---\n${trace.join('\n')}\n`);
    return 1;
  } finally {
    clearTimeout(watchdog);
    if (!st.closing) {
      st.closing = true;
      try {
        void client.deactivate({ force: true });
      } catch (_) {
        // best effort on the failure path
      }
    }
  }
}

runMain(main);
