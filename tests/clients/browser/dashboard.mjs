#!/usr/bin/env node
// A dashboard opened in the middle of a run (DESIGN §13: keys and `x-stream-offset:snapshot`),
// with the real @stomp/stompjs inside headless Chromium.
//
//   node browser/dashboard.mjs '{"http":"http://127.0.0.1:PORT","ws":"ws://127.0.0.1:PORT/ws",
//     "user":"ana","team":"t1","tokens":{"subscriber":"…","publisher":"…","holder-ivan":"…",
//     "holder-mei":"…","holder-olu":"…"},"heartbeat_ms":500,"page_port":NNNN}'
//
// `subscriber` is `user`'s token (a member of `team`, no scope); `publisher` has scope `publish`
// for `team`; every `holder-<name>` key is the token of user <name>, a member of `team` with scope
// `locks` (at least two). `page_port` is an allowed origin of Lockstep, as for browser/run.mjs.
// The team topic must be fresh (nothing published to it yet): the run knows every event on it.
//
// This process is the platform's backend, with two workers running at the same time. The job
// worker publishes `job.progress` for 10 jobs over `POST /api/v1/publish/batch` (a batch of two
// jobs every 10 ms, so each running job moves every 50 ms: about 200 events/s; one job completes
// early, `job.completed`; every 50th batch adds an unkeyed `task.assigned` and a `dataset.stats`
// with the explicit key `dataset:d1`). The lock worker locks 30 items through the lock API
// (`POST /api/v1/teams/{t}/items/{i}/lock`, ttl 5 min, no session), held by the holder users in
// turn, then until the live phase takes and releases a 31st item over and over (so lock events
// also go out while the page takes its snapshots). Every offset of the team topic is accounted
// for: a batch's answer gives its events' {id, offset, epoch}; the one event of each lock request
// is found in the HTTP history (`GET /api/v1/topics/{topic}/events?after=` the top known when
// the request was sent) by its type, item, holder and token. The backend fails the run on any
// answer that does not fit (status, one epoch, a publisher's offsets increasing, an offset
// answered twice, exactly one lock event per request, and at the end every offset from 1 to the
// top accounted for, `GET /teams/{t}/locks` listing exactly the backend's locks at that top).
//
// The page (browser/page.html running ../shared/dashboard_scenario.mjs, served as /scenario.mjs)
// talks to this backend over a small CORS HTTP server on 127.0.0.1 (the `backend` URL, added to
// the page's config): `GET /ready` answers once the 30 locks are held and 2 s of batches went out;
// `POST /live` starts the live phase (3 s more of batches, one job completing, 6 locks released
// and 3 of them taken by another holder, then stop); `GET /final` answers, once stopped and checked
// against `GET /teams/{t}/locks` and the topic's position, with the full record (every offset's
// event) and the backend's own final state (each job's last event, each item's holder);
// `POST /observed` carries the page's `observed {json}` line, printed here (stdout on success,
// stderr with a failure). The page checks everything against the record (see the scenario).
//
// Exit 0 after `observed {…}` and `OK {summary}` on stdout; exit 1 with `FAIL [chromium] …` (the
// page's verdict, which includes a backend failure as `backend: …`) or `FAIL [backend] …`.

import http from 'node:http';
import { makeRedactor, WAIT_MS } from '../shared/common.mjs';
import { runPage, stompjsPage } from '../shared/browser_harness.mjs';
import { configArg } from '../shared/node_harness.mjs';

