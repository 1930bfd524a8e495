#!/usr/bin/env node
// Node failover with the real @stomp/stompjs Client: it connects to the first node, the node is
// killed (SIGKILL), stompjs reconnects to the next URL by itself, resubscribes, and receives
// events again.
//
//   node node/failover.mjs '{"urls":["ws://…/ws","ws://…/ws"],"kill_pid":123,"token":"…",
//     "topic":"/team/t1"}'
//
// Events come from a publisher the Rust test runs (data {"n": seq}); this script reports the
// sequence numbers it received before the kill and after the reconnect. Prints
// `OK {summary}` and exits 0, or `FAIL reason` on stderr and exits 1.

import { Client } from '@stomp/stompjs';
import { WebSocket } from 'ws';

Object.assign(globalThis, { WebSocket });

const WAIT_MS = 15000;
const cfg = JSON.parse(process.argv[2]);
const fail = (reason) => {
  process.stderr.write(`FAIL ${reason}\n`);
  process.exit(1);
};
setTimeout(() => fail('whole run exceeded 60 s'), 60000);

let attempt = 0;
const connections = [];
const received = [[], []];
let phase = 0;
let onSubscribed = null;

const client = new Client({
  // stompjs calls beforeConnect before every (re)connection: rotate through the nodes.
  beforeConnect: () => {
    client.brokerURL = cfg.urls[attempt % cfg.urls.length];
    attempt += 1;
  },
  connectHeaders: { passcode: cfg.token },
  reconnectDelay: 200,
  heartbeatIncoming: 1000,
  heartbeatOutgoing: 1000,
  onConnect: () => {
    connections.push(client.brokerURL);
    const receipt = `sub-${connections.length}`;
    client.watchForReceipt(receipt, () => onSubscribed && onSubscribed());
    // stompjs does not restore subscriptions after a reconnect: subscribe in onConnect.
    client.subscribe(cfg.topic, (message) => {
      const event = JSON.parse(message.body);
      received[phase].push(event.data.n);
    }, { id: 'failover', receipt });
  },
  onStompError: (frame) => fail(`ERROR ${frame.headers.message}: ${frame.body}`),
});

const waitFor = (what, check) => new Promise((resolve, reject) => {
  const started = Date.now();
  const timer = setInterval(() => {
    if (check()) {
      clearInterval(timer);
      resolve();
    } else if (Date.now() - started > WAIT_MS) {
      clearInterval(timer);
      reject(new Error(`timed out waiting for ${what}`));
    }
  }, 10);
});

const subscribed = () => new Promise((resolve) => { onSubscribed = resolve; });

try {
  let ready = subscribed();
  client.activate();
  await ready;
  await waitFor('events on the first node', () => received[0].length >= 5);
  // Kill the node this client is on, as a crash would.
  ready = subscribed();
  phase = 1;
  process.kill(cfg.kill_pid, 'SIGKILL');
  await ready;
  await waitFor('events after the reconnect', () => received[1].length >= 10);
  await client.deactivate();
  const after = received[1];
  for (let i = 1; i < after.length; i += 1) {
    if (after[i] !== after[i - 1] + 1) fail(`gap or reorder after reconnect: ${after[i - 1]} then ${after[i]}`);
  }
  if (connections.length !== 2 || connections[0] === connections[1]) fail(`expected one reconnect to another node, got ${connections}`);
  process.stdout.write(`OK ${JSON.stringify({ connections, before: received[0].length, after: after.length, first_after: after[0] })}\n`);
  process.exit(0);
} catch (e) {
  fail(e.message);
}
