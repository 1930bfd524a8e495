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

// Pending waits of a scenario: the first fatal event (ERROR frame, unexpected close, …) fails
// every one of them at once; `changed()` re-evaluates the conditions waited for.
export class Waits {
  // step(): the scenario's current step, named in every failure.
  constructor(step) {
    this.step = step;
    this.error = null;
    this.checks = new Set();
  }

  trip(message) {
    if (this.error) return;
    this.error = new ScenarioFailure(`[${this.step()}] ${message}`);
    this.changed();
  }

  changed() {
    for (const c of [...this.checks]) c();
  }

  // Resolves when pred() holds; rejects on a trip or after `ms` (what: string or function).
  until(pred, what, ms = WAIT_MS) {
    return new Promise((resolve, reject) => {
      let timer;
      const done = () => {
        clearTimeout(timer);
        this.checks.delete(check);
      };
      const check = () => {
        if (this.error) {
          done();
          reject(this.error);
        } else if (pred()) {
          done();
          resolve();
        }
      };
      timer = setTimeout(() => {
        done();
        const name = typeof what === 'function' ? what() : what;
        reject(new ScenarioFailure(`[${this.step()}] timed out after ${ms} ms waiting for ${name}`));
      }, ms);
      this.checks.add(check);
      check();
    });
  }

  // Waits for a promise, at most `ms`, failing early on a trip.
  wait(promise, what, ms = WAIT_MS) {
    let settled = false;
    let value;
    let error = null;
    Promise.resolve(promise).then(
      (v) => {
        settled = true;
        value = v;
        this.changed();
      },
      (e) => {
        settled = true;
        error = e || new Error('rejected');
        this.changed();
      },
    );
    return this.until(() => settled, what, ms).then(() => {
      if (error) throw error;
      return value;
    });
  }
}

// Whether obj is a plain object with exactly these keys.
export function sameKeys(obj, keys) {
  return !!obj && typeof obj === 'object' && !Array.isArray(obj) && Object.keys(obj).sort().join(',') === [...keys].sort().join(',');
}
