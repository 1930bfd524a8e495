// The Lockstep console (DESIGN §16): one page on the public protocol and API only, through the
// client library (lockstep.js, clients/js, served beside this file). Everything the panels show
// comes from one subscription to the team topic with `x-stream-offset:snapshot` (every job's
// latest progress, every item's latest lock event, who is present), then live events, so a
// reload shows the same view without an HTTP call or a race.

import { Lockstep, tokenClaims } from '/console/lockstep.js';

const $ = (id) => document.getElementById(id);
const MAX_EVENTS = 300;
const STORE = 'lockstep-console';

const state = {
  ls: null,
  user: null,
  team: null,
  jobs: new Map(), // job id → {done, total, stage}
  locks: new Map(), // item → lock.acquired data
  ended: new Map(), // item → the highest token whose end the stream showed
  teamPresence: new Map(), // user → true
  itemPresence: new Map(),
  item: null,
  itemSub: null,
  events: [],
  lastDeliveries: null,
};

function setStatus(text) {
  $('status').textContent = text;
}

// --- Rendering -------------------------------------------------------------------------------

function renderJobs() {
  const list = $('job-list');
  list.replaceChildren();
  for (const [id, job] of [...state.jobs].sort(([a], [b]) => a.localeCompare(b))) {
    const li = document.createElement('li');
    li.className = 'job';
    li.dataset.job = id;
    const total = Number(job.total) > 0 ? Number(job.total) : 100;
    const done = Math.min(Number(job.done) || 0, total);
    const pct = Math.round((done / total) * 100);
    const label = document.createElement('label');
    label.id = `job-label-${id}`;
    label.textContent = `${id}${job.stage ? ` (${job.stage})` : ''}: ${done}/${total} (${pct}%)${job.state ? ` ${job.state}` : ''}`;
    const bar = document.createElement('progress');
    bar.max = total;
    bar.value = done;
    bar.setAttribute('aria-labelledby', label.id);
    bar.dataset.percent = String(pct);
    li.append(label, bar);
    list.append(li);
  }
  $('jobs-empty').hidden = state.jobs.size > 0;
}

function timeLeft(lock) {
  const ms = Date.parse(lock.expires_at) - Date.now();
  return ms > 0 ? `${Math.ceil(ms / 1000)} s` : 'expired';
}

function renderLocks() {
  const rows = $('lock-rows');
  rows.replaceChildren();
  $('locks-empty').hidden = state.locks.size > 0;
  for (const [item, lock] of [...state.locks].sort(([a], [b]) => a.localeCompare(b))) {
    const tr = document.createElement('tr');
    tr.dataset.item = item;
    for (const [cls, text] of [['item', item], ['holder', lock.holder], ['left', timeLeft(lock)], ['token', String(lock.token)]]) {
      const td = document.createElement('td');
      td.className = cls;
      td.textContent = text;
      tr.append(td);
    }
    rows.append(tr);
  }
}

function renderPeople(list, people) {
  list.replaceChildren();
  for (const user of [...people.keys()].sort()) {
    const li = document.createElement('li');
    li.textContent = user;
    li.dataset.user = user;
    list.append(li);
  }
}

function renderEvents() {
  const filter = $('filter').value.trim();
  const log = $('event-log');
  log.replaceChildren();
  for (const e of state.events) {
    if (filter && !e.type.includes(filter)) continue;
    const li = document.createElement('li');
    li.textContent = `${e.ts} ${e.topic} ${e.type} ${JSON.stringify(e.data)}`;
    log.append(li);
  }
}

// --- Events ----------------------------------------------------------------------------------

function apply(event, people) {
  const d = event.data || {};
  switch (event.type) {
    case 'job.progress':
    case 'job.completed':
    case 'job.failed':
      if (d.job_id !== undefined) {
        const job = state.jobs.get(String(d.job_id)) || {};
        if (event.type === 'job.progress') Object.assign(job, { done: d.done, total: d.total, stage: d.stage });
        else job.state = event.type === 'job.completed' ? 'completed' : 'failed';
        if (event.type === 'job.completed' && job.total) job.done = job.total;
        state.jobs.set(String(d.job_id), job);
        renderJobs();
      }
      break;
    case 'lock.acquired':
      state.locks.set(d.item, d);
      renderLocks();
      break;
    case 'lock.released':
    case 'lock.expired':
    case 'lock.taken_over':
      // Only the grant it ends: a newer grant of the item has a higher token.
      if (state.locks.get(d.item)?.token === d.token) state.locks.delete(d.item);
      state.ended.set(d.item, Math.max(state.ended.get(d.item) ?? 0, d.token));
      renderLocks();
      break;
    case 'presence.joined':
      people.set(d.user, true);
      break;
    case 'presence.left':
      people.delete(d.user);
      break;
    default:
  }
}

