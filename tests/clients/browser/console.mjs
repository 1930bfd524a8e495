#!/usr/bin/env node
// The console (/console, DESIGN §16) in headless Chromium against a real node, driven like a
// person would: the dev-token button, three job.progress events from the backend over HTTP (the
// bar reaches each percentage), a lock taken and released through the API (the row appears with
// its fencing token and goes), a second browser context opening the same item (both show in its
// presence), and a reload that restores the view from the snapshot. Screenshots go to
// cfg.shots (PNG, checked non-blank); every request must stay on the node's origin; no console
// error. With cfg.dev false (a node with a configured secret) the button must be absent and the
// endpoint 404.
//
// Prints `OK {summary}` and exits 0, or `FAIL reason` on stderr and exits 1.

import { statSync } from 'node:fs';
import path from 'node:path';
import { launchChromium } from '../shared/browser_harness.mjs';

const cfg = JSON.parse(process.argv[2]);
const WAIT_MS = 10_000;
const fail = (reason) => {
  process.stderr.write(`FAIL ${reason}\n`);
  process.exit(1);
};
setTimeout(() => fail('whole run exceeded 90 s'), 90_000);

const origin = new URL(cfg.http).origin;
const problems = [];
const foreign = [];

function watch(page, name) {
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') problems.push(`${name} console ${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`${name} page error: ${e.message}`));
  page.on('requestfailed', (r) => {
    // A WebSocket or fetch cut by a reload is not a problem of the page.
    if (!/ERR_ABORTED/.test(r.failure()?.errorText || '')) problems.push(`${name} request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  page.on('request', (r) => {
    if (new URL(r.url()).origin !== origin) foreign.push(r.url());
  });
  page.on('websocket', (ws) => {
    const u = new URL(ws.url());
    if (u.host !== new URL(origin).host) foreign.push(ws.url());
  });
}

async function api(method, p, token, body) {
  const init = { method, headers: { authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const answer = await fetch(`${cfg.http}${p}`, init);
  const text = await answer.text();
  return { status: answer.status, json: text ? JSON.parse(text) : null };
}

async function shot(page, name) {
  const file = path.join(cfg.shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  const size = statSync(file).size;
  // A blank page compresses to a few hundred bytes; panels with text take tens of KB.
  if (size < 8000) fail(`screenshot ${file} is ${size} bytes: blank?`);
  return { file, size };
}

const browser = await launchChromium();
const done = async (summary) => {
  await browser.close().catch(() => {});
  process.stdout.write(`OK ${JSON.stringify(summary)}\n`);
  process.exit(0);
};
try {
  const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
  const page = await context.newPage();
  watch(page, 'page 1');
  const started = Date.now();
  await page.goto(`${cfg.http}/console`, { waitUntil: 'load' });
  await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  const loadMs = Date.now() - started;
  // The page's weight: what it loaded to be ready (the document and every resource, /metrics
  // polls aside), decoded, from the browser's own resource timing.
  const weight = await page.evaluate(() =>
    [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
      .filter((e) => !e.name.endsWith('/metrics'))
      .reduce((sum, e) => sum + e.decodedBodySize, 0),
  );

  if (!cfg.dev) {
    if (await page.isVisible('#dev-token')) fail('the development-token button is shown on a node with a configured secret');
    const answer = await fetch(`${cfg.http}/console/dev-token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"team":"t1"}' });
    if (answer.status !== 404) fail(`POST /console/dev-token answered ${answer.status}, expected 404`);
    const s = await shot(page, 'console-no-dev-token');
    if (problems.length) fail(problems.join('\n'));
    if (foreign.length) fail(`requests to other origins: ${foreign.join(', ')}`);
    await done({ dev_token: false, screenshot: s, load_ms: loadMs, bytes: weight });
  }

  // Keyboard first: the button is reachable and labelled.
  await page.focus('#dev-token');
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('Connected as'), null, { timeout: WAIT_MS });

  // Job progress from the backend.
  for (const done of [30, 60, 100]) {
    const r = await api('POST', '/api/v1/publish', cfg.tokens.publisher, { topic: '/team/t1', type: 'job.progress', data: { job_id: 'import-7', done, total: 100, stage: 'images' } });
    if (r.status !== 202) fail(`publish: ${r.status} ${JSON.stringify(r.json)}`);
    await page.waitForSelector(`li[data-job="import-7"] progress[data-percent="${done}"]`, { timeout: WAIT_MS });
  }

  // A lock taken and released through the API.
  const lock = await api('POST', '/api/v1/teams/t1/items/812/lock', cfg.tokens.holder, {});
  if (lock.status !== 200) fail(`lock: ${lock.status} ${JSON.stringify(lock.json)}`);
  await page.waitForFunction(
    (token) => document.querySelector('tr[data-item="812"] td.token')?.textContent === String(token),
    lock.json.token,
    { timeout: WAIT_MS },
  );
  const holder = await page.textContent('tr[data-item="812"] td.holder');
  if (holder !== 'ivan') fail(`lock row holder ${holder}, expected ivan`);
  const withLock = await shot(page, 'console-live');
  const released = await api('DELETE', `/api/v1/teams/t1/items/812/lock?token=${lock.json.token}`, cfg.tokens.holder);
  if (released.status !== 200 && released.status !== 204) fail(`release: ${released.status}`);
  await page.waitForSelector('tr[data-item="812"]', { state: 'detached', timeout: WAIT_MS });

  // Presence of an item: this page and a second browser context open it.
  await page.fill('#item', 'i1');
  await page.click('#item-form button');
  await page.waitForFunction(() => document.querySelectorAll('#item-presence li').length === 1, null, { timeout: WAIT_MS });
  const other = await browser.newContext({ viewport: { width: 1366, height: 768 } });
  const page2 = await other.newPage();
  watch(page2, 'page 2');
  await page2.goto(`${cfg.http}/console`, { waitUntil: 'load' });
  await page2.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  await page2.click('#dev-token');
  await page2.waitForFunction(() => document.getElementById('status').textContent.startsWith('Connected as'), null, { timeout: WAIT_MS });
  await page2.fill('#item', 'i1');
  await page2.click('#item-form button');
  await page.waitForFunction(() => document.querySelectorAll('#item-presence li').length === 2, null, { timeout: WAIT_MS });
  const users = await page.$$eval('#item-presence li', (lis) => lis.map((li) => li.dataset.user));

  // A reload restores the view from the snapshot: the job at 100 %, both users on the item.
  await page.reload({ waitUntil: 'load' });
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('Connected as'), null, { timeout: WAIT_MS });
  await page.waitForSelector('li[data-job="import-7"] progress[data-percent="100"]', { timeout: WAIT_MS });
  await page.waitForFunction(() => document.querySelectorAll('#item-presence li').length === 2, null, { timeout: WAIT_MS });
  const reloaded = await shot(page, 'console-after-reload');

  // The publish form, with the dev token (scope publish).
  await page.fill('#pub-type', 'console.test');
  await page.click('#publish-form button');
  await page.waitForFunction(() => document.getElementById('publish-result').textContent.startsWith('Published at offset'), null, { timeout: WAIT_MS });
  await page.waitForFunction(() => [...document.querySelectorAll('#event-log li')].some((li) => li.textContent.includes('console.test')), null, { timeout: WAIT_MS });

  // Node status from /metrics (polled every 2 s): both pages' connections.
  await page.waitForFunction(() => Number(document.getElementById('node-connections').textContent) >= 2, null, { timeout: WAIT_MS });

  if (problems.length) fail(problems.join('\n'));
  if (foreign.length) fail(`requests to other origins: ${foreign.join(', ')}`);
  await done({ dev_token: true, users, load_ms: loadMs, bytes: weight, screenshots: [withLock, reloaded] });
} catch (e) {
  await browser.close().catch(() => {});
  fail(e && e.stack ? e.stack : String(e));
}
