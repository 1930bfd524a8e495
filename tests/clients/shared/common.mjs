// What the stompjs scenarios (scenario.mjs, resume_scenario.mjs) and their runners share.
//
// The scenarios run in Node and inside headless Chromium, where the browser runners serve this
// file as /common.mjs beside /scenario.mjs (so that the scenario's `import … from
// './common.mjs'` resolves). It therefore imports nothing and uses only what both platforms have.

// The bound of every wait in a scenario (connect, receipts, messages, HTTP).
export const WAIT_MS = 10_000;

export const ISO_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

// A failed expectation: reported by its message alone, without a stack.
export class ScenarioFailure extends Error {
  constructor(message) {
    super(message);
    this.name = 'ScenarioFailure';
  }
}

// Replaces the tokens in trace lines so failure output never carries them.
export function makeRedactor(tokens) {
  const pairs = Object.entries(tokens || {}).filter(([, v]) => typeof v === 'string' && v.length > 8);
  return (line) => {
    let s = String(line);
    for (const [k, v] of pairs) s = s.split(v).join(`<${k}-token>`);
    return s.replace(/(passcode:|authorization:\s*bearer\s+)[^\s\x00]+/gi, '$1<redacted>');
  };
}

// On the way out of a scenario: force-closes every connection ({client, closing}) that is not
// already closing, so that a failure leaves no socket open.
export function forceClose(conns) {
  for (const c of conns) {
    if (!c.closing) {
      c.closing = true;
      try {
        void c.client.deactivate({ force: true });
      } catch (_) {
        // best effort on the failure path
      }
    }
  }
}
