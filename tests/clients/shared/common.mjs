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

// A value as JSON for a failure message, cut after `max` characters.
export function showJson(value, max) {
  const s = JSON.stringify(value);
  return s === undefined ? String(value) : s.length > max ? `${s.slice(0, max)}…` : s;
}

// Whether obj is a plain object with exactly these keys.
export function sameKeys(obj, keys) {
  return !!obj && typeof obj === 'object' && !Array.isArray(obj) && Object.keys(obj).sort().join(',') === [...keys].sort().join(',');
}

// A stompjs Client whose every unexpected event trips the waits with a precise message.
// `show` renders values in those messages; trace lines longer than `traceWidth` are cut.
export function makeConn({ Client, cfg, name, token, waits, log, show, traceWidth = Infinity }) {
  const conn = {
    name,
    client: null,
    closing: false,
    connectedFrame: null,
    disconnectReceipt: null,
    closeEvent: null,
    receipts: new Set(),
  };
  const hb = Number.isInteger(cfg.heartbeat_ms) && cfg.heartbeat_ms > 0 ? cfg.heartbeat_ms : 0;
  const client = new Client({
    brokerURL: cfg.ws,
    connectHeaders: { passcode: token },
    heartbeatIncoming: hb,
    heartbeatOutgoing: hb,
    reconnectDelay: 0,
    debug: (line) => log(`[${name}] ${line.length > traceWidth ? `${line.slice(0, traceWidth)}…` : line}`),
  });
  client.onConnect = (frame) => {
    conn.connectedFrame = frame;
    waits.changed();
  };
  client.onStompError = (frame) => {
    waits.trip(`${name}: server sent an ERROR frame: headers=${show(frame.headers || {})} body=${show(frame.body)}`);
  };
  client.onWebSocketClose = (evt) => {
    conn.closeEvent = { code: evt && evt.code, reason: evt && evt.reason };
    if (!conn.closing) {
      const when = conn.connectedFrame ? 'after CONNECTED' : 'before any CONNECTED frame (upgrade refused? Origin allow-list, token, URL)';
      waits.trip(`${name}: WebSocket closed unexpectedly ${when}: code=${evt && evt.code} reason=${show(evt && evt.reason)}`);
    }
    waits.changed();
  };
  client.onWebSocketError = (evt) => log(`[${name}] WebSocket error event: ${(evt && (evt.message || evt.type)) || evt}`);
  client.onDisconnect = (frame) => {
    if (conn.closing) conn.disconnectReceipt = frame;
    else waits.trip(`${name}: RECEIPT for a DISCONNECT we did not send: ${show(frame.headers)}`);
    waits.changed();
  };
  client.onHeartbeatLost = () => waits.trip(`${name}: stompjs saw no server activity for 2 heart-beat intervals`);
  client.onUnhandledMessage = (msg) =>
    waits.trip(`${name}: MESSAGE for a subscription we do not have: headers=${show(msg.headers)} body=${show(msg.body)}`);
  client.onUnhandledReceipt = (frame) => waits.trip(`${name}: RECEIPT nobody asked for: ${show(frame.headers)}`);
  client.onUnhandledFrame = (frame) =>
    waits.trip(`${name}: unexpected ${frame.command} frame: headers=${show(frame.headers)} body=${show(frame.body)}`);
  conn.client = client;
  return conn;
}
