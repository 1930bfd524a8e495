// @lockstep/client: a small client for Lockstep (DESIGN §12-§16) on @stomp/stompjs.
//
// No build step: an ES module that runs as is in browsers and in Node 20+. It does not import
// stompjs itself (a bare `import '@stomp/stompjs'` needs a bundler or an import map in a
// browser): pass its `Client` class, or load the UMD bundle so `globalThis.StompJs` exists.
//
// What it adds to stompjs:
// - subscriptions that survive reconnects: each keeps the offset and epoch of the last event it
//   delivered and resubscribes with `x-stream-offset:offset=<n>` + `x-stream-epoch`, so the
//   handler sees every event once, in order, across any number of reconnects; when the server
//   says it could not (`x-recovered:false`, or `lockstep.reset` mid-stream) `onReset` is called
//   with the new position and the app reloads its state;
// - a token provider called before every connect and again before the token's `exp`, whose
//   new token is sent over the open socket (`SEND /lockstep/token`), so a long-lived tab never
//   reconnects for a token;
// - `lock(team, item)`: acquired with the connection's session (released by the server soon
//   after the socket closes), renewed before it expires, loss reported, released;
// - `presence(topic)` and plain HTTP helpers that carry the current token.

const SUBSCRIBED = 'lockstep.subscribed';
const RESET = 'lockstep.reset';
const UNSUBSCRIBED = 'lockstep.unsubscribed';
const TOKEN_DESTINATION = '/lockstep/token';

