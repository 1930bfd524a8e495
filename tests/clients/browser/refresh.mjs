#!/usr/bin/env node
// Token refresh over the open socket and the control API's unsubscribe (DESIGN §15) with the
// real @stomp/stompjs, run inside headless Chromium: the same page and harness as resume.mjs,
// with ../shared/refresh_scenario.mjs as the page's /scenario.mjs. Exit 0 after printing
// `OK {summary}` on stdout; exit 1 with `FAIL [chromium] …` on stderr.

import { makeRedactor, WAIT_MS } from '../shared/common.mjs';
import { runPage, stompjsPage } from '../shared/browser_harness.mjs';

const { routes, stompjs } = stompjsPage('refresh_scenario.mjs');

runPage({
  script: 'browser/refresh.mjs',
  configFail: 'FAIL [chromium]',
  redactor: (cfg) => makeRedactor(cfg.tokens),
  routes,
  budgetMs: (cfg) => Math.max(0, cfg.expires[2] * 1000 - Date.now()) + 4 * WAIT_MS,
  traceName: 'stompjs trace in the page',
  extra: { stompjs },
});