const SCRIPT = 'browser/dashboard.mjs';
const JOBS = 10;
const ITEMS = 30;
const SLOT_MS = 10; // one batch of job events per slot
const JOBS_PER_SLOT = 2; // so each running job moves every JOBS / JOBS_PER_SLOT slots (50 ms)
const WARMUP_SLOTS = 200; // at least this many batches before /ready answers
const EVERY = 50; // slots between two task.assigned / dataset.stats events
const LOCK_GAP_MS = 50; // between two lock requests in the warm-up
const CHURN_GAP_MS = 40; // between two lock requests on the extra item before the live phase
const LIVE_LOCK_GAP_MS = 250; // between two lock requests in the live phase
const LIVE_MS = 3_000; // the job loop's live phase (the lock loop finishes within it)
const EARLY_JOB = 2; // completes in the warm-up (total 30)
const LIVE_JOB = 7; // completes 20 steps into the live phase
const RELEASES = [0, 5, 10, 15, 20, 25]; // items released in the live phase
const RETAKEN = [0, 5, 10]; // then taken again by the next holder
const TTL_MS = 300_000; // no lock may expire during the run
const READY_BY_MS = 60_000; // the page must ask for /live within this after /ready
const LONG_POLL_MS = WAIT_MS - 2_000; // a long poll answers before the page's wait gives up

class BackendFailure extends Error {}

const show = (v) => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 600 ? `${s.slice(0, 600)}…` : s;
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const jobId = (j) => `import-${String(j + 1).padStart(2, '0')}`;
const itemId = (i) => `item-${String(i + 1).padStart(3, '0')}`;

// Two workers, as in a real platform backend: the job loop publishes progress batches, the lock
// loop takes and releases locks, at the same time. Every offset of the team topic is accounted
// for: a batch's answer names its events' offsets; a lock request's event is found in the HTTP
// history (after the top known when the request was sent) by its type, item, holder and token.
// At the end the record must hold every offset from 1 to the top, each exactly once.
class Backend {
  constructor(cfg) {
    this.cfg = cfg;
    this.team = cfg.team;
    this.topic = `/team/${cfg.team}`;
    this.topicPath = `/api/v1/topics/${encodeURIComponent(this.topic)}`;
    this.holders = Object.keys(cfg.tokens)
      .filter((k) => k.startsWith('holder-'))
      .map((k) => k.slice('holder-'.length))
      .sort();
    this.phase = 'warmup'; // warmup → ready → live → done | failed
    this.error = null;
    this.listeners = new Set();
    this.started = Date.now();
    this.epoch = null;
    this.byOffset = new Map(); // offset → {offset, id, type, key, data, source, phase, at_ms}
    this.top = 0; // the highest offset recorded
    this.jobs = Array.from({ length: JOBS }, (_, j) => ({ job_id: jobId(j), done: 0, total: j === EARLY_JOB ? 30 : 100_000, type: null }));
    this.locks = new Map(); // item → {holder, token} while held; null once released
    this.locksReady = false;
    this.lockOps = 0;
    this.marks = {};
  }

  since() {
    return Date.now() - this.started;
  }

  changed() {
    for (const f of [...this.listeners]) f();
  }

  fail(message) {
    if (this.error) return;
    this.error = message;
    this.phase = 'failed';
    process.stderr.write(`[backend] ${message}\n`);
    this.changed();
  }