/** The claims of a JWT (its payload, not verified); {} when it is not a JWT. */
export function tokenClaims(token) {
  const part = String(token).split('.')[1];
  if (!part) return {};
  try {
    return JSON.parse(atob(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=')));
  } catch (_) {
    return {};
  }
}

/** The `exp` claim of a JWT, in ms since the epoch; null when it has none or is not a JWT. */
export function tokenExpiry(token) {
  const exp = tokenClaims(token).exp;
  return typeof exp === 'number' ? exp * 1000 : null;
}

/** An error of the HTTP API: `status` and the API's `code` (e.g. `lock_held`, `lock_lost`). */
export class LockstepError extends Error {
  constructor(status, code, message, body) {
    super(`${status} ${code}: ${message}`);
    this.name = 'LockstepError';
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

/** One subscription; created by `Lockstep.subscribe`. */
class Subscription {
  constructor(owner, topic, handler, options) {
    this.owner = owner;
    this.topic = topic;
    this.handler = handler;
    this.options = options;
    this.id = `ls-${owner.nextId++}`;
    /** Offset and epoch of the last event handed to the handler (null until the first). */
    this.offset = null;
    this.epoch = null;
    this.active = true;
    this.stomp = null;
  }

  /** The headers of the next SUBSCRIBE: the asked start the first time, a resume after. */
  headers() {
    // A receipt, so a refused SUBSCRIBE (its ERROR names it) ends this subscription instead of
    // being sent again after every reconnect.
    this.receipt = `${this.id}-r${this.owner.nextId++}`;
    const h = { id: this.id, receipt: this.receipt };
    if (this.offset !== null && this.epoch !== null) {
      h['x-stream-offset'] = `offset=${this.offset}`;
      h['x-stream-epoch'] = this.epoch;
    } else {
      h['x-stream-offset'] = this.options.from || 'next';
    }
    if (this.options.presence === false) h['x-presence'] = 'false';
    return h;
  }

  /** (Re)subscribes on the current connection. */
  open(stomp) {
    const resuming = this.offset !== null;
    this.resuming = resuming;
    this.resumedFrom = resuming ? { offset: this.offset, epoch: this.epoch } : null;
    this.stomp = stomp.subscribe(this.topic, (message) => this.onMessage(message), this.headers());
  }

  /** The server refused the SUBSCRIBE (its ERROR closes the connection): final. */
  refused(message) {
    this.active = false;
    this.owner.subscriptions.delete(this);
    this.call(this.options.onEnd, { reason: 'refused', message });
  }

  onMessage(message) {
    const h = message.headers;
    const type = h['event-type'];
    const offset = Number(h['x-stream-offset']);
    const epoch = h['x-stream-epoch'];
    if (type === SUBSCRIBED) {
      const recovered = h['x-recovered'] === 'true';
      const position = { offset, epoch, recovered, resumedFrom: this.resumedFrom };
      if (this.resuming && !recovered) {
        // Nothing missed is coming: live events continue after `offset`.
        this.offset = offset;
        this.epoch = epoch;
        this.call(this.options.onReset, { ...position, reason: 'not_recovered' });
      } else if (this.offset === null) {
        // A fresh subscription starts from the position the server states.
        this.offset = offset;
        this.epoch = epoch;
      }
      this.call(this.options.onSubscribed, position);
      return;
    }
    if (type === RESET) {
      // The node could not fill a gap in the topic: continue from the stated position.
      let data = {};
      try {
        data = JSON.parse(message.body).data || {};
      } catch (_) {
        // The headers carry the position too.
      }
      this.offset = Number.isFinite(data.offset) ? data.offset : offset;
      this.epoch = data.epoch || epoch;
      this.call(this.options.onReset, { offset: this.offset, epoch: this.epoch, recovered: false, reason: 'reset' });
      return;
    }
    if (type === UNSUBSCRIBED) {
      // The server ended it (control API, or a refreshed token no longer allows it): final.
      this.active = false;
      this.owner.subscriptions.delete(this);
      let data = {};
      try {
        data = JSON.parse(message.body).data || {};
      } catch (_) {
        // No reason then.
      }
      this.call(this.options.onEnd, { reason: data.reason || 'unsubscribed' });
      return;
    }
    // Snapshot frames are state: keyed, each the latest of its key, at or below the position.
    const snapshot = h['x-snapshot'] === 'true';
    if (!snapshot && epoch === this.epoch && this.offset !== null && offset <= this.offset) {
      // Already delivered (a server never sends it twice; this makes it impossible).
      return;
    }
    if (!snapshot && Number.isFinite(offset)) {
      this.offset = offset;
      this.epoch = epoch;
    }
    let event;
    try {
      event = JSON.parse(message.body);
    } catch (_) {
      event = { type, topic: this.topic, data: message.body };
    }
    const conflated = h['x-conflated'] ? Number(h['x-conflated']) : 0;
    this.call(this.handler, event, { offset, epoch, snapshot, conflated, headers: h });
  }

  call(fn, ...args) {
    if (typeof fn !== 'function') return;
    try {
      fn(...args);
    } catch (e) {
      this.owner.report(e);
    }
  }

  /** Ends the subscription (no resume). */
  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.owner.subscriptions.delete(this);
    if (this.stomp && this.owner.stomp.connected) this.stomp.unsubscribe();
  }

  /** Where the subscription stands: resume from here after a page reload (keep it in storage). */
  position() {
    return { offset: this.offset, epoch: this.epoch };
  }
}

/** An edit lock held by this client; created by `Lockstep.lock`. */
class Lock {
  constructor(owner, team, item, grant, options) {
    this.owner = owner;
    this.team = team;
    this.item = item;
    this.options = options;
    this.token = grant.token;
    this.held = true;
    this.granted(grant);
  }

  /**
   * A grant or renewal answered. Its lifetime is taken from the server's own times
   * (`expires_at - acquired_at` the first time, then the asked TTL), measured from when the
   * answer arrived: the browser's clock never decides when to renew.
   */
  granted(grant) {
    if (!this.ttl) {
      this.ttl = this.options.ttlMs || Math.max(1000, Date.parse(grant.expires_at) - Date.parse(grant.acquired_at));
    }
    this.deadline = Date.now() + this.ttl;
    this.expiresAt = Date.parse(grant.expires_at);
    this.schedule();
  }

  get path() {
    return `/api/v1/teams/${encodeURIComponent(this.team)}/items/${encodeURIComponent(this.item)}/lock`;
  }

  /** Renews at two thirds of the lifetime, so a slow renewal still lands in time. */
  schedule() {
    clearTimeout(this.timer);
    if (!this.held || this.owner.closed) return;
    this.timer = setTimeout(() => this.renew().catch(() => {}), Math.max(100, (this.ttl * 2) / 3));
  }

  /** Renews now. Rejects (and reports the loss) when the grant is over. */
  async renew() {
    if (!this.held) throw new LockstepError(410, 'lock_lost', 'released');
    try {
      const body = { token: this.token };
      if (this.options.ttlMs) body.ttl_ms = this.options.ttlMs;
      const grant = await this.owner.api('PUT', this.path, body);
      if (!this.held) return grant;
      this.granted(grant);
      if (typeof this.options.onRenewed === 'function') this.options.onRenewed(this);
      return grant;
    } catch (e) {
      if (e instanceof LockstepError && (e.status === 410 || e.status === 409)) {
        this.lost(e.code);
      } else {
        // The API is away: try again soon while the grant may still be live.
        clearTimeout(this.timer);
        if (Date.now() < this.deadline) {
          if (this.held && !this.owner.closed) this.timer = setTimeout(() => this.renew().catch(() => {}), 1000);
        } else {
          this.lost('expired');
        }
      }
      throw e;
    }
  }

  lost(reason) {
    if (!this.held) return;
    this.held = false;
    clearTimeout(this.timer);
    this.owner.locks.delete(this);
    if (typeof this.options.onLost === 'function') {
      try {
        this.options.onLost({ team: this.team, item: this.item, token: this.token, reason });
      } catch (e) {
        this.owner.report(e);
      }
    }
  }

  /**
   * A new connection: bind the lock to its session (the server releases a lock a few seconds
   * after its session's socket closed). The holder asking again keeps the token; another token
   * means the grant was lost meanwhile.
   */
  async rebind(session) {
    if (!this.held) return;
    try {
      const body = { session };
      if (this.options.ttlMs) body.ttl_ms = this.options.ttlMs;
      const grant = await this.owner.api('POST', this.path, body);
      if (!this.held) return;
      if (grant.token !== this.token) {
        // Granted again, but as a new grant: the old one (whose token the app holds) is over.
        this.lost('lock_lost');
        await this.owner.api('DELETE', `${this.path}?token=${grant.token}`).catch(() => {});
        return;
      }
      this.granted(grant);
    } catch (e) {
      if (e instanceof LockstepError && (e.status === 409 || e.status === 410)) this.lost(e.code);
      else this.owner.report(e);
    }
  }

  /** Releases the lock (idempotent). */
  async release() {
    if (!this.held) return;
    this.held = false;
    clearTimeout(this.timer);
    this.owner.locks.delete(this);
    await this.owner.api('DELETE', `${this.path}?token=${this.token}`);
  }
}

/**
 * A Lockstep connection: one WebSocket (STOMP 1.2) plus the HTTP API of the same node.
 *
 * `options`: `url` (ws[s]://…/ws) or `urls` (tried in turn on reconnect), `http` (the API's
 * base URL; default: derived from the WebSocket URL), `token` (a string, or a function
 * returning one or a promise of one, called before every connect and before expiry),
 * `refreshBeforeMs` (default 30 s, at most half the token's lifetime), `Client` (stompjs's
 * Client class; default `globalThis.StompJs.Client`), `stomp` (extra stompjs options), and the
 * callbacks `onConnect(frame)`, `onDisconnect(event)`, `onRefresh()` (a new token applied),
 * `onError(error)`.
 */
export class Lockstep {
  constructor(options) {
    const Client = options.Client || globalThis.StompJs?.Client;
    if (typeof Client !== 'function') {
      throw new Error('pass the @stomp/stompjs Client class as options.Client, or load its UMD bundle first');
    }
    this.options = options;
    this.urls = options.urls || [options.url];
    this.http = (options.http || Lockstep.httpOf(this.urls[0])).replace(/\/$/, '');
    this.subscriptions = new Set();
    this.locks = new Set();
    this.nextId = 1;
    this.attempt = 0;
    this.token = null;
    this.session = null;
    this.refreshTimer = null;
    /** Set by close(): no timer or reconnect starts after it. */
    this.closed = false;
    /** Refreshes sent, and applied (the server's RECEIPT came). */
    this.refreshes = 0;
    this.refreshed = 0;
    this.connectedWaiters = [];
    this.stomp = new Client({
      reconnectDelay: 500,
      heartbeatIncoming: 10000,
      heartbeatOutgoing: 10000,
      ...options.stomp,
      beforeConnect: async () => {
        this.stomp.brokerURL = this.urls[this.attempt % this.urls.length];
        this.attempt += 1;
        this.token = await this.providedToken();
        this.stomp.connectHeaders = { passcode: this.token };
      },
      onConnect: (frame) => this.onConnect(frame),
      onStompError: (frame) => this.onStompError(frame),
      onWebSocketClose: (event) => {
        this.session = null;
        clearTimeout(this.refreshTimer);
        if (typeof this.options.onDisconnect === 'function') this.options.onDisconnect(event);
      },
    });
  }

  /** The HTTP origin of a WebSocket URL (`wss://h/ws?x` → `https://h`). */
  static httpOf(url) {
    const u = new URL(url);
    u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
    return u.origin;
  }

  async freshToken() {
    const t = this.options.token;
    return typeof t === 'function' ? await t() : t;
  }

  /**
   * The token for a connect. stompjs schedules no reconnect when this rejects, so a provider
   * that fails (its backend is down) is retried here, with backoff, until it answers or the
   * client is closed.
   */
  async providedToken() {
    let delay = 250;
    for (;;) {
      try {
        return await this.freshToken();
      } catch (e) {
        this.report(new Error(`token provider failed: ${e && e.message ? e.message : e}; retrying in ${delay} ms`));
        if (this.closed) throw e;
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 10000);
      }
    }
  }

  report(error) {
    if (typeof this.options.onError === 'function') this.options.onError(error);
    else console.error('lockstep:', error);
  }

  /** Connects; resolves once the first CONNECTED arrived. */
  connect() {
    const ready = new Promise((resolve, reject) => this.connectedWaiters.push({ resolve, reject }));
    this.stomp.activate();
    return ready;
  }

  onConnect(frame) {
    this.session = frame.headers.session || null;
    for (const sub of this.subscriptions) sub.open(this.stomp);
    if (this.session) for (const lock of this.locks) lock.rebind(this.session);
    this.scheduleRefresh();
    const waiters = this.connectedWaiters.splice(0);
    for (const w of waiters) w.resolve(frame);
    if (typeof this.options.onConnect === 'function') this.options.onConnect(frame);
  }

  onStompError(frame) {
    const receipt = frame.headers['receipt-id'];
    const text = `${frame.headers.message || ''}: ${frame.body || ''}`;
    if (receipt && this.pendingRefresh && receipt === this.pendingRefresh.receipt) {
      // A refused refresh keeps the connection and its current token: try again later.
      this.pendingRefresh.reject(new Error(`token refused ${text}`));
      return;
    }
    const sub = receipt && [...this.subscriptions].find((s) => s.receipt === receipt);
    if (sub) {
      // A refused SUBSCRIBE: the server closes the connection; the reconnect goes on without it.
      sub.refused(text);
      return;
    }
    const error = new Error(`STOMP ERROR ${text}`);
    if (!this.stomp.connected && this.connectedWaiters.length) {
      // CONNECT refused (bad, expired or revoked token): connect() says so. stompjs keeps
      // trying; close() stops it.
      for (const w of this.connectedWaiters.splice(0)) w.reject(error);
    }
    this.report(error);
  }

  /** Sends a new token over the open socket before the current one expires. */
  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    if (this.closed || !this.stomp.connected || typeof this.options.token !== 'function') return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const lifetime = exp - Date.now();
    const before = Math.min(this.options.refreshBeforeMs ?? 30000, lifetime / 2);
    const due = lifetime - before;
    // setTimeout holds at most 2^31 - 1 ms (24.8 days); a longer wait is taken in steps.
    const MAX_WAIT = 2 ** 31 - 1;
    if (due > MAX_WAIT) {
      this.refreshTimer = setTimeout(() => this.scheduleRefresh(), MAX_WAIT);
      return;
    }
    this.refreshTimer = setTimeout(() => {
      this.refresh().catch((e) => {
        if (this.closed || !this.stomp.connected) return;
        this.report(e);
        // The current token still holds: try again in a while, well before it runs out.
        const left = (tokenExpiry(this.token) ?? Date.now()) - Date.now();
        clearTimeout(this.refreshTimer);
        if (left > 1000) this.refreshTimer = setTimeout(() => this.scheduleRefresh(), Math.min(left / 3, 5000));
      });
    }, Math.max(0, due));
  }

  /** Refreshes the token now; resolves once the server applied it (its RECEIPT). */
  async refresh() {
    if (!this.stomp.connected) throw new Error('not connected');
    const token = await this.freshToken();
    // The socket may have gone while the provider answered; the next connect uses a fresh one.
    if (this.closed || !this.stomp.connected) throw new Error('not connected');
    const receipt = `ls-token-${++this.refreshes}`;
    await new Promise((resolve, reject) => {
      this.pendingRefresh = { receipt, reject };
      this.stomp.watchForReceipt(receipt, () => resolve());
      this.stomp.publish({ destination: TOKEN_DESTINATION, headers: { passcode: token, receipt } });
    }).finally(() => {
      this.pendingRefresh = null;
    });
    this.token = token;
    this.refreshed += 1;
    this.scheduleRefresh();
    if (typeof this.options.onRefresh === 'function') this.options.onRefresh();
  }

  /**
   * Subscribes to `topic`; `handler(event, meta)` gets each event once, in order, across
   * reconnects. `options`: `from` ('next' | 'last' | 'snapshot', or a stored position
   * `{offset, epoch}` to resume a reloaded page), `onReset(position)` when missed events could
   * not be replayed, `onSubscribed(position)`, `onEnd({reason})` when the server ended it,
   * `presence: false` to opt out of presence events.
   */
  subscribe(topic, handler, options = {}) {
    const from = options.from;
    const stored = from && typeof from === 'object';
    const sub = new Subscription(this, topic, handler, stored ? { ...options, from: 'next' } : options);
    // A stored position resumes only when it has both halves (position() before the first
    // event has neither): otherwise the subscription starts from `next`.
    if (stored && Number.isInteger(from.offset) && from.offset >= 0 && typeof from.epoch === 'string' && from.epoch) {
      sub.offset = from.offset;
      sub.epoch = from.epoch;
    }
    this.subscriptions.add(sub);
    if (this.stomp.connected) sub.open(this.stomp);
    return sub;
  }

  /** Publishes over STOMP (needs the `publish` scope). */
  publish(topic, type, data, headers = {}) {
    this.stomp.publish({
      destination: topic,
      headers: { 'event-type': type, 'content-type': 'application/json', ...headers },
      body: JSON.stringify(data),
    });
  }

  /** Calls the HTTP API with the current token; resolves with the JSON answer. */
  async api(method, path, body) {
    const token = this.token ?? (await this.freshToken());
    const init = { method, headers: { authorization: `Bearer ${token}` } };
    if (body !== undefined) {
      init.headers['content-type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const answer = await fetch(`${this.http}${path}`, init);
    const text = await answer.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (_) {
      json = { message: text };
    }
    if (!answer.ok) {
      throw new LockstepError(answer.status, json?.error?.code ?? json?.code ?? 'error', json?.error?.message ?? json?.message ?? text, json);
    }
    return json;
  }

  /**
   * Acquires the edit lock of `item` in `team`, bound to this connection's session (released
   * by the server shortly after the socket closes), renewed before it expires until
   * `release()`. `options`: `ttlMs`, `onRenewed(lock)`, `onLost({reason})` when the grant is
   * over (expired, taken over). Rejects with a LockstepError `lock_held` (409) when someone else holds it.
   */
  async lock(team, item, options = {}) {
    if (!this.session) await this.connect();
    const body = { session: this.session };
    if (options.ttlMs) body.ttl_ms = options.ttlMs;
    const grant = await this.api('POST', `/api/v1/teams/${encodeURIComponent(team)}/items/${encodeURIComponent(item)}/lock`, body);
    const lock = new Lock(this, team, item, grant, options);
    if (this.closed) {
      // close() ran while this was in flight: do not leave a renewing lock behind.
      await lock.release().catch(() => {});
      throw new Error('closed');
    }
    this.locks.add(lock);
    return lock;
  }

  /** Who is present in a team or item topic: `{count, users:[{user, connections, since}]}`. */
  presence(topic) {
    return this.api('GET', `/api/v1/topics/${encodeURIComponent(topic)}/presence`);
  }

  /** Releases held locks and closes the connection. */
  async close() {
    this.closed = true;
    clearTimeout(this.refreshTimer);
    await Promise.allSettled([...this.locks].map((l) => l.release()));
    await this.stomp.deactivate();
  }
}
