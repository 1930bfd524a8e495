#!/usr/bin/env node
// Lockstep conformance with the real @stomp/stompjs, run inside headless Chromium.
//
//   node browser/run.mjs '{"http":"http://127.0.0.1:PORT","ws":"ws://127.0.0.1:PORT/ws",
//     "user":"ana","team":"t1","tokens":{"subscriber":"…","publisher":"…","sender":"…"},
//     "heartbeat_ms":500,"page_port":NNNN}'
//
// Serves page.html, the stompjs UMD bundle and the shared scenario on http://127.0.0.1:<page_port>
// (Lockstep's allowed origin in the harness), opens the page in Debian's Chromium through
// playwright-core (which never downloads browsers), runs the scenario in the page and waits for
// window.__result (../shared/browser_harness.mjs). Exit 0 after printing `OK {summary}` on stdout;
// exit 1 with the reason on stderr.

import { makeRedactor, WAIT_MS } from '../shared/common.mjs';
import { runPage, stompjsPage } from '../shared/browser_harness.mjs';

const { routes, stompjs } = stompjsPage('scenario.mjs');

runPage({
  script: 'browser/run.mjs',
  configFail: 'FAIL',
  redactor: (cfg) => makeRedactor(cfg.tokens),
  routes,
  budgetMs: (cfg) => 3 * WAIT_MS + (cfg.heartbeat_ms || 0) * 4 + 500,
  traceName: 'stompjs trace in the page',
  extra: { stompjs },
});
