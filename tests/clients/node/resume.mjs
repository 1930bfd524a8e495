#!/usr/bin/env node
// Lockstep resume (DESIGN §12: offsets, epochs, x-stream-offset on SUBSCRIBE) with the real
// @stomp/stompjs Client, run from Node.
//
//   node node/resume.mjs '{"http":"http://127.0.0.1:PORT","ws":"ws://127.0.0.1:PORT/ws",
//     "user":"ana","team":"t1","tokens":{"subscriber":"…","publisher":"…"}}'
//
// `publisher` needs scope publish for <team>; optional "heartbeat_ms" (default: no heart-beats).
// Exit 0 after printing `OK {summary}` on stdout; exit 1 with `FAIL [node] [step] reason` (and a
// stompjs trace) on stderr. The scenario is shared with the browser run: ../shared/resume_scenario.mjs.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Client } from '@stomp/stompjs';
import { WebSocket } from 'ws';
import { runResumeScenario, makeRedactor, WAIT_MS } from '../shared/resume_scenario.mjs';

// Node 20 has no global WebSocket; stompjs opens `new WebSocket(brokerURL, ['v12.stomp', …])`.
Object.assign(globalThis, { WebSocket });

const TRACE_LINES = 300;

function packageVersion(name) {
  try {
    const require = createRequire(import.meta.url);
    let dir = require.resolve(name);
    for (let i = 0; i < 6; i++) {
      dir = dir.slice(0, dir.lastIndexOf('/'));
      try {
        const pkg = JSON.parse(readFileSync(`${dir}/package.json`, 'utf8'));
        if (pkg.name === name) return pkg.version;
      } catch (_) {
        // keep walking
      }
    }
  } catch (_) {
    // unknown
  }
  return 'unknown';
}

async function main() {
  if (process.argv.length < 3) {
    process.stderr.write('usage: node node/resume.mjs \'<json config>\'\n');
    return 1;
  }
  let cfg;
  try {
    cfg = JSON.parse(process.argv[2]);
  } catch (e) {
    process.stderr.write(`FAIL [node] config argument is not JSON: ${e.message}\n`);
    return 1;
  }
  const redact = makeRedactor(cfg.tokens);
  const trace = [];
  const log = (line) => {
    trace.push(`${new Date().toISOString()} ${redact(line)}`);
    if (trace.length > TRACE_LINES) trace.shift();
  };

  // Every wait inside the scenario is bounded; this bounds the whole run (about 25 waits).
  const overallMs = 4 * WAIT_MS;
  const watchdog = setTimeout(() => {
    process.stderr.write(`FAIL [node] whole scenario exceeded ${overallMs} ms\n--- stompjs trace ---\n${trace.join('\n')}\n`);
    process.exit(1);
  }, overallMs);

  try {
    const summary = await runResumeScenario({ Client, cfg, fetch: globalThis.fetch, log, platform: 'node' });
    summary.node = process.version;
    summary.stompjs = packageVersion('@stomp/stompjs');
    process.stdout.write(`OK ${JSON.stringify(summary)}\n`);
    return 0;
  } catch (e) {
    process.stderr.write(`FAIL [node] ${redact(e && e.message ? e.message : e)}\n`);
    if (e && e.name !== 'ScenarioFailure' && e.stack) process.stderr.write(`${redact(e.stack)}\n`);
    process.stderr.write(`--- stompjs trace (last ${trace.length} lines) ---\n${trace.join('\n')}\n`);
    return 1;
  } finally {
    clearTimeout(watchdog);
  }
}

process.on('unhandledRejection', (e) => {
  process.stderr.write(`FAIL [node] unhandled rejection: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});

main().then((code) => process.exit(code));
