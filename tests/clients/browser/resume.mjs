#!/usr/bin/env node
// Lockstep resume (DESIGN §12) with the real @stomp/stompjs, run inside headless Chromium.
//
//   node browser/resume.mjs '{"http":"http://127.0.0.1:PORT","ws":"ws://127.0.0.1:PORT/ws",
//     "user":"ana","team":"t1","tokens":{"subscriber":"…","publisher":"…"},"page_port":NNNN}'
//
// The same approach as run.mjs, and the same page: serves page.html and the stompjs UMD bundle
// on http://127.0.0.1:<page_port> (an allowed origin of Lockstep), and answers the page's
// `import … from '/scenario.mjs'` with ../shared/resume_scenario.mjs, which exports the same
// runScenario/makeRedactor. Opens the page in Debian's Chromium through playwright-core (which
// never downloads browsers), calls window.__start(cfg) and waits for window.__result.
// Exit 0 after printing `OK {summary}` on stdout; exit 1 with `FAIL [chromium] …` on stderr.

import { readFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { makeRedactor, WAIT_MS } from '../shared/resume_scenario.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const RUN_MS = 120_000;

const stompMain = require.resolve('@stomp/stompjs');
const stompPkg = JSON.parse(readFileSync(path.join(path.dirname(stompMain), '..', 'package.json'), 'utf8'));
const ROUTES = {
  '/': { file: path.join(here, 'page.html'), type: 'text/html; charset=utf-8' },
  '/page.html': { file: path.join(here, 'page.html'), type: 'text/html; charset=utf-8' },
  '/stomp.umd.min.js': { file: path.join(path.dirname(stompMain), 'stomp.umd.min.js'), type: 'text/javascript; charset=utf-8' },
  '/scenario.mjs': { file: path.join(here, '..', 'shared', 'resume_scenario.mjs'), type: 'text/javascript; charset=utf-8' },
};

function startPageServer(port) {
  const server = http.createServer(async (req, res) => {
    const pathname = new URL(req.url, 'http://x').pathname;
    if (pathname === '/favicon.ico') {
      res.writeHead(204).end();
      return;
    }
    const route = ROUTES[pathname];
    if (req.method !== 'GET' || !route) {
      res.writeHead(route ? 405 : 404, { 'content-type': 'text/plain' }).end('no\n');
      return;
    }
    try {
      const body = await readFile(route.file);
      res.writeHead(200, { 'content-type': route.type, 'cache-control': 'no-store' }).end(body);
    } catch (e) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`cannot read ${route.file}: ${e.message}\n`);
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`cannot listen on 127.0.0.1:${port} for the page: ${e.message}`)));
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

async function main() {
  if (process.argv.length < 3) {
    process.stderr.write('usage: node browser/resume.mjs \'<json config>\'\n');
    return 1;
  }
  let cfg;
  try {
    cfg = JSON.parse(process.argv[2]);
  } catch (e) {
    process.stderr.write(`FAIL [chromium] config argument is not JSON: ${e.message}\n`);
    return 1;
  }
  const redact = makeRedactor(cfg.tokens);
  const err = (line) => process.stderr.write(`${redact(line)}\n`);
  if (!Number.isInteger(cfg.page_port) || cfg.page_port <= 0 || cfg.page_port > 65535) {
    err('FAIL [chromium] config: page_port must be a TCP port number');
    return 1;
  }

  let server;
  let browser;
  try {
    server = await startPageServer(cfg.page_port);
    const origin = `http://127.0.0.1:${cfg.page_port}`;
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      timeout: 30_000,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    const page = await browser.newPage();
    page.on('console', (msg) => {
      if (msg.type() === 'error' || msg.type() === 'warning') err(`[page console.${msg.type()}] ${msg.text()}`);
    });
    page.on('pageerror', (e) => err(`[page error] ${e.message}`));
    page.on('requestfailed', (req) => err(`[page request failed] ${req.method()} ${req.url()}: ${req.failure()?.errorText}`));

    const resp = await page.goto(`${origin}/`, { waitUntil: 'load', timeout: WAIT_MS });
    if (!resp || resp.status() !== 200) throw new Error(`page ${origin}/ answered ${resp ? resp.status() : 'nothing'}`);
    await page.waitForFunction(() => typeof window.__start === 'function', null, { timeout: WAIT_MS });

    const { page_port: _pagePort, ...pageCfg } = cfg;
    await page.evaluate((c) => window.__start(c), pageCfg);
    // Every wait in the scenario is bounded by WAIT_MS; this bounds the page as a whole.
    const budget = 4 * WAIT_MS;
    let result;
    try {
      const handle = await page.waitForFunction(() => window.__result, null, { timeout: budget, polling: 100 });
      result = await handle.jsonValue();
    } catch (e) {
      const partial = await page.evaluate(() => document.getElementById('status')?.textContent).catch(() => '?');
      throw new Error(`the page did not publish window.__result within ${budget} ms (page status: ${partial}): ${e.message.split('\n')[0]}`);
    }
    if (!result.ok) {
      err(`FAIL [chromium] ${result.error}`);
      if (result.stack) err(result.stack);
      err(`--- stompjs trace in the page (last ${(result.trace || []).length} lines) ---\n${(result.trace || []).join('\n')}`);
      return 1;
    }
    const summary = { ...result.summary, browser: browser.version(), stompjs: stompPkg.version };
    process.stdout.write(`OK ${JSON.stringify(summary)}\n`);
    return 0;
  } catch (e) {
    err(`FAIL [chromium] ${e && e.message ? e.message : e}`);
    return 1;
  } finally {
    if (browser) await browser.close().catch((e) => err(`closing the browser: ${e.message}`));
    if (server) {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  }
}

// Bound the whole run whatever happens (browser launch, hung page, …).
const watchdog = setTimeout(() => {
  process.stderr.write(`FAIL [chromium] whole run exceeded ${RUN_MS / 1000} s\n`);
  process.exit(1);
}, RUN_MS);

main().then((code) => {
  clearTimeout(watchdog);
  process.exit(code);
});
