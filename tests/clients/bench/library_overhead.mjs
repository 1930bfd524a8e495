#!/usr/bin/env node
// The client library's own work per message (clients/js): a subscription's MESSAGE handling
// (headers, offset/epoch bookkeeping, duplicate check, JSON.parse, the handler call) against
// the reference a bare stompjs app does (JSON.parse and the handler call), on the same
// messages, back to back, in Node and in headless Chromium. No server: the messages are made
// here, so only the library's CPU per message is measured, not the network.
//
//   node bench/library_overhead.mjs [messages]
//
// Prints one JSON line per platform: {platform, messages, library_us, reference_us,
// overhead_us, ratio}.

import path from 'node:path';
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { launchChromium } from '../shared/browser_harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const libraryFile = path.join(here, '..', '..', '..', 'clients', 'js', 'src', 'index.js');
const N = Number(process.argv[2] || 200000);

// Runs in Node and in the page: `Lockstep` is the library's class.
function measure(Lockstep, n) {
  class FakeClient {
    constructor() {
      this.connected = true;
    }
    subscribe() {
      return { unsubscribe() {} };
    }
  }
  const ls = new Lockstep({ Client: FakeClient, url: 'ws://127.0.0.1:1/ws', token: 'x' });
  let sink = 0;
  const sub = ls.subscribe('/team/t1', (event) => {
    sink += event.data.done;
  });
  const body = (i) => JSON.stringify({ id: `01JD${i}`, type: 'job.progress', topic: '/team/t1', ts: '2026-12-08T00:00:00.000Z', data: { job_id: 'j', done: i % 100, total: 100 } });
  const messages = [];
  for (let i = 1; i <= n; i++) {
    messages.push({ headers: { 'event-type': 'job.progress', 'x-stream-offset': String(i), 'x-stream-epoch': 'E', 'message-id': `01JD${i}`, subscription: sub.id, destination: '/team/t1' }, body: body(i) });
  }
  const reference = (m) => {
    const event = JSON.parse(m.body);
    sink += event.data.done;
  };
  const run = (fn) => {
    const t0 = performance.now();
    for (const m of messages) fn(m);
    return ((performance.now() - t0) * 1000) / n;
  };
  // Warm both paths, then alternate three times and keep each one's best.
  run(reference);
  run((m) => sub.onMessage(m));
  let lib = Infinity;
  let ref = Infinity;
  for (let round = 0; round < 3; round++) {
    // A fresh position each round, so no message counts as a duplicate.
    sub.offset = null;
    sub.epoch = null;
    lib = Math.min(lib, run((m) => sub.onMessage(m)));
    ref = Math.min(ref, run(reference));
  }
  return { messages: n, library_us: +lib.toFixed(3), reference_us: +ref.toFixed(3), overhead_us: +(lib - ref).toFixed(3), ratio: +(lib / ref).toFixed(2), sink };
}

const { Lockstep } = await import(libraryFile);
const node = measure(Lockstep, N);
delete node.sink;
process.stdout.write(`${JSON.stringify({ platform: 'node', node: process.version, ...node })}\n`);

// The same function in a page that loads the library as an app would.
const server = http.createServer((req, res) => {
  if (req.url === '/lockstep.js') {
    res.writeHead(200, { 'content-type': 'text/javascript' });
    res.end(readFileSync(libraryFile));
  } else {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>bench</title><p>bench</p>');
  }
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const browser = await launchChromium();
try {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  const result = await page.evaluate(async ([source, n]) => {
    const { Lockstep } = await import('/lockstep.js');
    // eslint-disable-next-line no-new-func
    const fn = new Function(`return (${source})`)();
    return fn(Lockstep, n);
  }, [measure.toString(), N]);
  delete result.sink;
  process.stdout.write(`${JSON.stringify({ platform: 'chromium', browser: browser.version(), ...result })}\n`);
} finally {
  await browser.close();
  server.close();
}