function record(event) {
  state.events.push(event);
  if (state.events.length > MAX_EVENTS) state.events.shift();
  renderEvents();
}

// --- Connecting ------------------------------------------------------------------------------

async function connect(token, team) {
  await disconnect();
  state.user = tokenClaims(token).sub || '?';
  state.team = team;
  state.jobs.clear();
  state.locks.clear();
  state.ended.clear();
  state.teamPresence.clear();
  state.itemPresence.clear();
  state.events = [];
  renderJobs();
  renderLocks();
  renderPeople($('team-presence'), state.teamPresence);
  renderPeople($('item-presence'), state.itemPresence);
  renderEvents();
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ls = new Lockstep({
    url: `${scheme}://${location.host}/ws`,
    http: location.origin,
    token,
    onConnect: () => setStatus(`Connected as ${state.user}, team ${team}`),
    onDisconnect: () => setStatus('Disconnected; reconnecting…'),
    onError: (e) => setStatus(`Error: ${e.message}`),
  });
  state.ls = ls;
  setStatus('Connecting…');
  await ls.connect();
  sessionStorage.setItem(STORE, JSON.stringify({ token, team, item: state.item }));
  $('disconnect').disabled = false;
  $('pub-topic').value ||= `/team/${team}`;
  const onReset = () => {
    // Missed events are gone: start over from a fresh snapshot.
    connect(token, team).catch((e) => setStatus(`Error: ${e.message}`));
  };
  ls.subscribe(`/team/${team}`, (event) => {
    apply(event, state.teamPresence);
    renderPeople($('team-presence'), state.teamPresence);
    record(event);
  }, {
    from: 'snapshot',
    onReset,
    onEnd: ({ reason, message }) => setStatus(`Team ${team} closed by the server (${reason}${message ? `: ${message}` : ''})`),
  });
  if (state.item) openItem(state.item);
  // The snapshot forgets keys idle for history.key_idle (1 h): seed the long-present users and
  // long-held locks from the API too.
  ls.presence(`/team/${team}`).then((p) => {
    for (const u of p.users || []) state.teamPresence.set(u.user, true);
    renderPeople($('team-presence'), state.teamPresence);
  }).catch(() => {});
  pollLocks();
}

// Ids as the server takes them (protocol/src/topic.rs).
const ID = /^[A-Za-z0-9_.:-]{1,128}$/;

function openItem(item) {
  if (!state.ls) return;
  if (!ID.test(item) || item === '.' || item === '..') {
    setStatus(`Not an item id: ${item} (letters, digits, _ . : -)`);
    return;
  }
  if (state.itemSub) state.itemSub.unsubscribe();
  state.item = item;
  state.itemPresence.clear();
  renderPeople($('item-presence'), state.itemPresence);
  $('item-title').textContent = `Item ${item}`;
  const topic = `/team/${state.team}/items/${item}`;
  state.itemSub = state.ls.subscribe(topic, (event) => {
    apply(event, state.itemPresence);
    renderPeople($('item-presence'), state.itemPresence);
    record(event);
  }, {
    from: 'snapshot',
    // Missed events are gone: start the item over from a fresh snapshot.
    onReset: () => openItem(item),
    onEnd: ({ reason, message }) => setStatus(`Item ${item} closed by the server (${reason}${message ? `: ${message}` : ''})`),
  });
  const saved = JSON.parse(sessionStorage.getItem(STORE) || '{}');
  sessionStorage.setItem(STORE, JSON.stringify({ ...saved, item }));
}

async function disconnect() {
  if (state.ls) {
    const ls = state.ls;
    state.ls = null;
    state.itemSub = null;
    await ls.close().catch(() => {});
  }
  $('disconnect').disabled = true;
  setStatus('Not connected');
}