  // Resolves when `phase` is reached (or passed), rejects on a failure or after `ms`.
  reached(phase, ms) {
    const order = ['warmup', 'ready', 'live', 'done'];
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.error) {
          cleanup();
          reject(new BackendFailure(this.error));
        } else if (order.indexOf(this.phase) >= order.indexOf(phase)) {
          cleanup();
          resolve();
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new BackendFailure(`still in phase ${this.phase} after ${ms} ms waiting for ${phase} (top offset ${this.top})`));
      }, ms);
      const cleanup = () => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      this.listeners.add(check);
      check();
    });
  }

  async api(method, path, token, body, expectStatus) {
    const url = `${this.cfg.http}${path}`;
    const what = `${method} ${path}${body === undefined ? '' : ` ${show(body)}`}`;
    let res;
    let text;
    try {
      res = await fetch(url, {
        method,
        headers: { authorization: `Bearer ${token}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(WAIT_MS),
      });
      text = await res.text();
    } catch (e) {
      throw new BackendFailure(`${what} failed before an answer: ${e && e.message ? e.message : e}`);
    }
    if (res.status !== expectStatus) throw new BackendFailure(`${what} answered ${res.status}, expected ${expectStatus}: ${text.slice(0, 600)}`);
    if (text === '') return null;
    try {
      return JSON.parse(text);
    } catch (_) {
      throw new BackendFailure(`${what} answered ${res.status} with a body that is not JSON: ${text.slice(0, 300)}`);
    }
  }

  checkEpoch(epoch, what) {
    if (this.epoch === null) this.epoch = epoch;
    if (epoch !== this.epoch) throw new BackendFailure(`${what} is in epoch ${show(epoch)}, the run started in ${this.epoch} (the topic's epoch changed mid-run)`);
  }

  record(entry) {
    const prev = this.byOffset.get(entry.offset);
    if (prev) throw new BackendFailure(`offset ${entry.offset} answered twice: ${show(prev)} and ${show(entry)}`);
    this.byOffset.set(entry.offset, { ...entry, phase: this.phase, at_ms: this.since() });
    this.top = Math.max(this.top, entry.offset);
  }

  // One batch: the progress of the next running jobs (+ the periodic unkeyed and explicitly
  // keyed events).
  async batch(slot) {
    const events = [];
    const meta = [];
    const running = this.jobs.filter((j) => j.type !== 'job.completed');
    for (let k = 0; k < JOBS_PER_SLOT && k < running.length; k++) {
      const job = this.jobs[(slot * JOBS_PER_SLOT + k) % JOBS];
      if (job.type === 'job.completed') continue;
      job.done += 1;
      const type = job.done >= job.total ? 'job.completed' : 'job.progress';
      job.type = type;
      const data = { job_id: job.job_id, done: job.done, total: job.total };
      events.push({ topic: this.topic, type, data });
      meta.push({ type, key: `job:${job.job_id}`, data });
    }
    if (slot % EVERY === 0) {
      const task = { task: `task-${slot}`, to: this.cfg.user };
      events.push({ topic: this.topic, type: 'task.assigned', data: task });
      meta.push({ type: 'task.assigned', key: null, data: task });
      const stats = { dataset: 'd1', batches: slot + 1 };
      events.push({ topic: this.topic, type: 'dataset.stats', data: stats, key: 'dataset:d1' });
      meta.push({ type: 'dataset.stats', key: 'dataset:d1', data: stats });
    }
    if (!events.length) return;
    const answer = await this.api('POST', '/api/v1/publish/batch', this.cfg.tokens.publisher, { events }, 202);
    const got = answer && Array.isArray(answer.events) ? answer.events : null;
    if (!got || got.length !== events.length || !Array.isArray(answer.ids) || answer.ids.length !== events.length) {
      throw new BackendFailure(`POST /api/v1/publish/batch of ${events.length} events answered ${show(answer)}: expected {ids, events} with ${events.length} each`);
    }
    got.forEach((p, i) => {
      if (!p || typeof p.id !== 'string' || p.id !== answer.ids[i] || !Number.isSafeInteger(p.offset) || p.offset < 1 || typeof p.epoch !== 'string') {
        throw new BackendFailure(`publish/batch answer events[${i}] ${show(p)} is not {id (= ids[${i}]), offset, epoch}`);
      }
      this.checkEpoch(p.epoch, `publish/batch answer events[${i}] ${show(p)}`);
      // One publisher's events reach the topic in the order published.
      if (p.offset <= this.lastJobOffset) throw new BackendFailure(`publish/batch events[${i}] got offset ${p.offset}, after ${this.lastJobOffset} for an earlier event of this publisher`);
      this.lastJobOffset = p.offset;
      this.record({ offset: p.offset, id: p.id, ...meta[i], source: 'publish' });
    });
  }

  // The lock event a lock request caused: found in history after `after` (the top known when
  // the request was sent) by type, item, holder and token; checked and recorded.
  async lockEvent(after, type, item, holder, token) {
    const what = `${type} ${item} by ${holder} (token ${token})`;
    const found = [];
    let from = after;
    for (let page = 0; page < 20; page++) {
      const path = `${this.topicPath}/events?after=${from}&epoch=${encodeURIComponent(this.epoch)}&limit=1000`;
      const h = await this.api('GET', path, this.cfg.tokens.publisher, undefined, 200);
      if (!h || h.recovered !== true || !Array.isArray(h.events)) throw new BackendFailure(`looking for the event of ${what}: GET ${path} answered ${show(h)}`);
      for (const ev of h.events) {
        const env = ev.event || {};
        const d = env.data || {};
        if (env.type === type && d.item === item && d.token === token) found.push(ev);
        from = ev.offset;
      }
      if (!h.more) break;
    }
    if (found.length !== 1) throw new BackendFailure(`${what}: expected exactly one such event after offset ${after}, history holds ${found.length}: ${show(found)}`);
    const { offset, event: env } = found[0];
    const d = env.data;
    if (d.holder !== holder || d.team !== this.team || env.topic !== this.topic) throw new BackendFailure(`${what}: the event at offset ${offset} is ${show(env)}`);
    this.record({ offset, id: env.id, type, key: `lock:${item}`, data: d, source: 'lock api' });
    this.lockOps += 1;
  }

  async acquire(i, holder) {
    const item = itemId(i);
    const path = `/api/v1/teams/${encodeURIComponent(this.team)}/items/${encodeURIComponent(item)}/lock`;
    const after = this.top;
    const lock = await this.api('POST', path, this.cfg.tokens[`holder-${holder}`], { ttl_ms: TTL_MS }, 200);
    if (!lock || lock.item !== item || lock.holder !== holder || !Number.isSafeInteger(lock.token)) {
      throw new BackendFailure(`POST ${path} by ${holder} answered ${show(lock)}`);
    }
    this.locks.set(item, { holder, token: lock.token });
    await this.lockEvent(after, 'lock.acquired', item, holder, lock.token);
  }

  async release(i) {
    const item = itemId(i);
    const held = this.locks.get(item);
    const path = `/api/v1/teams/${encodeURIComponent(this.team)}/items/${encodeURIComponent(item)}/lock`;
    const after = this.top;
    await this.api('DELETE', path, this.cfg.tokens[`holder-${held.holder}`], { token: held.token }, 204);
    this.locks.set(item, null);
    await this.lockEvent(after, 'lock.released', item, held.holder, held.token);
  }

  holderOf(i, turn = 0) {
    return this.holders[(i + turn) % this.holders.length];
  }

  async jobLoop() {
    let slot = 0;
    let liveSlot = 0;
    let readyAt = 0;
    const t0 = Date.now();
    for (;;) {
      if (this.error) return;
      await this.batch(slot);
      if (this.phase === 'warmup' && slot + 1 >= WARMUP_SLOTS && this.locksReady) {
        this.phase = 'ready';
        readyAt = Date.now();
        this.marks.ready = { offset: this.top, slot, at_ms: this.since() };
        this.changed();
      } else if (this.phase === 'ready' && Date.now() - readyAt > READY_BY_MS) {
        throw new BackendFailure(`the page did not ask for /live within ${READY_BY_MS} ms of /ready`);
      } else if (this.phase === 'live') {
        liveSlot += 1;
        if (liveSlot === 1) {
          const job = this.jobs[LIVE_JOB];
          job.total = job.done + 20;
        }
        if (liveSlot * SLOT_MS >= LIVE_MS) break;
      }
      slot += 1;
      const wait = t0 + slot * SLOT_MS - Date.now();
      if (wait > 0) await sleep(wait);
    }
    this.marks.jobs_stopped = { slot, at_ms: this.since() };
  }

  async lockLoop() {
    // The job loop's first answer gives the epoch the history is read in.
    while (this.epoch === null) {
      if (this.error) return;
      if (this.since() > WAIT_MS) throw new BackendFailure('no publish answered within the first seconds');
      await sleep(5);
    }
    for (let i = 0; i < ITEMS; i++) {
      if (this.error) return;
      await this.acquire(i, this.holderOf(i));
      await sleep(LOCK_GAP_MS);
    }
    this.locksReady = true;
    // Until the live phase (so also while the page takes its snapshots): one more item taken and
    // released over and over, by each holder in turn, so lock events go out around them too.
    for (let turn = 0; this.phase !== 'live'; turn++) {
      if (this.error) return;
      await this.acquire(ITEMS, this.holderOf(turn));
      await sleep(CHURN_GAP_MS);
      await this.release(ITEMS);
      await sleep(CHURN_GAP_MS);
    }
    for (const i of RELEASES) {
      await sleep(LIVE_LOCK_GAP_MS);
      await this.release(i);
    }
    for (const i of RETAKEN) {
      await sleep(LIVE_LOCK_GAP_MS);
      await this.acquire(i, this.holderOf(i, 1));
    }
  }

  async run() {
    const position = await this.api('GET', `${this.topicPath}/position`, this.cfg.tokens.publisher, undefined, 200);
    if (!position || position.offset !== 0) {
      throw new BackendFailure(`the team topic ${this.topic} must be fresh (offset 0), it stands at ${show(position)}: this run must know every event on it`);
    }
    this.lastJobOffset = 0;
    const failed = (e) => {
      this.fail(e instanceof BackendFailure ? e.message : `backend crashed: ${e && e.stack ? e.stack : e}`);
      throw e;
    };
    await Promise.all([this.jobLoop().catch(failed), this.lockLoop().catch(failed)]);
    await this.finish();
  }

  // Stopped: every offset accounted for, and the node's view agrees with the backend's own.
  async finish() {
    const holes = [];
    for (let o = 1; o <= this.top; o++) if (!this.byOffset.has(o)) holes.push(o);
    if (holes.length) {
      const h = await this.api('GET', `${this.topicPath}/events?after=${holes[0] - 1}&limit=3`, this.cfg.tokens.publisher, undefined, 200).catch((e) => e.message);
      throw new BackendFailure(`offsets ${show(holes.slice(0, 20))} of the team topic were not caused by this backend (history from ${holes[0]}: ${show(h)})`);
    }
    const holderToken = this.cfg.tokens[`holder-${this.holders[0]}`];
    const listed = await this.api('GET', `/api/v1/teams/${encodeURIComponent(this.team)}/locks`, holderToken, undefined, 200);
    const mine = [...this.locks].filter(([, l]) => l).map(([item, l]) => `${item}=${l.holder}#${l.token}`).sort();
    const theirs = (listed && Array.isArray(listed.locks) ? listed.locks : []).map((l) => `${l.item}=${l.holder}#${l.token}`).sort();
    if (mine.join(',') !== theirs.join(',')) {
      throw new BackendFailure(`GET /teams/${this.team}/locks lists [${theirs.join(', ')}], the backend holds [${mine.join(', ')}]`);
    }
    if (!listed.position || listed.position.offset !== this.top || listed.position.epoch !== this.epoch) {
      throw new BackendFailure(`GET /teams/${this.team}/locks gives the team topic's position ${show(listed.position)}, the backend's top offset is ${this.top} in ${this.epoch}`);
    }
    this.marks.done = { offset: this.top, at_ms: this.since() };
    this.phase = 'done';
    this.changed();
  }

  final() {
    const jobs = {};
    for (const j of this.jobs) jobs[j.job_id] = { type: j.type, done: j.done, total: j.total };
    const locks = {};
    for (const [item, l] of this.locks) locks[item] = l ? l.holder : null;
    return {
      topic: this.topic,
      epoch: this.epoch,
      final_offset: this.top,
      entries: [...this.byOffset.values()].sort((a, b) => a.offset - b.offset),
      jobs,
      locks,
      marks: this.marks,
      lock_ops: this.lockOps,
      holders: this.holders,
    };
  }
}

// The page's side door to the backend: JSON over HTTP, CORS for the page's origin only.
function startControl(backend, origin) {
  const server = http.createServer((req, res) => {
    const cors = {
      'access-control-allow-origin': origin,
      'access-control-allow-methods': 'GET, POST',
      'access-control-allow-headers': 'content-type',
      vary: 'origin',
    };
    const send = (status, obj) => {
      res.writeHead(status, { ...cors, 'content-type': 'application/json', 'cache-control': 'no-store' }).end(JSON.stringify(obj));
    };
    if (req.method === 'OPTIONS') {
      res.writeHead(204, cors).end();
      return;
    }
    if (req.headers.origin !== undefined && req.headers.origin !== origin) {
      send(403, { error: `origin ${req.headers.origin} is not the page's` });
      return;
    }
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      const route = `${req.method} ${new URL(req.url, 'http://x').pathname}`;
      const failed = (e) => send(200, { error: e instanceof BackendFailure ? e.message : `backend: ${e && e.stack ? e.stack : e}` });
      try {
        if (route === 'GET /ready') {
          await backend.reached('ready', LONG_POLL_MS);
          send(200, { ok: true, ...backend.marks.ready, epoch: backend.epoch, now_offset: backend.top });
        } else if (route === 'POST /live') {
          if (backend.error) throw new BackendFailure(backend.error);
          if (backend.phase !== 'ready') throw new BackendFailure(`POST /live in phase ${backend.phase}`);
          backend.phase = 'live';
          backend.marks.live = { offset: backend.top, at_ms: backend.since() };
          backend.changed();
          send(200, { ok: true, ...backend.marks.live });
        } else if (route === 'GET /final') {
          await backend.reached('done', LONG_POLL_MS);
          send(200, { ok: true, record: backend.final() });
        } else if (route === 'POST /observed') {
          const { ok, observed } = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          (ok ? process.stdout : process.stderr).write(`observed ${JSON.stringify(observed)}\n`);
          send(200, { ok: true });
        } else {
          send(404, { error: `no route ${route}` });
        }
      } catch (e) {
        failed(e);
      }
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

async function start() {
  const cfg = configArg(SCRIPT, 'FAIL [chromium]');
  if (cfg === undefined) process.exit(1);
  const bad = (m) => {
    process.stderr.write(`FAIL [backend] config: ${m}\n`);
    process.exit(1);
  };
  for (const k of ['http', 'ws', 'user', 'team']) if (typeof cfg[k] !== 'string' || cfg[k] === '') bad(`"${k}" must be a non-empty string`);
  for (const k of ['subscriber', 'publisher']) if (!cfg.tokens || typeof cfg.tokens[k] !== 'string' || cfg.tokens[k] === '') bad(`tokens.${k} missing`);
  const backend = new Backend(cfg);
  if (backend.holders.length < 2) bad('at least two tokens.holder-<user> (members of the team with scope locks) are needed');
  if (!Number.isInteger(cfg.page_port)) bad('page_port must be a TCP port number');

  const server = await startControl(backend, `http://127.0.0.1:${cfg.page_port}`);
  server.unref();
  // The page gets its config from the harness, which reads it from the argument: add the
  // backend's address there.
  process.argv[2] = JSON.stringify({ ...cfg, backend: `http://127.0.0.1:${server.address().port}` });

  backend.run().catch((e) => backend.fail(e instanceof BackendFailure ? e.message : `backend crashed: ${e && e.stack ? e.stack : e}`));

  const { routes, stompjs } = stompjsPage('dashboard_scenario.mjs');
  runPage({
    script: SCRIPT,
    configFail: 'FAIL [chromium]',
    redactor: (c) => makeRedactor(c.tokens),
    routes,
    // ready (≤ warm-up + browser start) + subscribe + live phase + the checks: each wait in the
    // page is bounded by WAIT_MS; this bounds the page as a whole.
    budgetMs: () => 6 * WAIT_MS,
    traceName: 'stompjs trace in the page',
    extra: { stompjs },
  });
}

start().catch((e) => {
  process.stderr.write(`FAIL [backend] ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
