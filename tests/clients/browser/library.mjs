#!/usr/bin/env node
// @lockstep/client (clients/js) inside headless Chromium with the real @stomp/stompjs UMD
// bundle: browser/page.html runs ../shared/library_scenario.mjs as /scenario.mjs, which imports
// clients/js/src/index.js, served unchanged as /lockstep.js (no build step). Exit 0 after
// printing `OK {summary}` on stdout; exit 1 with `FAIL [chromium] …` on stderr.

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeRedactor, WAIT_MS } from '../shared/common.mjs';
import { runPage, stompjsPage } from '../shared/browser_harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const JS = 'text/javascript; charset=utf-8';
const { routes, stompjs } = stompjsPage('library_scenario.mjs');

runPage({
  script: 'browser/library.mjs',
  configFail: 'FAIL [chromium]',
  redactor: (cfg) => makeRedactor(cfg.tokens),
  routes: {
    ...routes,
    '/lockstep.js': { file: path.join(here, '..', '..', '..', 'clients', 'js', 'src', 'index.js'), type: JS },
  },
  budgetMs: (cfg) => Math.max(0, cfg.expires[2] * 1000 - Date.now()) + 6 * WAIT_MS,
  traceName: 'stompjs trace in the page',
  extra: { stompjs },
});
