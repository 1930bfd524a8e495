#!/usr/bin/env node
// Token refresh over the open socket and the control API's unsubscribe (DESIGN §15) with the
// real @stomp/stompjs Client, run from Node. The scenario and its config are
// ../shared/refresh_scenario.mjs. Exit 0 after printing `OK {summary}` on stdout; exit 1 with
// `FAIL [node] [step] reason` (and a stompjs trace) on stderr.

import { WAIT_MS } from '../shared/common.mjs';
import { runScenarioInNode } from '../shared/node_harness.mjs';
import { runRefreshScenario } from '../shared/refresh_scenario.mjs';

runScenarioInNode({
  script: 'node/refresh.mjs',
  configFail: 'FAIL [node]',
  scenario: runRefreshScenario,
  // The run lasts until past the third token's exp, then a few bounded waits.
  overallMs: (cfg) => Math.max(0, cfg.expires[2] * 1000 - Date.now()) + 4 * WAIT_MS,
  versions: { stompjs: '@stomp/stompjs' },
});
