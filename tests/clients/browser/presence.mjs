#!/usr/bin/env node
// Presence in item pages (DESIGN §14), with the real @stomp/stompjs inside headless Chromium,
// across three nodes that share a Redis (or a Redis Cluster).
//
//   node browser/presence.mjs '{"nodes":[{"http":"http://127.0.0.1:P0","ws":"ws://127.0.0.1:P0/ws"},
//     {…P1…},{…P2…}],"team":"t1","item":"doc-1","tokens":{"ana":"…","ben":"…","publisher":"…"},
//     "leave_delay_ms":2000,"page_port":NNNN}'
//
// `ana` and `ben` are the tokens of those users (members of `team`, no scope), `publisher` has
// scope `publish` for `team`; `leave_delay_ms` is the nodes' `presence.leave_delay`; `page_port`
// is an allowed origin of every node. The item topic must be fresh.
//
// Two browser contexts, two users, one item page each (browser/presence.html):
// 1. ana opens the item on node 0, ben on node 1: ana sees ben join live, ben sees ana in the
//    snapshot (and then his own join); GET …/presence on node 2 lists both, one connection each.
// 2. ana reloads her page, which connects to node 2 this time: within 3× the leave delay
//    nobody sees a presence event about her (a marker event published afterwards proves the
//    window is over on both pages); the list still has both.
// 3. ana closes her tab: ben sees exactly one presence.left for ana, no earlier than the leave
//    delay after the close, and nothing else about her for another leave delay (a marker again);
//    the list has only ben.
//
// Exit 0 after `OK {summary}` on stdout (the join and leave times it saw); exit 1 with
// `FAIL [chromium] …` on stderr.

import { makeRedactor, WAIT_MS } from '../shared/common.mjs';
import { launchChromium, startPageServer, stompjsRoutes } from '../shared/browser_harness.mjs';
import { configArg } from '../shared/node_harness.mjs';

const SCRIPT = 'browser/presence.mjs';
const RUN_MS = 120_000;

class Failure extends Error {}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main(cfg, err) {
  const bad = (m) => {
    throw new Failure(`config: ${m}`);
  };
  if (!Array.isArray(cfg.nodes) || cfg.nodes.length !== 3) bad('"nodes" must list three nodes {http, ws}');
  for (const k of ['ana', 'ben', 'publisher']) if (!cfg.tokens || typeof cfg.tokens[k] !== 'string') bad(`tokens.${k} missing`);
  if (!Number.isInteger(cfg.leave_delay_ms) || cfg.leave_delay_ms <= 0) bad('leave_delay_ms must be a positive integer');
  if (!Number.isInteger(cfg.page_port)) bad('page_port must be a TCP port number');
  const topic = `/team/${cfg.team}/items/${cfg.item}`;
  const presencePath = `/api/v1/topics/${encodeURIComponent(topic)}/presence`;
  const delay = cfg.leave_delay_ms;

