#!/usr/bin/env node
// @lockstep/client under a node kill: connected to the first node, the node is SIGKILLed while
// a backend publishes to the topic through the other node; the library reconnects to the next
// URL by itself and resumes from the last offset it delivered.
//
//   node node/library_failover.mjs '{"urls":["ws://…/ws","ws://…/ws"],"http":"http://…",
//     "kill_pid":123,"token":"…","topic":"/team/t1"}'
//
// Prints `OK {"log":[…],"ns":[…]}`: what the subscription saw, as the stream checker's entries
// (subscribe with its resume position, subscribed, event, reset, disconnected), and the data.n
// of every event the handler got, for the Rust test to check. Exit 1 with `FAIL reason`.

import { Client } from '@stomp/stompjs';
import { WebSocket } from 'ws';
import { Lockstep } from '../../../clients/js/src/index.js';

Object.assign(globalThis, { WebSocket });

const cfg = JSON.parse(process.argv[2]);
const fail = (reason) => {
  process.stderr.write(`FAIL ${reason}\n`);
  process.exit(1);
};
setTimeout(() => fail('whole run exceeded 60 s'), 60000);

const log = [];
const ns = [];
let changed = () => {};
const until = (what, check, ms = 20000) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  changed = () => {
    if (check()) {
      clearTimeout(timer);
      resolve();
    }
  };
  changed();
});

const ls = new Lockstep({
  urls: cfg.urls,
  http: cfg.http,
  Client,
  token: cfg.token,
  stomp: { reconnectDelay: 200, heartbeatIncoming: 1000, heartbeatOutgoing: 1000 },
  onDisconnect: () => {
    log.push({ kind: 'disconnected' });
    changed();
  },
  onError: (e) => process.stderr.write(`library error: ${e.message}\n`),
});

try {
  await ls.connect();
  let subscriptions = 0;
  ls.subscribe(cfg.topic, (event, meta) => {
    log.push({ kind: meta.snapshot ? 'state' : 'event', offset: meta.offset, epoch: meta.epoch, conflated: meta.conflated, keyed: 'x-key' in meta.headers });
    ns.push(event.data.n);
    changed();
  }, {
    onSubscribed: (p) => {
      subscriptions += 1;
      // The SUBSCRIBE the library sent, then what the server answered.
      log.push({ kind: 'subscribe', resume: p.resumedFrom });
      log.push({ kind: 'subscribed', recovered: p.recovered, offset: p.offset, epoch: p.epoch });
      changed();
    },
    onReset: (r) => {
      if (r.reason === 'reset') log.push({ kind: 'reset', offset: r.offset, epoch: r.epoch });
      changed();
    },
  });
  await until('events on the first node', () => ns.length >= 20);
  process.kill(cfg.kill_pid, 'SIGKILL');
  const before = ns.length;
  await until('the resumed subscription and events after it', () => subscriptions >= 2 && ns.length >= before + 40);
  await ls.close();
  process.stdout.write(`OK ${JSON.stringify({ log, ns })}\n`);
  process.exit(0);
} catch (e) {
  fail(`${e.message}; saw ${JSON.stringify(ns)}`);
}
