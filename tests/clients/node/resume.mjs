#!/usr/bin/env node
// Lockstep resume (DESIGN §12: offsets, epochs, x-stream-offset on SUBSCRIBE) with the real
// @stomp/stompjs Client, run from Node.
//
//   node node/resume.mjs '{"http":"http://127.0.0.1:PORT","ws":"ws://127.0.0.1:PORT/ws",
//     "user":"ana","team":"t1","tokens":{"subscriber":"…","publisher":"…"}}'
//
// `publisher` needs scope publish for <team>; optional "heartbeat_ms" (default: no heart-beats).
// Exit 0 after printing `OK {summary}` on stdout; exit 1 with `FAIL [node] [step] reason` (and a
// stompjs trace) on stderr. The scenario is shared with the browser run: ../shared/resume_scenario.mjs;
// the Node harness is ../shared/node_harness.mjs.

import { WAIT_MS } from '../shared/common.mjs';
import { runScenarioInNode } from '../shared/node_harness.mjs';
import { runResumeScenario } from '../shared/resume_scenario.mjs';

runScenarioInNode({
  script: 'node/resume.mjs',
  configFail: 'FAIL [node]',
  scenario: runResumeScenario,
  // Every wait inside the scenario is bounded; this bounds the whole run (about 25 waits).
  overallMs: () => 4 * WAIT_MS,
  versions: { stompjs: '@stomp/stompjs' },
});
