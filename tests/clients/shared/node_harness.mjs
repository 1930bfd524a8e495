// Harness code of the Node-side scripts: node/stompjs.mjs and node/resume.mjs (a shared stompjs
// scenario run from Node), node/flood.mjs, and the config argument of the browser runners.
// Node only (unlike common.mjs, never served to a page).

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Client } from '@stomp/stompjs';
import { WebSocket } from 'ws';
import { makeRedactor } from './common.mjs';

// Node 20 has no global WebSocket; stompjs opens `new WebSocket(brokerURL, ['v12.stomp', …])`.
export function useWsAsWebSocket() {
  Object.assign(globalThis, { WebSocket });
}

// The installed version of a package, for the OK summary ('unknown' when not found).
export function packageVersion(name) {
  try {
    let dir = createRequire(import.meta.url).resolve(name);
    // walk up to the package root
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

// The JSON config, the only argument; undefined once the usage line, or `<failPrefix> config
// argument is not JSON: …`, is on stderr.
export function configArg(script, failPrefix) {
  if (process.argv.length < 3) {
    process.stderr.write(`usage: node ${script} '<json config>'\n`);
    return undefined;
  }
  try {
    return JSON.parse(process.argv[2]);
  } catch (e) {
    process.stderr.write(`${failPrefix} config argument is not JSON: ${e.message}\n`);
    return undefined;
  }
}

// The last `max` lines of the stompjs debug output, redacted and time-stamped (each cut at
// `width` characters when given), printed with a failure.
export function makeTrace(redact, max, width) {
  const lines = [];
  const log = (line) => {
    const text = redact(line);
    lines.push(`${new Date().toISOString()} ${width ? text.slice(0, width) : text}`);
    if (lines.length > max) lines.shift();
  };
  return { lines, log };
}

// Runs main() and exits with the code it resolves to; a stray rejection is a failure too.
export function runMain(main) {
  process.on('unhandledRejection', (e) => {
    process.stderr.write(`FAIL [node] unhandled rejection: ${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
  });
  main().then((code) => process.exit(code));
}

/**
 * A shared stompjs scenario (../shared/scenario.mjs, resume_scenario.mjs) run from Node with the
 * real @stomp/stompjs Client and `ws`: `OK {summary}` on stdout and exit 0, or `FAIL [node] …`
 * and the redacted stompjs trace on stderr and exit 1.
 *
 * @param {object} o
 * @param {string} o.script        the script's path from tests/clients, for the usage line
 * @param {string} o.configFail    how a config that is not JSON is reported ('FAIL' or 'FAIL [node]')
 * @param {Function} o.scenario    runScenario({Client, cfg, fetch, log, platform}) → summary
 * @param {Function} o.overallMs   cfg → the bound of the whole run
 * @param {object} o.versions      summary key → package whose version it reports
 */
export function runScenarioInNode({ script, configFail, scenario, overallMs, versions }) {
  useWsAsWebSocket();
  runMain(async () => {
    const cfg = configArg(script, configFail);
    if (cfg === undefined) return 1;
    const redact = makeRedactor(cfg.tokens);
    const { lines: trace, log } = makeTrace(redact, 300);

    // Belt and braces: every wait inside the scenario is bounded, this bounds the whole run.
    const ms = overallMs(cfg);
    const watchdog = setTimeout(() => {
      process.stderr.write(`FAIL [node] whole scenario exceeded ${ms} ms\n--- stompjs trace ---\n${trace.join('\n')}\n`);
      process.exit(1);
    }, ms);

    try {
      const summary = await scenario({ Client, cfg, fetch: globalThis.fetch, log, platform: 'node' });
      summary.node = process.version;
      for (const [key, name] of Object.entries(versions)) summary[key] = packageVersion(name);
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
  });
}
