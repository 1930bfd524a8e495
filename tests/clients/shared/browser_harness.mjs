// Harness of the headless Chromium runs (browser/run.mjs, browser/resume.mjs, browser/presign.mjs,
// browser/dashboard.mjs; browser/presence.mjs uses its parts).
//
// Serves a page and what it loads on http://127.0.0.1:<page_port> (an allowed origin of Lockstep
// in the harness, and of the storage server's CORS front for presign), opens it in Debian's
// Chromium through playwright-core (which never downloads browsers), copies the page's console
// errors and warnings, page errors and failed requests to stderr (redacted), calls
// window.__start(cfg) and waits for window.__result: {ok, summary} or {ok: false, error, stack?,
// trace}. Exit 0 after printing `OK {summary}` on stdout; exit 1 with `FAIL [chromium] …` on stderr.

import { readFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { configArg } from './node_harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const RUN_MS = 120_000;
const LOAD_MS = 10_000; // loading the page until it defines window.__start
const HTML = 'text/html; charset=utf-8';
const JS = 'text/javascript; charset=utf-8';

// The routes of browser/page.html running a shared stompjs scenario (a file in shared/, served as
// /scenario.mjs with the common.mjs it imports), and the stompjs version the page loads.
export function stompjsPage(scenarioFile) {
  const page = { file: path.join(here, '..', 'browser', 'page.html'), type: HTML };
  return {
    routes: {
      '/': page,
      '/page.html': page,
      '/scenario.mjs': { file: path.join(here, scenarioFile), type: JS },
      ...stompjsRoutes(),
    },
    stompjs: stompjsVersion(),
  };
}

// `require` resolves @stomp/stompjs to bundles/stomp.umd.js; the minified bundle sits beside it.
const stompMain = () => createRequire(import.meta.url).resolve('@stomp/stompjs');

// The routes every stompjs page loads: the UMD bundle (window.StompJs) and common.mjs.
export function stompjsRoutes() {
  return {
    '/stomp.umd.min.js': { file: path.join(path.dirname(stompMain()), 'stomp.umd.min.js'), type: JS },
    '/common.mjs': { file: path.join(here, 'common.mjs'), type: JS },
  };
}

function stompjsVersion() {
  return JSON.parse(readFileSync(path.join(path.dirname(stompMain()), '..', 'package.json'), 'utf8')).version;
}

// Debian's Chromium, headless, through playwright-core (which never downloads browsers).
export function launchChromium() {
  return chromium.launch({
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
}

// A page of its own (browser/<name>), served at / and /<name>.
export function singlePage(name) {
  const page = { file: path.join(here, '..', 'browser', name), type: HTML };
  return { '/': page, [`/${name}`]: page };
}

// Serves `routes` (pathname → {file, type}) on 127.0.0.1:`port`, read from disk on every request.
export function startPageServer(port, routes) {
  const server = http.createServer(async (req, res) => {
    const pathname = new URL(req.url, 'http://x').pathname;
    if (pathname === '/favicon.ico') {
      res.writeHead(204).end();
      return;
    }
    const route = routes[pathname];
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

async function main({ script, configFail, redactor, routes, budgetMs, traceName, extra = {} }) {
  const cfg = configArg(script, configFail);
  if (cfg === undefined) return 1;
  const redact = redactor(cfg);
  const err = (line) => process.stderr.write(`${redact(line)}\n`);
  if (!Number.isInteger(cfg.page_port) || cfg.page_port <= 0 || cfg.page_port > 65535) {
    err('FAIL [chromium] config: page_port must be a TCP port number');
    return 1;
  }

  let server;
  let browser;
  try {
    server = await startPageServer(cfg.page_port, routes);
    const origin = `http://127.0.0.1:${cfg.page_port}`;
    browser = await launchChromium();
    const page = await browser.newPage();
    page.on('console', (msg) => {
      if (msg.type() === 'error' || msg.type() === 'warning') err(`[page console.${msg.type()}] ${msg.text()}`);
    });
    page.on('pageerror', (e) => err(`[page error] ${e.message}`));
    page.on('requestfailed', (req) => err(`[page request failed] ${req.method()} ${req.url()}: ${req.failure()?.errorText}`));

    const resp = await page.goto(`${origin}/`, { waitUntil: 'load', timeout: LOAD_MS });
    if (!resp || resp.status() !== 200) throw new Error(`page ${origin}/ answered ${resp ? resp.status() : 'nothing'}`);
    await page.waitForFunction(() => typeof window.__start === 'function', null, { timeout: LOAD_MS });

    const { page_port: _pagePort, ...pageCfg } = cfg;
    await page.evaluate((c) => window.__start(c), pageCfg);
    const budget = budgetMs(cfg);
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
      err(`--- ${traceName} (last ${(result.trace || []).length} lines) ---\n${(result.trace || []).join('\n')}`);
      return 1;
    }
    const summary = { ...result.summary, browser: browser.version(), ...extra };
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

/**
 * Runs one page to its window.__result and exits.
 *
 * @param {object} o
 * @param {string} o.script       the script's path from tests/clients, for the usage line
 * @param {string} o.configFail   how a config that is not JSON is reported ('FAIL' or 'FAIL [chromium]')
 * @param {Function} o.redactor   cfg → (line → line without its secrets), for everything on stderr
 * @param {object} o.routes       pathname → {file, type}; the page is '/'
 * @param {Function} o.budgetMs   cfg → how long the page may take to publish window.__result
 * @param {string} o.traceName    heading of the page's trace printed with a failure
 * @param {object} [o.extra]      added to the page's summary, after `browser`
 */
export function runPage(o) {
  // Bound the whole run whatever happens (browser launch, hung page, …).
  const watchdog = setTimeout(() => {
    process.stderr.write(`FAIL [chromium] whole run exceeded ${RUN_MS / 1000} s\n`);
    process.exit(1);
  }, RUN_MS);
  main(o).then((code) => {
    clearTimeout(watchdog);
    process.exit(code);
  });
}
