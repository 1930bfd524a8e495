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
// never downloads browsers), calls window.__start(cfg) and waits for window.__result
// (../shared/browser_harness.mjs). Exit 0 after printing `OK {summary}` on stdout; exit 1 with
// `FAIL [chromium] …` on stderr.

import { makeRedactor, WAIT_MS } from '../shared/common.mjs';
import { runPage, stompjsPage } from '../shared/browser_harness.mjs';

const { routes, stompjs } = stompjsPage('resume_scenario.mjs');

runPage({
  script: 'browser/resume.mjs',
  configFail: 'FAIL [chromium]',
  redactor: (cfg) => makeRedactor(cfg.tokens),
  routes,
  // Every wait in the scenario is bounded by WAIT_MS; this bounds the page as a whole.
  budgetMs: () => 4 * WAIT_MS,
  traceName: 'stompjs trace in the page',
  extra: { stompjs },
});
