#!/usr/bin/env node
// Lockstep conformance with the real @stomp/stompjs Client, run from Node.
//
//   node node/stompjs.mjs '{"http":"http://127.0.0.1:PORT","ws":"ws://127.0.0.1:PORT/ws",
//     "user":"ana","team":"t1","tokens":{"subscriber":"…","publisher":"…","sender":"…"},
//     "heartbeat_ms":500}'
//
// Exit 0 after printing `OK {summary}` on stdout; exit 1 with the reason (and a stompjs trace) on
// stderr. The scenario itself is shared with the browser run: ../shared/scenario.mjs; the Node
// harness (config, `ws` as the WebSocket, watchdog, reporting) is ../shared/node_harness.mjs.

import { WAIT_MS } from '../shared/common.mjs';
import { runScenarioInNode } from '../shared/node_harness.mjs';
import { runScenario } from '../shared/scenario.mjs';

runScenarioInNode({
  script: 'node/stompjs.mjs',
  configFail: 'FAIL',
  scenario: runScenario,
  overallMs: (cfg) => 8 * WAIT_MS + (cfg.heartbeat_ms || 0) * 4 + 500,
  versions: { stompjs: '@stomp/stompjs', ws: 'ws' },
});
