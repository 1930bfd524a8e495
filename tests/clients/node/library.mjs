#!/usr/bin/env node
// @lockstep/client (clients/js) from Node with the real @stomp/stompjs Client and `ws`: the
// scenario is ../shared/library_scenario.mjs. Exit 0 after printing `OK {summary}` on stdout;
// exit 1 with `FAIL [node] [step] reason` (and a stompjs trace) on stderr.

import { WAIT_MS } from '../shared/common.mjs';
import { runScenarioInNode } from '../shared/node_harness.mjs';
import { runScenario } from '../shared/library_scenario.mjs';

runScenarioInNode({
  script: 'node/library.mjs',
  configFail: 'FAIL [node]',
  scenario: runScenario,
  overallMs: (cfg) => Math.max(0, cfg.expires[2] * 1000 - Date.now()) + 6 * WAIT_MS,
  versions: { stompjs: '@stomp/stompjs' },
});