  const api = async (node, method, path, token, body) => {
    const res = await fetch(`${cfg.nodes[node].http}${path}`, {
      method,
      headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
      signal: AbortSignal.timeout(WAIT_MS),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  };
  // The list as `user=connections`, sorted; it must be complete (not counts only).
  const listed = async (node) => {
    const { status, body } = await api(node, 'GET', presencePath, cfg.tokens.ben);
    if (status !== 200 || body.counts_only || body.count !== body.users.length) {
      throw new Failure(`GET ${presencePath} on node ${node} answered ${status} ${JSON.stringify(body)}`);
    }
    return body.users.map((u) => `${u.user}=${u.connections}`).join(',');
  };
  const expectListed = async (node, want, when) => {
    const got = await listed(node);
    if (got !== want) throw new Failure(`${when}: GET …/presence on node ${node} lists [${got}], expected [${want}]`);
  };

  const server = await startPageServer(cfg.page_port, {
    '/': { file: new URL('presence.html', import.meta.url).pathname, type: 'text/html; charset=utf-8' },
    ...stompjsRoutes(),
  });
  const browser = await launchChromium();
  try {
    const origin = `http://127.0.0.1:${cfg.page_port}`;
    // One item page of `user`, connected to `node`.
    const open = async (page, user, node) => {
      const resp = await page.goto(`${origin}/`, { waitUntil: 'load', timeout: WAIT_MS });
      if (!resp || resp.status() !== 200) throw new Failure(`page ${origin}/ answered ${resp ? resp.status() : 'nothing'}`);
      await page.waitForFunction(() => typeof window.__open === 'function', null, { timeout: WAIT_MS });
      await page.evaluate((c) => window.__open(c), { ws: cfg.nodes[node].ws, token: cfg.tokens[user], user, topic });
      await until(page, () => window.__state.subscribed, `${user}'s page to subscribe on node ${node}`);
    };
    // Waits until the page's state satisfies `pred` (evaluated in the page, with `arg`); fails
    // at once when the page reports an error.
    const until = async (page, pred, what, arg, ms = WAIT_MS) => {
      try {
        await page.waitForFunction(
          ([p, a]) => window.__state.error !== null || new Function('a', `return (${p})(a)`)(a),
          [pred.toString(), arg],
          { timeout: ms, polling: 20 },
        );
      } catch (e) {
        throw new Failure(`timed out after ${ms} ms waiting for ${what}: ${e.message.split('\n')[0]}`);
      }
      const error = await page.evaluate(() => window.__state.error);
      if (error) throw new Failure(`while waiting for ${what}: ${error}`);
    };
    const seen = (page) => page.evaluate(() => window.__seen);
    const presenceOf = (events, user) => events.filter((e) => e.type.startsWith('presence.') && e.user === user && !e.snapshot);
    const describe = (events) => JSON.stringify(events.map((e) => `${e.type}${e.snapshot ? '(snapshot)' : ''} ${e.user ?? ''} @${e.offset}`));
    // Publishes a marker on the item topic and waits until every page got it: everything the
    // nodes published before it has been delivered (one topic, one order).
    let markers = 0;
    const marker = async (pages) => {
      markers += 1;
      const data = { marker: markers };
      const { status, body } = await api(0, 'POST', '/api/v1/publish', cfg.tokens.publisher, { topic, type: 'test.marker', data });
      if (status !== 202) throw new Failure(`publishing the marker answered ${status} ${JSON.stringify(body)}`);
      for (const [name, page] of pages) {
        await until(page, (m) => window.__seen.some((e) => e.type === 'test.marker' && e.offset === m), `the marker at offset ${body.offset} on ${name}'s page`, body.offset);
      }
      return body.offset;
    };

    // 1. Both open the item, on different nodes.
    const contextA = await browser.newContext();
    const contextB = await browser.newContext();
    for (const context of [contextA, contextB]) {
      context.on('console', (msg) => {
        if (msg.type() === 'error' || msg.type() === 'warning') err(`[page console.${msg.type()}] ${msg.text()}`);
      });
    }
    let pageA = await contextA.newPage();
    const pageB = await contextB.newPage();
    await open(pageA, 'ana', 0);
    const benOpened = await pageA.evaluate(() => Date.now());
    await open(pageB, 'ben', 1);
    await until(pageA, () => window.__seen.some((e) => e.type === 'presence.joined' && e.user === 'ben'), "ana's page to see ben join");
    const joinMs = (await seen(pageA)).find((e) => e.type === 'presence.joined' && e.user === 'ben').at - benOpened;
    // Ben learns of ana from the snapshot, and of himself once his own join is decided.
    await until(pageB, () => window.__seen.some((e) => e.type === 'presence.joined' && e.user === 'ben'), "ben's page to see his own join");
    const snapshotB = (await seen(pageB)).filter((e) => e.snapshot && e.type === 'presence.joined').map((e) => e.user);
    if (snapshotB.join(',') !== 'ana') throw new Failure(`ben's snapshot has presence.joined of [${snapshotB}], expected [ana]: ${describe(await seen(pageB))}`);
    await expectListed(2, 'ana=1,ben=1', 'both open');

    // 2. ana reloads; her page comes back on node 2. Silence for 3× the leave delay.
    const beforeReload = (await seen(pageB)).length;
    const reloaded = Date.now();
    await pageA.reload({ waitUntil: 'load', timeout: WAIT_MS });
    await pageA.waitForFunction(() => typeof window.__open === 'function', null, { timeout: WAIT_MS });
    await pageA.evaluate((c) => window.__open(c), { ws: cfg.nodes[2].ws, token: cfg.tokens.ana, user: 'ana', topic });
    await until(pageA, () => window.__state.subscribed, "ana's reloaded page to subscribe on node 2");
    const reloadMs = Date.now() - reloaded;
    await sleep(Math.max(0, 3 * delay - (Date.now() - reloaded)));
    await marker([
      ['ana', pageA],
      ['ben', pageB],
    ]);
    const afterReloadB = (await seen(pageB)).slice(beforeReload);
    const aboutAna = [...presenceOf(afterReloadB, 'ana'), ...presenceOf(await seen(pageA), 'ana')];
    if (aboutAna.length) throw new Failure(`a reload was not silent: ${describe(aboutAna)}`);
    await expectListed(0, 'ana=1,ben=1', 'after the reload');

    // 3. ana closes her tab: one presence.left, after the leave delay.
    const beforeClose = (await seen(pageB)).length;
    // On ben's page's clock, which also stamps what it receives (Chromium's clock and this
    // process's can differ by milliseconds).
    const closed = await pageB.evaluate(() => Date.now());
    await contextA.close();
    pageA = null;
    await until(pageB, (n) => window.__seen.slice(n).some((e) => e.type === 'presence.left' && e.user === 'ana'), "ben's page to see ana leave", beforeClose, delay + WAIT_MS);
    const left = (await seen(pageB)).slice(beforeClose).find((e) => e.type === 'presence.left');
    const leftMs = left.at - closed;
    if (leftMs < delay) throw new Failure(`presence.left came ${leftMs} ms after the close, before the leave delay of ${delay} ms`);
    await sleep(delay);
    await marker([['ben', pageB]]);
    const afterClose = (await seen(pageB)).slice(beforeClose);
    const changes = afterClose.filter((e) => e.type.startsWith('presence.'));
    if (changes.length !== 1 || changes[0].user !== 'ana' || changes[0].type !== 'presence.left') {
      throw new Failure(`after the close ben saw ${describe(changes)}, expected exactly one presence.left of ana`);
    }
    await expectListed(1, 'ben=1', 'after the close');
    await contextB.close();
    return { join_ms: joinMs, reload_ms: reloadMs, left_after_close_ms: leftMs, leave_delay_ms: delay, browser: browser.version() };
  } finally {
    await browser.close().catch((e) => err(`closing the browser: ${e.message}`));
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
}

const cfg = configArg(SCRIPT, 'FAIL [chromium]');
if (cfg === undefined) process.exit(1);
const redact = makeRedactor(cfg.tokens);
const err = (line) => process.stderr.write(`${redact(line)}\n`);
const watchdog = setTimeout(() => {
  err(`FAIL [chromium] whole run exceeded ${RUN_MS / 1000} s`);
  process.exit(1);
}, RUN_MS);
main(cfg, err).then(
  (summary) => {
    clearTimeout(watchdog);
    process.stdout.write(`OK ${JSON.stringify(summary)}\n`);
    process.exit(0);
  },
  (e) => {
    clearTimeout(watchdog);
    err(`FAIL [chromium] ${e instanceof Failure ? e.message : e && e.stack ? e.stack : e}`);
    process.exit(1);
  },
);