// Renewals publish no event: the list's expiry times keep "time left" true. Holder and token
// stay the stream's (the list cannot overtake a newer grant: only a matching token is updated).
async function pollLocks() {
  if (!state.ls || !state.team) return;
  try {
    const list = await state.ls.api('GET', `/api/v1/teams/${encodeURIComponent(state.team)}/locks`);
    for (const lock of list.locks || []) {
      const shown = state.locks.get(lock.item);
      if (shown && shown.token === lock.token) shown.expires_at = lock.expires_at;
      // A grant older than the snapshot's memory (held for over an hour), or one the stream
      // has not shown yet; an ended grant (a lower token than shown) is never added back.
      else if ((!shown || shown.token < lock.token) && lock.token > (state.ended.get(lock.item) ?? 0)) {
        state.locks.set(lock.item, lock);
      }
    }
    renderLocks();
  } catch (_) {
    // The next poll tries again; the stream still drives the table.
  }
}

// --- Node status -----------------------------------------------------------------------------

function metric(text, name) {
  let sum = null;
  for (const line of text.split('\n')) {
    if (line.startsWith(name) && (line[name.length] === ' ' || line[name.length] === '{')) {
      sum = (sum ?? 0) + Number(line.slice(line.lastIndexOf(' ') + 1));
    }
  }
  return sum;
}

async function pollNode() {
  try {
    const text = await (await fetch('/metrics')).text();
    const now = Date.now();
    const deliveries = metric(text, 'lockstep_deliveries_total');
    $('node-connections').textContent = String(metric(text, 'lockstep_ws_connections') ?? 0);
    $('node-topics').textContent = String(metric(text, 'lockstep_topics') ?? 0);
    if (state.lastDeliveries && deliveries !== null) {
      const rate = ((deliveries - state.lastDeliveries.value) * 1000) / (now - state.lastDeliveries.at);
      $('node-deliveries').textContent = rate.toFixed(1);
    }
    if (deliveries !== null) state.lastDeliveries = { value: deliveries, at: now };
  } catch (_) {
    $('node-connections').textContent = 'unreachable';
  }
}

// --- Wiring ----------------------------------------------------------------------------------

async function start() {
  const config = await (await fetch('/console/config.json')).json();
  $('dev-token').hidden = !config.dev_token;
  $('connect-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('token').value.trim();
    if (!token) {
      setStatus('Paste a token first');
      return;
    }
    connect(token, $('team').value.trim()).catch((err) => setStatus(`Error: ${err.message}`));
  });
  $('dev-token').addEventListener('click', async () => {
    const team = $('team').value.trim();
    const answer = await fetch('/console/dev-token', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ team }),
    });
    if (!answer.ok) {
      setStatus(`No development token: ${answer.status}`);
      return;
    }
    const { token } = await answer.json();
    $('token').value = token;
    connect(token, team).catch((err) => setStatus(`Error: ${err.message}`));
  });
  $('disconnect').addEventListener('click', () => disconnect());
  $('item-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const item = $('item').value.trim();
    if (item) openItem(item);
  });
  $('filter').addEventListener('input', renderEvents);
  $('publish-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const result = $('publish-result');
    if (!state.ls) {
      result.textContent = 'Connect first';
      return;
    }
    let data;
    try {
      data = JSON.parse($('pub-data').value);
    } catch (err) {
      result.textContent = `Data is not JSON: ${err.message}`;
      return;
    }
    try {
      const answer = await state.ls.api('POST', '/api/v1/publish', { topic: $('pub-topic').value.trim(), type: $('pub-type').value.trim(), data });
      result.textContent = `Published at offset ${answer.offset}`;
    } catch (err) {
      result.textContent = `Refused: ${err.message}`;
    }
  });
  setInterval(renderLocks, 1000);
  setInterval(pollLocks, 5000);
  setInterval(pollNode, 2000);
  pollNode();
  const saved = JSON.parse(sessionStorage.getItem(STORE) || 'null');
  if (saved?.token) {
    $('token').value = saved.token;
    $('team').value = saved.team;
    state.item = saved.item || null;
    if (state.item) $('item').value = state.item;
    connect(saved.token, saved.team).catch((err) => setStatus(`Error: ${err.message}`));
  }
  document.body.dataset.ready = 'true';
}

start().catch((e) => setStatus(`Error: ${e.message}`));
