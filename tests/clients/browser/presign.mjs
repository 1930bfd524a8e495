#!/usr/bin/env node
// Presigned object access from a real browser: headless Chromium reads and writes objects
// directly in S3-compatible storage with URLs signed by Lockstep, across three origins.
//
//   node browser/presign.mjs '{"http":"http://127.0.0.1:PORT","team":"t1","token":"…",
//     "read":{"item":"scan-9","names":["frames/000000.bin",…],"sizes":[1,…],"seed":N},
//     "write":{"item":"result-1","name":"checks/result.json","content_type":"application/json"},
//     "page_port":NNNN}'
//
// Serves presign.html on http://127.0.0.1:<page_port> (Lockstep's allowed origin in the
// harness; the storage server's CORS front allows it too), opens it in Debian's Chromium through
// playwright-core (which never downloads browsers), runs the page's scenario and waits for
// window.__result. The page: one batch of GET URLs from Lockstep, all objects fetched in
// parallel from the storage server and checked byte for byte, then the item lock, a PUT URL,
// the upload of a result file and its commit. Exit 0 after printing `OK {summary}` on stdout
// (the summary carries the uploaded text, which the Rust test compares with the stored object);
// exit 1 with the reason on stderr.

import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { makeRedactor } from '../shared/scenario.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const PAGE = path.join(here, 'presign.html');
const RUN_MS = 60_000;

function startPageServer(port) {
  const server = http.createServer(async (req, res) => {
    const pathname = new URL(req.url, 'http://x').pathname;
    if (pathname === '/favicon.ico') {
      res.writeHead(204).end();
      return;
    }
    if (req.method !== 'GET' || (pathname !== '/' && pathname !== '/presign.html')) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('no\n');
      return;
    }
    try {
      const body = await readFile(PAGE);
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' }).end(body);
    } catch (e) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`cannot read ${PAGE}: ${e.message}\n`);
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`cannot listen on 127.0.0.1:${port} for the page: ${e.message}`)));
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

async function main() {
  if (process.argv.length < 3) {
    process.stderr.write('usage: node browser/presign.mjs \'<json config>\'\n');
    return 1;
  }
  let cfg;
  try {
    cfg = JSON.parse(process.argv[2]);
  } catch (e) {
    process.stderr.write(`FAIL config argument is not JSON: ${e.message}\n`);
    return 1;
  }
  // Tokens and signatures stay out of the output.
  const redact = (line) => makeRedactor({ page: cfg.token })(line).replace(/(X-Amz-Signature=)[0-9a-f]+/g, '$1<redacted>');
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

    const resp = await page.goto(`${origin}/`, { waitUntil: 'load', timeout: 10_000 });
    if (!resp || resp.status() !== 200) throw new Error(`page ${origin}/ answered ${resp ? resp.status() : 'nothing'}`);
    await page.waitForFunction(() => typeof window.__start === 'function', null, { timeout: 10_000 });

    const { page_port: _pagePort, ...pageCfg } = cfg;
    await page.evaluate((c) => window.__start(c), pageCfg);
    let result;
    try {
      const handle = await page.waitForFunction(() => window.__result, null, { timeout: RUN_MS, polling: 100 });
      result = await handle.jsonValue();
    } catch (e) {
      const partial = await page.evaluate(() => document.getElementById('status')?.textContent).catch(() => '?');
      throw new Error(`the page did not publish window.__result within ${RUN_MS} ms (page status: ${partial}): ${e.message.split('\n')[0]}`);
    }
    if (!result.ok) {
      err(`FAIL [chromium] ${result.error}`);
      err(`--- page trace (last ${(result.trace || []).length} lines) ---\n${(result.trace || []).join('\n')}`);
      return 1;
    }
    const summary = { ...result.summary, browser: browser.version() };
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
  process.stderr.write('FAIL [chromium] whole run exceeded 120 s\n');
  process.exit(1);
}, 120_000);

main().then((code) => {
  clearTimeout(watchdog);
  process.exit(code);
});
